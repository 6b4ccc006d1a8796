"""The ``samx`` command line: ``python -m samx [SUBCOMMAND] [FLAGS]`` (or ``samx ...``).

Subcommands:

- ``demo`` (the default when none is given): SGD vs SAM vs ASAM on scikit-learn's
  digits with noisy labels, optionally with more variants and an m sweep of mSAM
  (``--variants sgd,sam,msam --msam-m 64,16,4,1``); see :mod:`samx.demo`.
- ``speed``: ``benchmarks/speed.py``, the cost of one SAM step next to SGD and a
  hand-written SAM step.
- ``generalization``: ``benchmarks/generalization.py``, small-scale versions of the
  papers' generalization claims (label noise, SAM-ON, SSAM, F-SAM, mSAM, radius
  sweeps).

``python -m samx --epochs 20`` is ``python -m samx demo --epochs 20``;
``python -m samx SUBCOMMAND --help`` lists a subcommand's flags. Every subcommand
takes ``--out DIR`` for its JSON file (and plots). The two benchmarks ship with the
source checkout, not with the installed package: they are found in ``benchmarks/``
next to the ``samx`` package folder, and their flags are passed to them unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

__all__ = [
  "BENCHMARKS",
  "DEFAULT_COMMAND",
  "BenchmarkNotFoundError",
  "benchmarks_dir",
  "build_parser",
  "load_benchmark",
  "main",
  "run_benchmark",
]

DEFAULT_COMMAND = "demo"

BENCHMARKS = {
  "speed": "the cost of one SAM step (samx vs hand-written SAM vs SGD): table, JSON "
  "(benchmarks/speed.py; its flags are passed on)",
  "generalization": "small-scale versions of the papers' generalization claims on "
  "digits: tables, PNGs, JSON (benchmarks/generalization.py; its flags are passed on)",
}
"""The subcommands that run a script of the source checkout's ``benchmarks/`` folder."""


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


# ---------------------------------------------------------------------------- benchmarks


class BenchmarkNotFoundError(FileNotFoundError):
  """A benchmark script is missing: samx was installed without its source checkout."""


def benchmarks_dir() -> Path:
  """The ``benchmarks/`` folder of the source checkout this ``samx`` was imported from."""
  import samx

  return Path(samx.__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
  """Imports ``benchmarks/<name>.py`` of the source checkout as a module.

  Raises:
    BenchmarkNotFoundError: the script is not there (an installed wheel has no
      ``benchmarks/``); the message says where it looked.
  """
  path = benchmarks_dir() / f"{name}.py"
  if not path.is_file():
    raise BenchmarkNotFoundError(
      f"{path} not found: the benchmarks ship with samx's source checkout, not with the "
      "installed package. Clone the samx repository, install it from there "
      "('pip install -e \".[examples]\"') and run 'samx "
      f"{name}' (or 'python benchmarks/{name}.py' from the repository root)."
    )
  module_name = f"samx_benchmark_{name}"
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module  # dataclasses look their module up here
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[module_name]
    raise
  return module


def run_benchmark(name: str, argv: Sequence[str]) -> int:
  """Runs ``benchmarks/<name>.py``'s ``main(argv)``; returns the exit status.

  The benchmark parses ``argv`` itself (``samx speed --help`` prints its flags) under
  the program name ``samx <name>``. A ``main`` that returns an ``int`` gives the exit
  status; one that returns anything else (its results) succeeded.
  """
  try:
    module = load_benchmark(name)
  except BenchmarkNotFoundError as err:
    print(f"samx {name}: error: {err}", file=sys.stderr)
    return 2
  program = sys.argv[0] if sys.argv else None
  if sys.argv:
    sys.argv[0] = f"samx {name}"  # argparse's prog in the benchmark's usage lines
  try:
    status = module.main(list(argv))
  finally:
    if program is not None:
      sys.argv[0] = program
  return status if isinstance(status, int) and not isinstance(status, bool) else 0


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
  """The ``samx`` argument parser, one subparser per subcommand.

  The benchmark subcommands are listed for ``--help`` only: :func:`main` hands their
  flags to the benchmark's own parser.
  """
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
  for name, help_text in BENCHMARKS.items():
    sub.add_parser(name, help=help_text, add_help=False)
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
  than ``-h`` / ``--help``, ``demo`` is run with all the arguments. ``speed`` and
  ``generalization`` pass the rest of ``argv`` to the benchmark script.

  Returns:
    The exit status.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in BENCHMARKS:
    return run_benchmark(argv[0], argv[1:])
  if not argv or argv[0] not in (*_COMMANDS, "-h", "--help"):
    argv.insert(0, DEFAULT_COMMAND)
  args = build_parser().parse_args(argv)
  args.check(args)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
