"""`python -m sparsekit` runs the command line (also the form torchrun needs)."""

from sparsekit.cli.main import main

main()
