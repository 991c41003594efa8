"""Template tags and filters of the console's pages."""
