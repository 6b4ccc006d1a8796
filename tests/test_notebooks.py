"""The notebooks under notebooks/ run top to bottom in their small configuration.

Each notebook is executed from a temporary copy (the committed file, with its stored
outputs, is never rewritten) by a fresh ``python3`` kernel with
``SAMX_NOTEBOOK_SIZE=small``; a cell that raises fails the test. One test per notebook, so
pytest-xdist spreads them over its workers. Skip them with ``-m "not notebook"``; CI
executes ``CI_NOTEBOOKS``, ``-m notebook`` or ``SAMX_FULL=1`` all of them.

The committed notebooks are also checked, without running them: they must hold the
outputs of a complete run (every code cell executed in order, no error, a plot) and stay
small enough to review.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; a whole notebook takes seconds to tens of seconds
MAX_BYTES = 1_500_000


def _ids(path: Path) -> str:
  return path.stem


# CI executes these; sam_on and edge_of_stability (their content is also run by the SAM-ON
# tutorial test and tests/test_benchmarks.py) run with -m notebook or SAMX_FULL=1.
CI_NOTEBOOKS = {"quickstart", "msam", "sparse_sam"}


def _params():
  return [
    pytest.param(
      path,
      id=_ids(path),
      marks=() if path.stem in CI_NOTEBOOKS else (pytest.mark.beyond_ci,),
    )
    for path in NOTEBOOKS
  ]


def test_every_notebook_is_found():
  names = {path.stem for path in NOTEBOOKS}
  assert {"quickstart", "sam_on", "sparse_sam", "msam", "edge_of_stability"} <= names


@pytest.mark.notebook
@pytest.mark.parametrize("path", _params())
def test_notebook_runs(path, tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")

  copy = tmp_path / path.name
  shutil.copyfile(path, copy)
  notebook = nbformat.read(copy, as_version=4)
  for cell in notebook.cells:  # start from a clean notebook, not the stored outputs
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  monkeypatch.setenv("SAMX_NOTEBOOK_SIZE", "small")  # the kernel inherits the environment
  client = nbclient.NotebookClient(
    notebook,
    timeout=CELL_TIMEOUT_S,
    kernel_name="python3",
    allow_errors=False,  # a cell that raises stops the run with CellExecutionError
    resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
  )
  client.execute()

  errors = [
    output
    for cell in notebook.cells
    if cell.cell_type == "code"
    for output in cell.outputs
    if output.output_type == "error"
  ]
  assert not errors, errors
  assert _pngs(notebook), f"{path.name} drew no plot"


def _pngs(notebook) -> int:
  return sum(
    "image/png" in output.get("data", {})
    for cell in notebook.cells
    if cell.cell_type == "code"
    for output in cell.outputs
  )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_committed_notebook_holds_a_complete_run(path):
  nbformat = pytest.importorskip("nbformat")
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  counts = [cell.execution_count for cell in code]
  assert counts == list(range(1, len(code) + 1)), (
    f"{path.name}: execution counts {counts}; regenerate the outputs with "
    "`python notebooks/execute.py`"
  )
  for cell in code:
    for output in cell.outputs:
      assert output.output_type != "error", f"{path.name} stores an error: {output}"
  assert _pngs(notebook), f"{path.name} stores no plot"
  size = path.stat().st_size
  assert size < MAX_BYTES, f"{path.name} is {size / 1e6:.2f} MB (limit {MAX_BYTES / 1e6} MB)"
