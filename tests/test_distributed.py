"""Data parallelism: the m-sharpness reference, and every misuse samx must refuse.

The conformance of every variant under pmap, shard_map and sharded jit is
``tests/test_sharding.py``; this file holds the NumPy reference for per-device eps
and the traps: gradients that are already reduced, sharded params inside
shard_map, a forgotten axis name in the non-finite guard, an unbound axis.
"""

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


def _shard_map_step(tx, loss, *, cast=False, reduce_grad_fn=None):
  def step(params, state, batch):
    local = jax.lax.pcast(params, AXIS, to="varying") if cast else params
    grads = jax.grad(loss)(local, batch)

    def grad_fn(p):
      g = jax.grad(loss)(p, batch)
      return reduce_grad_fn(g, AXIS) if reduce_grad_fn else g

    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  mesh = jax.make_mesh((DEVICES,), (AXIS,))  # JAX's default: Explicit axes
  params, batches = _setup()
  with jax.set_mesh(mesh):
    fn = jax.jit(jax.shard_map(step, in_specs=(P(), P(), P(AXIS)), out_specs=(P(), P())))
    batch = jax.device_put(batches[0], NamedSharding(mesh, P(AXIS)))
    return fn(params, tx.init(params), batch)


def _pmean_loss(p, b):
  return jax.lax.pmean(helpers.loss_jax(p, b), AXIS)


@pytest.mark.parametrize(
  "loss, cast, reduce_grad_fn, what",
  [
    (helpers.loss_jax, False, None, "the clean gradient"),  # summed over devices by JAX
    (_pmean_loss, False, None, "the clean gradient"),  # averaged by the loss
    (helpers.loss_jax, True, jax.lax.pmean, "the gradient at the perturbed params"),
    (helpers.loss_jax, True, jax.lax.psum, "the gradient at the perturbed params"),
  ],
  ids=["grad-of-replicated-params", "pmean-in-loss", "pmean-in-grad_fn", "psum-in-grad_fn"],
)
@pytest.mark.parametrize("make", [samx.sam, samx.msam, samx.gsam])
def test_reduced_gradients_under_replication_checking_raise(
  make, loss, cast, reduce_grad_fn, what
):
  # Under check_vma=True an invariant gradient is a sum or a mean over the devices;
  # samx cannot tell which, so it refuses instead of scaling the update silently.
  tx = make(optax.sgd(0.1), axis_name=AXIS)
  with pytest.raises(ValueError, match=f"{what} .* is not per device along axis_name='data'"):
    _shard_map_step(tx, loss, cast=cast, reduce_grad_fn=reduce_grad_fn)


def test_the_error_shows_the_call_that_works():
  tx = samx.sam(optax.sgd(0.1), axis_name=AXIS)
  with pytest.raises(ValueError) as err:
    _shard_map_step(tx, helpers.loss_jax)
  assert "jax.lax.pcast(params, 'data', to='varying')" in str(err.value)
  # ... and that call gives the single-device update.
  params, batches = _setup()
  expected, _ = helpers.run_steps(samx.sam(optax.sgd(0.1)), params, batches[:1])
  actual, _ = _shard_map_step(tx, helpers.loss_jax, cast=True)
  assert helpers.relative_error(actual, helpers.to_numpy(expected)) < 2e-6


def test_sharded_params_inside_shard_map_raise():
  params, _ = _setup()
  tx = samx.sam(optax.sgd(0.1), axis_name=AXIS)
  spec = {"W1": P(), "b1": P(AXIS), "W2": P()}  # b1 has 7 entries: shard a padded copy
  with pytest.raises(ValueError, match=r"params \[\"\['b1'\]\"\] vary along axis_name='data'"):

    def step(params, batch):
      b1 = jnp.concatenate([params["b1"], jnp.zeros(1)])  # (1,) per device
      local = {**params, "b1": b1}
      grads = jax.grad(lambda p, b: jnp.sum(p["b1"]) + helpers.loss_jax(params, b))(
        local, batch
      )
      return tx.update(grads, tx.init(local), local, grad_fn=lambda p: grads)[0]

    mesh = jax.make_mesh((DEVICES,), (AXIS,))
    padded = {**params, "b1": jnp.zeros(DEVICES)}
    with jax.set_mesh(mesh):
      jax.jit(jax.shard_map(step, in_specs=(spec, P(AXIS)), out_specs=spec))(
        jax.device_put(padded, {k: NamedSharding(mesh, s) for k, s in spec.items()}),
        jax.device_put(_setup()[1][0], NamedSharding(mesh, P(AXIS))),
      )


def _nan_on_device_zero_step(tx):
  """pmap step where only device 0's perturbed gradient is NaN."""

  def step(params, state, batch):
    grads = jax.grad(helpers.loss_jax)(params, batch)
    bad = jax.lax.axis_index(AXIS) == 0

    def grad_fn(p):
      g = jax.grad(helpers.loss_jax)(p, batch)
      return jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), g)

    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  params, batches = _setup()
  replicate = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (DEVICES, *x.shape)), t)
  shards = jax.tree.map(lambda x: x.reshape(DEVICES, PER_DEVICE, *x.shape[1:]), batches[0])
  return jax.pmap(step, axis_name=AXIS)(replicate(params), replicate(tx.init(params)), shards)


def test_skip_nonfinite_without_axis_name_under_pmap_raises():
  # Per-device sync_ascent=False SAM: only device 0 sees the NaN; without an axis
  # name device 0 would skip while the others step, and replicas would drift.
  tx = samx.skip_nonfinite(samx.sam(optax.sgd(0.1), axis_name=AXIS, sync_ascent=False))
  with pytest.raises(ValueError, match="skip_nonfinite: the step runs under the named device"):
    _nan_on_device_zero_step(tx)


def test_skip_nonfinite_with_axis_name_skips_on_every_device():
  # The inner step is local to each device (no collective): only device 0's update
  # is NaN. With axis_name every device skips; each device alone would skip only on 0.
  def step(params, state, grads):
    grads = jax.tree.map(lambda g: jnp.where(jax.lax.axis_index(AXIS) == 0, jnp.nan, g), grads)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = {"w": jnp.ones((DEVICES, 3))}
  for axis_name, skipped in ((AXIS, [1] * DEVICES), ((), [1] + [0] * (DEVICES - 1))):
    tx = samx.skip_nonfinite(optax.sgd(0.1), axis_name=axis_name or None)
    if not axis_name:  # per-device skipping is refused under pmap, so run it under vmap
      run = jax.vmap(step, axis_name=AXIS)
    else:
      run = jax.pmap(step, axis_name=AXIS)
    state = jax.vmap(tx.init)(params)
    _, state = run(params, state, {"w": jnp.ones((DEVICES, 3))})
    np.testing.assert_array_equal(np.asarray(state.total_notfinite), skipped)
