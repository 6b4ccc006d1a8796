r"""Perturbing a selected subset of the parameters: the masking ascent blocks and SAM-ON.

:func:`mask_perturbation` is an ascent block that keeps the selected entries of its
input and zeroes the rest. Where it sits in the ascent chain decides the norm
scope (which entries the normalisation to the :math:`\rho`-ball sees):

* before the normalisation, ``optax.chain(mask_perturbation(m), scale_by_sam(rho))``:
  the norm is over the selected entries, :math:`\|\epsilon\| = \rho` (SAM-ON);
* after it, ``optax.chain(scale_by_sam(rho), mask_perturbation(m))``: the norm is
  over all entries, :math:`\|\epsilon\| \le \rho` (SSAM, ESAM-SWP).

:func:`masked_ascent` wraps any ascent with either scope, and :func:`sam_on` is the
published algorithm. Leaves that a mask leaves out entirely become exact zeros:
the clean gradient of those leaves is then unused, and XLA drops the work that
produced it (the weight-gradient products of the clean backward pass) when the
step is jitted with the gradient computation.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from samx import ascent as ascent_blocks
from samx import masks
from samx.pipeline import sharpness_aware

__all__ = ["mask_perturbation", "masked_ascent", "sam_on"]

NormScope = Literal["selected", "all"]
_SCOPES = ("selected", "all")
_ASCENTS = ("sam", "asam")


def _apply_selection(u: jax.Array, selected: Any) -> jax.Array:
  if selected is True:
    return u
  if selected is False:
    return jnp.zeros_like(u)
  return jnp.where(selected, u, jnp.zeros((), u.dtype))


def mask_perturbation(mask: masks.Mask = None) -> optax.GradientTransformation:
  r"""Keeps the entries selected by a static mask and zeroes the others.

  .. math::
    u \mapsto M \odot u

  with :math:`M` the binary mask. Chained before the normalisation
  (:func:`samx.scale_by_sam`), the norm is taken over the selected entries only
  (SAM-ON's scope); chained after it, over all entries (SSAM's scope). A leaf that
  is not selected at all becomes ``zeros_like``, so nothing downstream depends on
  its incoming value.

  Args:
    mask: a pytree of booleans (per leaf) or NumPy boolean arrays (per entry) with
      the structure of the parameters, or a callable ``params -> such a pytree``
      (the builders of :mod:`samx.masks`); ``None`` selects the normalization
      layers by structure (:func:`samx.masks.norm_layers`). It is resolved at
      ``init`` (where an empty selection or a tree that does not match the
      parameters raises) and at every trace of ``update``.

  Returns:
    An :class:`optax.GradientTransformation` (stateless).

  >>> tx = mask_perturbation({"w": True, "b": False})
  >>> u = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
  >>> tx.update(u, tx.init(u))[0]
  {'b': Array([0.], dtype=float32), 'w': Array([3., 4.], dtype=float32)}
  >>> import samx
  >>> tx = optax.chain(mask_perturbation({"w": True, "b": False}),
  ...                  samx.scale_by_sam(rho=1.0))
  >>> tx.update(u, tx.init(u))[0]["w"]   # ||eps|| = rho over the selected entries
  Array([0.6, 0.8], dtype=float32)

  References:
    Mueller et al., `Normalization Layers Are All That Sharpness-Aware Minimization
    Needs <https://arxiv.org/abs/2306.04226>`_, 2023
  """

  def resolve(reference):
    return masks.resolve_selection(mask, reference, default=masks.norm_layers, name="mask")

  def init_fn(params):
    if jax.tree.leaves(params):  # (optax.tree.map_params initialises with a placeholder)
      resolve(params)  # a bad mask fails here, before the first step
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    selection = resolve(updates if params is None else params)
    return jax.tree.map(_apply_selection, updates, selection), state

  return optax.GradientTransformation(init_fn, update_fn)


def _check_scope(norm_scope: str) -> None:
  if norm_scope not in _SCOPES:
    raise ValueError(f"norm_scope must be one of {_SCOPES}; got norm_scope={norm_scope!r}")


def masked_ascent(
  ascent: optax.GradientTransformation,
  mask: masks.Mask = None,
  *,
  norm_scope: NormScope = "selected",
) -> optax.GradientTransformationExtraArgs:
  r"""Restricts any ascent to the entries a static mask selects.

  .. math::
    \epsilon = M \odot \mathrm{ascent}(M \odot g) \quad (\text{norm\_scope="selected"}),
    \qquad
    \epsilon = M \odot \mathrm{ascent}(g) \quad (\text{norm\_scope="all"})

  With ``"selected"`` (SAM-ON) the ascent sees only the selected gradient, so
  SAM's normalisation gives :math:`\|\epsilon\| = \rho` over the selection and
  ASAM's :math:`T_w` and the :math:`\ell_\infty` ball act on it alike; with
  ``"all"`` (SSAM's scope) the ascent sees the full gradient and its result is
  masked, :math:`\|\epsilon\| \le \rho`. Any ascent works, for example
  ``masked_ascent(my_fsam_ascent, samx.masks.norm_layers(model))`` gives an
  F-SAM-ON ascent for :func:`samx.sharpness_aware`.

  Args:
    ascent: the transformation ``g -> eps`` to restrict.
    mask: the selection (see :func:`mask_perturbation`); ``None`` selects the
      normalization layers by structure.
    norm_scope: ``"selected"`` or ``"all"``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` mapping ``g`` to ``eps``.

  >>> import samx
  >>> tx = masked_ascent(samx.scale_by_sam(rho=1.0), {"w": True, "b": False},
  ...                    norm_scope="all")
  >>> g = {"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
  >>> tx.update(g, tx.init(g))[0]   # normalised by ||g|| = 5, then masked
  {'b': Array([0.], dtype=float32), 'w': Array([0.6, 0. ], dtype=float32)}

  References:
    Mueller et al., `Normalization Layers Are All That Sharpness-Aware Minimization
    Needs <https://arxiv.org/abs/2306.04226>`_, 2023
  """
  _check_scope(norm_scope)
  if norm_scope == "selected":
    # The second mask keeps eps exactly zero off the selection whatever the ascent
    # does with a zero input (F-SAM's moving average, ASAM's T_w, noise).
    return optax.chain(mask_perturbation(mask), ascent, mask_perturbation(mask))
  return optax.chain(ascent, mask_perturbation(mask))


def sam_on(
  optimizer: optax.GradientTransformation,
  rho: Any = 0.5,
  mask: masks.Mask = None,
  *,
  ascent: Literal["sam", "asam"] = "sam",
  complement: bool = False,
  eta: Any = 0.01,
  adaptive_mask: masks.Mask = None,
  layerwise: bool = False,
  eps: float = 1e-12,
  ball: ascent_blocks.Ball = "l2",
  axis_name: str | None = None,
  sync_ascent: Any = True,
  micro_shards: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SAM-ON: perturb only the normalization layers, update every parameter.

  With :math:`N` the selected entries (default: the scale and bias of every
  normalization layer) and :math:`g_N` the gradient restricted to them:

  .. math::
    \epsilon_N = \rho\,\frac{T_N^2 \odot g_N}{\|T_N \odot g_N\| + \mathrm{eps}}, \quad
    \epsilon_{\bar N} = 0, \qquad
    \Delta w = \mathrm{optimizer}(\nabla L(w + \epsilon))

  The norm is over the selected entries only, so :math:`\|\epsilon\| = \rho`.
  ``ascent="sam"`` has :math:`T = 1`; ``ascent="asam"`` has :math:`T = |w| + \eta`
  (elementwise) or :math:`\|w_\ell\| + \eta` per leaf (``layerwise=True``) on the
  leaves of ``adaptive_mask`` (default: every selected leaf, scales and biases, as
  the official README's ``--normalize_bias`` run). ``ball="linf"`` gives
  :math:`\epsilon_N = \rho\, T_N \odot \mathrm{sign}(g_N)`. ``complement=True``
  perturbs everything except the selection (the paper's "no-norm" ablation).
  Other ascents (F-SAM-ON, ...): :func:`masked_ascent` with
  :func:`samx.sharpness_aware`.

  The radius must be about 10x SAM's (the norm covers ~0.1% of the parameters):
  the official README runs elementwise ASAM-ON with ``rho=10``.

  Call ``update`` with ``params`` and ``grad_fn``, as for :func:`samx.sam`. When the
  clean gradient is computed inside the same jitted step, XLA drops the parts of
  it that only the unselected leaves need (see ``benchmarks/sam_on_cost.py``);
  the perturbed gradient is needed in full for the update.

  Args:
    optimizer: the base optimizer, e.g. ``optax.sgd(0.1, momentum=0.9)``.
    rho: the radius :math:`\rho` >= 0 (number, schedule or per-leaf pytree).
    mask: which entries to perturb: a pytree of booleans / NumPy boolean arrays or
      a callable (see :mod:`samx.masks`); ``None`` finds the normalization layers
      by structure (:func:`samx.masks.norm_layers`). For an NNX model pass
      ``samx.masks.norm_layers(model)`` (by module type). Under
      :func:`optax.inject_hyperparams` pass ``static_args="mask"`` for a callable.
    ascent: ``"sam"`` or ``"asam"``.
    complement: perturb the complement of ``mask`` instead.
    eta: ASAM's offset :math:`\eta` >= 0 (``ascent="asam"``).
    adaptive_mask: the leaves that get ASAM's :math:`T_w` (``ascent="asam"``);
      default all.
    layerwise: ASAM's per-leaf :math:`T = \|w_\ell\| + \eta` (``ascent="asam"``).
    eps: the stabiliser in the normalisation, > 0.
    ball: ``"l2"`` or ``"linf"``.
    axis_name: the data-parallel axis under ``pmap`` / ``shard_map``.
    sync_ascent: which devices share one ``eps`` (see :func:`samx.sharpness_aware`).
    micro_shards: ``k`` >= 1 micro-shards of the local batch (``None``: 1), one
      ``eps`` each, on the same selection, normalised over the selected entries of
      that shard's gradient (see :func:`samx.sharpness_aware`; ``k > 1`` needs the
      per-example contract).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  >>> import jax, jax.numpy as jnp, optax, samx
  >>> params = {"dense": {"kernel": jnp.array([[3.0]])},
  ...           "norm": {"scale": jnp.array([1.0]), "bias": jnp.array([0.0])}}
  >>> def loss(p):   # (x W s + b)^2 at x = 1
  ...   return jnp.sum((p["dense"]["kernel"][0] * p["norm"]["scale"] + p["norm"]["bias"]) ** 2)
  >>> samx.masks.selected_paths(samx.masks.norm_layers, params)   # by structure
  ['norm/bias', 'norm/scale']
  >>> tx = sam_on(optax.sgd(0.01), rho=1.0)
  >>> updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params,
  ...                        grad_fn=jax.grad(loss))
  >>> jax.tree.map(lambda u: round(float(u.ravel()[0]), 4), updates)   # every leaf moves
  {'dense': {'kernel': -0.2402}, 'norm': {'bias': -0.1232, 'scale': -0.3697}}

  References:
    Mueller et al., `Normalization Layers Are All That Sharpness-Aware Minimization
    Needs <https://arxiv.org/abs/2306.04226>`_, 2023
  """
  if ascent not in _ASCENTS:
    raise ValueError(
      f"ascent must be one of {_ASCENTS}; got ascent={ascent!r}. For another ascent "
      "use samx.sharpness_aware(optimizer, samx.masked_ascent(my_ascent, mask))"
    )
  if ascent == "sam":
    if layerwise or adaptive_mask is not None:
      raise ValueError(
        "layerwise and adaptive_mask configure ASAM's T_w and need ascent='asam'; got "
        f"ascent='sam' with layerwise={layerwise!r}, adaptive_mask={adaptive_mask!r}"
      )
    block = ascent_blocks.scale_by_sam(rho, eps=eps, ball=ball)
  else:
    block = ascent_blocks.scale_by_asam(
      rho,
      eta,
      mask=masks.all_leaves if adaptive_mask is None else adaptive_mask,
      layerwise=layerwise,
      eps=eps,
      ball=ball,
    )
  selection = mask
  if complement:
    selection = masks.complement(masks.norm_layers if mask is None else mask)
  return sharpness_aware(
    optimizer,
    masked_ascent(block, selection, norm_scope="selected"),
    axis_name=axis_name,
    sync_ascent=sync_ascent,
    micro_shards=micro_shards,
    name="samx.sam_on",
  )
