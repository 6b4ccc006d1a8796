"""The published algorithms by name: each is a choice of stage pieces."""

from __future__ import annotations

from typing import Any

import optax

from samx import ascent as ascent_blocks
from samx.combine_variants import gsam, looksam, wsam
from samx.directions import fsam, random_sam, vasso
from samx.efficient import esam
from samx.masks import Mask
from samx.pipeline import sharpness_aware
from samx.selective import sam_on
from samx.sparse import ssam

__all__ = [
  "asam",
  "esam",
  "fsam",
  "gsam",
  "looksam",
  "msam",
  "random_sam",
  "sam",
  "sam_on",
  "ssam",
  "vasso",
  "wsam",
]


def sam(
  optimizer: optax.GradientTransformation,
  rho: Any = 0.05,
  *,
  eps: float = 1e-12,
  ball: ascent_blocks.Ball = "l2",
  axis_name: str | None = None,
  sync_ascent: bool = True,
  micro_shards: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Minimization in one ``update`` call per step.

  .. math::
    \epsilon = \rho\,\frac{g}{\|g\| + \mathrm{eps}}, \qquad
    g_s = \nabla L(w + \epsilon), \qquad
    \Delta w = \mathrm{optimizer}(g_s)

  Call ``update`` with ``params`` and ``grad_fn``::

    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=lambda p: jax.grad(loss_fn)(p, batch))

  Args:
    optimizer: the base optimizer, e.g. ``optax.sgd(0.1, momentum=0.9)``.
    rho: the radius :math:`\rho` >= 0: a number, a schedule, or a per-leaf pytree.
    eps: the stabiliser in the normalisation, > 0.
    ball: ``"l2"`` (SAM) or ``"linf"`` (:math:`\epsilon = \rho\,\mathrm{sign}(g)`).
    axis_name: the data-parallel axis under ``pmap`` / ``shard_map``.
    sync_ascent: average ``g`` over ``axis_name`` before the ascent (one global
      ``eps``); ``False`` gives one ``eps`` per device.
    micro_shards: ``k`` >= 1 micro-shards of the local batch, one ``eps`` each
      (``None``: 1). ``k > 1`` is :func:`samx.msam` inside a device: the
      per-example contract, and ``sync_ascent=False`` with ``axis_name``; see
      :func:`samx.sharpness_aware`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  >>> import jax, jax.numpy as jnp, optax
  >>> tx = sam(optax.sgd(0.1), rho=0.05)
  >>> loss = lambda p: jnp.sum(p ** 2)
  >>> params = jnp.array([0.6, 0.8])
  >>> updates, state = tx.update(jax.grad(loss)(params), tx.init(params), params,
  ...                            grad_fn=jax.grad(loss))
  >>> [round(float(u), 4) for u in updates]   # -0.1 * 2 * (w + 0.05 * w / |w|)
  [-0.126, -0.168]

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021
  """
  return sharpness_aware(
    optimizer,
    ascent_blocks.scale_by_sam(rho, eps=eps, ball=ball),
    axis_name=axis_name,
    sync_ascent=sync_ascent,
    micro_shards=micro_shards,
    name="samx.sam",
  )


def asam(
  optimizer: optax.GradientTransformation,
  rho: Any = 0.5,
  eta: Any = 0.01,
  *,
  mask: Mask = None,
  layerwise: bool = False,
  eps: float = 1e-12,
  ball: ascent_blocks.Ball = "l2",
  axis_name: str | None = None,
  sync_ascent: bool = True,
  micro_shards: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adaptive SAM: SAM in the coordinates rescaled by :math:`T_w = |w| + \eta`.

  .. math::
    \epsilon = \rho\,\frac{T_w^2 \odot g}{\|T_w \odot g\| + \mathrm{eps}}, \qquad
    \Delta w = \mathrm{optimizer}(\nabla L(w + \epsilon))

  :math:`T_w` acts on the leaves selected by ``mask`` (default: ``ndim >= 2``, the
  kernels) and is 1 elsewhere. ``eta=0`` with an all-leaves mask is the common
  PyTorch form; ``layerwise=True`` uses :math:`\|w_\ell\| + \eta` per leaf.

  Args:
    optimizer: the base optimizer.
    rho: the radius, >= 0 (ASAM needs about 10x SAM's; default 0.5).
    eta: the offset :math:`\eta` >= 0 (default 0.01).
    mask: the leaves that get :math:`T_w` (pytree of booleans or callable).
      Under :func:`optax.inject_hyperparams`, pass ``static_args="mask"`` for a
      callable mask.
    layerwise: one scalar :math:`T` per leaf instead of elementwise.
    eps: the stabiliser in the normalisation, > 0.
    ball: ``"l2"`` or ``"linf"`` (:math:`\epsilon = \rho\, T_w \odot \mathrm{sign}(g)`).
    axis_name: the data-parallel axis under ``pmap`` / ``shard_map``.
    sync_ascent: average ``g`` over ``axis_name`` before the ascent.
    micro_shards: ``k`` >= 1 micro-shards of the local batch (``None``: 1), each
      with its own ``eps`` from its own gradient (see :func:`samx.sharpness_aware`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  >>> import jax, jax.numpy as jnp, optax
  >>> tx = asam(optax.sgd(1.0), rho=1.0, eta=0.0)
  >>> loss = lambda p: jnp.sum(p["w"])
  >>> params = {"w": jnp.array([[1.0, 2.0]])}
  >>> updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params,
  ...                        grad_fn=jax.grad(loss))
  >>> updates["w"]
  Array([[-1., -1.]], dtype=float32)

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks <https://arxiv.org/abs/2102.11600>`_, 2021
  """
  return sharpness_aware(
    optimizer,
    ascent_blocks.scale_by_asam(rho, eta, mask=mask, layerwise=layerwise, eps=eps, ball=ball),
    axis_name=axis_name,
    sync_ascent=sync_ascent,
    micro_shards=micro_shards,
    name="samx.asam",
  )


def msam(
  optimizer: optax.GradientTransformation,
  rho: Any = 0.05,
  *,
  axis_name: str | tuple[str, ...] | None = None,
  sync_ascent: bool | str | tuple[str, ...] = False,
  micro_shards: int | None = None,
  eps: float = 1e-12,
  ball: ascent_blocks.Ball = "l2",
) -> optax.GradientTransformationExtraArgs:
  r"""mSAM (m-sharpness): one perturbation per shard of the batch, gradients averaged.

  For disjoint shards :math:`B_i` of the batch:

  .. math::
    \epsilon_i = \rho\,\frac{g_i}{\|g_i\| + \mathrm{eps}}, \quad
    h_i = \nabla L_{B_i}(w + \epsilon_i), \qquad
    \Delta w = \mathrm{optimizer}\big(\tfrac{1}{k}\textstyle\sum_i h_i\big)

  Shards are devices along ``axis_name`` (each device perturbs along its own
  gradient; the only collective is the mean of :math:`h_i`: one gradient all-reduce
  per step, as in data-parallel SGD), micro-shards inside a device
  (``micro_shards=k``, vectorised with ``vmap``), or both (``m`` = local batch /
  ``micro_shards``). ``sync_ascent`` lets groups of devices share a perturbation
  (see :func:`samx.sharpness_aware`); ``sync_ascent=True`` is synced SAM.

  Contracts: with ``micro_shards=1``, the ``grad_fn`` contract of :func:`samx.sam`.
  With ``micro_shards > 1``, the per-example contract (``per_example_loss_fn`` and
  ``batch``, see :mod:`samx.evaluation`): samx computes each shard's clean gradient
  itself, so the ``grads`` passed to ``update`` are not used (pass zeros to skip
  that pass; the step then costs the FLOPs of SAM). Memory: ``k`` perturbations and
  ``k`` per-shard gradients, about ``k x |params|`` each. Each micro-shard keeps its
  own ascent state (its step count), so ``rho`` may be a schedule. ``micro_shards``
  sets shapes: under :func:`optax.inject_hyperparams` an explicit value needs
  ``static_args="micro_shards"`` (the default ``None`` needs nothing). Every other
  alias takes ``micro_shards`` too (F-SAM, SSAM, SAM-ON, ... per micro-shard);
  ``msam`` is SAM's ascent with per-device ``eps`` by default.

  Under ``jax.shard_map`` with replication checking (the default ``check_vma=True``),
  ``jax.grad`` of replicated parameters returns gradients already summed over the
  devices. samx evaluates ``grad_fn`` at parameters cast to varying (so ``g_s`` is
  per device) and refuses an invariant clean gradient: take it with respect to
  ``jax.lax.pcast(params, axis_name, to="varying")`` (see :mod:`samx.axes`). With
  ``micro_shards > 1`` samx takes the clean gradients itself: nothing is needed.

  Gradient accumulation is mSAM with ``m`` = the micro-batch: put samx *before*
  :class:`optax.MultiSteps`, so every micro-step computes its own SAM gradient and
  MultiSteps averages them::

    tx = optax.chain(samx.sam(optax.identity(), rho),
                     optax.MultiSteps(base, k).gradient_transformation())

  (``optax.MultiSteps(samx.sam(base, rho), k)`` instead perturbs along the
  accumulated mean gradient but evaluates ``g_s`` on the last micro-batch only.)

  Args:
    optimizer: the base optimizer.
    rho: the radius :math:`\rho` >= 0: a number, a schedule, or a per-leaf pytree.
    axis_name: the data-parallel axis (or axes) under ``pmap`` / ``shard_map``.
    sync_ascent: ``False`` (default): one ``eps`` per device; ``True``: one global
      ``eps``; axis names: one ``eps`` per group along the other axes.
    micro_shards: ``k`` >= 1 micro-shards of the local batch (``None``: 1); with
      ``axis_name``, ``k > 1`` needs ``sync_ascent=False``, the default.
    eps: the stabiliser of the normalisation, > 0.
    ball: ``"l2"`` or ``"linf"``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  >>> import jax, jax.numpy as jnp, optax
  >>> tx = msam(optax.sgd(1.0), rho=0.0, micro_shards=2)
  >>> losses = lambda w, b: 0.5 * (b["x"] * w) ** 2
  >>> w = jnp.array(1.0)
  >>> updates, _ = tx.update(jnp.zeros(()), tx.init(w), w, per_example_loss_fn=losses,
  ...                        batch={"x": jnp.arange(4.0)})
  >>> updates
  Array(-3.5, dtype=float32)

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021 (Section 4.1);
    Behdin et al., `mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization
    <https://arxiv.org/abs/2302.09693>`_, 2023
  """
  return sharpness_aware(
    optimizer,
    ascent_blocks.scale_by_sam(rho, eps=eps, ball=ball),
    axis_name=axis_name,
    sync_ascent=sync_ascent,
    micro_shards=micro_shards,
    name="samx.msam",
  )
