"""The documentation: API coverage, variant pages, the strict build, the NNX tutorial.

The site is built by MkDocs from ``mkdocs.yml`` and ``docs/`` (see ``docs/index.md``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import pathlib
import re
import subprocess
import sys

import pytest

import samx
from samx import aliases

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_PAGES = sorted((DOCS / "api").glob("*.md"))
DIRECTIVE = re.compile(r"^:::\s+(\S+)\s*$", re.MULTILINE)


def _directives() -> dict[str, list[str]]:
  """Every ``::: identifier`` of the API pages, with the pages it appears on."""
  found: dict[str, list[str]] = {}
  for page in API_PAGES:
    for identifier in DIRECTIVE.findall(page.read_text(encoding="utf-8")):
      found.setdefault(identifier, []).append(page.name)
  return found


def _resolve(identifier: str):
  """The object ``samx.a.b`` names, by attribute access from the package."""
  parts = identifier.split(".")
  assert parts[0] == "samx", f"{identifier}: API directives document samx only"
  obj = samx
  for i, part in enumerate(parts[1:], start=1):
    if not hasattr(obj, part):
      try:  # a submodule that the package does not import itself
        obj = importlib.import_module(".".join(parts[: i + 1]))
        continue
      except ImportError:
        raise AttributeError(f"{'.'.join(parts[:i])} has no attribute {part!r}") from None
    obj = getattr(obj, part)
  return obj


def test_api_pages_exist():
  assert API_PAGES, "docs/api/ holds no page"


def test_every_public_name_has_an_api_entry():
  documented = _directives()
  missing = [name for name in samx.__all__ if f"samx.{name}" not in documented]
  assert not missing, (
    "names in samx.__all__ without a `::: samx.<name>` directive in docs/api/*.md: "
    f"{missing}. Add each to the API page of its module."
  )


def test_every_api_directive_names_an_existing_object():
  broken = {}
  for identifier, pages in _directives().items():
    try:
      _resolve(identifier)
    except AttributeError as err:
      broken[identifier] = f"{pages}: {err}"
  assert not broken, f"API directives naming no object: {broken}"


def test_top_level_names_are_documented_once():
  repeated = {
    identifier: pages
    for identifier, pages in _directives().items()
    if identifier.count(".") == 1 and len(pages) > 1
  }
  assert not repeated, f"documented on several pages: {repeated}"


@pytest.mark.parametrize("name", aliases.__all__)
def test_every_variant_has_a_page(name):
  page = DOCS / "variants" / f"{name}.md"
  assert page.is_file(), f"no page docs/variants/{name}.md for samx.{name}"
  text = page.read_text(encoding="utf-8")
  for section in ("## The step", "## Defaults", "## Reduction", "## Usage"):
    assert section in text, f"docs/variants/{name}.md has no '{section}' section"
  assert f"samx.{name}(" in text, f"docs/variants/{name}.md shows no call of samx.{name}"
  nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
  assert f"variants/{name}.md" in nav, f"variants/{name}.md is not in the mkdocs.yml nav"


# ----------------------------------------------------------------------------- the build


def _docs_tools_available() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ("mkdocs", "mkdocstrings"))


@pytest.mark.skipif(not _docs_tools_available(), reason='needs pip install -e ".[docs]"')
def test_strict_build_succeeds(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
  # The API reference really was generated: every public name has an anchor.
  html = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "api").glob("*/index.html"))
  missing = [name for name in samx.__all__ if f'id="samx.{name}"' not in html]
  assert not missing, f"no generated entry for {missing}"


# ------------------------------------------------------------------- docstring rendering


def _converter():
  spec = importlib.util.spec_from_file_location("rst_docstrings", DOCS / "rst_docstrings.py")
  module = importlib.util.module_from_spec(spec)
  if importlib.util.find_spec("griffe") is None:
    pytest.skip('needs griffe (pip install -e ".[docs]")')
  spec.loader.exec_module(module)
  return module._Converter({"sam", "scale_by_sam"})


def test_rst_pieces_become_markdown():
  text = "\n".join(
    [
      "Scales onto the :math:`\\rho`-ball, see :func:`scale_by_sam` and :func:`jax.grad`.",
      "",
      ".. math::",
      "  \\epsilon = \\rho g",
      "",
      "Call it as::",
      "",
      "  tx.update(grads, state, params)",
      "",
      ">>> 1 + 1",
      "2",
      "",
      "Foret et al., `Sharpness-Aware",
      "Minimization <https://arxiv.org/abs/2010.01412>`_, 2021",
      "",
      "Notes",
      "-----",
      "Plain text with ``code`` and :class:`~samx.masks.Mask`.",
    ]
  )
  out = _converter().convert(text, "samx.ascent")
  assert "$\\rho$-ball" in out
  assert 'identifier="samx.scale_by_sam" optional><code>scale_by_sam</code>' in out
  assert "<code>jax.grad</code>" in out and 'identifier="jax.grad"' not in out
  assert "$$\n\\epsilon = \\rho g\n$$" in out
  assert "Call it as:\n\n```python\ntx.update(grads, state, params)\n```" in out
  assert "```python\n>>> 1 + 1\n2\n```" in out
  assert "[Sharpness-Aware Minimization](https://arxiv.org/abs/2010.01412), 2021" in out
  assert "**Notes**\n\nPlain text with ``code``" in out
  assert "<code>Mask</code></autoref>" in out
  for leftover in (":math:", ":func:", ":class:", ".. math::", "`_", "-----"):
    assert leftover not in out


# ----------------------------------------------------------------------------- tutorial


def _python_blocks(page: pathlib.Path) -> str:
  """The page's ```python blocks, in order: the program the page describes.

  Blocks fenced as ```py are variations shown beside it and are not part of the run.
  """
  text = page.read_text(encoding="utf-8")
  return "\n".join(re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE))


@pytest.mark.slow
def test_nnx_tutorial_runs_as_written():
  pytest.importorskip("sklearn")
  page = DOCS / "guides" / "sam_on_nnx.md"
  source = _python_blocks(page)
  output = io.StringIO()
  with contextlib.redirect_stdout(output):
    exec(compile(source, str(page), "exec"), {"__name__": "sam_on_nnx_tutorial"})
  lines = output.getvalue().splitlines()
  text = page.read_text(encoding="utf-8")
  # The selection printed on the page is the one the code prints.
  for line in lines[:2]:
    assert line in text, f"the tutorial prints {line!r}, which the page does not show"
  epochs = [line for line in lines if line.startswith("epoch")]
  assert len(epochs) == 10
  final_accuracy = float(epochs[-1].rsplit(" ", 1)[-1])
  assert final_accuracy > 0.85, epochs
