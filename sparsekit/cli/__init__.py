"""The command line (nothing imports this package)."""
