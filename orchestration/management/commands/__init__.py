"""The orchestration app's management commands: demo data, forks and replays of runs."""
