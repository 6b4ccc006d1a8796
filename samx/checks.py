"""Argument validation with messages that name the argument and the expected form.

Checks run on Python-level configuration only. Values that are traced (for
example hyperparameters injected by :func:`optax.inject_hyperparams` under
``jax.jit``) are not inspected: data-dependent conditions are never raised from
traced code.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = [
  "check_condition",
  "check_nonnegative",
  "check_positive",
  "check_same_structure",
  "require_grad_fn",
  "require_params",
]

GRAD_FN_CALL = (
  "    updates, opt_state = tx.update(grads, opt_state, params,\n"
  "                                   grad_fn=lambda p: jax.grad(loss_fn)(p, batch))"
)


def _concrete_values(value: Any):
  """Yields the concrete numbers inside ``value``; skips tracers and callables."""
  for leaf in jax.tree.leaves(value):
    if callable(leaf) or isinstance(leaf, jax.core.Tracer):
      continue
    if isinstance(leaf, (numbers.Number, np.ndarray, np.generic, jax.Array)):
      yield from np.asarray(leaf, dtype=np.float64).ravel()
    else:
      raise TypeError(
        f"expected a number, an array, a schedule or a pytree of them; got {leaf!r}"
      )


def check_condition(name: str, value: Any, ok: Callable[[float], bool], form: str) -> None:
  """Raises ``ValueError`` unless ``ok(v)`` for every concrete number ``v`` in ``value``.

  ``form`` describes what is expected and appears in the message with the value.

  >>> check_condition("decay", 1.5, lambda v: 0 <= v <= 1, "a number in [0, 1]")
  Traceback (most recent call last):
  ...
  ValueError: decay must be a number in [0, 1]; got decay=1.5
  """
  try:
    values = list(_concrete_values(value))
  except TypeError as err:
    raise TypeError(f"{name} must be {form}: {err}") from None
  bad = [v for v in values if not ok(v)]
  if bad:
    hint = ""
    leaves = jax.tree.leaves(value)
    if any(np.dtype(getattr(x, "dtype", np.float64)).itemsize < 4 for x in leaves):
      hint = (
        " (a low-precision array: under optax.inject_hyperparams, pass "
        "hyperparam_dtype=jnp.float32 so small values do not round to 0)"
      )
    raise ValueError(f"{name} must be {form}; got {name}={value!r}{hint}")


def check_nonnegative(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless every concrete number in ``value`` is >= 0.

  >>> check_nonnegative("rho", -0.1)
  Traceback (most recent call last):
  ...
  ValueError: rho must be a non-negative number, schedule or pytree of them; got rho=-0.1
  """
  check_condition(
    name,
    value,
    lambda v: v >= 0,
    "a non-negative number, schedule or pytree of them",
  )


def check_positive(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless every concrete number in ``value`` is > 0.

  >>> check_positive("eps", 0.0)
  Traceback (most recent call last):
  ...
  ValueError: eps must be a positive number; got eps=0.0
  """
  check_condition(name, value, lambda v: v > 0, "a positive number")


def require_params(params: Any, who: str) -> None:
  """Raises when ``params`` is ``None``: the SAM family perturbs the parameters."""
  if params is None:
    raise ValueError(
      f"{who} needs the current parameters to perturb them: call "
      "tx.update(grads, opt_state, params, grad_fn=...) with params, not params=None."
    )


def require_grad_fn(grad_fn: Any, who: str) -> None:
  """Raises when the ``grad_fn`` extra argument is missing or not callable."""
  if grad_fn is None:
    raise TypeError(
      f"{who} needs the keyword argument grad_fn(params) -> grads to evaluate the "
      f"gradient at the perturbed parameters. Call it as\n{GRAD_FN_CALL}"
    )
  if not callable(grad_fn):
    raise TypeError(
      f"{who}: grad_fn must be a callable grad_fn(params) -> grads; got "
      f"{type(grad_fn).__name__}. Call it as\n{GRAD_FN_CALL}"
    )


def check_same_structure(name_a: str, a: Any, name_b: str, b: Any) -> None:
  """Raises when two pytrees differ in structure or in leaf shapes.

  >>> check_same_structure("grads", {"w": 1.0}, "params", {"v": 1.0})
  Traceback (most recent call last):
  ...
  ValueError: grads and params must have the same tree structure.
    grads:  PyTreeDef({'w': *})
    params: PyTreeDef({'v': *})
  """
  tree_a, tree_b = jax.tree.structure(a), jax.tree.structure(b)
  if tree_a != tree_b:
    width = max(len(name_a), len(name_b)) + 1
    raise ValueError(
      f"{name_a} and {name_b} must have the same tree structure.\n"
      f"  {name_a + ':':<{width}} {tree_a}\n  {name_b + ':':<{width}} {tree_b}"
    )
  for path_leaf_a, leaf_b in zip(
    jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
  ):
    path, leaf_a = path_leaf_a
    if np.shape(leaf_a) != np.shape(leaf_b):
      raise ValueError(
        f"{name_a} and {name_b} differ in shape at {jax.tree_util.keystr(path)}: "
        f"{np.shape(leaf_a)} vs {np.shape(leaf_b)}"
      )


_check = check_condition  # older private name
