"""mSAM: per-device, per-group and per-micro-shard eps against shard-by-shard references."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import samx
from tests import helpers

LR, RHO = 0.1, 0.05
DEVICES = 8
STEPS = 3


def global_batches(steps=STEPS, batch=32):
  """The batches every test (and every process of the multi-host test) uses."""
  return [helpers.make_problem(20 + i, batch=batch)[1] for i in range(steps)]


per_example_loss = helpers.per_example_loss


def np_msam_step(params, batch, shards, rho=RHO):
  """One mSAM step with plain SGD: the batch split in order into ``shards`` parts."""
  x, y = batch
  size = x.shape[0] // shards
  per_shard = []
  for i in range(shards):
    shard = (x[i * size : (i + 1) * size], y[i * size : (i + 1) * size])
    g = helpers.grad_numpy(params, shard)
    norm = helpers.np_norm(g)
    e = {k: rho * v / (norm + 1e-12) for k, v in g.items()}
    per_shard.append(helpers.grad_numpy({k: params[k] + e[k] for k in params}, shard))
  mean = {k: np.mean([h[k] for h in per_shard], axis=0) for k in params}
  return {k: params[k] - LR * mean[k] for k in params}


def np_msam_run(params, batches, shards, rhos=None):
  params = helpers.to_numpy(params)
  rhos = [RHO] * len(batches) if rhos is None else rhos
  for batch, rho in zip(batches, rhos, strict=True):
    params = np_msam_step(params, helpers.to_numpy(batch), shards, rho)
  return params


def _setup(steps=STEPS, batch=32):
  params, _ = helpers.make_problem(0)
  return helpers.to_jax(params, jnp.float32), helpers.to_jax(
    global_batches(steps, batch), jnp.float32
  )


def _per_example_step(tx):
  def step(params, state, batch):
    zeros = jax.tree.map(jnp.zeros_like, params)  # not used by micro-shard mSAM
    updates, state = tx.update(
      zeros, state, params, per_example_loss_fn=per_example_loss, batch=batch
    )
    return optax.apply_updates(params, updates), state

  return step


def _replicate(tree):
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (DEVICES, *x.shape)), tree)


def _split(batch):
  return jax.tree.map(lambda x: x.reshape(DEVICES, -1, *x.shape[1:]), batch)


@pytest.mark.parametrize("micro_shards", [1, 2, 4, 32])
def test_micro_shards_match_the_shard_by_shard_reference(micro_shards):
  params, batches = _setup()
  expected = np_msam_run(params, batches, micro_shards)
  tx = samx.msam(optax.sgd(LR), rho=RHO, micro_shards=micro_shards)
  if micro_shards == 1:
    actual, _ = helpers.run_steps(tx, params, batches)
  else:
    step = jax.jit(_per_example_step(tx))
    actual, state = params, tx.init(params)
    for batch in batches:
      actual, state = step(actual, state, batch)
  assert helpers.relative_error(actual, expected) < 1e-5


def test_rho_schedule_with_micro_shards_follows_each_shards_step_count():
  # Each micro-shard keeps its own ascent state, so a schedule sees the step count.
  params, batches = _setup()
  schedule = optax.linear_schedule(RHO, 4 * RHO, transition_steps=STEPS - 1)
  expected = np_msam_run(params, batches, 4, rhos=[float(schedule(t)) for t in range(STEPS)])
  tx = samx.msam(optax.sgd(LR), rho=schedule, micro_shards=4)
  step = jax.jit(_per_example_step(tx))
  actual, state = params, tx.init(params)
  for batch in batches:
    actual, state = step(actual, state, batch)
  assert helpers.relative_error(actual, expected) < 1e-5
  assert state.ascent_state.count.tolist() == [STEPS] * 4


def test_one_shard_is_sam():
  params, batches = _setup()
  sam, _ = helpers.run_steps(samx.sam(optax.sgd(LR), rho=RHO), params, batches)
  msam, _ = helpers.run_steps(samx.msam(optax.sgd(LR), rho=RHO), params, batches)
  assert helpers.relative_error(msam, helpers.to_numpy(sam)) < 1e-7


def test_micro_shards_differ_from_sam():
  params, batches = _setup()
  sam = helpers.to_numpy(
    helpers.run_steps(samx.sam(optax.sgd(LR), rho=RHO), params, batches)[0]
  )
  assert helpers.relative_error(np_msam_run(params, batches, 4), sam) > 1e-5


@pytest.mark.parametrize("micro_shards", [1, 2])
def test_pmap_devices_times_micro_shards(micro_shards):
  params, batches = _setup()
  expected = np_msam_run(params, batches, DEVICES * micro_shards)
  tx = samx.msam(optax.sgd(LR), rho=RHO, axis_name="d", micro_shards=micro_shards)
  if micro_shards == 1:

    def step(params, state, batch):
      grads = jax.grad(helpers.loss_jax)(params, batch)
      grad_fn = lambda p: jax.grad(helpers.loss_jax)(p, batch)
      updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), state

  else:
    step = _per_example_step(tx)
  step = jax.pmap(step, axis_name="d")
  p, s = _replicate(params), _replicate(tx.init(params))
  for batch in batches:
    p, s = step(p, s, _split(batch))
  assert helpers.relative_error(jax.tree.map(lambda x: x[0], p), expected) < 1e-5


def test_groups_of_devices_share_eps_on_a_2d_mesh():
  # Mesh (groups=2, chips=4): eps averaged over "chips" only, one eps per group of 4.
  params, batches = _setup()
  expected = np_msam_run(params, batches, 2)
  mesh = jax.make_mesh(
    (2, 4), ("groups", "chips"), axis_types=(jax.sharding.AxisType.Auto,) * 2
  )
  axes = ("groups", "chips")
  tx = samx.msam(optax.sgd(LR), rho=RHO, axis_name=axes, sync_ascent="chips")

  def step(params, state, batch):
    grads = jax.grad(helpers.loss_jax)(params, batch)
    grad_fn = lambda p: jax.grad(helpers.loss_jax)(p, batch)
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  with jax.set_mesh(mesh):
    sharded = jax.jit(
      jax.shard_map(step, in_specs=(P(), P(), P(axes)), out_specs=(P(), P()), check_vma=False)
    )
    p, s = params, tx.init(params)
    for batch in batches:
      p, s = sharded(p, s, jax.device_put(batch, NamedSharding(mesh, P(axes))))
  assert helpers.relative_error(p, expected) < 1e-5


def _all_reduces(tx):
  params, batches = _setup(steps=1)

  def step(p, s, b):
    g = jax.grad(helpers.loss_jax)(p, b)
    u, s = tx.update(g, s, p, grad_fn=lambda q: jax.grad(helpers.loss_jax)(q, b))
    return optax.apply_updates(p, u), s

  compiled = (
    jax.pmap(step, axis_name="d")
    .lower(_replicate(params), _replicate(tx.init(params)), _split(batches[0]))
    .compile()
  )
  return [
    line for line in compiled.as_text().splitlines() if re.search(r"= .*all-reduce\(", line)
  ]


def test_per_device_eps_needs_one_all_reduce_and_synced_sam_two():
  msam = _all_reduces(samx.msam(optax.sgd(LR), rho=RHO, axis_name="d"))
  synced = _all_reduces(samx.sam(optax.sgd(LR), rho=RHO, axis_name="d"))
  assert len(msam) == 1, msam
  assert len(synced) == 2, synced
  # Each all-reduce carries the whole gradient: W1 (5, 7), W2 (7, 3), b1 (7,).
  for line in msam + synced:
    assert "f32[5,7]" in line and "f32[7,3]" in line and "f32[7]" in line


@pytest.mark.parametrize(
  "make, error, pattern",
  [
    (lambda: samx.msam(optax.sgd(LR), micro_shards=0), ValueError, "micro_shards must be"),
    (
      lambda: samx.msam(optax.sgd(LR), micro_shards=2.0),
      TypeError,
      "micro_shards must be an integer >= 1",
    ),
    (
      lambda: samx.msam(optax.sgd(LR), axis_name="d", sync_ascent=True, micro_shards=2),
      ValueError,
      "sync_ascent must be False; got sync_ascent=True",
    ),
    (
      lambda: samx.msam(optax.sgd(LR), axis_name="d", sync_ascent="x"),
      ValueError,
      "sync_ascent must be True, False, or axis names contained in axis_name",
    ),
  ],
)
def test_bad_configuration(make, error, pattern):
  with pytest.raises(error, match=pattern):
    make()


def test_batch_not_divisible_by_micro_shards():
  params, batches = _setup(steps=1, batch=6)
  tx = samx.msam(optax.sgd(LR), micro_shards=4)
  with pytest.raises(ValueError, match=r"batch size 6 must be divisible by micro_shards=4"):
    _per_example_step(tx)(params, tx.init(params), batches[0])


def test_micro_shards_need_the_per_example_contract():
  params, batches = _setup(steps=1)
  tx = samx.msam(optax.sgd(LR), micro_shards=2)
  grads = jax.grad(helpers.loss_jax)(params, batches[0])
  with pytest.raises(TypeError, match="per_example_loss_fn and batch"):
    tx.update(grads, tx.init(params), params, grad_fn=lambda p: grads)


def test_gradient_accumulation_is_msam_with_m_equal_to_the_micro_batch():
  # samx before MultiSteps: every micro-step computes its own SAM gradient h_i with its
  # own eps; MultiSteps averages the h_i and applies the base optimizer every k steps.
  k = 4
  params, batches = _setup(steps=2)
  expected = np_msam_run(params, batches, k)
  tx = optax.chain(
    samx.sam(optax.identity(), rho=RHO),
    optax.MultiSteps(optax.sgd(LR), every_k_schedule=k).gradient_transformation(),
  )

  @jax.jit
  def micro_step(params, state, micro_batch):
    grads = jax.grad(helpers.loss_jax)(params, micro_batch)
    grad_fn = lambda p: jax.grad(helpers.loss_jax)(p, micro_batch)
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state, updates

  p, s = params, tx.init(params)
  for batch in batches:
    micro = jax.tree.map(lambda x: x.reshape(k, -1, *x.shape[1:]), batch)
    for i in range(k):
      before = p
      p, s, updates = micro_step(p, s, jax.tree.map(lambda x, i=i: x[i], micro))
      if i < k - 1:  # no weight drift between micro-steps
        assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), p, before))
  assert helpers.relative_error(p, expected) < 1e-5


def test_shard_map_with_replication_checking_needs_varying_params_for_local_grads():
  # check_vma=True: gradients w.r.t. replicated params come back summed over devices.
  # Differentiating w.r.t. jax.lax.pcast(params, axis, to="varying") gives the local
  # gradients that per-device eps needs; samx's final mean makes the update replicated.
  params, batches = _setup()
  expected = np_msam_run(params, batches, DEVICES)
  mesh = jax.make_mesh((DEVICES,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  tx = samx.msam(optax.sgd(LR), rho=RHO, axis_name="d")

  def step(params, state, batch):
    local = jax.lax.pcast(params, "d", to="varying")
    grads = jax.grad(helpers.loss_jax)(local, batch)
    grad_fn = lambda p: jax.grad(helpers.loss_jax)(p, batch)
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  with jax.set_mesh(mesh):
    sharded = jax.jit(jax.shard_map(step, in_specs=(P(), P(), P("d")), out_specs=(P(), P())))
    p, s = params, tx.init(params)
    for batch in batches:
      p, s = sharded(p, s, jax.device_put(batch, NamedSharding(mesh, P("d"))))
  assert helpers.relative_error(p, expected) < 1e-5
