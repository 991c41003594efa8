"""Management commands of the orchestration app."""
