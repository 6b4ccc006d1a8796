r"""Non-finite values (NaN, inf): samx's policy, and a wrapper that skips bad steps.

The policy
----------
Without a wrapper, samx **propagates** non-finite values and never **creates** them.

* A NaN or inf in the clean gradient :math:`g` (the ``updates`` given to
  ``update``) or in the perturbed gradient :math:`g_s` (what ``grad_fn`` or the
  per-example losses return at :math:`w + \epsilon`) reaches the update and the
  optimizer state (the base optimizer's moments, F-SAM's and VaSSO's averages,
  LookSAM's stored direction, ...), as it would without samx. samx never zeroes,
  clips or hides them, and nothing inside a jitted step raises on data-dependent
  values: a training loop sees the NaN where it would see it with plain optax.
* From finite input samx computes finite output. Every normalisation divides by
  :math:`\|u\| + \mathrm{eps}` through :func:`samx.numerics.safe_inverse`, so a
  zero gradient gives :math:`\epsilon = 0` (never :math:`0/0`), also when ``eps``
  underflows in a low-precision dtype. Norms and dot products accumulate in float32
  (or wider): the squares of float16 values (at most :math:`65504^2 \approx 4.3
  \cdot 10^9`) and of any realistic bfloat16 gradient stay far inside float32's
  range. The limit is float32's own: a squared global norm above
  :math:`3.4\cdot 10^{38}` (entries beyond about :math:`10^{19}`, reachable only
  by float32 and bfloat16 gradients) overflows to inf, and the normalised ascent
  then gives :math:`\epsilon = 0`.

Skipping a bad step
-------------------
:func:`skip_nonfinite` wraps any samx optimizer (or any optax transformation):
when the incoming gradient **or** the update it produces holds a NaN or an inf,
the step returns zero updates and keeps the previous inner state, so nothing that
the bad step computed (moments, EMAs, masks, PRNG keys, step counters) is kept.
Checking the produced update covers :math:`g_s`: under the one-call contract
:math:`g_s` only ever enters the state through the update of the same step (the
direction :math:`d` that the base optimizer consumes). On the steps where LookSAM
does not evaluate :math:`g_s` it reuses the direction stored at its last
evaluation, which a non-finite :math:`g_s` could only have reached through a step
that was skipped.

:func:`optax.apply_if_finite` checks only the incoming gradient :math:`g`, so with
samx inside it a NaN that appears only at :math:`w + \epsilon` passes into the
state. It composes with samx for the clean gradient (a bad :math:`g` is skipped and
the state is kept); use :func:`skip_nonfinite` to cover :math:`g_s` as well.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samx import axes

__all__ = ["SkipNonfiniteState", "all_finite", "skip_nonfinite"]


class SkipNonfiniteState(NamedTuple):
  """State of :func:`skip_nonfinite` (the fields of :class:`optax.ApplyIfFiniteState`).

  Attributes:
    notfinite_count: int32 number of consecutive steps skipped so far; reset to 0
      by a finite step.
    last_finite: bool, whether the last step was finite (and applied).
    total_notfinite: int32 number of steps skipped since ``init``; never reset.
    inner_state: the state of the wrapped transformation; a skipped step leaves it
      as it was.
  """

  notfinite_count: jax.Array
  last_finite: jax.Array
  total_notfinite: jax.Array
  inner_state: Any


def all_finite(tree: Any) -> jax.Array:
  """Whether every entry of every leaf of ``tree`` is finite (a bool scalar).

  Integer and boolean leaves are always finite; an empty tree is finite.

  >>> all_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.inf])})
  Array(False, dtype=bool)
  >>> all_finite({})
  Array(True, dtype=bool)
  """
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  if not flags:
    return jnp.ones([], bool)
  return jnp.all(jnp.stack(flags))


def _check_max_errors(max_consecutive_errors: Any) -> None:
  if max_consecutive_errors is None:
    return
  if (
    isinstance(max_consecutive_errors, bool)
    or not isinstance(max_consecutive_errors, (int, np.integer))
    or max_consecutive_errors < 0
  ):
    raise ValueError(
      "max_consecutive_errors must be None (skip every non-finite step) or an integer "
      f">= 0; got max_consecutive_errors={max_consecutive_errors!r}"
    )


def _all_devices_finite(finite: jax.Array, axis_name: Any) -> jax.Array:
  if axis_name is None:
    bound = axes.bound_data_axes()
    if bound:
      raise ValueError(
        f"skip_nonfinite: the step runs under the named device axes {bound} (pmap or "
        "shard_map) but axis_name=None, so a device that sees a NaN would skip its step "
        "while the others apply theirs, and the replicas would drift apart silently. "
        f"Pass the data-parallel axis: samx.skip_nonfinite(tx, axis_name={bound[0]!r}) "
        "(every device then skips together)."
      )
    return finite
  try:
    return jax.lax.pmin(finite.astype(jnp.int32), axis_name).astype(bool)
  except NameError as err:
    raise NameError(
      f"skip_nonfinite: axis_name={axis_name!r} is not bound here: run the training step "
      f"under jax.pmap(..., axis_name={axis_name!r}) or jax.shard_map over a mesh with that "
      f"axis, or pass axis_name=None under plain jax.jit. ({err})"
    ) from None


def skip_nonfinite(
  inner: optax.GradientTransformation,
  *,
  max_consecutive_errors: int | None = None,
  axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Skips the steps whose gradient or update is not finite: zero update, state kept.

  With :math:`(u, s') = \mathrm{inner.update}(g, s, w, \ldots)`:

  .. math::
    \mathrm{ok} = \mathrm{finite}(g) \wedge \mathrm{finite}(u), \qquad
    (\Delta w, s_{\mathrm{new}}) =
    \begin{cases} (u, s') & \mathrm{ok} \\ (0, s) & \text{otherwise} \end{cases}

  Every extra argument (``grad_fn``, ``per_example_loss_fn``, ``batch``, ...) is
  passed to ``inner``. For a samx optimizer a non-finite perturbed gradient
  :math:`g_s` shows in :math:`u`, so both gradients are covered (see
  :mod:`samx.nonfinite` for the policy). The inner step is always computed (its
  update is what is checked); the check costs one pass over :math:`g` and one over
  :math:`u`. The counters follow :func:`optax.apply_if_finite`.

  Put it outermost, around the whole optimizer, so that a skipped step leaves every
  part of the state as it was::

    tx = samx.skip_nonfinite(samx.sam(optax.sgd(0.1, momentum=0.9), rho=0.05))

  Args:
    inner: the transformation to guard, e.g. :func:`samx.sam`.
    max_consecutive_errors: ``None`` (default) skips every non-finite step. An
      integer :math:`n \ge 0` gives up after :math:`n` consecutive skipped steps and
      applies the next non-finite update, as :func:`optax.apply_if_finite` does, so
      that a run that has diverged fails visibly instead of standing still.
    axis_name: under ``pmap`` / ``shard_map``, the data-parallel axis (or axes): a
      step is skipped on every device when it is non-finite on any, so replicas
      stay identical. Required there: ``None`` under a bound device axis raises
      (``None`` is for one device and for ``jax.jit`` over sharded arrays, where the
      check is already global).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with state
    :class:`SkipNonfiniteState`.

  >>> import jax, jax.numpy as jnp, optax, samx
  >>> tx = skip_nonfinite(samx.sam(optax.sgd(0.1), rho=0.05))
  >>> params = jnp.array([0.6, 0.8])
  >>> grad_fn = lambda p: jnp.nan * p                 # g_s is NaN, g is finite
  >>> updates, state = tx.update(2 * params, tx.init(params), params, grad_fn=grad_fn)
  >>> updates, int(state.total_notfinite)
  (Array([0., 0.], dtype=float32), 1)

  References:
    :func:`optax.apply_if_finite`, which checks the incoming gradient only.
  """
  _check_max_errors(max_consecutive_errors)
  axes.check_axis_name(axis_name, who="skip_nonfinite")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return SkipNonfiniteState(
      notfinite_count=jnp.zeros([], jnp.int32),
      last_finite=jnp.ones([], bool),
      total_notfinite=jnp.zeros([], jnp.int32),
      inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    grads_finite = all_finite(updates)
    new_updates, new_inner_state = inner.update(
      updates, state.inner_state, params, **extra_args
    )
    finite = _all_devices_finite(grads_finite & all_finite(new_updates), axis_name)
    notfinite_count = jnp.where(
      finite, jnp.zeros([], jnp.int32), optax.safe_increment(state.notfinite_count)
    )
    apply = finite
    if max_consecutive_errors is not None:
      apply = finite | (notfinite_count > max_consecutive_errors)
    return optax.tree.where(
      apply, new_updates, optax.tree.zeros_like(new_updates)
    ), SkipNonfiniteState(
      notfinite_count=notfinite_count,
      last_finite=finite,
      total_notfinite=jnp.where(
        finite, state.total_notfinite, optax.safe_increment(state.total_notfinite)
      ),
      inner_state=optax.tree.where(apply, new_inner_state, state.inner_state),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
