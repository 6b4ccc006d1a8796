"""The sharpness-aware step: ascent -> evaluate -> combine -> descend, in one ``update``.

:func:`sharpness_aware` wires the four stages into one
:class:`optax.GradientTransformationExtraArgs`. One call to ``update`` is one
training step: the base optimizer's state, schedules and counters advance once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optax

from samx import checks
from samx.combination import Combination, use_perturbed_gradient
from samx.evaluation import CONTRACT_ARGS, Evaluation, axis_mean, gradient_at_perturbed

__all__ = ["SharpnessAwareState", "sharpness_aware"]


class SharpnessAwareState(NamedTuple):
  """State of :func:`sharpness_aware` and of every samx alias.

  Attributes:
    ascent_state: state of the ascent transformation (g -> eps).
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

  Args:
    optimizer: the base optax optimizer (the descent stage), used unchanged.
    ascent: a transformation mapping ``g`` to the perturbation ``eps``, e.g.
      :func:`samx.scale_by_sam`.
    evaluation: ``evaluation(params, perturbation, *, who, **extra_args) -> g_s``;
      default :func:`samx.gradient_at_perturbed` (calls ``grad_fn``).
    combination: the combine stage; default :func:`samx.use_perturbed_gradient`.
      It receives a function that evaluates ``g_s`` and may skip calling it.
    axis_name: the named data-parallel axis under ``pmap`` / ``shard_map``; the
      perturbed gradient is averaged over it. ``None`` under plain ``jit``.
    sync_ascent: with ``axis_name``, which devices share one ``eps``: ``True``
      averages ``g`` over ``axis_name`` before the ascent (one global ``eps``, synced
      SAM); ``False`` keeps one ``eps`` per device (m-sharpness, no collective before
      the ascent); an axis name or a tuple of names (a subset of ``axis_name``)
      averages over those axes only, so groups of devices share ``eps`` (e.g. a mesh
      ``("hosts", "chips")`` with ``axis_name=("hosts", "chips")`` and
      ``sync_ascent="chips"``).
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
  ascent_axes = _ascent_axes(sync_ascent, axis_name)
  default_evaluation = gradient_at_perturbed
  if evaluation is None:
    evaluation = default_evaluation
  if combination is None:
    combination = use_perturbed_gradient()
  ascent = optax.with_extra_args_support(ascent)
  optimizer = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    return SharpnessAwareState(
      ascent_state=ascent.init(params),
      combine_state=combination.init(params),
      base_state=optimizer.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    checks.require_params(params, name)
    checks.check_same_structure("grads", updates, "params", params)
    if evaluation is default_evaluation:
      # Fail before any work, with the expected call, when the contract is not met.
      checks.require_grad_fn(extra_args.get("grad_fn"), name)
    grads = axis_mean(updates, ascent_axes)
    perturbation, ascent_state = ascent.update(grads, state.ascent_state, params, **extra_args)

    def evaluate():
      perturbed = evaluation(params, perturbation, who=name, **extra_args)
      return axis_mean(perturbed, axis_name)

    direction, combine_state = combination.update(grads, evaluate, state.combine_state, params)
    base_args = {k: v for k, v in extra_args.items() if k not in CONTRACT_ARGS}
    updates, base_state = optimizer.update(direction, state.base_state, params, **base_args)
    return updates, SharpnessAwareState(ascent_state, combine_state, base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _axis_names(axis_name: str | tuple[str, ...] | None) -> tuple[str, ...]:
  if axis_name is None:
    return ()
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _ascent_axes(sync_ascent: Any, axis_name: Any) -> str | tuple[str, ...] | None:
  """The axes ``g`` is averaged over before the ascent (``None``: none)."""
  if sync_ascent is True:
    return axis_name
  if sync_ascent is False or sync_ascent is None:
    return None
  wanted = _axis_names(sync_ascent)
  if not wanted or not set(wanted) <= set(_axis_names(axis_name)):
    raise ValueError(
      "sync_ascent must be True, False, or axis names contained in axis_name; got "
      f"sync_ascent={sync_ascent!r} with axis_name={axis_name!r}"
    )
  return sync_ascent
