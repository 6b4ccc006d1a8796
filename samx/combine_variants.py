"""Combine-stage variants: GSAM, WSAM and LookSAM, as combinations and as aliases.

Each variant is a :class:`samx.Combination` (how ``g`` and ``g_s`` make the
descent direction) plus a one-call alias that plugs it into
:func:`samx.sharpness_aware` with SAM's ascent:

* :func:`surrogate_gap_guided` / :func:`gsam`: GSAM's gradient decomposition, with
  :func:`gsam_rho_schedule` for the radius that follows the learning rate.
* :func:`weighted_sharpness` / :func:`wsam`: WSAM's weighted sharpness, coupled
  (one direction) or decoupled (:func:`add_sharpness_step` adds a separate
  sharpness step after the base optimizer).
* :func:`reuse_orthogonal_component` / :func:`looksam`: LookSAM evaluates
  ``g_s`` only every ``k`` steps, inside :func:`jax.lax.cond`, and reuses the
  stored component of ``g_s`` orthogonal to ``g`` in between;
  :func:`defer_ascent` moves the ascent into that branch too.

No combination takes ``axis_name``: :func:`samx.sharpness_aware` hands every
combination ``g`` and ``g_s`` already averaged over the data-parallel axis, whatever
``sync_ascent`` is, so every device descends alike (see :mod:`samx.axes`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samx import axes, checks, numerics
from samx.ascent import Ball, scale_by_sam
from samx.combination import Combination
from samx.evaluation import Evaluation, gradient_at_perturbed
from samx.pipeline import sharpness_aware

__all__ = [
  "DeferredPerturbation",
  "LookSAMState",
  "SharpnessDirection",
  "SharpnessStepState",
  "add_sharpness_step",
  "defer_ascent",
  "gsam",
  "gsam_rho_schedule",
  "looksam",
  "reuse_orthogonal_component",
  "surrogate_gap_guided",
  "weighted_sharpness",
  "wsam",
]


# ---------------------------------------------------------------------------
# Shared numerics: float32-accumulated dot products and per-leaf linear maps.
# ---------------------------------------------------------------------------


def _tree_dot(a: Any, b: Any) -> jax.Array:
  """The inner product over all leaves, accumulated in float32 or wider.

  An elementwise product and a full sum per leaf, not ``jnp.vdot``: on an Explicit
  mesh a contraction over a dimension sharded in both operands has no output
  sharding to infer, while a reduction of a sharded array is a replicated scalar.
  """
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  if not leaves_a:
    return jnp.zeros((), jnp.float32)
  dtype = numerics.accumulation_dtype(jnp.result_type(*leaves_a, *leaves_b))
  return sum(
    jnp.sum(jnp.conj(jnp.asarray(x, dtype)) * jnp.asarray(y, dtype))
    for x, y in zip(leaves_a, leaves_b, strict=True)
  )


def _combine(a: Any, scale_a: Any, b: Any, scale_b: Any, like: Any) -> Any:
  """``scale_a * a + scale_b * b`` leaf by leaf, computed wide, cast like ``like``."""

  def leaf(x, y, ref):
    acc = numerics.accumulation_dtype(jnp.result_type(x, y))
    value = scale_a * jnp.asarray(x, acc) + scale_b * jnp.asarray(y, acc)
    return value.astype(jnp.result_type(ref))

  return jax.tree.map(leaf, a, b, like)


def _orthogonal_part(u: Any, v: Any, eps: float) -> Any:
  r"""The component of ``u`` orthogonal to ``v``: :math:`u - (u\cdot\hat v)\,\hat v`.

  :math:`\hat v = v / (\|v\| + \mathrm{eps})`; a zero ``v`` leaves ``u`` unchanged.
  """
  inverse = numerics.safe_inverse(numerics.global_norm(v) + eps)
  coefficient = _tree_dot(u, v) * inverse * inverse
  return _combine(u, 1.0, v, -coefficient, u)


# ---------------------------------------------------------------------------
# GSAM.
# ---------------------------------------------------------------------------


def gsam_rho_schedule(
  lr_schedule: optax.ScalarOrSchedule,
  rho_max: float,
  rho_min: float,
  lr_max: float,
  lr_min: float,
) -> optax.Schedule:
  r"""GSAM's radius, linear in the learning rate: :math:`\rho_t` from :math:`\eta_t`.

  .. math::
    \rho_t = \rho_{\min} + (\rho_{\max} - \rho_{\min})\,
      \frac{\eta_t - \eta_{\min}}{\eta_{\max} - \eta_{\min}}

  with :math:`\eta_t` = ``lr_schedule(t)``; :math:`\rho_t = \rho_{\max}` when
  ``lr_max == lr_min`` (as the official code does). Give it to any samx alias as
  ``rho``; it is evaluated at the ascent's step count, which advances once per
  ``update`` as the base optimizer's count does, so :math:`\rho_t` and
  :math:`\eta_t` belong to the same step. Any other optax schedule works for
  ``rho`` too.

  Args:
    lr_schedule: the base optimizer's learning rate: a schedule or a number.
    rho_max: the radius at ``lr_max``, >= 0.
    rho_min: the radius at ``lr_min``, >= 0.
    lr_max: the largest learning rate of the schedule.
    lr_min: the smallest learning rate of the schedule, <= ``lr_max``.

  Returns:
    A schedule ``count -> rho``.

  >>> lr = optax.linear_schedule(1.0, 0.1, transition_steps=9)
  >>> rho = gsam_rho_schedule(lr, rho_max=0.6, rho_min=0.1, lr_max=1.0, lr_min=0.1)
  >>> [round(float(rho(t)), 4) for t in (0, 3, 9)]
  [0.6, 0.4333, 0.1]

  References:
    Zhuang et al., `Surrogate Gap Minimization Improves Sharpness-Aware Training
    <https://arxiv.org/abs/2203.08065>`_, 2022
  """
  checks.check_nonnegative("rho_max", rho_max)
  checks.check_nonnegative("rho_min", rho_min)
  if not np.all(np.asarray(lr_min) <= np.asarray(lr_max)):
    raise ValueError(f"lr_min must be <= lr_max; got {lr_min=}, {lr_max=}")

  def schedule(count):
    lr = lr_schedule(count) if callable(lr_schedule) else lr_schedule
    span = jnp.subtract(lr_max, lr_min)
    flat = span == 0
    fraction = jnp.where(flat, 1.0, (lr - lr_min) / jnp.where(flat, 1.0, span))
    return rho_min + (rho_max - rho_min) * fraction

  return schedule


def surrogate_gap_guided(
  alpha: Any = 0.4,
  *,
  minimize_fp: bool = True,
  eps: float = 1e-12,
) -> Combination:
  r"""GSAM's combination: decompose one gradient along the other, step against the gap.

  With ``minimize_fp=True`` (the paper's GSAM: minimise the perturbed loss
  :math:`f_p` and the surrogate gap :math:`h = f_p - f`) ``g`` is split along
  :math:`\hat g_s = g_s / (\|g_s\| + \mathrm{eps})`:

  .. math::
    g_\perp = g - (g \cdot \hat g_s)\,\hat g_s, \qquad d = g_s - \alpha\, g_\perp

  With ``minimize_fp=False`` (minimise :math:`f` and :math:`h`) ``g_s`` is split
  along :math:`\hat g = g / (\|g\| + \mathrm{eps})`:

  .. math::
    d = g + \alpha\,\bigl(g_s - (g_s \cdot \hat g)\,\hat g\bigr)

  ``alpha=0`` gives :math:`d = g_s` (SAM) in the first form, :math:`d = g` in the
  second. Norms and dot products accumulate in float32; a zero ``g_s`` (or
  ``g``) gives :math:`\hat g_s = 0` (or :math:`\hat g = 0`), never NaN.

  Args:
    alpha: :math:`\alpha` >= 0, the weight of the orthogonal component.
    minimize_fp: which of the two forms above.
    eps: the stabiliser in the normalisations, > 0.

  Returns:
    A :class:`samx.Combination` without state.

  >>> c = surrogate_gap_guided(alpha=0.5)
  >>> g, g_s = {"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([2.0, 0.0])}
  >>> d, _ = c.update(g, lambda: g_s, c.init(g), g)
  >>> d["w"]   # g_perp = [0, 1]: d = [2, 0] - 0.5 * [0, 1]
  Array([ 2. , -0.5], dtype=float32)

  References:
    Zhuang et al., `Surrogate Gap Minimization Improves Sharpness-Aware Training
    <https://arxiv.org/abs/2203.08065>`_, 2022
  """
  checks.check_nonnegative("alpha", alpha)
  checks.check_positive("eps", eps)

  def init(params):
    del params
    return optax.EmptyState()

  def update(grads, evaluate, state, params):
    del params
    perturbed = numerics.cast_tree_like(evaluate(), grads)
    if minimize_fp:
      vertical = _orthogonal_part(grads, perturbed, eps)
      return _combine(perturbed, 1.0, vertical, -alpha, grads), state
    vertical = _orthogonal_part(perturbed, grads, eps)
    return _combine(grads, 1.0, vertical, alpha, grads), state

  return Combination(init, update)


def gsam(
  optimizer: optax.GradientTransformation,
  rho: Any = 0.05,
  alpha: Any = 0.4,
  *,
  minimize_fp: bool = True,
  eps: float = 1e-12,
  ball: Ball = "l2",
  axis_name: str | None = None,
  sync_ascent: bool = True,
  micro_shards: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Surrogate-gap guided SAM (GSAM) in one ``update`` call per step.

  .. math::
    \epsilon = \rho_t\,\frac{g}{\|g\| + \mathrm{eps}}, \quad
    g_s = \nabla L(w + \epsilon), \quad
    g_\perp = g - (g \cdot \hat g_s)\,\hat g_s, \quad
    \Delta w = \mathrm{optimizer}(g_s - \alpha\, g_\perp)

  (``minimize_fp=False``: :math:`d = g + \alpha\,(g_s - (g_s\cdot\hat g)\,\hat g)`,
  see :func:`surrogate_gap_guided`). The paper lets :math:`\rho_t` follow the
  learning rate: pass ``rho=gsam_rho_schedule(lr_schedule, rho_max, rho_min,
  lr_max, lr_min)``. ``alpha=0`` with a constant ``rho`` is SAM.

  The official code decomposes each device's own ``g`` and ``g_s`` and averages
  the result; samx decomposes the averaged gradients (the same on one device).

  Call ``update`` with ``params`` and ``grad_fn``::

    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=lambda p: jax.grad(loss_fn)(p, batch))

  Args:
    optimizer: the base optimizer, e.g. ``optax.adamw(...)``.
    rho: the radius >= 0: a number, a schedule (e.g. :func:`gsam_rho_schedule`)
      or a per-leaf pytree.
    alpha: :math:`\alpha` >= 0, the weight of the surrogate-gap term (the
      official ViT configuration uses 0.6; published settings range from 0.01).
    minimize_fp: minimise the perturbed loss (``True``, the paper's GSAM) or the
      clean loss (``False``) together with the surrogate gap.
    eps: the stabiliser in the normalisations, > 0.
    ball: ``"l2"`` or ``"linf"`` (:math:`\epsilon = \rho\,\mathrm{sign}(g)`), the ascent's ball.
    axis_name: the data-parallel axis under ``pmap`` / ``shard_map``.
    sync_ascent: average ``g`` over ``axis_name`` before the ascent.
    micro_shards: ``k`` >= 1 micro-shards of the local batch, one ``eps`` each
      (``None``: 1); the decomposition acts on the averages of the shards' ``g``
      and ``g_s`` (see :func:`samx.sharpness_aware`; ``k > 1`` needs the
      per-example contract).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  >>> import jax
  >>> tx = gsam(optax.sgd(0.1), rho=0.1, alpha=0.5)
  >>> loss = lambda p: p[0] ** 2 + 5 * p[1] ** 2
  >>> params = jnp.array([1.0, 0.2])
  >>> updates, state = tx.update(jax.grad(loss)(params), tx.init(params), params,
  ...                            grad_fn=jax.grad(loss))
  >>> [round(float(u), 4) for u in updates]   # SAM alone would give [-0.2141, -0.2707]
  [-0.2013, -0.2809]

  References:
    Zhuang et al., `Surrogate Gap Minimization Improves Sharpness-Aware Training
    <https://arxiv.org/abs/2203.08065>`_, 2022
  """
  return sharpness_aware(
    optimizer,
    scale_by_sam(rho, eps=eps, ball=ball),
    combination=surrogate_gap_guided(alpha, minimize_fp=minimize_fp, eps=eps),
    axis_name=axis_name,
    sync_ascent=sync_ascent,
    micro_shards=micro_shards,
    name="samx.gsam",
  )


# ---------------------------------------------------------------------------
# WSAM.
# ---------------------------------------------------------------------------


class SharpnessDirection(NamedTuple):
  """The direction of decoupled WSAM, read by :func:`add_sharpness_step`.

  Attributes:
    grads: the clean gradient :math:`g`, for the base optimizer.
    sharpness: :math:`\\alpha\\,(g_s - g)`, the weighted sharpness gradient.
  """

  grads: Any
  sharpness: Any


class SharpnessStepState(NamedTuple):
  """State of :func:`add_sharpness_step`.

  Attributes:
    count: int32 number of steps taken; the argument of ``learning_rate`` when it
      is a schedule.
    base_state: state of the base optimizer.
  """

  count: jax.Array
  base_state: Any


def _sharpness_weight(gamma: Any) -> Any:
  return gamma / (1.0 - gamma)


def weighted_sharpness(
  gamma: Any = 0.9,
  *,
  decouple: bool = False,
) -> Combination:
  r"""WSAM's combination: the sharpness :math:`g_s - g` weighted by :math:`\alpha`.

  .. math::
    \alpha = \frac{\gamma}{1 - \gamma}, \qquad
    d = \alpha\, g_s + (1 - \alpha)\, g = g + \alpha\,(g_s - g)

  With ``decouple=True`` the direction is the pair
  :class:`SharpnessDirection` ``(g, alpha * (g_s - g))``, for
  :func:`add_sharpness_step`, which steps the base optimizer on ``g`` and the
  sharpness term separately. ``gamma=0.5`` (:math:`\alpha = 1`) coupled is SAM;
  ``gamma=0`` is the base optimizer.

  Args:
    gamma: :math:`\gamma` in [0, 1), the weight of sharpness in the objective
      :math:`L + \frac{\gamma}{1-\gamma}(L_{\max} - L)`.
    decouple: return :class:`SharpnessDirection` instead of one direction.

  Returns:
    A :class:`samx.Combination` without state.

  >>> c = weighted_sharpness(gamma=0.75)   # alpha = 3
  >>> g, g_s = {"w": jnp.array([1.0])}, {"w": jnp.array([2.0])}
  >>> c.update(g, lambda: g_s, c.init(g), g)[0]["w"]
  Array([4.], dtype=float32)

  References:
    Yue et al., `Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
    Regularization Term <https://arxiv.org/abs/2305.15817>`_, 2023
  """
  checks._check("gamma", gamma, lambda v: 0 <= v < 1, "a number in [0, 1)")

  def init(params):
    del params
    return optax.EmptyState()

  def update(grads, evaluate, state, params):
    del params
    perturbed = numerics.cast_tree_like(evaluate(), grads)
    alpha = _sharpness_weight(gamma)
    if decouple:
      sharpness = _combine(perturbed, alpha, grads, -alpha, grads)
      return SharpnessDirection(grads=grads, sharpness=sharpness), state
    return _combine(perturbed, alpha, grads, 1.0 - alpha, grads), state

  return Combination(init, update)


def _find_learning_rate(base_state: Any) -> Any:
  # inject_hyperparams keeps the value in `hyperparams` and, for a schedule, the
  # schedule's state under the same name in `hyperparams_states`: take the array.
  found = optax.tree.get_all_with_path(
    base_state, "learning_rate", filtering=lambda _, v: isinstance(v, (jax.Array, np.ndarray))
  )
  if len(found) != 1:
    what = f"{len(found)} learning_rate entries" if found else "no learning_rate entry"
    raise ValueError(
      "decoupled WSAM steps the sharpness term with the base optimizer's learning rate; "
      f"learning_rate=None looks it up in the base optimizer's state, which has {what}. "
      "Pass learning_rate= (the same number or schedule as the base optimizer's) or "
      "build the base optimizer with optax.inject_hyperparams, e.g. "
      "optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)."
    )
  return found[0][1]


def add_sharpness_step(
  optimizer: optax.GradientTransformation,
  learning_rate: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Decoupled WSAM's descent: the base step on ``g`` plus a separate sharpness step.

  Takes a :class:`SharpnessDirection` ``(g, s)`` with :math:`s = \alpha(g_s - g)`:

  .. math::
    \Delta w = \mathrm{optimizer}(g) - \eta_t\, s

  as the official WSAM does after ``base_optimizer.step()``, with
  :math:`\eta_t` the base optimizer's current learning rate.

  Args:
    optimizer: the base optimizer.
    learning_rate: :math:`\eta_t`: a number or a schedule of the step count
      (give the base optimizer's); ``None`` reads the ``learning_rate``
      hyperparameter from the base optimizer's state after its update, which
      needs a base optimizer built with :func:`optax.inject_hyperparams`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with state
    :class:`SharpnessStepState`; use it as the ``optimizer`` of
    :func:`samx.sharpness_aware` with ``weighted_sharpness(decouple=True)``.

  >>> tx = add_sharpness_step(optax.sgd(0.1), learning_rate=0.1)
  >>> direction = SharpnessDirection(grads=jnp.array([1.0]), sharpness=jnp.array([3.0]))
  >>> tx.update(direction, tx.init(jnp.zeros(1)))[0]   # -0.1 * 1 - 0.1 * 3
  Array([-0.4], dtype=float32)

  References:
    Yue et al., `Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
    Regularization Term <https://arxiv.org/abs/2305.15817>`_, 2023
  """
  if learning_rate is not None:
    checks.check_nonnegative("learning_rate", learning_rate)
  optimizer = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    base_state = optimizer.init(params)
    if learning_rate is None:
      _find_learning_rate(base_state)  # fail at init, not in the first step
    return SharpnessStepState(count=jnp.zeros([], jnp.int32), base_state=base_state)

  def update_fn(updates, state, params=None, **extra_args):
    if not isinstance(updates, SharpnessDirection):
      raise TypeError(
        "add_sharpness_step expects the SharpnessDirection made by "
        "weighted_sharpness(decouple=True); got "
        f"{type(updates).__name__}. Use it as the optimizer of samx.sharpness_aware "
        "with that combination, or use samx.wsam."
      )
    base_updates, base_state = optimizer.update(
      updates.grads, state.base_state, params, **extra_args
    )
    if learning_rate is None:
      lr = _find_learning_rate(base_state)
    elif callable(learning_rate):
      lr = learning_rate(state.count)
    else:
      lr = learning_rate
    new_updates = _combine(base_updates, 1.0, updates.sharpness, -lr, base_updates)
    return new_updates, SharpnessStepState(optax.safe_increment(state.count), base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def wsam(
  optimizer: optax.GradientTransformation,
  rho: Any = 0.05,
  gamma: Any = 0.9,
  *,
  decouple: bool = True,
  learning_rate: optax.ScalarOrSchedule | None = None,
  eps: float = 1e-12,
  ball: Ball = "l2",
  axis_name: str | None = None,
  sync_ascent: bool = True,
  micro_shards: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Weighted SAM (WSAM): sharpness as a regularisation term of weight :math:`\alpha`.

  With :math:`\epsilon = \rho\,g/(\|g\|+\mathrm{eps})`, :math:`g_s = \nabla
  L(w+\epsilon)` and :math:`\alpha = \gamma/(1-\gamma)`:

  .. math::
    \text{decoupled:}\quad \Delta w = \mathrm{optimizer}(g) - \eta_t\,\alpha\,(g_s - g)
    \qquad
    \text{coupled:}\quad \Delta w = \mathrm{optimizer}\bigl(\alpha g_s + (1-\alpha) g\bigr)

  The decoupled form (the official default) steps the base optimizer on the
  clean gradient and adds a plain gradient step on the sharpness, scaled by the
  base optimizer's current learning rate :math:`\eta_t`: pass it as
  ``learning_rate`` (number or the same schedule), or leave ``None`` with a base
  optimizer built by :func:`optax.inject_hyperparams`, whose ``learning_rate``
  is then read from its state. Coupled WSAM with ``gamma=0.5`` is SAM.

  The official code also clips ``g`` and ``g_s`` to global norm 1 by default;
  samx leaves clipping to the user (chained before samx it clips ``g`` only).

  Call ``update`` with ``params`` and ``grad_fn``::

    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=lambda p: jax.grad(loss_fn)(p, batch))

  Args:
    optimizer: the base optimizer.
    rho: the radius >= 0: a number, a schedule or a per-leaf pytree.
    gamma: :math:`\gamma` in [0, 1); :math:`\alpha = \gamma/(1-\gamma)`
      (0.9 gives :math:`\alpha = 9`).
    decouple: the decoupled form (``True``) or the coupled one.
    learning_rate: decoupled only: :math:`\eta_t`, a number or schedule, or
      ``None`` to read it from an injected base optimizer.
    eps: the stabiliser in the normalisation, > 0.
    ball: ``"l2"`` or ``"linf"`` (:math:`\epsilon = \rho\,\mathrm{sign}(g)`), the ascent's ball.
    axis_name: the data-parallel axis under ``pmap`` / ``shard_map``.
    sync_ascent: average ``g`` over ``axis_name`` before the ascent.
    micro_shards: ``k`` >= 1 micro-shards of the local batch, one ``eps`` each
      (``None``: 1); the weighting acts on the averages of the shards' ``g`` and
      ``g_s`` (see :func:`samx.sharpness_aware`; ``k > 1`` needs the per-example
      contract).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  >>> import jax
  >>> tx = wsam(optax.sgd(0.1), rho=0.05, gamma=0.75, learning_rate=0.1)
  >>> loss = lambda p: jnp.sum(p ** 2)
  >>> params = jnp.array([0.6, 0.8])
  >>> updates, state = tx.update(jax.grad(loss)(params), tx.init(params), params,
  ...                            grad_fn=jax.grad(loss))
  >>> [round(float(u), 4) for u in updates]   # -0.1 * g - 0.1 * 3 * (g_s - g)
  [-0.138, -0.184]

  References:
    Yue et al., `Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
    Regularization Term <https://arxiv.org/abs/2305.15817>`_, 2023
  """
  combination = weighted_sharpness(gamma, decouple=decouple)
  if decouple:
    optimizer = add_sharpness_step(optimizer, learning_rate)
  elif learning_rate is not None:
    raise ValueError(
      "learning_rate is the step size of decoupled WSAM's sharpness step; coupled "
      f"WSAM (decouple=False) takes none. Got {learning_rate=} with decouple=False."
    )
  return sharpness_aware(
    optimizer,
    scale_by_sam(rho, eps=eps, ball=ball),
    combination=combination,
    axis_name=axis_name,
    sync_ascent=sync_ascent,
    micro_shards=micro_shards,
    name="samx.wsam",
  )


# ---------------------------------------------------------------------------
# LookSAM.
# ---------------------------------------------------------------------------


class LookSAMState(NamedTuple):
  r"""State of :func:`reuse_orthogonal_component`.

  Attributes:
    count: int32 number of steps taken; ``g_s`` is evaluated when
      ``count % k == 0``.
    orthogonal: :math:`g_v`, the component of the last evaluated ``g_s``
      orthogonal to that step's ``g`` (the parameters' structure and dtypes).
    orthogonal_norm: :math:`\|g_v\|` (float32, or wider for wider params), kept so
      that the steps in between do not recompute it.
  """

  count: jax.Array
  orthogonal: Any
  orthogonal_norm: jax.Array


class DeferredPerturbation(NamedTuple):
  """What the ascent of :func:`defer_ascent` hands to its evaluation.

  Attributes:
    grads: the gradient the ascent received.
    ascent_state: the ascent's state before this step.
  """

  grads: Any
  ascent_state: Any


def defer_ascent(
  ascent: optax.GradientTransformation,
  evaluation: Evaluation = gradient_at_perturbed,
) -> tuple[optax.GradientTransformationExtraArgs, Evaluation]:
  r"""Moves the computation of :math:`\epsilon` into the evaluation stage.

  Returns an ``(ascent, evaluation)`` pair for :func:`samx.sharpness_aware`.
  The ascent only advances the wrapped ascent's state and hands on ``g`` and the
  old state (a :class:`DeferredPerturbation`); the evaluation computes
  :math:`\epsilon` from them, then calls ``evaluation``. A combination that
  skips the evaluation (:func:`reuse_orthogonal_component`) then skips the
  ascent's work too: XLA removes the unused :math:`\epsilon` of the ascent
  stage, and the evaluation's copy sits in the branch that does not run. The
  step computes the same numbers as with ``ascent`` and ``evaluation`` as they
  are (random ascents draw from the same key in both places).

  Args:
    ascent: the ascent to defer, e.g. :func:`samx.scale_by_sam`.
    evaluation: the evaluation to call with :math:`\epsilon`.

  Returns:
    The deferred ascent and the evaluation that completes it.

  >>> import jax
  >>> ascent, evaluation = defer_ascent(scale_by_sam(0.5))
  >>> tx = sharpness_aware(optax.sgd(0.1), ascent, evaluation=evaluation)
  >>> loss = lambda p: jnp.sum(p ** 2)
  >>> params = jnp.array([3.0, 4.0])
  >>> updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params,
  ...                        grad_fn=jax.grad(loss))
  >>> [round(float(u), 4) for u in updates]   # as sharpness_aware(sgd, scale_by_sam(0.5))
  [-0.66, -0.88]
  """
  ascent = optax.with_extra_args_support(ascent)

  def update_fn(updates, state, params=None, **extra_args):
    _, new_state = ascent.update(updates, state, params, **extra_args)
    return DeferredPerturbation(grads=updates, ascent_state=state), new_state

  def deferred_evaluation(params, perturbation, *, who="samx", **extra_args):
    if not isinstance(perturbation, DeferredPerturbation):
      raise TypeError(
        f"{who}: the evaluation of defer_ascent needs the perturbation of its ascent; "
        f"got {type(perturbation).__name__}"
      )
    epsilon, _ = ascent.update(
      perturbation.grads, perturbation.ascent_state, params, **extra_args
    )
    return evaluation(params, epsilon, who=who, **extra_args)

  return optax.GradientTransformationExtraArgs(ascent.init, update_fn), deferred_evaluation


def _check_k(k: Any) -> None:
  for leaf in jax.tree.leaves(k):
    if isinstance(leaf, jax.core.Tracer) or callable(leaf):
      continue
    if isinstance(leaf, bool) or not np.issubdtype(np.asarray(leaf).dtype, np.integer):
      raise ValueError(f"k must be a positive integer (steps between evaluations); got {k=!r}")
  checks._check("k", k, lambda v: v >= 1, "a positive integer (steps between evaluations)")


def reuse_orthogonal_component(
  k: Any = 5,
  alpha: Any = 0.7,
  *,
  eps: float = 1e-12,
) -> Combination:
  r"""LookSAM's combination: evaluate ``g_s`` every ``k`` steps, reuse it in between.

  When ``count % k == 0`` it calls ``evaluate()``, descends along :math:`g_s` and
  stores the part of :math:`g_s` orthogonal to :math:`g`,

  .. math::
    g_v = g_s - \|g_s\|\cos(g, g_s)\,\hat g = g_s - (g_s \cdot \hat g)\,\hat g,
    \qquad \hat g = \frac{g}{\|g\| + \mathrm{eps}}

  On the other steps ``evaluate`` is not called (the branch of
  :func:`jax.lax.cond` that holds it does not run, so the second gradient pass is
  skipped) and

  .. math::
    d = g + \alpha\,\frac{\|g\|}{\|g_v\| + \mathrm{eps}}\, g_v

  ``k=1`` is SAM. Under :func:`jax.vmap` a batched predicate turns
  :func:`jax.lax.cond` into a select that runs both branches.

  Args:
    k: steps between evaluations of ``g_s``, an integer >= 1 (an integer array
      under :func:`optax.inject_hyperparams`).
    alpha: :math:`\alpha` >= 0, the weight of the reused component.
    eps: the stabiliser in the normalisations, > 0.

  Returns:
    A :class:`samx.Combination` with state :class:`LookSAMState`.

  >>> c = reuse_orthogonal_component(k=2, alpha=1.0)
  >>> params = {"w": jnp.zeros(2)}
  >>> g = {"w": jnp.array([1.0, 0.0])}
  >>> d, state = c.update(g, lambda: {"w": jnp.array([1.0, 1.0])}, c.init(params), params)
  >>> d["w"], state.orthogonal["w"]
  (Array([1., 1.], dtype=float32), Array([0., 1.], dtype=float32))
  >>> nan = lambda: {"w": jnp.full(2, jnp.nan)}   # traced, but this branch does not run
  >>> d, state = c.update({"w": jnp.array([2.0, 0.0])}, nan, state, params)
  >>> d["w"]   # g + alpha * (|g| / |g_v|) * g_v
  Array([2., 2.], dtype=float32)

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, 2022
  """
  _check_k(k)
  checks.check_nonnegative("alpha", alpha)
  checks.check_positive("eps", eps)

  def init(params):
    leaves = jax.tree.leaves(params)
    widest = jnp.result_type(*leaves) if leaves else jnp.float32
    norm_dtype = numerics.accumulation_dtype(widest)
    return LookSAMState(
      count=jnp.zeros([], jnp.int32),
      orthogonal=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.result_type(p)), params),
      orthogonal_norm=jnp.zeros([], norm_dtype),
    )

  def update(grads, evaluate, state, params):
    del params

    def evaluate_and_store(stored):
      perturbed = numerics.cast_tree_like(evaluate(), grads)
      orthogonal = numerics.cast_tree_like(_orthogonal_part(perturbed, grads, eps), stored[0])
      # Both branches keep the typed sharding of g and of the stored state (Explicit mesh).
      orthogonal = axes.sharded_like(orthogonal, stored[0])
      norm = numerics.global_norm(orthogonal).astype(stored[1].dtype)
      return axes.sharded_like(perturbed, grads), (orthogonal, norm)

    def reuse(stored):
      orthogonal, norm = stored
      ratio = numerics.global_norm(grads) * numerics.safe_inverse(norm + eps)
      return _combine(grads, 1.0, orthogonal, alpha * ratio, grads), stored

    refresh = jnp.remainder(state.count, k) == 0
    direction, (orthogonal, norm) = jax.lax.cond(
      refresh, evaluate_and_store, reuse, (state.orthogonal, state.orthogonal_norm)
    )
    return direction, LookSAMState(optax.safe_increment(state.count), orthogonal, norm)

  return Combination(init, update)


def looksam(
  optimizer: optax.GradientTransformation,
  rho: Any = 0.05,
  k: Any = 5,
  alpha: Any = 0.7,
  *,
  eps: float = 1e-12,
  ball: Ball = "l2",
  axis_name: str | None = None,
  sync_ascent: bool = True,
  micro_shards: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM: SAM's second gradient only every ``k`` steps, its new direction reused.

  On steps :math:`t` with :math:`t \bmod k = 0`: :math:`\epsilon = \rho\,
  g/(\|g\|+\mathrm{eps})`, :math:`g_s = \nabla L(w+\epsilon)`, store
  :math:`g_v = g_s - (g_s\cdot\hat g)\,\hat g` and descend along :math:`g_s`. On
  the others ``grad_fn`` is not called and

  .. math::
    \Delta w = \mathrm{optimizer}\Bigl(g + \alpha\,\frac{\|g\|}{\|g_v\| +
      \mathrm{eps}}\, g_v\Bigr)

  so a step costs one gradient, plus a second one every ``k`` steps. ``k=1`` is
  SAM. The paper's layer-wise variant (Look-LayerSAM) is not included.

  On the CPU backend XLA canonicalises only top-level convolutions, so the
  weight-gradient convolutions of a convolutional ``grad_fn`` inside the
  :func:`jax.lax.cond` branch run a slow generic kernel there: on CPU, LookSAM
  pays off for dense models only. GPU and TPU are not affected.

  Call ``update`` with ``params`` and ``grad_fn`` on every step::

    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=lambda p: jax.grad(loss_fn)(p, batch))

  Args:
    optimizer: the base optimizer.
    rho: the radius >= 0: a number, a schedule or a per-leaf pytree.
    k: steps between evaluations of ``g_s``, an integer >= 1.
    alpha: :math:`\alpha` >= 0, the weight of the reused component.
    eps: the stabiliser in the normalisations, > 0.
    ball: ``"l2"`` or ``"linf"`` (:math:`\epsilon = \rho\,\mathrm{sign}(g)`), the ascent's ball.
    axis_name: the data-parallel axis under ``pmap`` / ``shard_map``.
    sync_ascent: average ``g`` over ``axis_name`` before the ascent.
    micro_shards: ``k`` >= 1 micro-shards of the local batch (``None``: 1), one
      ``eps`` each on the steps that evaluate ``g_s`` (no shard is evaluated on the
      others); ``g_v`` comes from the averages of the shards' ``g`` and ``g_s``
      (see :func:`samx.sharpness_aware`; ``k > 1`` needs the per-example
      contract).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  >>> import jax
  >>> tx = looksam(optax.sgd(0.1), rho=0.05, k=5)
  >>> loss = lambda p: jnp.sum(p ** 2)
  >>> params, state = jnp.array([0.6, 0.8]), tx.init(jnp.zeros(2))
  >>> calls = []
  >>> def grad_fn(p):
  ...   jax.debug.callback(lambda: calls.append(1))
  ...   return jax.grad(loss)(p)
  >>> step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, grad_fn=grad_fn))
  >>> for _ in range(10):
  ...   updates, state = step(params, state)
  >>> len(calls)   # steps 0 and 5
  2

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, 2022
  """
  # The ascent is deferred into the evaluation, so the steps that skip g_s skip
  # computing eps too.
  ascent, evaluation = defer_ascent(scale_by_sam(rho, eps=eps, ball=ball))
  return sharpness_aware(
    optimizer,
    ascent,
    evaluation=evaluation,
    combination=reuse_orthogonal_component(k, alpha, eps=eps),
    axis_name=axis_name,
    sync_ascent=sync_ascent,
    micro_shards=micro_shards,
    name="samx.looksam",
  )
