"""Stage 1, the ascent: blocks that map the gradient ``g`` to the perturbation ``eps``.

Every block is an :class:`optax.GradientTransformation`; chain them with
:func:`optax.chain` to build a perturbation (for example
``optax.chain(scale_by_weight_magnitude(), scale_by_sam(rho), scale_by_weight_magnitude())``
is ASAM). The result of the chain is the perturbation ``eps`` that the evaluation
stage adds to the parameters.

Radii (``rho``) accept a number, an optax schedule of the step count, or a pytree
of numbers / schedules with the structure of the parameters (or a prefix of it),
which gives each leaf its own radius (layer-wise radii).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from samx import checks, masks, numerics

__all__ = [
  "ScaleBySAMState",
  "radius_per_leaf",
  "scale_by_asam",
  "scale_by_sam",
  "scale_by_weight_magnitude",
]

Ball = Literal["l2", "linf"]
_BALLS = ("l2", "linf")


class ScaleBySAMState(NamedTuple):
  """State of :func:`scale_by_sam` when ``rho`` holds a schedule (else ``EmptyState``).

  Attributes:
    count: int32 number of ascents taken so far; the argument of ``rho`` when it
      is a schedule.
  """

  count: jax.Array


def _is_single(value: Any) -> bool:
  return callable(value) or jax.tree_util.treedef_is_leaf(jax.tree.structure(value))


def radius_per_leaf(rho: Any, count: jax.Array, updates: Any) -> Any:
  """Evaluates a radius argument into one radius per leaf of ``updates``.

  Args:
    rho: a number, a schedule ``count -> number``, or a pytree of them with the
      structure of ``updates`` (or a prefix of it).
    count: the step count given to schedules.
    updates: the tree the radii apply to.

  Returns:
    A pytree with the structure of ``updates`` holding one scalar radius per leaf.

  >>> radii = radius_per_leaf({"a": 0.1, "b": lambda t: 2.0 * t}, jnp.asarray(3),
  ...                         {"a": jnp.ones(2), "b": (jnp.ones(1), jnp.ones(1))})
  >>> jax.tree.map(float, radii)
  {'a': 0.1, 'b': (6.0, 6.0)}
  """

  def value(r):
    return r(count) if callable(r) else r

  if _is_single(rho):
    r = value(rho)
    return jax.tree.map(lambda _: r, updates)
  try:
    return jax.tree.map(lambda r, sub: jax.tree.map(lambda _: value(r), sub), rho, updates)
  except ValueError as err:
    raise ValueError(
      "rho given as a pytree must have the structure of the parameters (or a "
      "prefix of it), one number or schedule per leaf.\n"
      f"  rho:     {jax.tree.structure(rho)}\n"
      f"  updates: {jax.tree.structure(updates)}\n({err})"
    ) from None


def _check_ball(ball: str) -> None:
  if ball not in _BALLS:
    raise ValueError(f"ball must be one of {_BALLS}; got ball={ball!r}")


def scale_by_sam(
  rho: Any = 0.05,
  *,
  eps: float = 1e-12,
  ball: Ball = "l2",
) -> optax.GradientTransformation:
  r"""Scales the incoming direction onto the sphere of radius ``rho`` (SAM's ascent).

  For ``ball="l2"`` (SAM):

  .. math::
    \epsilon = \rho \, \frac{u}{\|u\| + \mathrm{eps}}

  with :math:`\|u\|` the global L2 norm over all leaves, accumulated in float32.
  For ``ball="linf"`` (the paper's :math:`p=\infty` ablation)
  :math:`\epsilon = \rho\,\mathrm{sign}(u)`. A per-leaf ``rho`` multiplies leaf by
  leaf, :math:`\epsilon_\ell = \rho_\ell\, u_\ell / (\|u\| + \mathrm{eps})`. A zero
  direction gives a zero perturbation, never NaN.

  Args:
    rho: the radius :math:`\rho` >= 0: a number, a schedule of the step count, or
      a pytree of numbers / schedules with the structure of the parameters.
    eps: the stabiliser added to the norm, > 0.
    ball: ``"l2"`` or ``"linf"``.

  Returns:
    An :class:`optax.GradientTransformation` mapping a direction to ``eps``.

  >>> tx = scale_by_sam(rho=0.5)
  >>> g = {"w": jnp.array([3.0, 4.0])}
  >>> eps, _ = tx.update(g, tx.init(g))
  >>> eps["w"]
  Array([0.3, 0.4], dtype=float32)

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021
  """
  checks.check_nonnegative("rho", rho)
  checks.check_positive("eps", eps)
  _check_ball(ball)
  # A step counter only when a schedule needs it (optax's scale_by_learning_rate
  # does the same): one buffer and one kernel less per step otherwise.
  scheduled = any(callable(r) for r in jax.tree.leaves(rho, is_leaf=callable))

  def init_fn(params):
    del params
    if not scheduled:
      return optax.EmptyState()
    return ScaleBySAMState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    count = state.count if scheduled else None
    radii = radius_per_leaf(rho, count, updates)
    if ball == "l2":
      inverse_norm = numerics.safe_inverse(numerics.global_norm(updates) + eps)

      def leaf(u, r):
        acc = numerics.accumulation_dtype(u.dtype)
        return (r * inverse_norm * jnp.asarray(u, acc)).astype(u.dtype)

    else:

      def leaf(u, r):
        return (r * jnp.sign(jnp.asarray(u, numerics.accumulation_dtype(u.dtype)))).astype(
          u.dtype
        )

    perturbation = jax.tree.map(leaf, updates, radii)
    if scheduled:
      state = ScaleBySAMState(count=optax.safe_increment(state.count))
    return perturbation, state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_weight_magnitude(
  eta: Any = 0.01,
  *,
  mask: masks.Mask = None,
  layerwise: bool = False,
) -> optax.GradientTransformation:
  r"""Multiplies the incoming direction by ASAM's normalization operator :math:`T_w`.

  .. math::
    T_w = |w| + \eta \ \text{(elementwise)}, \qquad
    T_w = \|w_\ell\| + \eta \ \text{(layerwise, one scalar per leaf)}

  on the leaves selected by ``mask``; :math:`T_w = 1` on the others. ASAM applies
  it twice around the normalization, see :func:`scale_by_asam`.

  Args:
    eta: the offset :math:`\eta` >= 0 (a number or a per-leaf pytree).
    mask: which leaves get :math:`T_w`; ``None`` selects leaves with ``ndim >= 2``
      (:func:`samx.masks.weight_leaves`). A pytree of booleans or a callable
      ``params -> pytree of booleans`` replaces it.
    layerwise: use the per-leaf norm :math:`\|w_\ell\|` instead of :math:`|w|`.

  Returns:
    An :class:`optax.GradientTransformation`; it needs ``params``.

  >>> tx = scale_by_weight_magnitude(eta=0.5, mask=lambda p: {"w": True, "b": False})
  >>> params = {"w": jnp.array([-2.0, 1.0]), "b": jnp.array([3.0])}
  >>> u, _ = tx.update({"w": jnp.ones(2), "b": jnp.ones(1)}, tx.init(params), params)
  >>> u["w"], u["b"]
  (Array([2.5, 1.5], dtype=float32), Array([1.], dtype=float32))

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks <https://arxiv.org/abs/2102.11600>`_, 2021
  """
  checks.check_nonnegative("eta", eta)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    checks.require_params(params, "scale_by_weight_magnitude")
    selected = masks.resolve_mask(mask, params, default=masks.weight_leaves)
    etas = radius_per_leaf(eta, jnp.zeros([], jnp.int32), updates)

    def leaf(u, w, e, on):
      if not on:
        return u
      acc = numerics.accumulation_dtype(u.dtype)
      w = jnp.asarray(w, acc)
      t = (numerics.global_norm(w) if layerwise else jnp.abs(w)) + e
      return (t * jnp.asarray(u, acc)).astype(u.dtype)

    return jax.tree.map(leaf, updates, params, etas, selected), state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_asam(
  rho: Any = 0.5,
  eta: Any = 0.01,
  *,
  mask: masks.Mask = None,
  layerwise: bool = False,
  eps: float = 1e-12,
  ball: Ball = "l2",
) -> optax.GradientTransformation:
  r"""ASAM's ascent: the SAM step in the coordinates rescaled by :math:`T_w`.

  .. math::
    \epsilon = \rho \, \frac{T_w^2 \odot g}{\|T_w \odot g\| + \mathrm{eps}}

  with :math:`T_w = |w| + \eta` on the leaves selected by ``mask`` (default:
  ``ndim >= 2``) and 1 elsewhere; the norm is global over all leaves. With
  ``ball="linf"``, :math:`\epsilon = \rho\, T_w \odot \mathrm{sign}(g)`. The common
  PyTorch form :math:`\rho\, w^2 \odot g / \|w \odot g\|` on every leaf is
  ``eta=0, mask=lambda p: jax.tree.map(lambda _: True, p)``.

  Built as ``optax.chain(scale_by_weight_magnitude, scale_by_sam,
  scale_by_weight_magnitude)``.

  Args:
    rho: the radius, >= 0 (number, schedule or per-leaf pytree). ASAM needs about
      10x SAM's radius.
    eta: the offset :math:`\eta` >= 0.
    mask: the leaves that get :math:`T_w` (see :func:`scale_by_weight_magnitude`).
    layerwise: use :math:`T_w = \|w_\ell\| + \eta` per leaf.
    eps: the stabiliser added to the norm, > 0.
    ball: ``"l2"`` or ``"linf"``.

  Returns:
    An :class:`optax.GradientTransformation` mapping ``g`` to ``eps``.

  >>> tx = scale_by_asam(rho=1.0, eta=0.0, mask=lambda p: {"w": True})
  >>> params = {"w": jnp.array([1.0, 2.0])}
  >>> eps, _ = tx.update({"w": jnp.array([1.0, 0.0])}, tx.init(params), params)
  >>> eps["w"]
  Array([1., 0.], dtype=float32)

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks <https://arxiv.org/abs/2102.11600>`_, 2021
  """
  magnitude = scale_by_weight_magnitude(eta, mask=mask, layerwise=layerwise)
  return optax.chain(magnitude, scale_by_sam(rho, eps=eps, ball=ball), magnitude)
