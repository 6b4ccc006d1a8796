"""The public surface: explicit ``__all__``, documented and example-bearing symbols."""

from __future__ import annotations

import inspect

import pytest

import samx

PUBLIC = [name for name in samx.__all__ if not inspect.ismodule(getattr(samx, name))]


def test_all_is_sorted_and_complete():
  assert samx.__all__ == sorted(samx.__all__)
  exported = {
    name
    for name, value in vars(samx).items()
    if not name.startswith("_") and getattr(value, "__module__", "").startswith("samx")
  }
  assert exported <= set(samx.__all__)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_symbol_is_documented(name):
  obj = getattr(samx, name)
  doc = inspect.getdoc(obj)
  assert doc and len(doc.splitlines()[0]) > 10, f"{name} needs a one-line summary"
  if inspect.isfunction(obj):
    assert ">>>" in doc, f"{name} needs a runnable example"
    params = [p for p in inspect.signature(obj).parameters if p not in ("args", "kwargs")]
    if params:
      assert "Args:" in doc or "Attributes:" in doc or len(params) <= 1, name
  else:
    assert "Attributes:" in doc, f"{name} (a state/record) documents its fields"
