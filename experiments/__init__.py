"""Reproductions of published analyses, each a runnable module: `python -m experiments.<name> --help`."""
