"""The sharpness-aware step: ascent -> evaluate -> combine -> descend, in one ``update``.

:func:`sharpness_aware` wires the four stages into one
:class:`optax.GradientTransformationExtraArgs`. One call to ``update`` is one
training step: the base optimizer's state, schedules and counters advance once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samx import axes, checks
from samx.axes import axis_mean
from samx.combination import Combination, use_perturbed_gradient
from samx.evaluation import (
  CONTRACT_ARGS,
  Evaluation,
  batch_size,
  gradient_at_perturbed,
  mean_over_micro_shards,
  per_example_losses,
  require_per_example_contract,
  split_into_micro_shards,
)

__all__ = ["SharpnessAwareState", "sharpness_aware"]


class SharpnessAwareState(NamedTuple):
  """State of :func:`sharpness_aware` and of every samx alias.

  Attributes:
    ascent_state: state of the ascent transformation (g -> eps). With
      ``micro_shards=k > 1`` every leaf has a leading axis of size ``k``: one
      ascent state per micro-shard.
    combine_state: state of the combination (g, g_s -> d).
    base_state: state of the base optimizer (d -> updates).
  """

  ascent_state: Any
  combine_state: Any
  base_state: Any


def sharpness_aware(
  optimizer: optax.GradientTransformation,
  ascent: optax.GradientTransformation,
  *,
  evaluation: Evaluation | None = None,
  combination: Combination | None = None,
  axis_name: str | None = None,
  sync_ascent: bool | str | tuple[str, ...] = True,
  micro_shards: int | None = None,
  name: str = "sharpness_aware",
) -> optax.GradientTransformationExtraArgs:
  r"""Builds a sharpness-aware optimizer from its four stages.

  For the gradient ``g`` given as ``updates``:

  .. math::
    \epsilon = \mathrm{ascent}(g), \quad
    g_s = \mathrm{grad\_fn}(w + \epsilon), \quad
    d = \mathrm{combination}(g, g_s), \quad
    \Delta w = \mathrm{optimizer}(d)

  ``update`` needs ``params`` and the keyword extra argument
  ``grad_fn(params) -> grads`` (the gradient of the loss on the current batch),
  or, for evaluations that must see the batch, the per-example contract
  (``per_example_loss_fn`` and ``batch``, see :mod:`samx.evaluation`). Every extra
  argument reaches the ascent and the evaluation; the base optimizer gets the
  extra arguments other than these contract arguments.

  **Micro-shards** (``micro_shards=k > 1``, m-sharpness inside a device). The step
  uses the per-example contract: the (local) batch is split in order into ``k``
  equal micro-shards :math:`B_i` of ``m = B / k`` examples, and under
  :func:`jax.vmap` over the shards

  .. math::
    g_i = \nabla \tfrac{1}{m}\textstyle\sum_{n \in B_i} \ell_n(w), \quad
    (\epsilon_i, s_i) = \mathrm{ascent}(g_i, s_i), \quad
    h_i = \mathrm{evaluation}(w, \epsilon_i)\ \text{on}\ B_i, \qquad
    g = \tfrac{1}{k}\textstyle\sum_i g_i, \quad
    g_s = \tfrac{1}{k}\textstyle\sum_i h_i

  The ascent and the evaluation of shard ``i`` get that shard's extra arguments:
  ``batch`` = :math:`B_i`, ``losses`` (if given) its ``(m,)`` slice, and ``grad_fn``
  = the gradient of the shard's mean loss (a ``grad_fn`` passed to ``update`` is
  not used). The combination sees :math:`g` and :math:`g_s` (then averaged over
  ``axis_name``): combine-stage variants (GSAM, WSAM, LookSAM) act on the averaged
  gradients, and a combination that skips ``evaluate`` skips every shard's
  evaluation. The ascent state :math:`s_i` is per micro-shard: each leaf of
  ``ascent_state`` has a leading axis of size ``k``, built by broadcasting
  ``ascent.init(params)``, so every shard starts alike (a random ascent draws the
  same numbers on every shard, as it does on every device) and then follows its
  own gradients (F-SAM's EMA, VaSSO's average, SSAM's mask and schedules' step
  counts are per shard).

  The clean ``grads`` passed to ``update`` are not used: samx computes the
  :math:`g_i` itself, so a step may pass zeros and then costs the FLOPs of SAM (one
  gradient pass for the :math:`g_i`, one for the :math:`h_i`, no third pass).
  Memory: ``k`` perturbations :math:`\epsilon_i`, ``k`` per-shard gradients (and
  perturbed points) and ``k`` copies of the ascent state, i.e. about ``k x
  |params|`` per stored tree. BatchNorm inside ``per_example_loss_fn`` sees each
  micro-shard alone (ghost batch statistics). Under :func:`jax.vmap` a
  :func:`jax.lax.cond` in the ascent (SSAM's mask refresh) becomes a select that
  runs both branches, on every step.

  With ``axis_name``, devices and micro-shards combine (``n`` devices, ``k``
  micro-shards each: ``n * k`` perturbations; with SAM's combination the only
  collective is the mean of :math:`g_s`). ``sync_ascent`` must then be ``False``:
  sharing ``eps`` across devices would pair micro-shards of different devices by
  their index, which is no grouping a user can name. samx differentiates with respect to
  parameters cast to varying along ``axis_name``, so under :func:`jax.shard_map`
  with replication checking the :math:`g_i` stay local. ``micro_shards`` sets
  shapes: under :func:`optax.inject_hyperparams` an explicit value needs
  ``static_args="micro_shards"`` (the default ``None``, which is 1, is left alone
  by ``inject_hyperparams``).

  Args:
    optimizer: the base optax optimizer (the descent stage), used unchanged.
    ascent: a transformation mapping ``g`` to the perturbation ``eps``, e.g.
      :func:`samx.scale_by_sam`.
    evaluation: ``evaluation(params, perturbation, *, who, **extra_args) -> g_s``;
      default :func:`samx.gradient_at_perturbed` (calls ``grad_fn``).
    combination: the combine stage; default :func:`samx.use_perturbed_gradient`.
      It receives a function that evaluates ``g_s`` and may skip calling it.
    axis_name: the named data-parallel axis (or a tuple of axes) under ``pmap`` /
      ``shard_map``: ``g`` and ``g_s`` are averaged over it before the combination,
      so no combination takes an axis name. Under ``shard_map`` with replication
      checking the clean gradient must be each device's own (see :mod:`samx.axes`).
      ``None`` under plain ``jit`` (sharded arrays need no axis name).
    sync_ascent: with ``axis_name``, which devices share one ``eps``: ``True``
      averages ``g`` over ``axis_name`` before the ascent (one global ``eps``, synced
      SAM); ``False`` keeps one ``eps`` per device (m-sharpness, no collective before
      the ascent); an axis name or a tuple of names (a subset of ``axis_name``)
      averages over those axes only, so groups of devices share ``eps`` (e.g. a mesh
      ``("hosts", "chips")`` with ``axis_name=("hosts", "chips")`` and
      ``sync_ascent="chips"``). With ``micro_shards > 1`` and ``axis_name`` it must
      be ``False`` (one ``eps`` per micro-shard per device).
    micro_shards: ``k`` >= 1, the number of micro-shards of the local batch, each
      with its own ``eps`` (see above); ``None`` (default) or 1 is the plain step.
    name: the name used in error messages.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with state
    :class:`SharpnessAwareState`.

  >>> import jax, jax.numpy as jnp
  >>> from samx import scale_by_sam
  >>> tx = sharpness_aware(optax.sgd(0.1), scale_by_sam(0.5))
  >>> loss = lambda p: jnp.sum(p ** 2)
  >>> params = jnp.array([3.0, 4.0])
  >>> updates, state = tx.update(jax.grad(loss)(params), tx.init(params), params,
  ...                            grad_fn=jax.grad(loss))
  >>> [round(float(u), 4) for u in updates]   # -0.1 * 2 * (w + 0.5 * w / |w|)
  [-0.66, -0.88]
  """
  axes.check_axis_name(axis_name, who=name)
  ascent_axes = _ascent_axes(sync_ascent, axis_name)
  # The axes g still has to be averaged over after the ascent (a mean of group means).
  rest_axes = tuple(
    a for a in axes.axis_names(axis_name) if a not in axes.axis_names(ascent_axes)
  )
  rest_axes = rest_axes or None
  micro_shards = _check_micro_shards(micro_shards)
  if micro_shards > 1 and ascent_axes is not None:
    raise ValueError(
      "with micro_shards > 1 every micro-shard of every device keeps its own eps, so "
      f"sync_ascent must be False; got sync_ascent={sync_ascent!r} with "
      f"axis_name={axis_name!r} and micro_shards={micro_shards}"
    )
  default_evaluation = gradient_at_perturbed
  if evaluation is None:
    evaluation = default_evaluation
  if combination is None:
    combination = use_perturbed_gradient()
  fingerprint = axes.configuration_fingerprint(
    name, optimizer, ascent, evaluation, combination, axis_name, sync_ascent, micro_shards
  )
  compared = []  # the configuration is compared across processes once, at the first init
  ascent = optax.with_extra_args_support(ascent)
  optimizer = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    if not compared:
      axes.check_same_configuration_across_processes(fingerprint, who=name)
      compared.append(True)
    ascent_state = ascent.init(params)
    if micro_shards > 1:
      ascent_state = jax.tree.map(
        lambda x: jnp.broadcast_to(x, (micro_shards, *jnp.shape(x))), ascent_state
      )
    return SharpnessAwareState(
      ascent_state=ascent_state,
      combine_state=combination.init(params),
      base_state=optimizer.init(params),
    )

  def global_stages(updates, ascent_state, params, extra_args):
    """The ascent on ``g`` (averaged over ``ascent_axes``) and a thunk for ``g_s``."""
    if evaluation is default_evaluation:
      # Fail before any work, with the expected call, when the contract is not met.
      checks.require_grad_fn(extra_args.get("grad_fn"), name)
    axes.require_per_device(updates, axis_name, what="the clean gradient (updates)", who=name)
    local = axes.varying_along(params, axis_name)
    grads = axis_mean(updates, ascent_axes)
    perturbation, ascent_state = ascent.update(grads, ascent_state, local, **extra_args)

    def evaluate():
      perturbed = evaluation(local, perturbation, who=name, **extra_args)
      axes.require_per_device(perturbed, axis_name, what=_EVALUATED, who=name)
      return axis_mean(perturbed, axis_name)

    return axis_mean(grads, rest_axes), ascent_state, evaluate

  def micro_shard_stages(ascent_state, params, extra_args):
    """The ascent per micro-shard under ``vmap``; the thunk averages the ``h_i``."""
    loss_fn, batch = extra_args.get("per_example_loss_fn"), extra_args.get("batch")
    require_per_example_contract(loss_fn, batch, who=name)
    shards = {"batch": split_into_micro_shards(batch, micro_shards, who=name)}
    if extra_args.get("losses") is not None:
      shards["losses"] = _split_losses(extra_args["losses"], batch, micro_shards, name)
    # On an Explicit mesh each micro-shard (sharded over the devices with the batch)
    # needs whole params and its own slice of the ascent state.
    local = axes.unsharded(axes.varying_along(params, axis_name))
    incoming_state = ascent_state
    ascent_state = axes.shard_leading_axis(ascent_state, axes.leading_axis_spec(shards))

    def shard_args(shard):
      def shard_loss(p):
        return jnp.mean(per_example_losses(loss_fn, p, shard["batch"], who=name))

      def grad_fn(p):
        return jax.grad(shard_loss)(axes.varying_along(p, axis_name))

      return {**extra_args, **shard, "grad_fn": grad_fn}

    def ascend(shard, state):
      args = shard_args(shard)
      grads = args["grad_fn"](local)
      perturbation, state = ascent.update(grads, state, local, **args)
      return grads, perturbation, state

    shard_grads, perturbations, ascent_state = jax.vmap(ascend)(shards, ascent_state)
    ascent_state = axes.sharded_like(ascent_state, incoming_state)

    def evaluate():
      def one(shard, perturbation):
        return evaluation(local, perturbation, who=name, **shard_args(shard))

      perturbed = jax.vmap(one)(shards, perturbations)
      axes.require_per_device(perturbed, axis_name, what=_EVALUATED, who=name)
      return axes.sharded_like(axis_mean(mean_over_micro_shards(perturbed), axis_name), params)

    grads = axes.sharded_like(axis_mean(mean_over_micro_shards(shard_grads), axis_name), params)
    return grads, ascent_state, evaluate

  def update_fn(updates, state, params=None, **extra_args):
    checks.require_params(params, name)
    checks.check_same_structure("grads", updates, "params", params)
    axes.require_replicated(params, axis_name, who=name)
    if axis_name is not None:
      extra_args = _per_device_contract(extra_args, axis_name)
    if micro_shards > 1:
      grads, ascent_state, evaluate = micro_shard_stages(state.ascent_state, params, extra_args)
    else:
      grads, ascent_state, evaluate = global_stages(
        updates, state.ascent_state, params, extra_args
      )
    direction, combine_state = combination.update(grads, evaluate, state.combine_state, params)
    base_args = {k: v for k, v in extra_args.items() if k not in CONTRACT_ARGS}
    updates, base_state = optimizer.update(direction, state.base_state, params, **base_args)
    return updates, SharpnessAwareState(ascent_state, combine_state, base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_EVALUATED = "the gradient at the perturbed params (what grad_fn returned)"


def _per_device_contract(extra_args: dict[str, Any], axis_name: Any) -> dict[str, Any]:
  """``grad_fn`` evaluated at params cast to varying along ``axis_name``.

  Under ``shard_map`` with replication checking the user's ``jax.grad(loss)(p, batch)``
  then returns the device's own gradient whatever ``p`` samx passes (the cast is a
  no-op elsewhere and for params that already vary).
  """
  grad_fn = extra_args.get("grad_fn")
  if not callable(grad_fn):
    return extra_args

  def per_device_grad_fn(p):
    return grad_fn(axes.varying_along(p, axis_name))

  return {**extra_args, "grad_fn": per_device_grad_fn}


def _check_micro_shards(micro_shards: Any) -> int:
  if micro_shards is None:
    return 1
  if isinstance(micro_shards, bool) or not isinstance(micro_shards, (int, np.integer)):
    hint = ""
    if isinstance(micro_shards, (jax.Array, np.ndarray)):
      hint = " (under optax.inject_hyperparams pass static_args=('micro_shards',))"
    raise TypeError(
      f"micro_shards must be an integer >= 1 or None (a Python int: it sets shapes); got "
      f"micro_shards={micro_shards!r}{hint}"
    )
  if micro_shards < 1:
    raise ValueError(f"micro_shards must be an integer >= 1; got micro_shards={micro_shards!r}")
  return int(micro_shards)


def _split_losses(losses: Any, batch: Any, micro_shards: int, who: str) -> jax.Array:
  """The optional ``(B,)`` clean per-example losses, split like the batch."""
  losses = jnp.asarray(losses)
  size = batch_size(batch, who=who)
  if losses.shape != (size,):
    raise ValueError(
      f"{who}: losses must be the ({size},) per-example losses of the batch at params; "
      f"got shape {losses.shape}"
    )
  return split_into_micro_shards(losses, micro_shards, who=who)


def _ascent_axes(sync_ascent: Any, axis_name: Any) -> str | tuple[str, ...] | None:
  """The axes ``g`` is averaged over before the ascent (``None``: none)."""
  if sync_ascent is True:
    return axis_name
  if sync_ascent is False or sync_ascent is None:
    return None
  try:
    wanted = axes.axis_names(sync_ascent) if isinstance(sync_ascent, (str, tuple)) else ()
  except (TypeError, ValueError):  # not axis names at all: the message below says what is
    wanted = ()
  if not wanted or not set(wanted) <= set(axes.axis_names(axis_name)):
    raise ValueError(
      "sync_ascent must be True, False, or axis names contained in axis_name; got "
      f"sync_ascent={sync_ascent!r} with axis_name={axis_name!r}"
    )
  return sync_ascent
