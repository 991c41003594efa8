"""The console app's management commands: API tokens."""
