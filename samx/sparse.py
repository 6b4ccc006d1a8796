r"""Sparse perturbations (SSAM): a binary mask from Fisher information or dynamic sparsity.

SSAM perturbs only the entries of a binary mask :math:`M` (1 = perturbed), with
the norm of the *unmasked* gradient, so :math:`\|\epsilon\| \le \rho`:

.. math::
  \epsilon = \rho\, \frac{g \odot M}{\|g\| + \mathrm{eps}}

As optax blocks, the mask is a transformation ``u -> u * M`` whose state holds
:math:`M`; ``optax.chain(samx.scale_by_sam(rho), fisher_mask(...))`` is SSAM's
ascent (:func:`ssam`). The mask is refreshed every ``refresh_every`` steps inside
the jitted step, under :func:`jax.lax.cond`, so the refresh costs only on refresh
steps (under :func:`jax.vmap` of the whole step a ``cond`` becomes a ``select``
and both branches run).

Masks and patterns
------------------
The number of kept entries is :math:`k = \mathrm{round}((1-s)\,|w|)` for sparsity
:math:`s` (exactly :math:`(1-s)|w|` when that is an integer, whatever the
floating-point rounding of :math:`1-s`). Scores are ranked with a stable sort, so
ties go to the entry that comes first in ``jax.tree.leaves`` order (row-major
within a leaf): masks are deterministic.

* ``"unstructured"``: the global top-:math:`k` scores across all leaves.
* ``"structured"``: whole leaves, ranked by their mean score; the best leaves are
  switched on until they hold at least :math:`k` entries.
* ``"N:M"`` (e.g. ``"2:4"``): in every group of :math:`M` consecutive entries along
  the *input* axis of a kernel (axis -2: ``[in, out]`` for Dense,
  ``[kh, kw, in, out]`` for Conv, Flax's layouts) the :math:`N` best are kept.
  Leaves with fewer than two dimensions (biases, normalization parameters) are
  always perturbed. The density of the kernels is :math:`N/M`; ``sparsity`` is
  not used.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samx import ascent as ascent_blocks
from samx import axes, checks, evaluation, masks, numerics
from samx.pipeline import sharpness_aware

__all__ = [
  "DynamicMaskState",
  "FisherMaskState",
  "dynamic_mask",
  "fisher_information",
  "fisher_mask",
  "n_m_mask",
  "ssam",
  "structured_mask",
  "top_k_mask",
]

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_MASK_TYPES = ("fisher", "dynamic")
_DEFAULT_INPUT_AXIS = -2


# ---------------------------------------------------------------------------------------
# Configuration checks.


def _parse_pattern(pattern: Any) -> tuple[str, tuple[int, int] | None]:
  if pattern in ("unstructured", "structured"):
    return pattern, None
  match = _NM.match(pattern) if isinstance(pattern, str) else None
  if match is None:
    raise ValueError(
      "pattern must be 'unstructured', 'structured' or 'N:M' with integers N <= M "
      f"(e.g. '2:4'); got pattern={pattern!r}"
    )
  n, m = int(match.group(1)), int(match.group(2))
  if not 1 <= n <= m:
    raise ValueError(
      f"pattern='N:M' keeps N of every M entries and needs 1 <= N <= M; got "
      f"pattern={pattern!r} (N={n}, M={m})"
    )
  return "n:m", (n, m)


def _is_traced(value: Any) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(value))


def _check_fraction(name: str, value: Any, *, upper_open: bool) -> None:
  if value is None or callable(value) or _is_traced(value):
    return
  try:
    v = float(np.asarray(value, np.float64))
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a number; got {name}={value!r}") from None
  upper_ok = v < 1 if upper_open else v <= 1
  if not (v >= 0 and upper_ok):
    interval = "[0, 1)" if upper_open else "[0, 1]"
    raise ValueError(f"{name} must be in {interval}; got {name}={value!r}")


def _check_period(name: str, value: Any) -> None:
  if _is_traced(value):
    return
  if (
    isinstance(value, bool)
    or np.ndim(value) != 0
    or not np.issubdtype(np.asarray(value).dtype, np.integer)
  ):
    raise TypeError(f"{name} must be an integer >= 1; got {name}={value!r}")
  if int(value) < 1:
    raise ValueError(f"{name} must be an integer >= 1; got {name}={value!r}")


def _static_int(name: str, value: Any, who: str) -> int | None:
  """A shape-setting integer: a Python int (or a concrete array), never a traced one."""
  if value is None:
    return None
  if _is_traced(value):
    raise TypeError(
      f"{who}: {name} sets an array shape and must be a Python integer, not a traced "
      f"value; under optax.inject_hyperparams pass static_args=({name!r},)"
    )
  if isinstance(value, bool) or not np.issubdtype(np.asarray(value).dtype, np.integer):
    raise TypeError(f"{name} must be a positive integer or None; got {name}={value!r}")
  if int(value) < 1:
    raise ValueError(f"{name} must be a positive integer or None; got {name}={value!r}")
  return int(value)


def _input_axis(input_axis: Any, who: str) -> int:
  if input_axis is None:
    return _DEFAULT_INPUT_AXIS
  if _is_traced(input_axis):
    raise TypeError(
      f"{who}: input_axis selects an axis and must be a Python integer, not a traced "
      "value; under optax.inject_hyperparams pass static_args=('input_axis',)"
    )
  if isinstance(input_axis, bool) or not np.issubdtype(
    np.asarray(input_axis).dtype, np.integer
  ):
    raise TypeError(f"input_axis must be an integer or None; got input_axis={input_axis!r}")
  return int(input_axis)


def _check_n_m(params: Any, n: int, m: int, axis: int, pattern: Any) -> None:
  """Every leaf with ndim >= 2 must have a multiple of M entries along the input axis."""
  for path, leaf in zip(masks.leaf_paths(params), jax.tree.leaves(params), strict=True):
    shape = np.shape(leaf)
    if len(shape) < 2:
      continue
    if not -len(shape) <= axis < len(shape):
      raise ValueError(
        f"input_axis={axis} is out of range for the leaf {path!r} of shape {shape}"
      )
    if shape[axis] % m:
      raise ValueError(
        f"pattern={pattern!r} groups M={m} consecutive entries along the input axis "
        f"(axis {axis}); the leaf {path!r} of shape {shape} has {shape[axis]} there, "
        f"not a multiple of {m}. Choose M dividing every kernel's input dimension."
      )


def _kept_entries(sparsity: Any, total: int) -> Any:
  """k = round((1 - s) * total): a Python int for a Python number, else an int32 array."""
  if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
    return int(round((1.0 - sparsity) * total))
  s = jnp.asarray(sparsity, jnp.float32)
  return jnp.round((1.0 - s) * total).astype(jnp.int32)


# ---------------------------------------------------------------------------------------
# Pure mask functions.


def _concat(leaves: list[jax.Array]) -> jax.Array:
  dtype = numerics.accumulation_dtype(jnp.result_type(*leaves)) if leaves else jnp.float32
  return jnp.concatenate([jnp.ravel(jnp.asarray(x, dtype)) for x in leaves] or [jnp.zeros(0)])


def _split_like(flat: jax.Array, leaves: list[Any]) -> list[jax.Array]:
  out, start = [], 0
  for leaf in leaves:
    size = int(np.size(leaf))
    out.append(flat[start : start + size].reshape(np.shape(leaf)))
    start += size
  return out


def _check_concrete_k(k: Any, size: int) -> None:
  """Checks a concrete (not traced) ``k`` against ``0 <= k <= size``."""
  if isinstance(k, jax.core.Tracer):
    return
  value = np.asarray(k)
  if value.shape != () or not 0 <= value <= size:
    raise ValueError(f"k must be an integer with 0 <= k <= {size}; got k={k!r}")


def top_k_mask(scores: Any, k: Any) -> Any:
  r"""The ``k`` largest entries over all leaves of ``scores`` (the unstructured pattern).

  .. math::
    M_i = [\,\mathrm{rank}(F_i) < k\,]

  with ranks from a stable descending sort of all entries, so ties go to the entry
  that comes first in ``jax.tree.leaves`` order: exactly ``k`` entries are kept.
  ``k`` may be traced.

  Args:
    scores: a pytree of arrays (e.g. the Fisher information).
    k: the number of entries to keep, ``0 <= k <= size``.

  Returns:
    A pytree of boolean arrays with the structure and shapes of ``scores``.

  >>> top_k_mask({"a": jnp.array([3.0, 1.0]), "b": jnp.array([1.0, 5.0])}, 3)
  {'a': Array([ True,  True], dtype=bool), 'b': Array([False,  True], dtype=bool)}
  """
  leaves, treedef = jax.tree.flatten(scores)
  _check_concrete_k(k, sum(int(np.size(x)) for x in leaves))
  flat = _concat(axes.unsharded(leaves))  # an Explicit mesh refuses a sharded sort
  order = jnp.argsort(-flat, stable=True)
  keep = jnp.zeros(flat.shape, bool).at[order].set(jnp.arange(flat.size) < k)
  return axes.sharded_like(jax.tree.unflatten(treedef, _split_like(keep, leaves)), scores)


def structured_mask(scores: Any, k: Any) -> Any:
  r"""Whole leaves, best mean score first, until at least ``k`` entries are kept.

  Leaves are sorted by their mean score (stable: ties go to the earlier leaf); the
  shortest prefix of that order holding :math:`\ge k` entries is switched on.

  Args:
    scores: a pytree of arrays.
    k: the number of entries to cover (may be traced).

  Returns:
    A pytree of boolean arrays, each all True or all False.

  >>> chosen = structured_mask({"a": jnp.ones(4), "b": jnp.full(2, 3.0), "c": jnp.zeros(3)}, 5)
  >>> jax.tree.map(lambda m: bool(m.all()), chosen)   # b (mean 3), then a (mean 1)
  {'a': True, 'b': True, 'c': False}
  """
  leaves, treedef = jax.tree.flatten(scores)
  _check_concrete_k(k, sum(int(np.size(x)) for x in leaves))
  means = jnp.stack([jnp.mean(jnp.asarray(x, jnp.float32)) for x in leaves])
  sizes = jnp.asarray([int(np.size(x)) for x in leaves], jnp.int32)
  order = jnp.argsort(-means, stable=True)
  sorted_sizes = sizes[order]
  before = jnp.cumsum(sorted_sizes) - sorted_sizes
  on = jnp.zeros(len(leaves), bool).at[order].set(before < k)
  return axes.sharded_like(
    jax.tree.unflatten(
      treedef, [jnp.broadcast_to(on[i], np.shape(x)) for i, x in enumerate(leaves)]
    ),
    scores,
  )


def n_m_mask(scores: Any, n: int, m: int, *, input_axis: int = _DEFAULT_INPUT_AXIS) -> Any:
  r"""N:M sparsity along the input axis: the ``n`` best of every ``m`` consecutive inputs.

  For a Dense kernel ``[in, out]`` the groups are ``kernel[g*m:(g+1)*m, j]``; for a
  Conv kernel ``[kh, kw, in, out]`` they are ``kernel[a, b, g*m:(g+1)*m, j]``: each
  output unit (and kernel position) keeps ``n`` of every ``m`` consecutive input
  channels (stable ranking: ties go to the lower input index). Leaves with fewer
  than two dimensions are kept whole.

  Args:
    scores: a pytree of arrays.
    n: entries kept per group, ``1 <= n <= m``.
    m: the group size; it must divide the input dimension of every kernel.
    input_axis: the input axis of the kernels (Flax: -2).

  Returns:
    A pytree of boolean arrays.

  >>> n_m_mask({"kernel": jnp.array([[1.0], [4.0], [3.0], [2.0]]), "bias": jnp.ones(1)},
  ...          1, 2)["kernel"].ravel()
  Array([False,  True,  True, False], dtype=bool)
  """

  def leaf(x):
    if jnp.ndim(x) < 2:
      return axes.sharded_like(jnp.ones(jnp.shape(x), bool), x)
    return axes.sharded_like(groups_of(axes.unsharded(x)), x)

  def groups_of(x):
    moved = jnp.moveaxis(x, input_axis, -1)
    channels = moved.shape[-1]
    if channels % m:
      raise ValueError(
        f"N:M groups of m={m} need an input dimension divisible by {m}; got a leaf of "
        f"shape {jnp.shape(x)} with {channels} entries along input_axis={input_axis}"
      )
    groups = moved.reshape(*moved.shape[:-1], channels // m, m)
    order = jnp.argsort(-jnp.asarray(groups, jnp.float32), axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1)
    keep = (ranks < n).reshape(moved.shape)
    return jnp.moveaxis(keep, -1, input_axis)

  return jax.tree.map(leaf, scores)


def fisher_information(
  per_example_loss_fn: Callable[[Any, Any], Any],
  params: Any,
  batch: Any,
  *,
  num_samples: int | None = None,
  chunk_size: int | None = None,
  who: str = "samx.fisher_information",
) -> Any:
  r"""The empirical Fisher diagonal from per-example gradients of the first examples.

  .. math::
    F_i = \sum_{n=1}^{N_F} \Big(\frac{\partial \ell_n}{\partial w_i}\Big)^2

  over the first :math:`N_F` (``num_samples``) examples of ``batch``. Each
  :math:`\ell_n` is ``per_example_loss_fn(params, example_n)`` on a batch of one
  example (the second contract of :mod:`samx.evaluation`), differentiated with
  :func:`jax.grad` under :func:`jax.vmap`: as in the official code each example is
  evaluated alone, and since the contract function is pure nothing is written
  (BatchNorm running statistics stay untouched). Squares accumulate in float32.

  Args:
    per_example_loss_fn: ``(params, batch) -> (B,)`` losses.
    params: where to evaluate.
    batch: a pytree with a leading example axis.
    num_samples: :math:`N_F`; ``None`` uses the whole batch.
    chunk_size: how many per-example gradients are held in memory at once (a
      divisor of ``num_samples``, summed with :func:`jax.lax.scan`); ``None``: all.
    who: the name used in error messages.

  Returns:
    A pytree like ``params`` (float32 or wider).

  >>> losses = lambda w, b: 0.5 * (b["x"] @ w - b["y"]) ** 2
  >>> batch = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]),
  ...          "y": jnp.array([1.0, 1.0, 0.0])}
  >>> fisher_information(losses, jnp.zeros(2), batch, num_samples=2)
  Array([1., 4.], dtype=float32)
  """
  _require_contract(per_example_loss_fn, batch, who)
  size = evaluation.batch_size(batch, who=who)
  n = _static_int("num_samples", num_samples, who) or size
  if n > size:
    raise ValueError(
      f"{who}: num_samples={n} per-example gradients need at least {n} examples; the "
      f"batch has {size}"
    )
  chunk = _static_int("chunk_size", chunk_size, who) or n
  if n % chunk:
    raise ValueError(f"{who}: chunk_size={chunk} must divide num_samples={n}")
  examples = jax.tree.map(lambda x: x[:n], batch)
  like, params = params, axes.unsharded(params)  # per-example grads of FSDP params

  def squared_gradient(example):
    one = jax.tree.map(lambda x: x[None], example)
    grads = jax.grad(
      lambda p: evaluation.per_example_losses(per_example_loss_fn, p, one, who=who)[0]
    )(params)
    return jax.tree.map(
      lambda x: jnp.square(jnp.asarray(x, numerics.accumulation_dtype(x.dtype))), grads
    )

  def chunk_sum(chunk_examples):
    return jax.tree.map(
      lambda x: jnp.sum(x, axis=0), jax.vmap(squared_gradient)(chunk_examples)
    )

  if chunk == n:
    return axes.sharded_like(chunk_sum(examples), like)
  chunks = jax.tree.map(lambda x: x.reshape(n // chunk, chunk, *x.shape[1:]), examples)
  zeros = jax.tree.map(
    lambda p: jnp.zeros(jnp.shape(p), numerics.accumulation_dtype(jnp.result_type(p))), params
  )

  def body(total, chunk_examples):
    return jax.tree.map(jnp.add, total, chunk_sum(chunk_examples)), None

  return axes.sharded_like(jax.lax.scan(body, zeros, chunks)[0], like)


def _require_contract(per_example_loss_fn: Any, batch: Any, who: str) -> None:
  if per_example_loss_fn is None or batch is None or not callable(per_example_loss_fn):
    # per_example_losses raises the contract's error, which shows the expected call.
    evaluation.per_example_losses(per_example_loss_fn, None, batch, who=who)


def _refresh_if(pred: jax.Array, refresh: Callable[[], Any], keep: Callable[[], Any]) -> Any:
  """``lax.cond(pred, refresh, keep)``; outside ``jit`` (a concrete ``pred``) only one runs."""
  if not isinstance(pred, jax.core.Tracer):
    return refresh() if bool(pred) else keep()
  # On an Explicit mesh the refreshed value takes the sharding the state already has.
  return jax.lax.cond(pred, lambda: axes.sharded_like(refresh(), keep()), keep)


def _apply_mask(updates: Any, mask: Any) -> Any:
  return jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros((), u.dtype)), updates, mask)


def _zeros_mask(params: Any) -> Any:
  return jax.tree.map(lambda p: jnp.zeros_like(p, dtype=bool), params)


# ---------------------------------------------------------------------------------------
# Fisher masks.


class FisherMaskState(NamedTuple):
  """State of :func:`fisher_mask`.

  Attributes:
    count: int32 number of updates so far; the mask is refreshed when
      ``count % refresh_every == 0``.
    mask: the current binary mask, boolean arrays with the parameters' structure
      (True = perturbed). All False at ``init``; replaced by the Fisher mask at step
      0, before it is used.
  """

  count: jax.Array
  mask: Any


def fisher_mask(
  sparsity: Any = None,
  *,
  pattern: str = "unstructured",
  num_samples: int | None = 16,
  chunk_size: int | None = None,
  refresh_every: Any = 100,
  input_axis: int | None = None,
  axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SSAM-F's mask: keeps the entries with the largest Fisher information.

  .. math::
    u \mapsto u \odot M, \qquad
    M = \mathrm{pattern}\big(F\big), \quad
    F_i = \textstyle\sum_{n \le N_F} (\partial \ell_n / \partial w_i)^2

  (see :func:`fisher_information` and the patterns in :mod:`samx.sparse`). The
  mask is recomputed at the current parameters from the first ``num_samples``
  examples of the current batch when ``count % refresh_every == 0`` (steps 0,
  T, 2T, ...), inside :func:`jax.lax.cond`: the per-example gradients cost only on
  refresh steps.

  Initial mask: samx computes the Fisher mask at step 0 (from the first batch)
  and uses it at once. The official code starts from an all-zero mask, so its
  step 0 is plain SGD, and refreshes after the step at the parameters it
  produced; from then on both use a Fisher mask, samx's one step earlier.

  ``update`` needs the second contract's ``per_example_loss_fn`` and ``batch``
  extra arguments (see :mod:`samx.evaluation`) and ``params``.

  Args:
    sparsity: the fraction :math:`s \in [0, 1)` of entries *not* perturbed
      (``None``: 0.5); must be ``None`` for an ``"N:M"`` pattern.
    pattern: ``"unstructured"``, ``"structured"`` or ``"N:M"`` (e.g. ``"2:4"``).
    num_samples: :math:`N_F`, the examples of the batch used (``None``: all).
      It sets a shape: under :func:`optax.inject_hyperparams` pass it in
      ``static_args``.
    chunk_size: per-example gradients held at once (a divisor of ``num_samples``).
    refresh_every: :math:`T_m` >= 1, steps between refreshes (the official code
      refreshes once per epoch).
    input_axis: the input axis of kernels for ``"N:M"`` (``None``: -2, Flax's
      ``[in, out]`` and ``[kh, kw, in, out]``).
    axis_name: a named axis (or axes) to sum the Fisher information over, so that
      every device of a data-parallel step picks the same mask.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with state
    :class:`FisherMaskState`.

  >>> losses = lambda w, b: 0.5 * (b["x"] @ w - b["y"]) ** 2
  >>> batch = {"x": jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]),
  ...          "y": jnp.array([1.0, -1.0])}
  >>> w = jnp.zeros(3)
  >>> tx = fisher_mask(sparsity=2 / 3, num_samples=2)
  >>> u, state = tx.update(jnp.ones(3), tx.init(w), w, per_example_loss_fn=losses,
  ...                      batch=batch)
  >>> u   # F = (1, 1, 5): one entry of three is kept
  Array([0., 0., 1.], dtype=float32)

  References:
    Mi et al., `Make Sharpness-Aware Minimization Stronger: A Sparsified
    Perturbation Approach <https://arxiv.org/abs/2210.05177>`_, 2022;
    Mi et al., `Systematic Investigation of Sparse Perturbed Sharpness-Aware
    Minimization Optimizer <https://arxiv.org/abs/2306.17504>`_, 2023
  """
  who = "samx.fisher_mask"
  kind, nm = _parse_pattern(pattern)
  if kind == "n:m":
    if sparsity is not None:
      raise ValueError(
        f"sparsity is set by pattern={pattern!r} (density N/M on kernels, 1 elsewhere); "
        f"leave sparsity=None, got sparsity={sparsity!r}"
      )
  else:
    sparsity = 0.5 if sparsity is None else sparsity
    _check_fraction("sparsity", sparsity, upper_open=True)
  _static_int("num_samples", num_samples, who)
  _static_int("chunk_size", chunk_size, who)
  _check_period("refresh_every", refresh_every)
  axis = _input_axis(input_axis, who)

  def select(fisher):
    if kind == "unstructured":
      return top_k_mask(fisher, _kept_entries(sparsity, _total(fisher)))
    if kind == "structured":
      return structured_mask(fisher, _kept_entries(sparsity, _total(fisher)))
    return n_m_mask(fisher, *nm, input_axis=axis)

  def init_fn(params):
    if kind == "n:m":
      _check_n_m(params, *nm, axis, pattern)
    return FisherMaskState(count=jnp.zeros([], jnp.int32), mask=_zeros_mask(params))

  def update_fn(updates, state, params=None, *, per_example_loss_fn=None, batch=None, **extra):
    del extra
    checks.require_params(params, who)
    _require_contract(per_example_loss_fn, batch, who)
    if kind == "n:m":
      _check_n_m(params, *nm, axis, pattern)

    def refresh():
      fisher = fisher_information(
        per_example_loss_fn,
        params,
        batch,
        num_samples=num_samples,
        chunk_size=chunk_size,
        who=who,
      )
      if axis_name is not None:
        fisher = jax.lax.psum(fisher, axis_name)
      return select(fisher)

    mask = _refresh_if(state.count % refresh_every == 0, refresh, lambda: state.mask)
    new_state = FisherMaskState(count=optax.safe_increment(state.count), mask=mask)
    return _apply_mask(updates, mask), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _total(tree: Any) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------
# Dynamic masks.


class DynamicMaskState(NamedTuple):
  """State of :func:`dynamic_mask`.

  Attributes:
    count: int32 number of updates so far; the mask is refreshed when
      ``count % refresh_every == 0``.
    mask: the current binary mask (boolean arrays like the parameters).
    key: the uint32 data of the PRNG key used for the next regrowth
      (:func:`jax.random.key_data`).
  """

  count: jax.Array
  mask: Any
  key: jax.Array


def _drop_and_regrow(scores: list[jax.Array], mask: list[jax.Array], fraction, key):
  like = mask
  scores, mask = axes.unsharded(scores), axes.unsharded(mask)  # no sharded sort
  score = _concat([jnp.abs(s) for s in scores])
  active = jnp.concatenate([jnp.ravel(m) for m in mask] or [jnp.zeros(0, bool)])
  total = active.size
  n_active = jnp.sum(active, dtype=jnp.int32)
  fraction = jnp.asarray(fraction, jnp.float32)
  dropped_count = jnp.minimum(
    jnp.floor(fraction * n_active.astype(jnp.float32)).astype(jnp.int32), total - n_active
  )
  ranks = jnp.arange(total)
  # Active entries first, smallest |u| first (stable: ties to the earlier entry).
  drop_order = jnp.lexsort((score, ~active))
  dropped = jnp.zeros(total, bool).at[drop_order].set(ranks < dropped_count)
  # Previously inactive entries first, in a random order.
  noise = jax.random.uniform(key, (total,))
  grow_order = jnp.lexsort((noise, active))
  grown = jnp.zeros(total, bool).at[grow_order].set(ranks < dropped_count)
  return axes.sharded_like(_split_like((active & ~dropped) | grown, mask), like)


@functools.partial(jax.jit, static_argnums=2)
def _random_start(key_data: jax.Array, k: Any, shapes: tuple[tuple[int, ...], ...]):
  """Exactly ``k`` entries at random over leaves of ``shapes``, and the next key's data."""
  init_key, state_key = jax.random.split(jax.random.wrap_key_data(key_data))
  total = sum(math.prod(shape) for shape in shapes)
  noise = jax.random.uniform(init_key, (total,))
  leaves = [jnp.zeros(shape) for shape in shapes]
  return top_k_mask(_split_like(noise, leaves), k), jax.random.key_data(state_key)


def dynamic_mask(
  sparsity: Any = 0.5,
  *,
  drop_fraction: Any = 0.5,
  total_steps: Any = None,
  refresh_every: Any = 100,
  seed: Any = 0,
) -> optax.GradientTransformation:
  r"""SSAM-D's mask: a random sparse mask evolved by drop-and-regrow.

  At ``init``, exactly :math:`k = \mathrm{round}((1-s)|w|)` entries chosen
  uniformly at random. When ``count % refresh_every == 0`` (steps 0, T, 2T, ...),
  with :math:`t` the step count:

  .. math::
    d = \min\big(\lfloor \alpha_t k \rfloor,\ |w| - k\big), \qquad
    \alpha_t = \frac{\alpha_0}{2}\Big(1 + \cos\frac{\pi \min(t, T)}{T}\Big)

  the :math:`d` active entries with the smallest :math:`|u|` (the incoming
  direction: SSAM chains this block after :func:`samx.scale_by_sam`, so
  :math:`|u| \propto |g|`) are dropped and :math:`d` entries that were inactive
  are switched on at random. The number of active entries never changes. The
  PRNG key lives in the state.

  Args:
    sparsity: :math:`s \in [0, 1)`.
    drop_fraction: :math:`\alpha_0 \in [0, 1]`, or a schedule ``count -> alpha``
      used as it is.
    total_steps: :math:`T` of the cosine annealing; ``None`` keeps
      :math:`\alpha_t = \alpha_0` (the paper anneals over the whole run).
    refresh_every: steps between refreshes, >= 1.
    seed: the seed of the initial mask and of the regrowth.

  Returns:
    An :class:`optax.GradientTransformation` with state :class:`DynamicMaskState`.

  >>> tx = dynamic_mask(sparsity=0.75, drop_fraction=0.5, seed=0)
  >>> u = jnp.arange(1.0, 9.0)
  >>> state = tx.init(u)
  >>> int(state.mask.sum())
  2
  >>> _, state = jax.jit(tx.update)(u, state)
  >>> int(state.mask.sum())   # one of two dropped, one regrown
  2

  References:
    Mi et al., `Make Sharpness-Aware Minimization Stronger: A Sparsified
    Perturbation Approach <https://arxiv.org/abs/2210.05177>`_, 2022
  """
  _check_fraction("sparsity", sparsity, upper_open=True)
  _check_fraction("drop_fraction", drop_fraction, upper_open=False)
  if total_steps is not None:
    _check_period("total_steps", total_steps)
  _check_period("refresh_every", refresh_every)
  if not _is_traced(seed) and (
    isinstance(seed, bool) or not np.issubdtype(np.asarray(seed).dtype, np.integer)
  ):
    raise TypeError(f"seed must be an integer; got seed={seed!r}")

  def fraction_at(count):
    if callable(drop_fraction):
      return drop_fraction(count)
    if total_steps is None:
      return drop_fraction
    progress = jnp.minimum(count / total_steps, 1.0)
    return drop_fraction * 0.5 * (1.0 + jnp.cos(math.pi * progress))

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    shapes = tuple(tuple(np.shape(x)) for x in leaves)
    k = _kept_entries(sparsity, _total(leaves))
    mask, key = _random_start(jax.random.key_data(jax.random.key(seed)), k, shapes)
    return DynamicMaskState(
      count=jnp.zeros([], jnp.int32), mask=jax.tree.unflatten(treedef, mask), key=key
    )

  def update_fn(updates, state, params=None):
    del params

    def refresh():
      grow_key, next_key = jax.random.split(jax.random.wrap_key_data(state.key))
      leaves, treedef = jax.tree.flatten(updates)
      new = _drop_and_regrow(
        leaves, jax.tree.leaves(state.mask), fraction_at(state.count), grow_key
      )
      return jax.tree.unflatten(treedef, new), jax.random.key_data(next_key)

    mask, key = _refresh_if(
      state.count % refresh_every == 0, refresh, lambda: (state.mask, state.key)
    )
    new_state = DynamicMaskState(count=optax.safe_increment(state.count), mask=mask, key=key)
    return _apply_mask(updates, mask), new_state

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------
# The alias.


def _require_either_contract(grad_fn: Any, per_example_loss_fn: Any, who: str) -> None:
  if grad_fn is None and per_example_loss_fn is None:
    raise TypeError(
      f"{who} needs the keyword argument grad_fn(params) -> grads, or "
      "per_example_loss_fn and batch, to evaluate the gradient at the perturbed "
      f"parameters. Call it as\n{checks.GRAD_FN_CALL}\nor\n{evaluation.PER_EXAMPLE_CALL}"
    )


def _checked_before(block: optax.GradientTransformation, who: str):
  """``block`` that first checks that the step can evaluate ``g_s`` (fail before any work)."""
  block = optax.with_extra_args_support(block)

  def update_fn(updates, state, params=None, **extra_args):
    _require_either_contract(
      extra_args.get("grad_fn"), extra_args.get("per_example_loss_fn"), who
    )
    return block.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(block.init, update_fn)


def _perturbed_gradient(
  params: Any,
  perturbation: Any,
  *,
  who: str = "samx",
  grad_fn: Callable[[Any], Any] | None = None,
  per_example_loss_fn: Callable[[Any, Any], Any] | None = None,
  batch: Any = None,
  **extra_args: Any,
) -> Any:
  """``g_s`` from ``grad_fn`` when given, else from the mean of the per-example losses."""
  del extra_args
  _require_either_contract(grad_fn, per_example_loss_fn, who)
  if grad_fn is not None:
    return evaluation.perturbed_gradient(grad_fn, params, perturbation, who=who)
  perturbed = optax.apply_updates(params, perturbation)

  def loss(p):
    return jnp.mean(evaluation.per_example_losses(per_example_loss_fn, p, batch, who=who))

  return jax.grad(loss)(perturbed)


def _fisher_axes(axis_name: Any, sync_ascent: Any) -> Any:
  if sync_ascent is True:
    return axis_name
  if sync_ascent is False or sync_ascent is None:
    return None
  return sync_ascent


def ssam(
  optimizer: optax.GradientTransformation,
  rho: Any = 0.05,
  sparsity: Any = None,
  *,
  mask_type: Literal["fisher", "dynamic"] = "fisher",
  pattern: str = "unstructured",
  num_samples: int | None = 16,
  chunk_size: int | None = None,
  refresh_every: Any = 100,
  drop_fraction: Any = 0.5,
  total_steps: Any = None,
  seed: Any = 0,
  input_axis: int | None = None,
  eps: float = 1e-12,
  axis_name: Any = None,
  sync_ascent: Any = True,
  micro_shards: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sparse SAM: perturb a binary mask of the parameters, normalised by the full gradient.

  .. math::
    \epsilon = \rho\, \frac{g \odot M}{\|g\| + \mathrm{eps}}, \qquad
    \Delta w = \mathrm{optimizer}(\nabla L(w + \epsilon))

  :math:`\|\epsilon\| \le \rho`. The mask :math:`M` keeps a fraction
  :math:`1 - s` of the entries (exactly :math:`\mathrm{round}((1-s)|w|)`) and is
  refreshed every ``refresh_every`` steps inside the jitted step:

  * ``mask_type="fisher"`` (SSAM-F, :func:`fisher_mask`): the largest empirical
    Fisher information over ``num_samples`` single examples of the batch, in the
    ``pattern`` ``"unstructured"``, ``"structured"`` or ``"N:M"``. Computed at step
    0, then every ``refresh_every`` steps.
  * ``mask_type="dynamic"`` (SSAM-D, :func:`dynamic_mask`): a random start;
    each refresh drops the fraction :math:`\alpha_t` of the active entries with the
    smallest :math:`|g|` and regrows as many at random (unstructured only).

  Calls: SSAM-F needs the second contract, ``per_example_loss_fn`` and ``batch``
  (the perturbed gradient is then the gradient of the mean per-example loss
  unless ``grad_fn`` is also given); SSAM-D needs ``grad_fn`` (or the second
  contract)::

    updates, opt_state = tx.update(grads, opt_state, params,
                                   per_example_loss_fn=per_example_loss_fn, batch=batch)

  Args:
    optimizer: the base optimizer.
    rho: the radius :math:`\rho` >= 0 (number, schedule or per-leaf pytree).
    sparsity: :math:`s \in [0, 1)`, the fraction not perturbed (``None``: 0.5);
      ``None`` for an ``"N:M"`` pattern.
    mask_type: ``"fisher"`` or ``"dynamic"``.
    pattern: ``"unstructured"``, ``"structured"`` or ``"N:M"`` such as ``"2:4"``
      (Fisher masks).
    num_samples: :math:`N_F`, the examples of the batch in the Fisher sum
      (``None``: all). Under :func:`optax.inject_hyperparams` pass it in
      ``static_args``.
    chunk_size: per-example gradients held at once (Fisher).
    refresh_every: :math:`T_m` >= 1, steps between mask refreshes.
    drop_fraction: :math:`\alpha_0` or a schedule (dynamic).
    total_steps: :math:`T` of the cosine annealing of :math:`\alpha_t` (dynamic).
    seed: the PRNG seed (dynamic).
    input_axis: the input axis of kernels for ``"N:M"`` (``None``: -2).
    eps: the stabiliser in the normalisation, > 0.
    axis_name: the data-parallel axis under ``pmap`` / ``shard_map``; the Fisher
      information is summed over the devices that share ``eps``.
    sync_ascent: which devices share one ``eps`` (see :func:`samx.sharpness_aware`).
    micro_shards: ``k`` >= 1 micro-shards of the local batch (``None``: 1), each
      with its own ``eps`` and its own mask. A shard's Fisher mask comes from the
      first ``num_samples`` examples of that shard (so ``num_samples`` <= batch /
      ``k``); a shard's dynamic mask drops by that shard's gradient. Under the
      ``vmap`` over shards the refresh condition becomes a select, so the refresh
      (for Fisher masks, the per-example gradients) is computed on every step.
      See :func:`samx.sharpness_aware`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  >>> import jax, jax.numpy as jnp, optax
  >>> losses = lambda w, b: 0.5 * (b["x"] @ w - b["y"]) ** 2
  >>> batch = {"x": jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]),
  ...          "y": jnp.array([1.0, -1.0])}
  >>> w = jnp.zeros(3)
  >>> tx = ssam(optax.sgd(0.1), rho=0.05, sparsity=2 / 3, num_samples=2)
  >>> grads = jax.grad(lambda w: losses(w, batch).mean())(w)
  >>> updates, state = tx.update(grads, tx.init(w), w, per_example_loss_fn=losses,
  ...                            batch=batch)
  >>> state.ascent_state[1].mask   # the Fisher information is (1, 1, 5)
  Array([False, False,  True], dtype=bool)

  References:
    Mi et al., `Make Sharpness-Aware Minimization Stronger: A Sparsified
    Perturbation Approach <https://arxiv.org/abs/2210.05177>`_, 2022;
    Mi et al., `Systematic Investigation of Sparse Perturbed Sharpness-Aware
    Minimization Optimizer <https://arxiv.org/abs/2306.17504>`_, 2023
  """
  if mask_type not in _MASK_TYPES:
    raise ValueError(f"mask_type must be one of {_MASK_TYPES}; got mask_type={mask_type!r}")
  if mask_type == "fisher":
    block = fisher_mask(
      sparsity,
      pattern=pattern,
      num_samples=num_samples,
      chunk_size=chunk_size,
      refresh_every=refresh_every,
      input_axis=input_axis,
      axis_name=_fisher_axes(axis_name, sync_ascent),
    )
  else:
    if pattern != "unstructured":
      raise ValueError(
        "pattern applies to Fisher masks (as in the official code); dynamic masks are "
        f"unstructured. Got pattern={pattern!r} with mask_type='dynamic'"
      )
    block = _checked_before(
      dynamic_mask(
        0.5 if sparsity is None else sparsity,
        drop_fraction=drop_fraction,
        total_steps=total_steps,
        refresh_every=refresh_every,
        seed=seed,
      ),
      "samx.ssam",
    )
  return sharpness_aware(
    optimizer,
    optax.chain(ascent_blocks.scale_by_sam(rho, eps=eps), block),
    evaluation=_perturbed_gradient,
    axis_name=axis_name,
    sync_ascent=sync_ascent,
    micro_shards=micro_shards,
    name="samx.ssam",
  )
