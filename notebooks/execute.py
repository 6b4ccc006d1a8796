"""Executes the notebooks in place, storing their outputs (plots included).

Run from anywhere; the notebooks run with this directory as their working directory::

  python notebooks/execute.py                       # every notebook, small size
  python notebooks/execute.py --size full           # the long runs (a GPU helps)
  python notebooks/execute.py msam sparse_sam       # some of them
  python notebooks/execute.py --check               # run, but do not write the outputs

The size is passed to the notebooks as ``SAMX_NOTEBOOK_SIZE``. The committed notebooks
hold the outputs of ``--size small``, the configuration CI runs
(``tests/test_notebooks.py``). Needs ``pip install -e ".[notebooks,examples]"``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_BYTES = 1_500_000  # keep every stored notebook under ~1.5 MB
SIZES = ("small", "full")


def notebook_paths(names: list[str] | None = None) -> list[Path]:
  """The notebooks of this directory, all or the ones named (with or without .ipynb)."""
  available = sorted(HERE.glob("*.ipynb"))
  if not names:
    return available
  by_stem = {path.stem: path for path in available}
  missing = [name for name in names if Path(name).stem not in by_stem]
  if missing:
    raise SystemExit(f"no such notebook: {', '.join(missing)} (have: {', '.join(by_stem)})")
  return [by_stem[Path(name).stem] for name in names]


def execute(path: Path, *, size: str, timeout: int, write: bool) -> float:
  """Runs one notebook top to bottom; returns the wall time in seconds.

  Raises ``nbclient.exceptions.CellExecutionError`` when a cell raises.
  """
  import nbformat
  from nbclient import NotebookClient

  notebook = nbformat.read(path, as_version=4)
  os.environ["SAMX_NOTEBOOK_SIZE"] = size  # the kernel inherits the environment
  client = NotebookClient(
    notebook,
    timeout=timeout,
    kernel_name="python3",
    record_timing=False,  # no timestamps in the stored cells: smaller diffs
    resources={"metadata": {"path": str(path.parent)}},
  )
  start = time.perf_counter()
  client.execute()
  elapsed = time.perf_counter() - start
  if write:
    nbformat.write(notebook, path)
  return elapsed


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("notebooks", nargs="*", help="names (default: every notebook)")
  parser.add_argument("--size", choices=SIZES, default="small", help="default: small")
  parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
  parser.add_argument("--check", action="store_true", help="execute without writing")
  args = parser.parse_args(argv)

  failed = []
  for path in notebook_paths(args.notebooks):
    try:
      elapsed = execute(path, size=args.size, timeout=args.timeout, write=not args.check)
    except Exception as err:  # report and go on with the next notebook
      print(f"{path.name:<28} FAILED: {type(err).__name__}", flush=True)
      print(str(err)[-3000:], file=sys.stderr)
      failed.append(path.name)
      continue
    stored = path.stat().st_size
    note = "" if stored <= MAX_BYTES else f"  WARNING: over {MAX_BYTES / 1e6:.1f} MB"
    print(f"{path.name:<28} {elapsed:6.1f} s  {stored / 1e3:7.0f} kB{note}", flush=True)
  if failed:
    raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
  main()
