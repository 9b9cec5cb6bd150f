"""Timm model surgery: targets by role and exact masks; never imports recipes or the CLI."""
