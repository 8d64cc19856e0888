"""``cxrctl``: the command line for people."""

from cxrd.cli.main import main

__all__ = ["main"]
