"""The ``aecore`` command (also ``python -m aecore``): ``main`` builds the parser from
the command modules and turns errors into one line on stderr."""

from aecore.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
