"""Stage 2, the evaluation: the gradient at the perturbed parameters, and where ``eps`` lives.

Under ``jax.pmap`` or ``jax.shard_map`` the data-parallel shards are named by an
axis. With ``sync_ascent=True`` (synced SAM) the gradient is averaged over the axis
before the ascent, so every device uses one global perturbation; with
``sync_ascent=False`` each device perturbs along its own local gradient
(m-sharpness, as the official SAM code does). In both cases the gradient at the
perturbed point is averaged over the axis before the base optimizer sees it.
Under ``jax.jit`` with sharded arrays no axis name is needed: the computation is
the single-device one.

Inside a device, ``micro_shards=k`` (an argument of :func:`samx.sharpness_aware`
and of every alias) splits the local batch in order into ``k`` micro-shards
(:func:`split_into_micro_shards`) and gives each its own perturbation under
:func:`jax.vmap`; the evaluation runs once per micro-shard, on that shard, and the
perturbed gradients are averaged (:func:`mean_over_micro_shards`) before the mean
over the named axis. Devices and micro-shards combine: ``n`` devices with ``k``
micro-shards each give ``n * k`` perturbations.

The two contracts
-----------------
Every samx optimizer is called once per step with the clean gradient, the
parameters and keyword extra arguments. There are exactly two contracts:

1. ``grad_fn`` (every variant)::

     tx.update(grads, opt_state, params,
               grad_fn=lambda p: jax.grad(loss_fn)(p, batch))

   ``grad_fn(params) -> grads`` is the gradient of the loss on the current batch.

2. Per-example losses (variants that must see the batch itself: ESAM's data
   selection, micro-shards, Fisher masks)::

     tx.update(grads, opt_state, params,
               per_example_loss_fn=per_example_loss_fn, batch=batch)

   ``batch`` is a pytree whose leaves share a leading example axis of size ``B``,
   and ``per_example_loss_fn(params, batch) -> losses`` returns the ``(B,)``
   per-example losses on that batch (any sub-batch, too). The batch loss is their
   mean: the clean ``grads`` must be ``jax.grad`` of ``mean(losses)``.
   :func:`per_example_losses` checks a call against the contract. A step that
   already has the clean per-example losses may pass them as ``losses=`` (ESAM's
   data selection uses them instead of a forward pass).

An evaluation is a function ``evaluation(params, perturbation, *, who,
**extra_args) -> g_s``; the default is :func:`gradient_at_perturbed`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samx import checks, numerics
from samx.axes import axis_mean, varying_along

__all__ = [
  "CONTRACT_ARGS",
  "Evaluation",
  "axis_mean",
  "batch_size",
  "gradient_at_perturbed",
  "mean_over_micro_shards",
  "per_example_losses",
  "perturbed_gradient",
  "require_per_example_contract",
  "split_into_micro_shards",
  "varying_along",
]

CONTRACT_ARGS = ("grad_fn", "per_example_loss_fn", "batch", "losses")
"""The extra arguments of the two contracts; samx does not pass them to the base optimizer."""

Evaluation = Callable[..., Any]
"""``evaluation(params, perturbation, *, who, **extra_args) -> perturbed grads``."""

PER_EXAMPLE_CALL = (
  "    updates, opt_state = tx.update(grads, opt_state, params,\n"
  "                                   per_example_loss_fn=per_example_loss_fn, batch=batch)\n"
  "with per_example_loss_fn(params, batch) -> losses of shape (B,)"
)


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


def gradient_at_perturbed(
  params: Any,
  perturbation: Any,
  *,
  grad_fn: Callable[[Any], Any] | None = None,
  who: str = "samx",
  **extra_args: Any,
) -> Any:
  """The default evaluation: ``grad_fn(params + perturbation)`` (the first contract).

  Args:
    params: the clean parameters.
    perturbation: the perturbation from the ascent.
    grad_fn: ``grad_fn(params) -> grads`` on the current batch.
    who: the name used in error messages.
    **extra_args: other extra arguments of the step, ignored.

  Returns:
    The gradient at ``params + perturbation``.

  >>> import jax.numpy as jnp
  >>> gradient_at_perturbed({"w": jnp.array(1.0)}, {"w": jnp.array(0.5)},
  ...                       grad_fn=lambda p: {"w": 2 * p["w"]})
  {'w': Array(3., dtype=float32)}
  """
  del extra_args
  return perturbed_gradient(grad_fn, params, perturbation, who=who)


def batch_size(batch: Any, *, who: str = "samx") -> int:
  """The size ``B`` of the leading example axis shared by every leaf of ``batch``.

  >>> batch_size({"x": np.zeros((8, 3)), "y": np.zeros(8)})
  8
  """
  leaves = jax.tree.leaves(batch)
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if not leaves or None in sizes or len(sizes) != 1:
    shapes = jax.tree.map(np.shape, batch)
    raise ValueError(
      f"{who}: batch must be a pytree whose leaves share a leading example axis; "
      f"got leaf shapes {shapes}. Call it as\n{PER_EXAMPLE_CALL}"
    )
  return sizes.pop()


def require_per_example_contract(
  per_example_loss_fn: Any, batch: Any, *, who: str = "samx"
) -> None:
  """Raises unless the second contract's ``per_example_loss_fn`` and ``batch`` are given.

  Checks only what is known before any call: both are present and the function is
  callable (:func:`per_example_losses` checks the shape of its result).

  >>> require_per_example_contract(None, {"x": np.zeros(2)}, who="doc")
  Traceback (most recent call last):
  ...
  TypeError: doc needs the keyword arguments per_example_loss_fn and batch (missing: ...
  """
  if per_example_loss_fn is None or batch is None:
    missing = "per_example_loss_fn" if per_example_loss_fn is None else "batch"
    raise TypeError(
      f"{who} needs the keyword arguments per_example_loss_fn and batch (missing: "
      f"{missing}). Call it as\n{PER_EXAMPLE_CALL}"
    )
  if not callable(per_example_loss_fn):
    raise TypeError(
      f"{who}: per_example_loss_fn must be callable; got "
      f"{type(per_example_loss_fn).__name__}. Call it as\n{PER_EXAMPLE_CALL}"
    )


def per_example_losses(
  per_example_loss_fn: Callable[[Any, Any], Any] | None,
  params: Any,
  batch: Any,
  *,
  who: str = "samx",
) -> jax.Array:
  """Calls ``per_example_loss_fn(params, batch)`` and checks the second contract.

  Args:
    per_example_loss_fn: ``(params, batch) -> losses`` of shape ``(B,)``.
    params: where to evaluate.
    batch: a pytree with a leading example axis of size ``B``.
    who: the name used in error messages.

  Returns:
    The ``(B,)`` losses.

  >>> import jax.numpy as jnp
  >>> per_example_losses(lambda p, b: (b["x"] * p) ** 2, jnp.array(2.0),
  ...                    {"x": jnp.array([1.0, 3.0])})
  Array([ 4., 36.], dtype=float32)
  """
  require_per_example_contract(per_example_loss_fn, batch, who=who)
  size = batch_size(batch, who=who)
  losses = jnp.asarray(per_example_loss_fn(params, batch))
  if losses.shape != (size,):
    raise ValueError(
      f"{who}: per_example_loss_fn(params, batch) must return one loss per example, "
      f"shape ({size},); got shape {losses.shape}. Call it as\n{PER_EXAMPLE_CALL}"
    )
  return losses


def split_into_micro_shards(tree: Any, micro_shards: int, *, who: str = "samx") -> Any:
  """Splits the leading example axis of ``tree`` in order into ``micro_shards`` shards.

  Every leaf of shape ``(B, ...)`` becomes ``(micro_shards, B // micro_shards, ...)``:
  shard ``i`` holds examples ``i * m`` to ``(i + 1) * m - 1`` with ``m = B //
  micro_shards``. ``B`` must be divisible by ``micro_shards``; otherwise the error
  names both.

  Args:
    tree: a batch (or per-example losses) with a leading example axis of size ``B``.
    micro_shards: ``k`` >= 1.
    who: the name used in error messages.

  Returns:
    The tree with leaves of shape ``(k, B // k, ...)``.

  >>> split_into_micro_shards({"x": np.arange(6)}, 3)["x"].tolist()
  [[0, 1], [2, 3], [4, 5]]
  >>> split_into_micro_shards({"x": np.arange(6)}, 4, who="doc")
  Traceback (most recent call last):
  ...
  ValueError: doc: the batch size 6 must be divisible by micro_shards=4 ...
  """
  size = batch_size(tree, who=who)
  if size % micro_shards:
    raise ValueError(
      f"{who}: the batch size {size} must be divisible by micro_shards={micro_shards} "
      f"(each micro-shard gets batch size / micro_shards examples); choose "
      f"micro_shards among the divisors of {size}"
    )
  return jax.tree.map(
    lambda x: jnp.reshape(x, (micro_shards, size // micro_shards, *np.shape(x)[1:])), tree
  )


def mean_over_micro_shards(tree: Any) -> Any:
  """Averages every leaf over its leading (micro-shard) axis, keeping the leaf's dtype.

  The sum is a contraction with a vector of ones, accumulated in float32 (or
  wider), then divided by ``k``; not ``jnp.mean``: jax 0.10's CPU backend lowers a
  reduction over the leading axis of a ``(k, n, m)`` array to a slow path (74 ms
  against 1 ms for ``k = 16`` in ``benchmarks/scaling.py``).

  >>> mean_over_micro_shards({"w": jnp.array([[1.0, 2.0], [3.0, 6.0]])})["w"]
  Array([2., 4.], dtype=float32)
  """

  def leaf(x):
    acc = numerics.accumulation_dtype(x.dtype)
    ones = jnp.ones((x.shape[0],), x.dtype)
    total = jnp.tensordot(ones, x, axes=1, preferred_element_type=acc)
    return (total / jnp.asarray(x.shape[0], acc)).astype(x.dtype)

  return jax.tree.map(leaf, tree)
