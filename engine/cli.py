"""The ``hfc-engine`` command line: a thin layer over the Python API.

A user error (engine.errors.UserError: a bad config key, a missing dataset root, data too small for the protocol...,
also when it surfaces inside a cell; or a file the system refused to read or write) prints one line on stderr saying
what was wrong and exits with status 2. Any other exception is a bug: the traceback, a line asking for a report, and
status 1. ``--debug`` (before or after the subcommand) lets every exception through as Python shows it. Ctrl-C keeps
every finished cell: rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from engine import git_commit
from engine.errors import UserError

COMMANDS = {  # name -> what it does; engine.commands adds each one's arguments once it is parsed
    "run": "run (or resume) an audit; no config = the default audit on embedded data",
    "study": "run one of the papers' studies on the embedded data",
    "score": "batch-score a dataset with a model and fitted detectors",
    "calibrate": "reset detectors' thresholds on a site's own clean images (saved beside them)",
    "runs": "inspect finished runs",
    "train": "train a classifier on a dataset's seeded 70/15/15 train/val/test split",
    "export": "export a model to ONNX, verified with onnxruntime",
    "layers": "list a model's layers (feature points), their kinds and output shapes",
    "bench": "run the kernel benchmark suite and print the table",
}
DEBUG_HELP = "let errors through with their traceback"
REPORT_LINE = (
    "hfc-engine: this is a bug in hfc-engine, not in your input: please report it on the hfc-engine issue tracker "
    "with the command you ran and the traceback above"
)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``hfc-engine run: error: ...``, status 2) and arguments added on first use:
    a command's parser gets them (``arguments(parser)``) only when it parses or shows its help, so neither
    ``hfc-engine --help`` nor ``--version`` imports torch and the engine."""

    def __init__(self, *args: Any, arguments: Callable[[Parser], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._arguments = arguments

    def add_command(self, group: argparse._SubParsersAction, name: str, help_text: str, **kwargs: Any) -> Parser:
        """A subcommand of this parser (``group``: its subparsers), taking --debug too, defaults shown in its help."""
        debug = argparse.ArgumentParser(add_help=False)  # only when given (SUPPRESS): never resets the top-level flag
        debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        return group.add_parser(
            name, help=help_text, description=help_text, parents=[debug], formatter_class=HelpFormatter, **kwargs
        )

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        self._add_arguments()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_arguments()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help shows the usage)\n")

    def _add_arguments(self) -> None:
        add, self._arguments = self._arguments, None
        if add is not None:
            add(self)


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default after its help, unless the help already states it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if unset or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def version() -> str:
    """The installed package's version, and the engine's git commit when known (see engine.git_commit)."""
    try:
        installed = importlib.metadata.version("hfc-engine")
    except importlib.metadata.PackageNotFoundError:
        installed = "unknown (not installed: pip install . in the checkout)"
    commit = git_commit()
    return f"{installed} (commit {commit})" if commit else installed


def _arguments_of(name: str) -> Callable[[Parser], None]:
    def add(parser: Parser) -> None:
        from engine import commands  # torch and the whole engine: only once a command is parsed

        commands.ARGUMENTS[name](parser)

    return add


def build_parser() -> Parser:
    parser = Parser(prog="hfc-engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)  # also accepted after the subcommand
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    group = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        parser.add_command(group, name, help_text, arguments=_arguments_of(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("hfc-engine: interrupted; finished work is saved, rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a user error becomes one line; anything else is a bug to report
        if args.debug:  # the exception as Python shows it (and a post-mortem debugger can catch it)
            raise
        from engine.runs.executor import cell_error  # loaded already: the command ran

        cell, cause = cell_error(exc)
        if not _user_error(cause):
            traceback.print_exc()
            print(REPORT_LINE, file=sys.stderr)
            return 1
        where = f"{cell}: " if cell else ""
        message = " ".join(str(cause).split())  # one line, whatever the message holds
        print(f"hfc-engine: error: {where}{message} (--debug shows the traceback)", file=sys.stderr)
        return 2


def _user_error(exc: BaseException) -> bool:
    """A failure the user caused: a UserError, or a file the system refused to open, read or write (an OSError
    naming a file: missing, a directory, no permission, disk full)."""
    return isinstance(exc, UserError) or (isinstance(exc, OSError) and exc.filename is not None)


if __name__ == "__main__":
    sys.exit(main())
