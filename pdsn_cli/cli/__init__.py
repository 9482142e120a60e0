from pdsn_cli.cli.app import app, main

__all__ = ["app", "main"]
