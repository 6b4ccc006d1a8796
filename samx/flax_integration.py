"""Flax helpers: build ``grad_fn`` from an NNX model or a linen ``apply`` function.

Both helpers evaluate the perturbed pass without writing any state back: the
BatchNorm running statistics (and any other mutable collection) of the model are
only changed by the clean pass the user runs, as SAM requires.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax
from flax import nnx

__all__ = ["apply_gradients", "linen_grad_fn", "nnx_grad_fn"]


def nnx_grad_fn(
  model: nnx.Module,
  loss_fn: Callable[..., Any],
  *args: Any,
  wrt: Any = nnx.Param,
  has_aux: bool = False,
  **kwargs: Any,
) -> Callable[[Any], Any]:
  """``grad_fn(params) -> grads`` for an NNX model, for ``nnx.Optimizer.update``.

  The returned function merges ``params`` (the state filtered by ``wrt``, as
  :class:`flax.nnx.Optimizer` passes it) with a snapshot of the model's other
  state taken when ``nnx_grad_fn`` is called, calls ``loss_fn(model, *args,
  **kwargs)`` on that copy and returns the gradient. Whatever the copy writes
  (BatchNorm statistics, RNG counters) is discarded, so the perturbed pass leaves
  ``model`` untouched.

  Dropout: the copy draws its random keys from the snapshot's RNG state. Build
  ``grad_fn`` *before* the clean pass and the perturbed pass reuses the clean
  pass's dropout masks (the same sub-network at ``w`` and ``w + eps``); built
  after it, the perturbed pass draws the keys the next clean pass will draw.

  Args:
    model: the NNX module (as it is at the clean pass).
    loss_fn: ``loss_fn(model, *args, **kwargs) -> loss`` (or ``(loss, aux)``
      with ``has_aux=True``; the aux output is dropped).
    *args: positional arguments for ``loss_fn`` after the model (the batch).
    wrt: the filter of differentiated state; it must match the optimizer's.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    **kwargs: keyword arguments for ``loss_fn``.

  Returns:
    A function of the parameter state returning its gradient.

  >>> import jax.numpy as jnp, optax, samx
  >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  >>> optimizer = nnx.Optimizer(model, samx.sam(optax.sgd(0.1)), wrt=nnx.Param)
  >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
  >>> loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
  >>> grads = nnx.grad(loss_fn)(model, x, y)
  >>> before = loss_fn(model, x, y)
  >>> _ = optimizer.update(model, grads, grad_fn=nnx_grad_fn(model, loss_fn, x, y))
  >>> bool(loss_fn(model, x, y) < before)
  True
  """
  graphdef, selected, rest = nnx.split(model, wrt, ...)
  rest = nnx.as_pure(rest)  # a snapshot: later writes to the model do not reach it
  expected_paths = _state_paths(selected)

  def loss_of_params(params):
    loss = loss_fn(nnx.merge(graphdef, params, rest, copy=True), *args, **kwargs)
    return loss[0] if has_aux else loss

  def grad_fn(params):
    _check_params_match_wrt(params, expected_paths, wrt)
    return jax.grad(loss_of_params)(params)

  return grad_fn


def _state_paths(state: Any) -> set[tuple[Any, ...]]:
  """The leaf paths of an NNX state (of Variables or of plain arrays) as plain keys."""
  leaves = jax.tree_util.tree_leaves_with_path(
    state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  return {
    tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
    for path, _ in leaves
  }


def _check_params_match_wrt(params: Any, expected: set[tuple[Any, ...]], wrt: Any) -> None:
  """Raises when ``params`` is not the state ``wrt`` selects (a filter mismatch)."""
  got = _state_paths(params)
  if got == expected:
    return
  raise ValueError(
    f"nnx_grad_fn: grad_fn(params) got parameters that are not the model state selected "
    f"by wrt={wrt!r}; nnx.Optimizer and nnx_grad_fn must use the same filter.\n"
    f"  selected by wrt, not in params: {sorted(expected - got, key=str)}\n"
    f"  in params, not selected by wrt: {sorted(got - expected, key=str)}\n"
    "Call it as\n"
    "    optimizer = nnx.Optimizer(model, tx, wrt=WRT)\n"
    "    optimizer.update(model, grads,\n"
    "                     grad_fn=samx.nnx_grad_fn(model, loss_fn, *batch, wrt=WRT))"
  )


def linen_grad_fn(
  apply_fn: Callable[..., Any],
  loss_fn: Callable[[Any, Any], Any],
  inputs: Any,
  targets: Any,
  *,
  collections: Mapping[str, Any] | None = None,
  **apply_kwargs: Any,
) -> Callable[[Any], Any]:
  """``grad_fn(params) -> grads`` for a linen model's ``apply``.

  The loss at ``params`` is ``loss_fn(apply_fn({"params": params, **collections},
  inputs, **apply_kwargs), targets)``. The non-parameter ``collections`` (e.g.
  ``{"batch_stats": state.batch_stats}``) are passed as mutable, so BatchNorm runs
  in training mode on the batch, and their updates are discarded.

  Args:
    apply_fn: the module's ``apply`` (e.g. ``TrainState.apply_fn``).
    loss_fn: ``loss_fn(outputs, targets) -> scalar``.
    inputs: the model inputs of the current batch.
    targets: the targets of the current batch.
    collections: other variable collections, e.g. ``{"batch_stats": ...}``.
    **apply_kwargs: passed to ``apply_fn`` (``train=True``, ``rngs=...``).

  Returns:
    A function of the parameters returning their gradient.

  >>> import flax.linen as nn, jax.numpy as jnp
  >>> model = nn.Dense(1)
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 2)))["params"]
  >>> mse = lambda out, y: jnp.mean((out - y) ** 2)
  >>> grad_fn = linen_grad_fn(model.apply, mse, jnp.ones((4, 2)), jnp.zeros((4, 1)))
  >>> jax.tree.map(jnp.shape, grad_fn(params))
  {'bias': (1,), 'kernel': (2, 1)}
  """
  for name, fn in (("apply_fn", apply_fn), ("loss_fn", loss_fn)):
    if not callable(fn):
      raise TypeError(
        f"linen_grad_fn: {name} must be callable; got {type(fn).__name__}. Call it as "
        "linen_grad_fn(state.apply_fn, loss_fn, inputs, targets)"
      )
  collections = dict(collections or {})

  def loss_of_params(params):
    variables = {"params": params, **collections}
    if collections:
      outputs, _ = apply_fn(variables, inputs, mutable=list(collections), **apply_kwargs)
    else:
      outputs = apply_fn(variables, inputs, **apply_kwargs)
    return loss_fn(outputs, targets)

  return jax.grad(loss_of_params)


def apply_gradients(state: Any, *, grads: Any, grad_fn: Callable[[Any], Any], **changes: Any):
  """``TrainState.apply_gradients`` that passes ``grad_fn`` on to a samx optimizer.

  flax's :meth:`flax.training.train_state.TrainState.apply_gradients` treats its
  keyword arguments as fields to replace, so it cannot hand ``grad_fn`` to
  ``tx.update``. This does the same step (one ``tx.update``, ``step + 1``) with
  ``grad_fn``; other keyword arguments replace fields, e.g. ``batch_stats=...``.

  Args:
    state: a linen ``TrainState`` (or a subclass) whose ``tx`` is a samx optimizer.
    grads: the gradient of the loss at ``state.params``.
    grad_fn: ``grad_fn(params) -> grads`` on the current batch, e.g. from
      :func:`linen_grad_fn`.
    **changes: other fields to replace.

  Returns:
    The updated state.

  >>> import flax.linen as nn, jax.numpy as jnp, optax, samx
  >>> from flax.training.train_state import TrainState
  >>> model = nn.Dense(1)
  >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
  >>> state = TrainState.create(apply_fn=model.apply, tx=samx.sam(optax.sgd(0.1)),
  ...                           params=model.init(jax.random.key(0), x)["params"])
  >>> mse = lambda out, y: jnp.mean((out - y) ** 2)
  >>> grad_fn = linen_grad_fn(state.apply_fn, mse, x, y)
  >>> state = apply_gradients(state, grads=grad_fn(state.params), grad_fn=grad_fn)
  >>> int(state.step)
  1
  """
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
  return state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    opt_state=opt_state,
    **changes,
  )
