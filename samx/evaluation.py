"""Stage 2, the evaluation: the gradient at the perturbed parameters, and where ``eps`` lives.

Under ``jax.pmap`` or ``jax.shard_map`` the data-parallel shards are named by an
axis. With ``sync_ascent=True`` (synced SAM) the gradient is averaged over the axis
before the ascent, so every device uses one global perturbation; with
``sync_ascent=False`` each device perturbs along its own local gradient
(m-sharpness, as the official SAM code does). In both cases the gradient at the
perturbed point is averaged over the axis before the base optimizer sees it.
Under ``jax.jit`` with sharded arrays no axis name is needed: the computation is
the single-device one.

The two contracts
-----------------
Every samx optimizer is called once per step with the clean gradient, the
parameters and keyword extra arguments. There are exactly two contracts:

1. ``grad_fn`` (every variant)::

     tx.update(grads, opt_state, params,
               grad_fn=lambda p: jax.grad(loss_fn)(p, batch))

   ``grad_fn(params) -> grads`` is the gradient of the loss on the current batch.

2. Per-example losses (variants that must see the batch itself: ESAM's data
   selection, micro-shard mSAM, Fisher masks)::

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

from samx import checks

__all__ = [
  "CONTRACT_ARGS",
  "Evaluation",
  "axis_mean",
  "batch_size",
  "gradient_at_perturbed",
  "micro_shard_evaluation",
  "per_example_losses",
  "perturbed_gradient",
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
  size = batch_size(batch, who=who)
  losses = jnp.asarray(per_example_loss_fn(params, batch))
  if losses.shape != (size,):
    raise ValueError(
      f"{who}: per_example_loss_fn(params, batch) must return one loss per example, "
      f"shape ({size},); got shape {losses.shape}. Call it as\n{PER_EXAMPLE_CALL}"
    )
  return losses


def micro_shard_evaluation(
  ascent: Any,
  micro_shards: int,
) -> Evaluation:
  r"""mSAM on one device: one perturbation per micro-shard of the batch, via ``vmap``.

  The batch (second contract: ``per_example_loss_fn`` and ``batch``) is split in
  order into ``micro_shards`` equal shards :math:`B_i`. For each shard, under
  :func:`jax.vmap`:

  .. math::
    g_i = \nabla L_{B_i}(w), \quad \epsilon_i = \mathrm{ascent}(g_i), \quad
    h_i = \nabla L_{B_i}(w + \epsilon_i), \qquad g_s = \tfrac{1}{k} \textstyle\sum_i h_i

  Together the :math:`g_i` cost one gradient pass over the batch and the
  :math:`h_i` another: the FLOPs of SAM. The clean ``grads`` given to ``update``
  are not used by this evaluation (samx needs the per-shard gradients), so a
  training step may pass zeros instead of computing them. Memory: ``k`` copies of
  the parameters for the perturbed points and the per-shard gradients.
  BatchNorm inside ``per_example_loss_fn`` sees each micro-shard alone (ghost batch
  statistics).

  The ascent is applied to each shard's gradient with a fresh state every step, so
  it must be stateless in effect (e.g. :func:`samx.scale_by_sam` or
  :func:`samx.scale_by_asam` with a number or per-leaf radius, not a schedule).

  Args:
    ascent: the transformation ``g_i -> eps_i``.
    micro_shards: ``k``, which must divide the batch size.

  Returns:
    An evaluation for :func:`samx.sharpness_aware` (use with ``optax.identity()`` as
    its ascent stage, as :func:`samx.msam` does).

  >>> import jax.numpy as jnp, samx
  >>> ev = micro_shard_evaluation(samx.scale_by_sam(0.0), micro_shards=2)
  >>> losses = lambda w, b: 0.5 * (b["x"] * w) ** 2
  >>> ev(jnp.array(1.0), None, per_example_loss_fn=losses, batch={"x": jnp.arange(4.0)})
  Array(3.5, dtype=float32)
  """
  if not isinstance(micro_shards, int) or micro_shards < 1:
    raise ValueError(f"micro_shards must be an integer >= 1; got micro_shards={micro_shards!r}")

  def evaluation(params, perturbation, *, who="samx", **extra_args):
    del perturbation
    fn = extra_args.get("per_example_loss_fn")
    batch = extra_args.get("batch")
    per_example_losses(fn, params, batch, who=who)  # checks the contract (traced once)
    size = batch_size(batch, who=who)
    if size % micro_shards:
      raise ValueError(
        f"{who}: the batch size {size} must be divisible by micro_shards={micro_shards}"
      )
    shards = jax.tree.map(
      lambda x: x.reshape(micro_shards, size // micro_shards, *x.shape[1:]), batch
    )
    ascent_state = ascent.init(params)

    def one(shard):
      grad = jax.grad(lambda p: jnp.mean(fn(p, shard)))
      eps, _ = ascent.update(grad(params), ascent_state, params)
      return grad(optax.apply_updates(params, eps))

    per_shard = jax.vmap(one)(shards)
    # A contraction with 1/k, not jnp.mean: jax 0.10's CPU backend runs that reduce
    # through a slow path (74 ms vs 1 ms for k = 16 in benchmarks/scaling.py).
    weights = jnp.full((micro_shards,), 1.0 / micro_shards)
    return jax.tree.map(
      lambda h: jnp.tensordot(weights.astype(h.dtype), h, axes=1).astype(h.dtype), per_shard
    )

  return evaluation
