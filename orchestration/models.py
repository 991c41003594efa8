from __future__ import annotations

import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models

from orchestration.engine.states import RunStatus, TaskStatus


class Agent(models.Model):
    class Autonomy(models.TextChoices):
        DETERMINISTIC = "deterministic"
        SUPERVISED = "supervised"
        AUTONOMOUS = "autonomous"

    class Status(models.TextChoices):
        ACTIVE = "active"
        RETIRED = "retired"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    slug = models.SlugField(unique=True)
    name = models.CharField(max_length=200)
    # Each agent acts as its own service-account user, so object permissions express its grants.
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="agent_identity"
    )
    instructions = models.TextField(blank=True)
    provider = models.CharField(max_length=40, default="scripted")
    model_name = models.CharField(max_length=200, blank=True)
    model_params = models.JSONField(default=dict, blank=True)
    autonomy = models.CharField(
        max_length=20, choices=Autonomy.choices, default=Autonomy.SUPERVISED
    )
    step_budget = models.PositiveIntegerField(default=5)
    token_budget = models.PositiveIntegerField(default=20000)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACTIVE)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class Tool(models.Model):
    class Risk(models.TextChoices):
        READ = "read"
        WRITE = "write"
        FINANCIAL = "financial"
        COMPLIANCE = "compliance"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    slug = models.SlugField(unique=True, max_length=100)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    implementation = models.CharField(max_length=200, help_text="name in the tool registry")
    input_schema = models.JSONField(default=dict)
    output_schema = models.JSONField(default=dict)
    timeout_s = models.FloatField(default=10.0)
    idempotent = models.BooleanField(default=True)
    risk_class = models.CharField(max_length=20, choices=Risk.choices, default=Risk.READ)
    cost_per_call = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"))

    class Meta:
        permissions = [("invoke_tool", "May invoke this tool")]

    def __str__(self) -> str:
        return self.slug


class Process(models.Model):
    class Pattern(models.TextChoices):
        AUTONOMOUS_FRONTEND = "autonomous_frontend"
        AGENT_WORKFLOW = "agent_workflow"
        DETERMINISTIC = "deterministic"
        HYBRID = "hybrid"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    slug = models.SlugField(unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    pattern = models.CharField(max_length=30, choices=Pattern.choices)
    current_version = models.ForeignKey(
        "ProcessVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        verbose_name_plural = "processes"
        permissions = [("start_run", "May start runs of this process")]

    def __str__(self) -> str:
        return self.slug


class ProcessVersion(models.Model):
    """An immutable snapshot of a process definition; a run pins one."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    process = models.ForeignKey(Process, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    plan = models.JSONField()
    input_schema = models.JSONField(default=dict)
    hydration_limit = models.PositiveIntegerField(default=3)
    budgets = models.JSONField(default=dict, blank=True)
    gates = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["process", "number"], name="process_version_unique")
        ]
        ordering = ["process", "-number"]

    def __str__(self) -> str:
        return f"{self.process.slug} v{self.number}"

    def save(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self._state.adding:
            raise ValueError("process versions are immutable; publish a new version instead")
        super().save(*args, **kwargs)


class Run(models.Model):
    Status = models.TextChoices("Status", [(s.name, s.value) for s in RunStatus])

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    process_version = models.ForeignKey(ProcessVersion, on_delete=models.PROTECT,
                                        related_name="runs")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
        related_name="runs",
    )
    input = models.JSONField(default=dict)
    status = models.CharField(max_length=30, choices=Status.choices, default="pending",
                              db_index=True)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    cancel_requested = models.BooleanField(default=False)
    tokens_in = models.PositiveBigIntegerField(default=0)
    tokens_out = models.PositiveBigIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal("0"))
    steps = models.PositiveIntegerField(default=0)
    tool_calls = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"run {self.id}"


class Task(models.Model):
    Status = models.TextChoices("Status", [(s.name, s.value) for s in TaskStatus])

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="tasks")
    key = models.CharField(max_length=63)
    position = models.PositiveIntegerField(default=0)
    title = models.CharField(max_length=200, blank=True)
    executor_type = models.CharField(max_length=20)
    executor_ref = models.CharField(max_length=200)
    depends_on = models.JSONField(default=list)
    status = models.CharField(max_length=20, choices=Status.choices, default="pending")
    attempts = models.PositiveIntegerField(default=0)
    output = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "position"]
        constraints = [models.UniqueConstraint(fields=["run", "key"], name="task_run_key_unique")]

    def __str__(self) -> str:
        return f"{self.run_id}/{self.key}"
