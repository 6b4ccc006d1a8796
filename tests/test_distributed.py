"""Synced SAM under pmap, shard_map and sharded jit equals the single-device step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import samx
from tests import helpers

DEVICES = 8
PER_DEVICE = 4
STEPS = 3
AXIS = "data"

FACTORIES = {
  "sam": lambda **kw: samx.sam(optax.sgd(0.1, momentum=0.9), rho=0.05, **kw),
  "asam": lambda **kw: samx.asam(optax.sgd(0.1, momentum=0.9), rho=0.5, **kw),
}


def _setup():
  assert jax.device_count() >= DEVICES, "conftest.py sets 8 CPU devices"
  params, _ = helpers.make_problem(0)
  batches = [helpers.make_problem(10 + i, batch=DEVICES * PER_DEVICE)[1] for i in range(STEPS)]
  return helpers.to_jax(params, jnp.float32), helpers.to_jax(batches, jnp.float32)


def _mesh():
  return jax.make_mesh((DEVICES,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def _sgd_step(tx, loss):
  def step(params, state, batch):
    grads = jax.grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))
    return optax.apply_updates(params, updates), state

  return step


def _run_pmap(tx, params, batches):
  """Runs the steps under pmap, each device on its slice of every batch; per-device params."""
  step = jax.pmap(_sgd_step(tx, helpers.loss_jax), axis_name=AXIS)
  replicate = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (DEVICES, *x.shape)), t)
  p, s = replicate(params), replicate(tx.init(params))
  for batch in batches:
    shards = jax.tree.map(lambda x: x.reshape(DEVICES, PER_DEVICE, *x.shape[1:]), batch)
    p, s = step(p, s, shards)
  return p


def _close(actual, expected, rtol=2e-5):
  helpers_err = helpers.relative_error(actual, helpers.to_numpy(expected))
  assert helpers_err < rtol, helpers_err


@pytest.mark.parametrize("variant", sorted(FACTORIES))
def test_pmap_synced_equals_single_device(variant):
  params, batches = _setup()
  expected, _ = helpers.run_steps(FACTORIES[variant](), params, batches)

  tx = FACTORIES[variant](axis_name=AXIS)
  p = _run_pmap(tx, params, batches)
  for d in (0, DEVICES - 1):
    _close(jax.tree.map(lambda x, d=d: x[d], p), expected)


@pytest.mark.parametrize("check_vma", [False, True])
@pytest.mark.parametrize("variant", sorted(FACTORIES))
def test_shard_map_synced_equals_single_device(variant, check_vma):
  params, batches = _setup()
  expected, _ = helpers.run_steps(FACTORIES[variant](), params, batches)

  if check_vma:
    # With replication checking, the user averages the loss over the axis and
    # JAX returns already-reduced gradients; samx's averages are then no-ops.
    def loss(p, b):
      return jax.lax.pmean(helpers.loss_jax(p, b), AXIS)
  else:
    loss = helpers.loss_jax

  tx = FACTORIES[variant](axis_name=AXIS)
  mesh = _mesh()
  with jax.set_mesh(mesh):
    step = jax.jit(
      jax.shard_map(
        _sgd_step(tx, loss),
        in_specs=(P(), P(), P(AXIS)),
        out_specs=(P(), P()),
        check_vma=check_vma,
      )
    )
    p, s = params, tx.init(params)
    for batch in batches:
      p, s = step(p, s, jax.device_put(batch, NamedSharding(mesh, P(AXIS))))
  _close(p, expected)


@pytest.mark.parametrize("variant", sorted(FACTORIES))
def test_jit_over_sharded_batch_needs_no_axis_name(variant):
  params, batches = _setup()
  expected, _ = helpers.run_steps(FACTORIES[variant](), params, batches)
  mesh = _mesh()
  sharded = [jax.device_put(b, NamedSharding(mesh, P(AXIS))) for b in batches]
  replicated = jax.device_put(params, NamedSharding(mesh, P()))
  actual, _ = helpers.run_steps(FACTORIES[variant](), replicated, sharded)
  _close(actual, expected)


def test_pmap_per_device_perturbation_is_m_sharpness():
  # sync_ascent=False: each device perturbs along its own gradient; the update
  # uses the mean over devices of the per-shard SAM gradients.
  params, batches = _setup()
  rho, lr = 0.05, 0.1

  def reference_step(params, batch):
    shards = jax.tree.map(lambda x: x.reshape(DEVICES, PER_DEVICE, *x.shape[1:]), batch)
    per_shard = []
    for i in range(DEVICES):
      shard = jax.tree.map(lambda x, i=i: x[i], shards)
      g = helpers.grad_numpy(params, shard)
      norm = helpers.np_norm(g)
      e = {k: rho * v / (norm + 1e-12) for k, v in g.items()}
      per_shard.append(helpers.grad_numpy({k: params[k] + e[k] for k in params}, shard))
    mean = {k: np.mean([h[k] for h in per_shard], axis=0) for k in params}
    return {k: params[k] - lr * mean[k] for k in params}

  expected = helpers.to_numpy(params)
  for batch in batches:
    expected = reference_step(expected, helpers.to_numpy(batch))

  tx = samx.sam(optax.sgd(lr), rho=rho, axis_name=AXIS, sync_ascent=False)
  p = _run_pmap(tx, params, batches)
  assert helpers.relative_error(jax.tree.map(lambda x: x[0], p), expected) < 1e-5
  synced, _ = helpers.run_steps(samx.sam(optax.sgd(lr), rho=rho), params, batches)
  assert helpers.relative_error(synced, expected) > 1e-5


def test_unbound_axis_name_is_reported():
  params, batches = _setup()
  tx = samx.sam(optax.sgd(0.1), axis_name="devices")
  with pytest.raises(NameError, match="axis_name='devices' is not bound"):
    helpers.run_steps(tx, params, batches[:1])
