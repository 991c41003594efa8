"""Orchestration: processes, runs and their tasks, executed by the engine under governance."""
