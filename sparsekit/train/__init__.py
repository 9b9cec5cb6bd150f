"""The built-in trainer and its data sources."""
