"""The audit app's management commands: exporting and verifying the ledger."""
