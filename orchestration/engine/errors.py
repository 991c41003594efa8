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


class ToolFailed(ContractError):
    """The implementation raised; the message is what the caller may see."""


class ReferenceError_(EngineError):
    """A ``$input...`` or ``$tasks...`` reference in a task's arguments names nothing."""


class LeaseLost(EngineError):
    """The task was taken over after this worker's lease expired; its outcome is dropped."""
