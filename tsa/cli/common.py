"""What the commands share: a parser whose mistakes are one line, option types, and the one-line exit."""

from __future__ import annotations

import argparse
import sys

from tsa.errors import UsageError


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake prints one line (`PROG: error: MESSAGE`, `--help` for the options), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def exit_with_error(prog: str, error: Exception) -> None:
    """End a console script on `error` with one line and no traceback: status 2 for a UsageError, else 1."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    raise SystemExit(2 if isinstance(error, UsageError) else 1)
