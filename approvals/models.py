"""Approval policies (versioned), the requests they raise, and people's decisions."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import models

from approvals import conditions


class Reason(models.TextChoices):
    SENSITIVE_ACTION = "sensitive_action", "sensitive action"
    BUDGET_EXHAUSTED = "budget_exhausted", "budget exhausted"
    STEP_BUDGET_EXHAUSTED = "step_budget_exhausted", "step budget exhausted"
    QUOTA_EXHAUSTED = "quota_exhausted", "quota exhausted"
    LOW_CONFIDENCE = "low_confidence", "low confidence"
    QC_MISMATCH = "qc_mismatch", "QC mismatch"
    UNKNOWN_OUTCOME = "unknown_outcome", "unknown outcome of a non-idempotent call"
    AGENT_RETIRED = "agent_retired", "agent retired"
    POISON_TASK = "poison_task", "task kept losing its worker"
    CONFIGURATION_ERROR = "configuration_error", "configuration error"
    PLAN_REVIEW = "plan_review", "plan review"
    PLAN_INVALID = "plan_invalid", "no valid plan"
    HUMAN_TASK = "human_task", "task for a person"
    QUESTION = "question", "an agent's question"


# Requests a reviewer may answer by raising the budget: only a spent budget is helped by more.
BUDGET_REASONS = (Reason.BUDGET_EXHAUSTED, Reason.STEP_BUDGET_EXHAUSTED)

class Policy(models.Model):
    slug = models.SlugField(unique=True)
    name = models.CharField(max_length=200)
    current_version = models.ForeignKey("PolicyVersion", null=True, blank=True,
                                        on_delete=models.PROTECT, related_name="+")

    class Meta:
        verbose_name_plural = "policies"

    def __str__(self) -> str:
        return self.slug


class PolicyVersion(models.Model):
    """Immutable. Matches a tool call by tool, risk class and argument conditions."""

    class OnExpiry(models.TextChoices):
        REJECT = "reject"
        ESCALATE = "escalate", "escalate to the second tier"

    policy = models.ForeignKey(Policy, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    tool = models.CharField(max_length=100, blank=True, help_text="tool slug; blank = any")
    risk_class = models.CharField(max_length=20, blank=True, help_text="blank = any")
    conditions = models.JSONField(default=list, blank=True,
                                  help_text='e.g. [{"arg": "amount", "op": ">", "value": 100}]')
    decider_group = models.ForeignKey(Group, on_delete=models.PROTECT, related_name="+")
    required_approvals = models.PositiveSmallIntegerField(default=1)
    deadline_minutes = models.PositiveIntegerField(default=24 * 60)
    on_expiry = models.CharField(max_length=10, choices=OnExpiry.choices,
                                 default=OnExpiry.REJECT)
    escalation_group = models.ForeignKey(Group, null=True, blank=True, on_delete=models.PROTECT,
                                         related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["policy", "number"],
                                               name="policy_version_unique")]

    def __str__(self) -> str:
        return f"{self.policy.slug} v{self.number}"

    def save(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self._state.adding:
            raise ValueError("policy versions are immutable; publish a new version instead")
        super().save(*args, **kwargs)

    def clean_fields(self, exclude: Any = None) -> None:
        """Django's field checks, then what the matcher needs: readable conditions and at least
        one approval (0 would let a request through with nobody deciding). Per field, so a form
        leaving a field out is not handed its error."""
        errors: dict[str, Any] = {}
        try:
            super().clean_fields(exclude)
        except ValidationError as exc:
            errors = exc.update_error_dict(errors)
        skip = set(exclude or ()) | set(errors)
        found = {"conditions": conditions.problems(self.conditions),
                 "required_approvals": ([] if isinstance(self.required_approvals, int)
                                        and self.required_approvals >= 1 else
                                        ["at least 1 person must approve"])}
        errors.update({f: m for f, m in found.items() if m and f not in skip})
        if errors:
            raise ValidationError(errors)


class ApprovalRequest(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        REJECTED = "rejected"
        EDITED = "edited", "approved with edited arguments"
        BUDGET_RAISED = "budget_raised", "budget raised"
        STOPPED = "stopped", "run stopped"
        EXPIRED = "expired"
        CANCELLED = "cancelled"
        RESPONDED = "responded"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    run_id = models.UUIDField(db_index=True)
    task_key = models.CharField(max_length=63)
    call_key = models.CharField(max_length=200, blank=True, db_index=True,
                                help_text="idempotency key of the paused call")
    tool = models.CharField(max_length=100, blank=True)
    arguments = models.JSONField(default=dict, blank=True)
    arguments_digest = models.CharField(max_length=64, blank=True)
    reason = models.CharField(max_length=30, choices=Reason.choices)
    detail = models.TextField(blank=True)
    policy_version = models.ForeignKey(PolicyVersion, null=True, blank=True,
                                       on_delete=models.PROTECT, related_name="requests")
    decider_group = models.ForeignKey(Group, on_delete=models.PROTECT, related_name="+")
    required_approvals = models.PositiveSmallIntegerField(default=1)
    tier = models.PositiveSmallIntegerField(default=1)
    requested_by = models.CharField(max_length=200, help_text="the agent or system that asked")
    run_started_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                       on_delete=models.SET_NULL, related_name="+")
    context = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING,
                              db_index=True)
    deadline = models.DateTimeField(db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    resolution = models.JSONField(default=dict, blank=True,
                                  help_text="what the decision means for the paused work")

    class Meta:
        ordering = ["deadline"]
        indexes = [models.Index(fields=["status", "deadline"], name="approval_pending_idx")]

    def __str__(self) -> str:
        return f"{self.reason} {self.tool} ({self.status})"

    @property
    def is_pending(self) -> bool:
        return self.status == self.Status.PENDING


class Decision(models.Model):
    class Kind(models.TextChoices):
        APPROVE = "approve"
        REJECT = "reject"
        EDIT = "edit"
        RAISE_BUDGET = "raise_budget", "raise budget"
        STOP = "stop", "stop the run"
        RESPOND = "respond", "respond"

    request = models.ForeignKey(ApprovalRequest, on_delete=models.PROTECT,
                                related_name="decisions")
    decider = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT,
                                related_name="+")
    kind = models.CharField(max_length=20, choices=Kind.choices)
    arguments_digest = models.CharField(max_length=64)
    arguments = models.JSONField(null=True, blank=True)
    note = models.TextField(blank=True)
    budget = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [models.UniqueConstraint(fields=["request", "decider"],
                                               name="one_decision_per_person")]

    def __str__(self) -> str:
        return f"{self.kind} by {self.decider}"
