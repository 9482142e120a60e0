"""The ``pdsn`` command line. Importing the command modules registers their commands on ``app``."""

from pdsn_cli.cli import data_cmds, train_cmds, eval_cmds, model_cmds, cache_cmds  # noqa: F401, I001 (the help lists them in this order)
from pdsn_cli.cli.app import app, main

__all__ = ["app", "main"]
