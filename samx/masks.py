"""Leaf masks: which parameter leaves a stage acts on.

A mask is given as ``None`` (the stage's default), a pytree of booleans with the
structure of the parameters (or a prefix of it), or a callable
``mask(params) -> pytree of booleans``. Masks are static: they are resolved from
leaf shapes and tree structure, never from values, so they do not change under
``jax.jit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["Mask", "resolve_mask", "weight_leaves"]

Mask = Any | Callable[[Any], Any] | None


def weight_leaves(params: Any) -> Any:
  """Marks the leaves with two or more dimensions (kernels, embeddings) as True.

  This is ASAM's default selection of "weight" leaves: biases and normalization
  scales (one-dimensional) are left out.

  >>> weight_leaves({"kernel": np.ones((3, 2)), "bias": np.ones(2)})
  {'bias': False, 'kernel': True}
  """
  return jax.tree.map(lambda p: np.ndim(p) >= 2, params)


def resolve_mask(mask: Mask, params: Any, *, default: Callable[[Any], Any], name: str = "mask"):
  """Turns a mask argument into a pytree of Python booleans, one per params leaf.

  Args:
    mask: ``None`` (use ``default``), a pytree of booleans matching ``params``
      (or a prefix of it), or a callable ``mask(params) -> pytree of booleans``.
    params: the parameters the mask refers to.
    default: the callable used when ``mask`` is ``None``.
    name: the argument name used in error messages.

  Returns:
    A pytree with the structure of ``params`` whose leaves are Python booleans.

  >>> resolve_mask(None, {"w": np.ones((2, 2)), "b": np.ones(2)}, default=weight_leaves)
  {'b': False, 'w': True}
  >>> resolve_mask({"w": True, "b": False}, {"w": np.ones(2), "b": np.ones(2)},
  ...              default=weight_leaves)
  {'b': False, 'w': True}
  """
  if mask is None:
    mask = default
  selection = mask(params) if callable(mask) else mask
  try:
    return jax.tree.map(
      lambda m, sub: jax.tree.map(lambda _: _as_bool(m, name), sub), selection, params
    )
  except ValueError as err:
    raise ValueError(
      f"{name} must be a pytree of booleans with the structure of params (or a prefix "
      f"of it), or a callable params -> such a pytree.\n"
      f"  {name}:   {jax.tree.structure(selection)}\n"
      f"  params: {jax.tree.structure(params)}\n({err})"
    ) from None


def _as_bool(value: Any, name: str) -> bool:
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  raise TypeError(f"{name} leaves must be Python booleans (static under jit); got {value!r}")
