"""The orchestration rows: agents, tools, processes and their immutable versions, runs and their
tasks, model prices, tool usage, outbox messages and kill switches."""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models

from orchestration.config_checks import (
    CheckedFields,
    agent_problems,
    price_problems,
    tool_problems,
)
from orchestration.engine.states import RunStatus, TaskStatus
from orchestration.run_indexes import RUN_INDEXES


class Agent(CheckedFields, models.Model):
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
    model_params = models.JSONField(
        default=dict, blank=True,
        help_text="provider options: base_url, timeout_s, max_retries, temperature, max_tokens; "
                  "for the scripted provider, script: a list of assistant turns",
    )
    credential_ref = models.CharField(
        max_length=100, blank=True,
        help_text="name of the credential holding the provider's API key (never shown)",
    )
    step_budget = models.PositiveIntegerField(default=5)
    token_budget = models.PositiveIntegerField(default=20000)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACTIVE)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name

    def config_problems(self) -> dict[str, list[str]]:
        return agent_problems(self)


class Tool(CheckedFields, models.Model):
    class Risk(models.TextChoices):
        READ = "read"
        WRITE = "write"
        FINANCIAL = "financial"
        COMPLIANCE = "compliance"

    class Kind(models.TextChoices):
        PYTHON = "python", "registered Python callable"
        HTTP = "http", "HTTP endpoint"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    slug = models.SlugField(unique=True, max_length=100)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.PYTHON)
    implementation = models.CharField(max_length=200, blank=True,
                                      help_text="name in the tool registry (python tools)")
    http_method = models.CharField(max_length=10, blank=True, default="POST")
    url_template = models.CharField(max_length=500, blank=True,
                                    help_text="e.g. https://crm.example/api/customers/{id}")
    credential_ref = models.CharField(max_length=100, blank=True,
                                      help_text="credential injected at call time (never logged)")
    input_schema = models.JSONField(default=dict)
    output_schema = models.JSONField(default=dict)
    timeout_s = models.FloatField(default=10.0)
    idempotent = models.BooleanField(default=True)
    risk_class = models.CharField(max_length=20, choices=Risk.choices, default=Risk.READ)
    cost_per_call = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"))
    quota_per_run = models.PositiveIntegerField(null=True, blank=True,
                                                help_text="most calls in one run; blank = none")
    quota_per_window = models.PositiveIntegerField(
        null=True, blank=True, help_text="most calls across all runs per window; blank = none")
    quota_window_s = models.PositiveIntegerField(default=3600)
    rate_limit = models.CharField(max_length=40, blank=True,
                                  help_text='e.g. "10/second" or "100 per minute"; blank = none')

    class Meta:
        permissions = [("invoke_tool", "May invoke this tool")]

    def __str__(self) -> str:
        return self.slug

    def config_problems(self) -> dict[str, list[str]]:
        return tool_problems(self)


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
    # The identity the process's deterministic (tool and function) steps act as: granted
    # tools like an agent is, so a plan-level step passes the same grant check as an agent.
    service_user = models.OneToOneField(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT,
        related_name="process_identity", editable=False,
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
    # A fork starts from a step of another run, reusing that run's results before the step.
    forked_from = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="forks")
    fork_point = models.PositiveIntegerField(
        null=True, blank=True, help_text="the origin's task position (1-based) the fork ran from")
    # A planned run's current plan (orchestration/planning.py) and its version: 0 = the run
    # follows its process version's plan.
    plan = models.JSONField(null=True, blank=True)
    plan_version = models.PositiveIntegerField(default=0)
    # Caps (null = none), copied from the process version and raised by reviewers.
    budget_tokens = models.PositiveBigIntegerField(null=True, blank=True)
    budget_cost = models.DecimalField(max_digits=14, decimal_places=6, null=True, blank=True)
    budget_steps = models.PositiveIntegerField(null=True, blank=True)
    budget_wall_s = models.PositiveIntegerField(null=True, blank=True)
    # Worst cases reserved by calls in flight; settled against real usage when they finish.
    reserved_tokens = models.BigIntegerField(default=0)
    reserved_cost = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal("0"))
    reserved_steps = models.IntegerField(default=0)
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
        indexes = RUN_INDEXES  # orchestration/run_indexes.py: which page reads which

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
    step_budget_extra = models.PositiveIntegerField(
        default=0, help_text="steps reviewers granted beyond the agent's own step budget")
    budget_tokens = models.PositiveBigIntegerField(null=True, blank=True)
    budget_cost = models.DecimalField(max_digits=14, decimal_places=6, null=True, blank=True)
    used_tokens = models.PositiveBigIntegerField(default=0)
    used_cost = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal("0"))
    reserved_tokens = models.BigIntegerField(default=0)
    reserved_cost = models.DecimalField(max_digits=14, decimal_places=6, default=Decimal("0"))
    reserved_steps = models.IntegerField(default=0)
    # The lease of the worker running the task: a fencing token it renews while it works
    # (orchestration/leases.py). Once it has expired any worker may take the task over.
    lease_owner = models.CharField(max_length=64, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    crashes = models.PositiveIntegerField(
        default=0, help_text="times a worker was lost while running this task")
    output = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "position"]
        constraints = [models.UniqueConstraint(fields=["run", "key"], name="task_run_key_unique")]
        indexes = [models.Index(fields=["lease_expires_at"], name="task_running_lease",
                                condition=models.Q(status="running"))]

    def __str__(self) -> str:
        return f"{self.run_id}/{self.key}"


class ModelPrice(CheckedFields, models.Model):
    """What a provider charges per million tokens; admins edit it, runs read it."""

    provider = models.CharField(max_length=40)
    model_name = models.CharField(max_length=200)
    input_per_mtok = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"))
    output_per_mtok = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal("0"))

    class Meta:
        constraints = [models.UniqueConstraint(fields=["provider", "model_name"],
                                               name="model_price_unique")]

    def __str__(self) -> str:
        return f"{self.provider}/{self.model_name}"

    def config_problems(self) -> dict[str, list[str]]:
        return price_problems(self)

    def cost(self, tokens_in: int, tokens_out: int) -> Decimal:
        million = Decimal(1_000_000)
        return (self.input_per_mtok * tokens_in + self.output_per_mtok * tokens_out) / million


class ToolUsage(models.Model):
    """Calls of one tool in one run, for the per-run quota (claimed by conditional UPDATE)."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="tool_usage")
    tool = models.CharField(max_length=100)
    calls = models.PositiveIntegerField(default=0)
    allowance = models.PositiveIntegerField(default=0, help_text="extra calls reviewers allowed")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["run", "tool"], name="tool_usage_unique")]

    def __str__(self) -> str:
        return f"{self.tool} in {self.run_id}: {self.calls}"


class Outbox(models.Model):
    """A message a state change needs, written in the same transaction as the change.

    It is published after commit and deleted by the transaction that handles it; the relay
    (orchestration/sweep.py) publishes again whatever is still here when ``due_at`` passes, so a
    broker outage or a lost message delays work and never loses it."""

    class Topic(models.TextChoices):
        ADVANCE = "advance"
        EXECUTE = "execute"
        RESUME = "resume"
        REPLAY = "replay"  # run_id: the run, request_id: the ReplayCheck

    id = models.BigAutoField(primary_key=True)
    topic = models.CharField(max_length=10, choices=Topic.choices)
    run_id = models.UUIDField()
    key = models.CharField(max_length=63, blank=True)
    request_id = models.UUIDField(null=True, blank=True)
    created_at = models.DateTimeField()
    due_at = models.DateTimeField(db_index=True)
    sent = models.PositiveIntegerField(default=0, help_text="times it was published")

    def __str__(self) -> str:
        return f"{self.topic} {self.run_id} {self.key}".strip()


# The escalation code of a task a kill switch parked.
PAUSED = "paused"


class KillSwitch(models.Model):
    """An admin's stop: while engaged, no model or tool call in its scope passes the gate, and
    tool calls in flight are told to stop (the sandbox is killed; a tool that cannot be
    interrupted is abandoned, its outcome left to a person if it is not idempotent); the tasks
    wait until it is released. A model call in flight is not interrupted: the next call is."""

    class Scope(models.TextChoices):
        ALL = "all", "everything"
        PROCESS = "process", "one process"
        AGENT = "agent", "one agent"
        TOOL = "tool", "one tool"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    scope = models.CharField(max_length=10, choices=Scope.choices)
    target = models.SlugField(max_length=100, blank=True,
                              help_text="the process, agent or tool slug; blank for everything")
    reason = models.TextField()
    engaged_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    engaged_at = models.DateTimeField(auto_now_add=True)
    released_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                    on_delete=models.SET_NULL, related_name="+")
    released_at = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        ordering = ["-engaged_at"]

    def __str__(self) -> str:
        return self.label(self.scope, self.target)

    @staticmethod
    def label(scope: str, target: str) -> str:
        where = "everything" if scope == KillSwitch.Scope.ALL else f"{scope} {target}"
        return f"kill switch on {where}"

    def pause_reason(self) -> str:
        """The reason a task it parks carries (``paused: ...``): how a release, and the sweep,
        tell the tasks of a switch from those another engaged switch still holds."""
        return f"{PAUSED}: {self}: {self.reason}"

    @property
    def engaged(self) -> bool:
        return self.released_at is None

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        if self.scope == self.Scope.ALL:
            self.target = ""
            return
        owner = {self.Scope.PROCESS: Process, self.Scope.AGENT: Agent,
                 self.Scope.TOOL: Tool}.get(self.scope)
        if owner is None:
            raise ValidationError({"scope": f"unknown scope {self.scope!r}"})
        if not owner.objects.filter(slug=self.target).exists():
            raise ValidationError({"target": f"no {self.scope} named {self.target!r}"})


class ReplayCheck(models.Model):
    """One request to replay a run from its ledger (orchestration/replay_jobs.py), done by a
    worker. A new row per request, kept as the run's history of checks; at most one per run is
    queued or running at a time."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        MATCHED = "matched"
        DIVERGED = "diverged"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="replay_checks")
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                     on_delete=models.SET_NULL, related_name="+")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    compared = models.PositiveIntegerField(default=0, help_text="recorded events compared")
    summary = models.TextField(blank=True, help_text="the verdict, as the replay command says it")
    divergence = models.TextField(blank=True, help_text="the first divergence, if any")
    attempts = models.PositiveIntegerField(default=0, help_text="times a worker started it")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(
        null=True, blank=True, help_text="last sign of life of the worker replaying it")
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(
            fields=["run"], condition=models.Q(status__in=["queued", "running"]),
            name="replay_check_one_pending_per_run")]

    def __str__(self) -> str:
        return f"replay check of run {self.run_id}: {self.status}"

    @property
    def pending(self) -> bool:
        return self.status in (self.Status.QUEUED, self.Status.RUNNING)


class Transcript(models.Model):
    """The (redacted) conversation sent to a model for one recorded call, beside the ledger,
    which holds only its digest; see orchestration/transcripts.py."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="transcripts")
    # model.called (task, step), qc.checked (task, audit round), plan.proposed (version)
    kind = models.CharField(max_length=64)
    task = models.CharField(max_length=63, blank=True)
    step = models.PositiveIntegerField()
    messages_digest = models.CharField(max_length=64)
    messages = models.JSONField(null=True, blank=True,
                                help_text="the conversation; NULL once the retention expired")
    recorded_at = models.DateTimeField()
    expired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["run", "task", "step"], name="transcript_run_task_step"),
            # The sweep looks only at text still held.
            models.Index(fields=["recorded_at"], condition=models.Q(expired_at__isnull=True),
                         name="transcript_unexpired"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} of {self.run_id}/{self.task or 'plan'}#{self.step}"
