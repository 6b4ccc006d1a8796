"""Stage 2, the evaluation: the gradient at the perturbed parameters, and where ``eps`` lives.

Under ``jax.pmap`` or ``jax.shard_map`` the data-parallel shards are named by an
axis. With ``sync_ascent=True`` (synced SAM) the gradient is averaged over the axis
before the ascent, so every device uses one global perturbation; with
``sync_ascent=False`` each device perturbs along its own local gradient
(m-sharpness, as the official SAM code does). In both cases the gradient at the
perturbed point is averaged over the axis before the base optimizer sees it.
Under ``jax.jit`` with sharded arrays no axis name is needed: the computation is
the single-device one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from samx import checks

__all__ = ["axis_mean", "perturbed_gradient"]


def axis_mean(tree: Any, axis_name: str | None) -> Any:
  """Averages ``tree`` over the named axis; the identity when ``axis_name`` is None.

  Raises a clear error when the axis is not bound (the step is not running under
  ``pmap`` / ``shard_map`` with that axis name).

  Args:
    tree: the pytree to average.
    axis_name: the named axis, or ``None``.

  Returns:
    The average over the axis (the same on every device).

  >>> import jax, jax.numpy as jnp
  >>> jax.vmap(lambda x: axis_mean(x, "i"), axis_name="i")(jnp.array([1.0, 3.0]))
  Array([2., 2.], dtype=float32)
  """
  if axis_name is None:
    return tree
  try:
    return jax.lax.pmean(tree, axis_name)
  except NameError as err:
    raise NameError(
      f"axis_name={axis_name!r} is not bound here: run the training step under "
      f"jax.pmap(..., axis_name={axis_name!r}) or jax.shard_map over a mesh with that "
      "axis, or pass axis_name=None under plain jax.jit (sharded arrays need no axis "
      f"name). ({err})"
    ) from None


def perturbed_gradient(
  grad_fn: Callable[[Any], Any],
  params: Any,
  perturbation: Any,
  *,
  who: str = "samx",
) -> Any:
  r"""Evaluates :math:`g_s = \nabla L(w + \epsilon)` with the user's ``grad_fn``.

  ``w + eps`` keeps the parameters' dtype. The result must have the structure and
  leaf shapes of ``params``; otherwise an error names both structures.

  Args:
    grad_fn: ``grad_fn(params) -> grads`` on the current batch.
    params: the clean parameters :math:`w`.
    perturbation: :math:`\epsilon`, with the structure of ``params``.
    who: the name used in error messages.

  Returns:
    The gradient at the perturbed parameters.

  >>> import jax.numpy as jnp
  >>> perturbed_gradient(lambda p: {"w": 2 * p["w"]}, {"w": jnp.array(1.0)},
  ...                    {"w": jnp.array(0.5)})
  {'w': Array(3., dtype=float32)}
  """
  checks.require_grad_fn(grad_fn, who)
  perturbed = optax.apply_updates(params, perturbation)
  grads = grad_fn(perturbed)
  checks.check_same_structure("grad_fn(params) output", grads, "params", params)
  return grads
