"""ESAM: stochastic weight perturbation (an ascent) and sharpness-sensitive data selection.

Efficient SAM makes the SAM step cheaper in two independent ways, each one stage
piece of :func:`samx.sharpness_aware`:

* :func:`scale_by_swp` (ascent, SWP): perturb a random subset of the weights,
  built on the :func:`scale_by_bernoulli_mask` block.
* :func:`gradient_on_sharpest_examples` (evaluation, SDS): compute ``g_s`` on
  the examples whose loss rises most under the perturbation only. It needs the
  batch, so it uses the per-example contract of :mod:`samx.evaluation`.

:func:`esam` is the alias with both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samx import checks, numerics
from samx.ascent import Ball, scale_by_sam
from samx.evaluation import Evaluation, batch_size, per_example_losses
from samx.pipeline import sharpness_aware

__all__ = [
  "BernoulliMaskState",
  "esam",
  "gradient_on_sharpest_examples",
  "scale_by_bernoulli_mask",
  "scale_by_swp",
]

NormScope = Literal["all", "selected"]
_NORM_SCOPES = ("all", "selected")


def _check_fraction(name: str, value: Any) -> None:
  checks._check(name, value, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _key_data(key: Any) -> tuple[jax.Array, Any]:
  """Raw ``uint32`` key data (serialisable, comparable) and the PRNG implementation."""
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key), jax.random.key_impl(key)
  if isinstance(key, (jax.Array, np.ndarray)) and jnp.ndim(key) > 0:
    return jnp.asarray(key, jnp.uint32), None  # legacy raw key, e.g. jax.random.PRNGKey(0)
  dtype = key.dtype if isinstance(key, jax.Array) else np.asarray(key).dtype  # tracers too
  if isinstance(key, bool) or not np.issubdtype(dtype, np.integer):
    raise TypeError(f"key must be an integer seed or a jax.random key; got {key=!r}")
  return jax.random.key_data(jax.random.key(key)), None


class BernoulliMaskState(NamedTuple):
  """State of :func:`scale_by_bernoulli_mask`.

  Attributes:
    key: the raw ``uint32`` data of the PRNG key the next mask is drawn from
      (``jax.random.key_data``), split once per step.
  """

  key: jax.Array


def scale_by_bernoulli_mask(
  beta: Any = 0.5,
  *,
  key: Any = 0,
  per_tensor: bool = False,
  rescale: bool = True,
) -> optax.GradientTransformation:
  r"""Keeps each entry (or each leaf) with probability :math:`\beta`, a fresh mask per step.

  .. math::
    u \mapsto \frac{m \odot u}{\beta}, \qquad m_i \sim \mathrm{Bernoulli}(\beta)

  (without the :math:`1/\beta` when ``rescale=False``). With ``per_tensor=True``
  one draw per leaf keeps or drops the whole leaf. The mask of a step is drawn
  as follows, so that it can be reproduced from the state's key: ``key, sample
  = jax.random.split(key)``; one key per leaf, ``jax.random.split(sample,
  n_leaves)`` in tree-flatten order; ``jax.random.bernoulli(leaf_key,
  float32(beta), shape)`` with ``shape`` the leaf's shape (``()`` per tensor).
  ``beta=1`` keeps everything.

  Args:
    beta: the keep probability :math:`\beta` in (0, 1].
    key: an integer seed or a :func:`jax.random.key`.
    per_tensor: one draw per leaf instead of one per entry.
    rescale: divide the kept entries by :math:`\beta` (an unbiased mask).

  Returns:
    An :class:`optax.GradientTransformation` with state :class:`BernoulliMaskState`.

  >>> tx = scale_by_bernoulli_mask(beta=0.5, key=0)
  >>> u = {"w": jnp.ones(1000)}
  >>> masked, state = tx.update(u, tx.init(u))
  >>> sorted(set(masked["w"].tolist())), 400 < int(jnp.sum(masked["w"] > 0)) < 600
  ([0.0, 2.0], True)
  """
  _check_fraction("beta", beta)
  key_data, impl = _key_data(key)

  def init_fn(params):
    del params
    return BernoulliMaskState(key=key_data)

  def update_fn(updates, state, params=None):
    del params
    rng = jax.random.wrap_key_data(state.key, impl=impl)
    rng, sample = jax.random.split(rng)
    leaves, treedef = jax.tree.flatten(updates)
    leaf_keys = jax.random.split(sample, len(leaves)) if leaves else []
    # The draw uses a float32 probability whatever the dtypes (the same mask with
    # and without x64); the rescaling is done in the leaf's accumulation dtype.
    probability = jnp.asarray(beta, jnp.float32)

    def leaf(u, leaf_key):
      keep = jax.random.bernoulli(leaf_key, probability, () if per_tensor else jnp.shape(u))
      acc = numerics.accumulation_dtype(u.dtype)
      scale = 1.0 / jnp.asarray(beta, acc) if rescale else 1.0
      return jnp.where(keep, scale * jnp.asarray(u, acc), 0.0).astype(u.dtype)

    masked = treedef.unflatten([leaf(u, k) for u, k in zip(leaves, leaf_keys, strict=True)])
    return masked, BernoulliMaskState(key=jax.random.key_data(rng))

  return optax.GradientTransformation(init_fn, update_fn)


def _scale_by_inverse(beta: Any) -> optax.GradientTransformation:
  """Divides every leaf by ``beta``, keeping its dtype."""

  def update_fn(updates, state, params=None):
    del params

    def leaf(u):
      acc = numerics.accumulation_dtype(u.dtype)
      return (jnp.asarray(u, acc) / jnp.asarray(beta, acc)).astype(u.dtype)

    return jax.tree.map(leaf, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def scale_by_swp(
  rho: Any = 0.05,
  beta: Any = 0.5,
  *,
  key: Any = 0,
  per_tensor: bool = False,
  norm_scope: NormScope = "all",
  eps: float = 1e-12,
  ball: Ball = "l2",
) -> optax.GradientTransformation:
  r"""ESAM's stochastic weight perturbation: SAM's ascent on a random subset of weights.

  .. math::
    \epsilon = \frac{\rho}{\beta}\,\frac{m \odot g}{\|g\| + \mathrm{eps}}, \qquad
    m_i \sim \mathrm{Bernoulli}(\beta)

  a fresh mask every step (see :func:`scale_by_bernoulli_mask` for how it is
  drawn). The :math:`1/\beta` makes :math:`\mathbb{E}[\epsilon]` SAM's
  perturbation. ``per_tensor=True`` keeps or drops whole leaves, as the official
  code does; ``norm_scope="selected"`` normalises by :math:`\|m \odot g\|`
  instead (the official code's norm, which only sees the selected leaves).
  ``beta=1`` is SAM's ascent.

  Args:
    rho: the radius >= 0: a number, a schedule or a per-leaf pytree.
    beta: the fraction :math:`\beta` in (0, 1] of perturbed weights.
    key: an integer seed or a :func:`jax.random.key`.
    per_tensor: draw one mask bit per leaf instead of per entry.
    norm_scope: ``"all"`` (:math:`\|g\|`, the paper's form) or ``"selected"``
      (:math:`\|m\odot g\|`).
    eps: the stabiliser in the normalisation, > 0.
    ball: ``"l2"`` or ``"linf"`` (:math:`\epsilon = \rho\,\mathrm{sign}(g)`), the ascent's ball.

  Returns:
    An :class:`optax.GradientTransformation` mapping ``g`` to ``eps``.

  >>> tx = scale_by_swp(rho=1.0, beta=1.0)
  >>> eps, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init({"w": jnp.zeros(2)}))
  >>> eps["w"]
  Array([0.6, 0.8], dtype=float32)

  References:
    Du et al., `Efficient Sharpness-aware Minimization for Improved Training of
    Neural Networks <https://arxiv.org/abs/2110.03141>`_, 2022
  """
  if norm_scope not in _NORM_SCOPES:
    raise ValueError(f"norm_scope must be one of {_NORM_SCOPES}; got {norm_scope=!r}")
  if norm_scope == "all":
    return optax.chain(
      scale_by_sam(rho, eps=eps, ball=ball),
      scale_by_bernoulli_mask(beta, key=key, per_tensor=per_tensor),
    )
  return optax.chain(
    scale_by_bernoulli_mask(beta, key=key, per_tensor=per_tensor, rescale=False),
    scale_by_sam(rho, eps=eps, ball=ball),
    _scale_by_inverse(beta),
  )


def _selected_count(gamma: Any, size: int, who: str) -> int:
  if isinstance(gamma, jax.core.Tracer):
    raise TypeError(
      f"{who}: gamma sets the static size ceil(gamma * B) of the selected sub-batch, so "
      "it must be a Python number, not a traced value. Under optax.inject_hyperparams "
      "pass static_args=('gamma',)."
    )
  # round() first so that e.g. 0.3 * 10 = 3.0000000000000004 selects 3, not 4.
  return min(size, max(1, math.ceil(round(float(gamma) * size, 9))))


def gradient_on_sharpest_examples(gamma: Any = 0.5) -> Evaluation:
  r"""ESAM's sharpness-sensitive data selection: ``g_s`` on the sharpest examples only.

  With per-example losses :math:`\ell_n` and :math:`m = \lceil \gamma B \rceil`:

  .. math::
    S = \operatorname{top}_m\bigl(\ell_n(w + \epsilon) - \ell_n(w)\bigr), \qquad
    g_s = \nabla_w \frac{1}{m}\sum_{n \in S} \ell_n(w)\Big|_{w + \epsilon}

  The losses at :math:`w + \epsilon` are a forward pass; the gradient is taken on
  the gathered sub-batch of static size :math:`m`, so it costs about
  :math:`\gamma` of a full gradient. The clean losses :math:`\ell_n(w)` come
  from the optional extra argument ``losses`` (the ``(B,)`` losses of the step's
  first pass, which saves a forward pass) or are recomputed. Ties go to the
  lower index. ``gamma=1`` is the full batch (no selection is computed).

  This is an evaluation for :func:`samx.sharpness_aware` (``evaluation=``); it
  uses the per-example contract::

    updates, opt_state = tx.update(grads, opt_state, params,
                                   per_example_loss_fn=per_example_loss_fn,
                                   batch=batch, losses=losses)   # losses optional

  Args:
    gamma: the selected fraction :math:`\gamma` in (0, 1], a Python number (it
      sets a static shape).

  Returns:
    An evaluation ``(params, perturbation, *, who, **extra_args) -> g_s``.

  >>> evaluation = gradient_on_sharpest_examples(gamma=0.5)
  >>> loss_fn = lambda w, b: (w * b["x"]) ** 2
  >>> batch = {"x": jnp.array([1.0, 3.0, 2.0, 0.5])}
  >>> evaluation(jnp.array(1.0), jnp.array(0.5), per_example_loss_fn=loss_fn,
  ...            batch=batch, who="doc")   # mean of 2 w x^2 over x = 3, 2 at w = 1.5
  Array(19.5, dtype=float32)

  References:
    Du et al., `Efficient Sharpness-aware Minimization for Improved Training of
    Neural Networks <https://arxiv.org/abs/2110.03141>`_, 2022
  """
  _check_fraction("gamma", gamma)

  def evaluation(
    params: Any,
    perturbation: Any,
    *,
    per_example_loss_fn: Callable[[Any, Any], Any] | None = None,
    batch: Any = None,
    losses: Any = None,
    who: str = "samx",
    **extra_args: Any,
  ) -> Any:
    del extra_args
    perturbed = optax.apply_updates(params, perturbation)
    if per_example_loss_fn is None or batch is None:
      per_example_losses(per_example_loss_fn, params, batch, who=who)  # raises, shows the call
    size = batch_size(batch, who=who)
    count = _selected_count(gamma, size, who)
    if count < size:
      after = per_example_losses(per_example_loss_fn, perturbed, batch, who=who)
      if losses is None:
        before = per_example_losses(per_example_loss_fn, params, batch, who=who)
      else:
        before = jnp.asarray(losses)
        if before.shape != (size,):
          raise ValueError(
            f"{who}: losses must be the ({size},) per-example losses at params of the "
            f"step's first pass; got shape {before.shape}"
          )
      acc = numerics.accumulation_dtype(jnp.result_type(after, before))
      rise = jax.lax.stop_gradient(jnp.asarray(after, acc) - jnp.asarray(before, acc))
      _, selected = jax.lax.top_k(rise, count)
      batch = jax.tree.map(lambda x: jnp.take(x, selected, axis=0), batch)

    def mean_loss(p):
      values = per_example_losses(per_example_loss_fn, p, batch, who=who)
      return jnp.mean(jnp.asarray(values, numerics.accumulation_dtype(values.dtype)))

    return jax.grad(mean_loss)(perturbed)

  return evaluation


def esam(
  optimizer: optax.GradientTransformation,
  rho: Any = 0.05,
  beta: Any = 0.5,
  gamma: Any = 0.5,
  *,
  key: Any = 0,
  per_tensor: bool = False,
  norm_scope: NormScope = "all",
  eps: float = 1e-12,
  ball: Ball = "l2",
  axis_name: str | None = None,
  sync_ascent: bool = True,
  micro_shards: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Efficient SAM (ESAM): SAM on random weights (SWP) and on the sharpest examples (SDS).

  .. math::
    \epsilon = \frac{\rho}{\beta}\,\frac{m \odot g}{\|g\| + \mathrm{eps}},\quad
    m_i \sim \mathrm{Bernoulli}(\beta); \quad
    S = \operatorname{top}_{\lceil \gamma B\rceil}\bigl(\ell_n(w+\epsilon) - \ell_n(w)\bigr);
    \quad \Delta w = \mathrm{optimizer}\Bigl(\nabla \tfrac{1}{|S|}
      \textstyle\sum_{n\in S} \ell_n(w + \epsilon)\Bigr)

  See :func:`scale_by_swp` and :func:`gradient_on_sharpest_examples`.
  ``beta=gamma=1`` is SAM. The second pass costs a forward pass on the batch
  plus a gradient on :math:`\lceil\gamma B\rceil` examples; pass the first
  pass's per-example ``losses`` to save recomputing them. (In the official
  PyTorch code SWP also skips the weight gradients of unperturbed tensors in the
  first pass; here the first pass is the caller's, so SWP saves nothing, and
  per-entry masks cost one random draw per weight and step.)

  Uses the per-example contract of :mod:`samx.evaluation`::

    def mean_loss(p, batch):
      losses = per_example_loss_fn(p, batch)
      return losses.mean(), losses
    (loss, losses), grads = jax.value_and_grad(mean_loss, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, losses=losses,
                                   per_example_loss_fn=per_example_loss_fn, batch=batch)

  Args:
    optimizer: the base optimizer.
    rho: the radius >= 0: a number, a schedule or a per-leaf pytree.
    beta: the fraction :math:`\beta` in (0, 1] of perturbed weights (SWP).
    gamma: the fraction :math:`\gamma` in (0, 1] of examples in the second
      gradient (SDS), a Python number; under :func:`optax.inject_hyperparams`
      pass ``static_args=("gamma",)``.
    key: an integer seed or a :func:`jax.random.key` for the SWP masks.
    per_tensor: SWP keeps or drops whole leaves (the official code) instead of
      single weights (the paper's description).
    norm_scope: ``"all"`` (:math:`\|g\|`) or ``"selected"`` (:math:`\|m\odot g\|`).
    eps: the stabiliser in the normalisation, > 0.
    ball: ``"l2"`` or ``"linf"`` (:math:`\epsilon = \rho\,\mathrm{sign}(g)`), the ascent's ball.
    axis_name: the data-parallel axis under ``pmap`` / ``shard_map``; each device
      selects among its own examples.
    sync_ascent: average ``g`` over ``axis_name`` before the ascent.
    micro_shards: ``k`` >= 1 micro-shards of the local batch (``None``: 1), one
      ``eps`` each; each shard selects its own :math:`\lceil \gamma B / k \rceil`
      sharpest examples. Every shard starts from the same key, so the SWP masks
      are the same on every shard (as on every device). See
      :func:`samx.sharpness_aware`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  >>> import jax
  >>> tx = esam(optax.sgd(0.1), rho=0.05, beta=1.0, gamma=0.5)
  >>> loss_fn = lambda w, b: (w * b["x"]) ** 2
  >>> batch = {"x": jnp.array([1.0, 3.0, 2.0, 0.5])}
  >>> params = jnp.array(1.0)
  >>> grads = jax.grad(lambda w: loss_fn(w, batch).mean())(params)
  >>> updates, state = tx.update(grads, tx.init(params), params,
  ...                            per_example_loss_fn=loss_fn, batch=batch)
  >>> round(float(updates), 4)   # -0.1 * mean over x = 3, 2 of 2 (1 + 0.05) x^2
  -1.365

  References:
    Du et al., `Efficient Sharpness-aware Minimization for Improved Training of
    Neural Networks <https://arxiv.org/abs/2110.03141>`_, 2022
  """
  return sharpness_aware(
    optimizer,
    scale_by_swp(
      rho, beta, key=key, per_tensor=per_tensor, norm_scope=norm_scope, eps=eps, ball=ball
    ),
    evaluation=gradient_on_sharpest_examples(gamma),
    axis_name=axis_name,
    sync_ascent=sync_ascent,
    micro_shards=micro_shards,
    name="samx.esam",
  )
