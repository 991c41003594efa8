"""Management commands of the console app."""
