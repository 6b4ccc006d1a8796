"""The ``samx`` command line: ``python -m samx [SUBCOMMAND] [FLAGS]``.

Subcommands:

- ``demo`` (the default when none is given): SGD vs SAM vs ASAM on scikit-learn's
  digits with noisy labels, optionally with an m sweep of mSAM
  (``--variants sgd,sam,msam --msam-m 64,16,4,1``); see :mod:`samx.demo`.

``python -m samx --epochs 20`` is ``python -m samx demo --epochs 20``;
``python -m samx demo --help`` lists the demo's flags.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["DEFAULT_COMMAND", "build_parser", "main"]

DEFAULT_COMMAND = "demo"


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
  from samx import demo

  demo.add_demo_arguments(parser)


def _demo_check(args: argparse.Namespace) -> None:
  from samx import demo

  demo.check_demo_arguments(args)


def _demo_run(args: argparse.Namespace) -> int:
  from samx import demo

  return demo.run_command(args)


# name -> (one-line help, add_arguments(parser), check(args) raising ValueError for flags
# that are invalid together (reported by argparse), run(args) -> exit status)
_COMMANDS: dict[
  str,
  tuple[
    str,
    Callable[[argparse.ArgumentParser], None],
    Callable[[argparse.Namespace], None],
    Callable[[argparse.Namespace], int],
  ],
] = {
  "demo": (
    "SGD vs SAM vs ASAM (opt-in: mSAM m sweep, F-SAM, VaSSO, SSAM-F, SAM-ON with "
    "--model ln-mlp) on digits with 40% label noise: table, plot, JSON",
    _demo_arguments,
    _demo_check,
    _demo_run,
  ),
}


def build_parser() -> argparse.ArgumentParser:
  """The ``samx`` argument parser, one subparser per subcommand."""
  parser = argparse.ArgumentParser(
    prog="samx",
    description="samx command line. Without a subcommand, runs "
    f"'{DEFAULT_COMMAND}'; 'samx SUBCOMMAND --help' lists its flags.",
  )
  sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
  for name, (help_text, add_arguments, check, run) in _COMMANDS.items():
    command = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)
    add_arguments(command)
    command.set_defaults(run=run, check=_checker(command, check))
  return parser


def _checker(
  command: argparse.ArgumentParser, check: Callable[[argparse.Namespace], None]
) -> Callable[[argparse.Namespace], None]:
  """``check``, with its ``ValueError`` reported as ``command``'s usage error (exit 2)."""

  def run_check(args: argparse.Namespace) -> None:
    try:
      check(args)
    except ValueError as err:
      command.error(str(err))

  return run_check


def main(argv: Sequence[str] | None = None) -> int:
  """Parses ``argv`` (default ``sys.argv[1:]``) and runs the subcommand.

  The first argument names the subcommand; when it is missing or is a flag other
  than ``-h`` / ``--help``, ``demo`` is run with all the arguments.

  Returns:
    The exit status.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or (argv[0] not in _COMMANDS and argv[0] not in ("-h", "--help")):
    argv.insert(0, DEFAULT_COMMAND)
  args = build_parser().parse_args(argv)
  args.check(args)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
