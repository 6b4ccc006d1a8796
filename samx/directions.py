"""Ascent directions: blocks that choose which way to perturb, before the radius is applied.

A direction block maps the gradient ``g`` to a direction ``u``; :func:`samx.scale_by_sam`
chained after it puts ``u`` on the sphere of radius ``rho``. The blocks compose with every
other ascent block, for example F-SAM's direction with ASAM's scaling::

  ascent = optax.chain(
    fsam_direction(sigma=1.0, decay=0.9),
    samx.scale_by_weight_magnitude(0.01),
    samx.scale_by_sam(1.0),
    samx.scale_by_weight_magnitude(0.01),
  )
  tx = samx.sharpness_aware(optax.sgd(0.1, momentum=0.9), ascent)

- :func:`fsam_direction` (F-SAM): the gradient minus an EMA of past gradients.
- :func:`vasso_direction` (VaSSO): an exponential average of the gradients.
- :func:`random_direction`: a Gaussian direction that ignores the gradient (the
  random-perturbation control experiment).

:func:`fsam`, :func:`vasso` and :func:`random_sam` are the aliases. All numeric
hyperparameters are used as (possibly traced) arrays, never in Python conditions, so
:func:`optax.inject_hyperparams` works; the step-0 special cases are selected with the
int32 step ``count`` inside the computation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samx import checks, numerics
from samx.ascent import Ball, scale_by_sam
from samx.pipeline import sharpness_aware

__all__ = [
  "FSAMDirectionState",
  "RandomDirectionState",
  "VaSSODirectionState",
  "fsam",
  "fsam_direction",
  "random_direction",
  "random_sam",
  "vasso",
  "vasso_direction",
]


# --------------------------------------------------------------------------- checks


def _check_scalar(name: str, value: Any, ok, form: str) -> None:
  """A single number (or scalar array) satisfying ``ok``; schedules and pytrees refused."""
  if callable(value) or not jax.tree_util.treedef_is_leaf(jax.tree.structure(value)):
    raise TypeError(f"{name} must be {form} (a single number); got {name}={value!r}")
  if np.ndim(value) != 0:
    raise TypeError(
      f"{name} must be {form} (a scalar); got an array of shape {np.shape(value)}"
    )
  checks.check_condition(name, value, ok, form)


def _check_nonnegative_scalar(name: str, value: Any) -> None:
  _check_scalar(name, value, lambda v: v >= 0, "a non-negative number")


def _check_unit_interval(name: str, value: Any, *, open_at_zero: bool = False) -> None:
  if open_at_zero:
    _check_scalar(name, value, lambda v: 0 < v <= 1, "a number in (0, 1]")
  else:
    _check_scalar(name, value, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def _canonical_dtype(dtype: Any) -> Any:
  return None if dtype is None else jax.dtypes.canonicalize_dtype(dtype)


# --------------------------------------------------------------------------- F-SAM


class FSAMDirectionState(NamedTuple):
  """State of :func:`fsam_direction`.

  Attributes:
    count: int32 number of steps taken so far; at ``count == 0`` the EMA is seeded
      with the first gradient.
    ema: :math:`m_{t-1}`, the exponential moving average of the raw (unmodified)
      gradients, with the structure of the parameters. Zeros before the first step.
      Its dtype is ``accumulator_dtype``, by default the parameters' dtype.
  """

  count: jax.Array
  ema: Any


def fsam_direction(
  sigma: Any = 1.0,
  decay: Any = 0.9,
  *,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformation:
  r"""F-SAM's ascent direction: the gradient with its full-gradient component removed.

  The full-batch gradient is estimated by an exponential moving average :math:`m` of
  the raw minibatch gradients and subtracted, so the perturbation follows the
  stochastic gradient noise:

  .. math::
    d_0 = g_0, \quad m_0 = g_0; \qquad
    d_t = g_t - \sigma\, m_{t-1}, \quad
    m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g_t \quad (t \ge 1)

  with :math:`\sigma` = ``sigma`` and :math:`\lambda` = ``decay``, in this order (the
  official code's): the direction uses the EMA of the previous steps, then the EMA
  absorbs the raw :math:`g_t` (not :math:`d_t`). Chain :func:`samx.scale_by_sam`
  after it for :math:`\epsilon = \rho\, d_t / (\|d_t\| + \mathrm{eps})`. ``sigma=0``
  gives :math:`d_t = g_t` (SAM's direction).

  F-SAM is meant for minibatch gradients: with a gradient that does not change
  between steps (full batch), :math:`m_t = g` and :math:`d_t = (1-\sigma)\,g` for
  :math:`t \ge 1`: SAM's direction for ``sigma < 1``, and exactly 0 for ``sigma=1``,
  where the normalisation gives a zero perturbation (not NaN).

  The arithmetic runs in float32 (or wider) for low-precision gradients; the direction
  keeps the gradient's dtype and the EMA keeps its own.

  Args:
    sigma: :math:`\sigma` >= 0, how much of the EMA to remove (paper: 1).
    decay: :math:`\lambda \in [0, 1]`, the EMA's decay (official code: 0.9 class
      default, 0.95 command-line default; 0.6 and 0.95 in its CIFAR-100 runs).
    accumulator_dtype: dtype of the stored EMA; ``None`` uses the parameters' dtype.
      ``jnp.float32`` keeps a float32 EMA for bfloat16 parameters.

  Returns:
    An :class:`optax.GradientTransformation` mapping ``g`` to :math:`d_t`, with state
    :class:`FSAMDirectionState`.

  >>> tx = fsam_direction(sigma=1.0, decay=0.5)
  >>> d, state = tx.update({"w": jnp.array([1.0, 2.0])}, tx.init({"w": jnp.zeros(2)}))
  >>> d["w"]                            # step 0: d_0 = g_0 (plain SAM)
  Array([1., 2.], dtype=float32)
  >>> d, state = tx.update({"w": jnp.array([3.0, 2.0])}, state)
  >>> d["w"]                            # g_1 - sigma * m_0
  Array([2., 0.], dtype=float32)
  >>> state.ema["w"]                    # 0.5 * m_0 + 0.5 * g_1
  Array([2., 2.], dtype=float32)

  References:
    Li et al., `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`_, 2024
  """
  _check_nonnegative_scalar("sigma", sigma)
  _check_unit_interval("decay", decay)
  accumulator_dtype = _canonical_dtype(accumulator_dtype)

  def init_fn(params):
    return FSAMDirectionState(
      count=jnp.zeros([], jnp.int32),
      ema=optax.tree.zeros_like(params, dtype=accumulator_dtype),
    )

  def update_fn(updates, state, params=None):
    del params
    first = state.count == 0

    def leaf(g, m):
      acc = numerics.accumulation_dtype(jnp.result_type(g, m))
      g_acc, m_acc = jnp.asarray(g, acc), jnp.asarray(m, acc)
      # At count 0 the EMA is still zero, so d_0 = g_0 with no special case; the
      # EMA is seeded with g_0 by taking decay = 0 for that one step.
      lam = jnp.where(first, jnp.zeros([], acc), jnp.asarray(decay, acc))
      direction = g_acc - jnp.asarray(sigma, acc) * m_acc
      ema = lam * m_acc + (1 - lam) * g_acc
      return direction.astype(g.dtype), ema.astype(m.dtype)

    pairs = jax.tree.map(leaf, updates, state.ema)
    directions = jax.tree.map(lambda _, p: p[0], updates, pairs)
    ema = jax.tree.map(lambda _, p: p[1], updates, pairs)
    return directions, FSAMDirectionState(count=optax.safe_increment(state.count), ema=ema)

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------- VaSSO


class VaSSODirectionState(NamedTuple):
  """State of :func:`vasso_direction`.

  Attributes:
    count: int32 number of steps taken so far; at ``count == 0`` the average is
      seeded with the first gradient.
    direction: :math:`d_{t-1}`, the exponential average of the gradients, with the
      structure of the parameters. Zeros before the first step. Its dtype is
      ``accumulator_dtype``, by default the parameters' dtype.
  """

  count: jax.Array
  direction: Any


def vasso_direction(
  theta: Any = 0.9,
  *,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformation:
  r"""VaSSO's ascent direction: an exponential average of the gradients.

  Averaging suppresses the variance of the minibatch gradient that SAM's perturbation
  follows:

  .. math::
    d_0 = g_0; \qquad d_t = (1 - \theta)\, d_{t-1} + \theta\, g_t \quad (t \ge 1)

  with :math:`\theta` = ``theta``. Chain :func:`samx.scale_by_sam` after it for
  :math:`\epsilon = \rho\, d_t / (\|d_t\| + \mathrm{eps})`. ``theta=1`` gives
  :math:`d_t = g_t` (SAM's direction).

  The arithmetic runs in float32 (or wider) for low-precision gradients; the output
  keeps the gradient's dtype and the stored average keeps its own.

  Args:
    theta: :math:`\theta \in (0, 1]`, the weight of the newest gradient (official
      default 0.9). ``theta=0`` would freeze the direction at :math:`g_0` and is
      refused.
    accumulator_dtype: dtype of the stored average; ``None`` uses the parameters'
      dtype.

  Returns:
    An :class:`optax.GradientTransformation` mapping ``g`` to :math:`d_t`, with state
    :class:`VaSSODirectionState`.

  >>> tx = vasso_direction(theta=0.5)
  >>> d, state = tx.update({"w": jnp.array([1.0, 2.0])}, tx.init({"w": jnp.zeros(2)}))
  >>> d["w"]                            # step 0: d_0 = g_0 (plain SAM)
  Array([1., 2.], dtype=float32)
  >>> d, state = tx.update({"w": jnp.array([3.0, 0.0])}, state)
  >>> d["w"]                            # 0.5 * d_0 + 0.5 * g_1
  Array([2., 1.], dtype=float32)

  References:
    Li & Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance
    Suppression <https://arxiv.org/abs/2309.15639>`_, 2023
  """
  _check_unit_interval("theta", theta, open_at_zero=True)
  accumulator_dtype = _canonical_dtype(accumulator_dtype)

  def init_fn(params):
    return VaSSODirectionState(
      count=jnp.zeros([], jnp.int32),
      direction=optax.tree.zeros_like(params, dtype=accumulator_dtype),
    )

  def update_fn(updates, state, params=None):
    del params
    first = state.count == 0

    def leaf(g, d):
      acc = numerics.accumulation_dtype(jnp.result_type(g, d))
      # theta = 1 at count 0: d_0 = 0 * 0 + 1 * g_0 exactly.
      weight = jnp.where(first, jnp.ones([], acc), jnp.asarray(theta, acc))
      return (1 - weight) * jnp.asarray(d, acc) + weight * jnp.asarray(g, acc)

    averaged = jax.tree.map(leaf, updates, state.direction)
    directions = jax.tree.map(lambda a, g: a.astype(g.dtype), averaged, updates)
    stored = jax.tree.map(lambda a, d: a.astype(d.dtype), averaged, state.direction)
    return directions, VaSSODirectionState(
      count=optax.safe_increment(state.count), direction=stored
    )

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------- random


class RandomDirectionState(NamedTuple):
  """State of :func:`random_direction`.

  Attributes:
    key: the raw data (:func:`jax.random.key_data`, uint32) of the PRNG key used at
      the next step; split at every step. Raw data keeps the state an ordinary
      array for checkpoints and tree utilities.
  """

  key: jax.Array


def _is_typed_key(key: Any) -> bool:
  return isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def _check_key(key: Any) -> None:
  if _is_typed_key(key):
    return
  dtype = key.dtype if isinstance(key, jax.Array) else np.asarray(key).dtype
  if isinstance(key, bool) or not jnp.issubdtype(dtype, jnp.integer) or np.ndim(key) > 1:
    raise TypeError(
      "key must be an int seed, a key from jax.random.key(seed), or a raw key from "
      f"jax.random.PRNGKey(seed); got key={key!r}"
    )


def random_direction(key: Any = 0) -> optax.GradientTransformation:
  r"""A Gaussian direction that ignores the gradient: the random-perturbation control.

  .. math::
    u_t \sim \mathcal{N}(0, I) \quad \text{over every entry of every leaf}

  drawn afresh at each step from a key carried in the state. Chained with
  :func:`samx.scale_by_sam`, :math:`\epsilon = \rho\, u_t/\|u_t\|` is uniform on the
  sphere of radius :math:`\rho` (with ``ball="linf"``, a random vertex
  :math:`\rho\,\mathrm{sign}(u_t)` of the cube): a perturbation of SAM's size that
  carries no gradient information. Unlike the gradient-based directions, a zero
  gradient does not give a zero perturbation.

  The normals are drawn in float32 (or wider) and cast to each leaf's dtype. Under
  ``pmap`` the state is replicated, so every device draws the same direction.

  Args:
    key: an int seed, a key from :func:`jax.random.key`, or a raw key from
      :func:`jax.random.PRNGKey`. The same key gives the same sequence of
      directions.

  Returns:
    An :class:`optax.GradientTransformation` mapping ``g`` to :math:`u_t`, with state
    :class:`RandomDirectionState`.

  >>> tx = optax.chain(random_direction(key=0), scale_by_sam(rho=0.5))
  >>> g = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
  >>> eps, state = tx.update(g, tx.init(g))
  >>> round(float(optax.tree.norm(eps)), 4)
  0.5

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021 (the perturbation this
    control replaces)
  """
  _check_key(key)
  impl = jax.random.key_impl(key) if _is_typed_key(key) else None

  def init_fn(params):
    del params
    if _is_typed_key(key):
      return RandomDirectionState(key=jax.random.key_data(key))
    if jnp.ndim(key) == 0:
      return RandomDirectionState(key=jax.random.key_data(jax.random.key(key)))
    return RandomDirectionState(key=jnp.asarray(key, jnp.uint32))

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    keys = jax.random.split(jax.random.wrap_key_data(state.key, impl=impl), len(leaves) + 1)
    directions = [
      jax.random.normal(k, jnp.shape(u), numerics.accumulation_dtype(u.dtype)).astype(u.dtype)
      for k, u in zip(keys[1:], leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, directions), RandomDirectionState(
      key=jax.random.key_data(keys[0])
    )

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------- aliases


def fsam(
  optimizer: optax.GradientTransformation,
  rho: Any = 0.1,
  sigma: Any = 1.0,
  decay: Any = 0.9,
  *,
  eps: float = 1e-12,
  ball: Ball = "l2",
  axis_name: str | None = None,
  sync_ascent: bool = True,
  micro_shards: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Friendly SAM: perturb along the gradient minus an EMA of past gradients.

  .. math::
    d_t = g_t - \sigma\, m_{t-1}, \quad
    m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g_t, \quad
    \epsilon = \rho\,\frac{d_t}{\|d_t\| + \mathrm{eps}}, \quad
    \Delta w = \mathrm{optimizer}(\nabla L(w + \epsilon))

  with :math:`d_0 = m_0 = g_0` (the first step is SAM's) and :math:`\lambda` =
  ``decay``. The ascent is ``optax.chain(fsam_direction(sigma, decay),
  scale_by_sam(rho))``; see :func:`fsam_direction`. ``sigma=0`` is SAM.

  Call ``update`` with ``params`` and ``grad_fn``::

    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=lambda p: jax.grad(loss_fn)(p, batch))

  Args:
    optimizer: the base optimizer, e.g. ``optax.sgd(0.05, momentum=0.9)``.
    rho: the radius :math:`\rho` >= 0: a number, a schedule, or a per-leaf pytree.
      Default 0.1, the official code's command-line default (the paper uses
      0.1-0.2; its CIFAR-100 script 0.2).
    sigma: :math:`\sigma` >= 0, the weight of the removed EMA (default 1).
    decay: :math:`\lambda \in [0, 1]`, the EMA's decay (default 0.9, the official
      class default).
    eps: the stabiliser in the normalisation, > 0.
    ball: ``"l2"`` or ``"linf"`` (:math:`\epsilon = \rho\,\mathrm{sign}(d_t)`).
    axis_name: the data-parallel axis under ``pmap`` / ``shard_map``.
    sync_ascent: average ``g`` over ``axis_name`` before the ascent (one global
      ``eps`` and one EMA); ``False`` keeps one ``eps`` and one EMA of the local
      gradients per device.
    micro_shards: ``k`` >= 1 micro-shards of the local batch (``None``: 1), each
      with its own ``eps`` and its own EMA of that shard's gradients (see
      :func:`samx.sharpness_aware`; ``k > 1`` needs the per-example contract).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  >>> tx = fsam(optax.sgd(0.1), rho=0.1)
  >>> loss = lambda p: jnp.sum(p ** 2)
  >>> params = jnp.array([0.6, 0.8])
  >>> updates, state = tx.update(jax.grad(loss)(params), tx.init(params), params,
  ...                            grad_fn=jax.grad(loss))
  >>> [round(float(u), 4) for u in updates]   # step 0 is SAM's: -0.1 * 2 * 1.1 * w
  [-0.132, -0.176]

  References:
    Li et al., `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`_, 2024
  """
  return sharpness_aware(
    optimizer,
    optax.chain(fsam_direction(sigma, decay), scale_by_sam(rho, eps=eps, ball=ball)),
    axis_name=axis_name,
    sync_ascent=sync_ascent,
    micro_shards=micro_shards,
    name="samx.fsam",
  )


def vasso(
  optimizer: optax.GradientTransformation,
  rho: Any = 0.05,
  theta: Any = 0.9,
  *,
  eps: float = 1e-12,
  ball: Ball = "l2",
  axis_name: str | None = None,
  sync_ascent: bool = True,
  micro_shards: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Variance-suppressed SAM: perturb along an exponential average of the gradients.

  .. math::
    d_t = (1 - \theta)\, d_{t-1} + \theta\, g_t, \quad
    \epsilon = \rho\,\frac{d_t}{\|d_t\| + \mathrm{eps}}, \quad
    \Delta w = \mathrm{optimizer}(\nabla L(w + \epsilon))

  with :math:`d_0 = g_0` (the first step is SAM's). The ascent is
  ``optax.chain(vasso_direction(theta), scale_by_sam(rho))``; see
  :func:`vasso_direction`. ``theta=1`` is SAM.

  Call ``update`` with ``params`` and ``grad_fn``::

    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=lambda p: jax.grad(loss_fn)(p, batch))

  Args:
    optimizer: the base optimizer, e.g. ``optax.sgd(0.05, momentum=0.9)``.
    rho: the radius :math:`\rho` >= 0: a number, a schedule, or a per-leaf pytree.
      Default 0.05, the official code's default (its WideResNet CIFAR-100 script
      uses 0.2).
    theta: :math:`\theta \in (0, 1]`, the weight of the newest gradient (default
      0.9, the official default).
    eps: the stabiliser in the normalisation, > 0.
    ball: ``"l2"`` or ``"linf"`` (:math:`\epsilon = \rho\,\mathrm{sign}(d_t)`).
    axis_name: the data-parallel axis under ``pmap`` / ``shard_map``.
    sync_ascent: average ``g`` over ``axis_name`` before the ascent (one global
      ``eps`` and one average); ``False`` keeps one per device.
    micro_shards: ``k`` >= 1 micro-shards of the local batch (``None``: 1), each
      with its own ``eps`` and its own average of that shard's gradients (see
      :func:`samx.sharpness_aware`; ``k > 1`` needs the per-example contract).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  >>> tx = vasso(optax.sgd(0.1), rho=0.05)
  >>> loss = lambda p: jnp.sum(p ** 2)
  >>> params = jnp.array([0.6, 0.8])
  >>> updates, state = tx.update(jax.grad(loss)(params), tx.init(params), params,
  ...                            grad_fn=jax.grad(loss))
  >>> [round(float(u), 4) for u in updates]   # step 0 is SAM's: -0.1 * 2 * 1.05 * w
  [-0.126, -0.168]

  References:
    Li & Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance
    Suppression <https://arxiv.org/abs/2309.15639>`_, 2023
  """
  return sharpness_aware(
    optimizer,
    optax.chain(vasso_direction(theta), scale_by_sam(rho, eps=eps, ball=ball)),
    axis_name=axis_name,
    sync_ascent=sync_ascent,
    micro_shards=micro_shards,
    name="samx.vasso",
  )


def random_sam(
  optimizer: optax.GradientTransformation,
  rho: Any = 0.05,
  key: Any = 0,
  *,
  eps: float = 1e-12,
  ball: Ball = "l2",
  axis_name: str | None = None,
  sync_ascent: bool = True,
  micro_shards: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The random-perturbation control: SAM's step with a random direction of radius rho.

  .. math::
    u_t \sim \mathcal{N}(0, I), \quad
    \epsilon = \rho\,\frac{u_t}{\|u_t\| + \mathrm{eps}}, \quad
    \Delta w = \mathrm{optimizer}(\nabla L(w + \epsilon))

  Same cost and perturbation size as :func:`samx.sam`, but the direction carries no
  gradient information; it separates the effect of the adversarial direction from
  that of merely evaluating the gradient at a nearby point. The ascent is
  ``optax.chain(random_direction(key), scale_by_sam(rho))``.

  Args:
    optimizer: the base optimizer.
    rho: the radius :math:`\rho` >= 0: a number, a schedule, or a per-leaf pytree
      (default 0.05, SAM's).
    key: an int seed or a PRNG key; the same key gives the same directions.
    eps: the stabiliser in the normalisation, > 0.
    ball: ``"l2"`` (uniform on the sphere) or ``"linf"`` (a random vertex of the
      cube, :math:`\rho\,\mathrm{sign}(u_t)`).
    axis_name: the data-parallel axis under ``pmap`` / ``shard_map``.
    sync_ascent: average ``g`` over ``axis_name`` before the ascent (it does not
      change the direction, which ignores ``g``).
    micro_shards: ``k`` >= 1 micro-shards of the local batch (``None``: 1; see
      :func:`samx.sharpness_aware`). Every micro-shard starts from the same key and
      so draws the same direction (as every device does): the update is the one
      of ``micro_shards=1``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  >>> tx = random_sam(optax.sgd(0.1), rho=0.05, key=0)
  >>> loss = lambda p: jnp.sum(p ** 2)
  >>> params = jnp.array([0.6, 0.8])
  >>> updates, state = tx.update(jax.grad(loss)(params), tx.init(params), params,
  ...                            grad_fn=jax.grad(loss))
  >>> # -0.1 * 2 * (w + eps) with |eps| = 0.05: |update + 0.2 w| = 0.2 * 0.05
  >>> round(float(jnp.linalg.norm(updates + 0.2 * params)), 4)
  0.01

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021 (the perturbation this
    control replaces)
  """
  return sharpness_aware(
    optimizer,
    optax.chain(random_direction(key), scale_by_sam(rho, eps=eps, ball=ball)),
    axis_name=axis_name,
    sync_ascent=sync_ascent,
    micro_shards=micro_shards,
    name="samx.random_sam",
  )
