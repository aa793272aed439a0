"""What the commands share: a parser whose mistakes are one line, option types, help that states defaults in
plain words, and `run_command`, which turns what a command raises into one line and an exit status."""

from __future__ import annotations

import argparse
import re
import sys
import traceback
import warnings
from pathlib import Path

from tsa.errors import TrainingInterrupted, UsageError

# Negative numbers as option values, exponents and -inf included (argparse alone reads "-1e-4" as an option).
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$", re.IGNORECASE)

EXIT_USAGE, EXIT_FAILURE = 2, 1


class PlainDefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends `(default: VALUE)` to an option's help unless the help already names its default or there is
    none to state (None, an off switch, an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        text = text.replace(" (default: %(default)s)", "")  # BooleanOptionalAction's, restated below
        default = action.default
        if "default" in text.lower() or default in (None, argparse.SUPPRESS) or default == [] or (
                default is False and not isinstance(action, argparse.BooleanOptionalAction)):
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            shown = "on" if default else "off"
        elif isinstance(default, Path):
            shown = str(default)
        else:
            shown = "%(default)s"
        if text.endswith("."):
            return f"{text[:-1]} (default: {shown})."
        return f"{text} (default: {shown})"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake prints one line (`PROG: error: MESSAGE`, `--help` for the options), exit 2; no
    abbreviated options (`--max-step` is refused, not read as `--max-steps`); negative numbers are values."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", PlainDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_debug_option(parser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="On a failure, print the full Python traceback instead of one line.")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def exit_with_error(prog: str, error: Exception) -> None:
    """End a console script on `error` with one line and no traceback: status 2 for a UsageError, else 1."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILURE)


def run_command(prog: str, body, *, debug: bool = False):
    """Run `body()` for the console script `prog`: exit 0 when it returns, 2 with one line for a UsageError,
    1 with one line for any other failure (the traceback too with `debug`), 128 + the signal for an interrupt
    (TrainingInterrupted from the training loop, or KeyboardInterrupt anywhere else)."""
    def one_line_warning(message, category, filename, lineno, line=None):
        return f"{prog}: warning: {' '.join(str(message).split())}\n"

    format_warning, warnings.formatwarning = warnings.formatwarning, one_line_warning
    try:
        body()
    except TrainingInterrupted as interrupt:
        if str(interrupt):  # the main process's; the others stop silently
            print(f"{prog}: {interrupt}", file=sys.stderr)
        raise SystemExit(interrupt.exit_status) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
    except UsageError as error:
        if debug:
            traceback.print_exc()
        exit_with_error(prog, error)
    except Exception as error:  # noqa: BLE001 - every failure ends in one line; --debug shows where
        if debug:
            traceback.print_exc()
        ours = type(error).__module__ == "tsa.errors"  # messages written for the user, the others get their type
        message = " ".join(str(error).split())
        message = message if ours else f"{type(error).__name__}: {message}".rstrip(": ")
        print(f"{prog}: error: {message}" + ("" if ours or debug else " (--debug for the traceback)"),
              file=sys.stderr)
        raise SystemExit(EXIT_FAILURE) from None
    finally:
        warnings.formatwarning = format_warning
