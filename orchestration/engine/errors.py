"""The errors the engine raises on purpose."""

from __future__ import annotations


class EngineError(Exception):
    """Root of every error the engine raises on purpose."""


class PlanError(EngineError):
    """A plan template is malformed: bad shape, unknown dependency, a cycle."""


class TransitionError(EngineError):
    """A state change that the run or task state machine does not allow."""


class ContractError(EngineError):
    """A tool or function call broke its contract."""


class UnknownTool(ContractError):
    pass


class ToolInputInvalid(ContractError):
    pass


class ToolOutputInvalid(ContractError):
    pass


class ToolTimeout(ContractError):
    pass


class ToolStopped(ContractError):
    """A stop signal (cancel, kill switch, retired agent, revoked grant) ended the call."""


class ConfigurationError(ContractError):
    """A tool or model is configured so that no call can work (a bad schema, an unknown
    implementation, bad model parameters): people must fix it, so the task escalates."""


class UngatedCall(RuntimeError):
    """A tool was called by something other than the gate: a bug, never a tool's failure."""


class ToolFailed(ContractError):
    """The implementation raised; the message is what the caller may see."""


class ReferenceError_(EngineError):
    """A ``$input...`` or ``$tasks...`` reference in a task's arguments names nothing."""


class LeaseLost(EngineError):
    """The task was taken over after this worker's lease expired; its outcome is dropped."""
