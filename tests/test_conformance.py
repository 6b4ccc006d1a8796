"""The optax conformance contract, run over every public samx transformation.

Later variants add themselves to ``OPTIMIZERS`` (full sharpness-aware optimizers,
called with ``grad_fn``) or ``BLOCKS`` (ascent blocks, plain transformations).
"""

from __future__ import annotations

import inspect
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samx
from tests import helpers

OPTIMIZERS = {
  "sam": (samx.sam, {"optimizer": optax.sgd(0.1, momentum=0.9), "rho": 0.05}),
  "sam_adam": (samx.sam, {"optimizer": optax.adam(1e-2), "rho": 0.05}),
  "sam_linf": (samx.sam, {"optimizer": optax.sgd(0.1), "rho": 0.01, "ball": "linf"}),
  "asam": (samx.asam, {"optimizer": optax.sgd(0.1, momentum=0.9), "rho": 0.5, "eta": 0.01}),
  "asam_layerwise": (
    samx.asam,
    {"optimizer": optax.sgd(0.1), "rho": 0.5, "eta": 0.01, "layerwise": True},
  ),
  "fsam": (
    samx.fsam,
    {"optimizer": optax.sgd(0.1, momentum=0.9), "rho": 0.2, "sigma": 0.5, "decay": 0.6},
  ),
  "vasso": (samx.vasso, {"optimizer": optax.sgd(0.1, momentum=0.9), "rho": 0.05, "theta": 0.9}),
  "random_sam": (samx.random_sam, {"optimizer": optax.sgd(0.1), "rho": 0.05, "key": 3}),
  "msam": (samx.msam, {"optimizer": optax.sgd(0.1, momentum=0.9), "rho": 0.05}),
  "sharpness_aware": (
    samx.sharpness_aware,
    {"optimizer": optax.sgd(0.1), "ascent": samx.scale_by_sam(0.05)},
  ),
}

BLOCKS = {
  "scale_by_sam": (samx.scale_by_sam, {"rho": 0.05}),
  "scale_by_asam": (samx.scale_by_asam, {"rho": 0.5, "eta": 0.01}),
  "scale_by_weight_magnitude": (samx.scale_by_weight_magnitude, {"eta": 0.01}),
  "fsam_direction": (samx.fsam_direction, {"sigma": 1.0, "decay": 0.9}),
  "vasso_direction": (samx.vasso_direction, {"theta": 0.9}),
  "random_direction": (samx.random_direction, {"key": 3}),
}

ALL = {**OPTIMIZERS, **BLOCKS}

# Structural integer/callable settings that inject_hyperparams must not turn into arrays.
STATIC_ARGS = ("micro_shards", "mask")

# The checks below that take one registered name, in the order other files run them
# (their first entries are the cheapest subset).
NAMED_CHECKS = [
  "test_unknown_extra_args_and_no_recompilation",
  "test_inject_hyperparams_gives_identical_results",
  "test_state_stable_through_lax_cond",
  "test_inside_multi_steps",
  "test_map_params",
  "test_inside_optax_chain",
  "test_schedules_accepted_for_rho",
]


def _problem(dtype=jnp.float32):
  params, batch = helpers.make_problem(0)
  return helpers.to_jax(params, dtype), helpers.to_jax(batch, dtype)


# Optimizers called with the per-example contract instead of grad_fn.
PER_EXAMPLE: set[str] = set()


def register(monkeypatch, *, optimizers=(), blocks=(), per_example=()):
  """Adds another test file's cases to these tables for one test (via ``monkeypatch``).

  ``optimizers`` and ``blocks`` are dicts like ``OPTIMIZERS`` and ``BLOCKS``;
  ``per_example`` names the optimizers that take ``per_example_loss_fn`` and ``batch``.
  """
  for table, cases in ((OPTIMIZERS, optimizers), (BLOCKS, blocks)):
    for name, case in dict(cases).items():
      monkeypatch.setitem(table, name, case)
      monkeypatch.setitem(ALL, name, case)
  monkeypatch.setattr(sys.modules[__name__], "PER_EXAMPLE", PER_EXAMPLE | set(per_example))


def _update_kwargs(name, params, batch):
  if name in PER_EXAMPLE:
    return {"per_example_loss_fn": helpers.per_example_loss, "batch": batch}
  if name in OPTIMIZERS:
    return {"grad_fn": lambda p: jax.grad(helpers.loss_jax)(p, batch)}
  return {}


def _one_update(name, tx, params, batch, state=None, **extra):
  grads = jax.grad(helpers.loss_jax)(params, batch)
  state = tx.init(params) if state is None else state
  return optax.with_extra_args_support(tx).update(
    grads, state, params, **_update_kwargs(name, params, batch), **extra
  )


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(
      np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
    )


@pytest.mark.parametrize("name", sorted(ALL))
def test_unknown_extra_args_and_no_recompilation(name):
  factory, kwargs = ALL[name]
  tx = factory(**kwargs)
  params, batch = _problem()
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = _one_update(
      name, tx, params, batch, state, unexpected_extra_arg_nobody_expects=1
    )
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  params, state = step(params, state)
  params, state = step(params, state)
  params, state = step(params, state)
  assert len(traces) == 1, "the step retraced: the state changed type or shape"


@pytest.mark.parametrize("name", sorted(ALL))
def test_map_params(name):
  factory, kwargs = ALL[name]
  tx = factory(**kwargs)
  params, batch = _problem()
  state = tx.init(params)
  mapped = optax.tree.map_params(tx, lambda v: v, state)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  _, state = _one_update(name, tx, params, batch, mapped)


@pytest.mark.parametrize("name", sorted(ALL))
def test_inject_hyperparams_gives_identical_results(name):
  factory, kwargs = ALL[name]
  params, batch = _problem()
  tx = factory(**kwargs)
  static = tuple(k for k in STATIC_ARGS if k in inspect.signature(factory).parameters)
  injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
  state, injected_state = tx.init(params), injected.init(params)
  for _ in range(2):
    updates, state = jax.jit(lambda p, s: _one_update(name, tx, p, batch, s))(params, state)
    injected_updates, injected_state = jax.jit(
      lambda p, s: _one_update(name, injected, p, batch, s)
    )(params, injected_state)
    _assert_trees_close(injected_updates, updates)
    _assert_trees_close(injected_state.inner_state, state)
    params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", sorted(ALL))
def test_dtypes_preserved(name, dtype):
  factory, kwargs = ALL[name]
  tx = factory(**kwargs)
  params, batch = _problem(dtype)
  state = tx.init(params)
  updates, new_state = jax.jit(lambda p, s: _one_update(name, tx, p, batch, s))(params, state)
  assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state) == jax.tree.map(
    lambda x: (x.shape, x.dtype), state
  )
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", sorted(ALL))
def test_state_stable_through_lax_cond(name):
  factory, kwargs = ALL[name]
  tx = factory(**kwargs)
  params, batch = _problem()

  @jax.jit
  def maybe_step(pred, params, state):
    return jax.lax.cond(
      pred, lambda s: _one_update(name, tx, params, batch, s)[1], lambda s: s, state
    )

  state = tx.init(params)
  stepped = maybe_step(True, params, state)
  skipped = maybe_step(False, params, state)
  _assert_trees_close(skipped, state, rtol=0, atol=0)
  assert jax.tree.structure(stepped) == jax.tree.structure(state)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_inside_optax_chain(name):
  factory, kwargs = OPTIMIZERS[name]
  params, batch = _problem()
  alone = factory(**kwargs)
  chained = optax.chain(optax.identity(), factory(**kwargs), optax.scale(1.0))
  updates, _ = _one_update(name, alone, params, batch)
  chained_updates, _ = _one_update(name, chained, params, batch)
  _assert_trees_close(chained_updates, updates)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_inside_multi_steps(name):
  # Two micro-steps on the same batch average to the same g: one samx step.
  factory, kwargs = OPTIMIZERS[name]
  params, batch = _problem()
  multi = optax.MultiSteps(factory(**kwargs), every_k_schedule=2)
  state = multi.init(params)

  @jax.jit
  def micro_step(state):
    grads = jax.grad(helpers.loss_jax)(params, batch)
    return multi.update(grads, state, params, **_update_kwargs(name, params, batch))

  first, state = micro_step(state)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(first))
  second, state = micro_step(state)
  expected, _ = _one_update(name, factory(**kwargs), params, batch)
  _assert_trees_close(second, expected)


@pytest.mark.parametrize("name", sorted(n for n in ALL if "rho" in ALL[n][1]))
def test_schedules_accepted_for_rho(name):
  factory, kwargs = ALL[name]
  rho = kwargs["rho"]
  scheduled = factory(**{**kwargs, "rho": optax.constant_schedule(rho)})
  constant = factory(**kwargs)
  params, batch = _problem()
  state, scheduled_state = constant.init(params), scheduled.init(params)
  for _ in range(2):
    updates, state = _one_update(name, constant, params, batch, state)
    scheduled_updates, scheduled_state = _one_update(
      name, scheduled, params, batch, scheduled_state
    )
    _assert_trees_close(scheduled_updates, updates)
