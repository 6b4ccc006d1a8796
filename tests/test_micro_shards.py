"""Micro-shards for every variant: one eps (and one ascent state) per micro-shard.

The reference processes the shards one by one: one instance of the same variant at
``micro_shards=1`` per shard, each with its own state and that shard's gradient
function, with the base optimizer plain SGD (linear and stateless, so the mean of the
per-shard updates is the update of the mean direction). GSAM and LookSAM combine the
averaged gradients non-linearly; their references average per-shard SAM gradients
and apply the combination written out in NumPy float64.
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
from tests import test_conformance as conformance

LR = 0.1
K = 4  # micro-shards
BATCH = 16  # 4 examples per micro-shard
STEPS = 3
DEVICES = 8
EPS = 1e-12
MASK = {"W1": False, "b1": True, "W2": True}

per_example_loss = helpers.per_example_loss

# How a step calls the variant: "grad_fn", "per_example", or "per_example+losses".
VARIANTS = {
  "sam": (samx.sam, {"rho": 0.05}, "grad_fn"),
  "asam": (samx.asam, {"rho": 0.5, "eta": 0.01}, "grad_fn"),
  "sam_on": (samx.sam_on, {"rho": 0.5, "mask": MASK}, "grad_fn"),
  "random_sam": (samx.random_sam, {"rho": 0.05, "key": 3}, "grad_fn"),
  "fsam": (samx.fsam, {"rho": 0.2, "sigma": 1.0, "decay": 0.6}, "grad_fn"),
  "vasso": (samx.vasso, {"rho": 0.05, "theta": 0.5}, "grad_fn"),
  "ssam_fisher": (
    samx.ssam,
    {"rho": 0.05, "sparsity": 0.5, "num_samples": 4, "refresh_every": 2},
    "per_example",
  ),
  "esam": (  # per-tensor SWP: one draw per leaf compiles faster than one per weight
    samx.esam,
    {"rho": 0.05, "beta": 0.5, "gamma": 0.5, "per_tensor": True},
    "per_example+losses",
  ),
  "wsam_decoupled": (samx.wsam, {"rho": 0.05, "gamma": 0.75, "learning_rate": LR}, "grad_fn"),
}


def _setup(steps=STEPS, batch=BATCH):
  params, _ = helpers.make_problem(0)
  batches = [helpers.make_problem(40 + i, batch=batch)[1] for i in range(steps)]
  return helpers.to_jax(params, jnp.float32), helpers.to_jax(batches, jnp.float32)


def _shards(batch, k):
  """The ``k`` micro-shards of ``batch``, in order."""
  size = batch[0].shape[0] // k
  return [jax.tree.map(lambda x, i=i: x[i * size : (i + 1) * size], batch) for i in range(k)]


def _contract(kind, params, batch):
  if kind == "grad_fn":
    return {"grad_fn": lambda p: jax.grad(helpers.loss_jax)(p, batch)}
  args = {"per_example_loss_fn": per_example_loss, "batch": batch}
  if kind == "per_example+losses":
    args["losses"] = per_example_loss(params, batch)
  return args


def _micro_step(tx, kind="per_example"):
  """One step of a micro-shard optimizer: the per-example contract and zero grads."""

  def step(params, state, batch):
    zeros = jax.tree.map(jnp.zeros_like, params)  # not used with micro-shards
    args = _contract("per_example" if kind == "grad_fn" else kind, params, batch)
    updates, state = tx.update(zeros, state, params, **args)
    return optax.apply_updates(params, updates), state

  return step


def _run(step, params, state, batches):
  step = jax.jit(step)
  for batch in batches:
    params, state = step(params, state, batch)
  return params, state


def _shard_step(tx, kind):
  @jax.jit
  def step(params, state, shard):
    grads = jax.grad(helpers.loss_jax)(params, shard)
    updates, state = tx.update(grads, state, params, **_contract(kind, params, shard))
    return grads, updates, state

  return step


def reference_run(tx, kind, params, batches, shards):
  """``shards`` instances of ``tx`` (``micro_shards=1``), one per shard; updates averaged."""
  step = _shard_step(tx, kind)
  states = [tx.init(params)] * shards
  for batch in batches:
    updates = []
    for i, shard in enumerate(_shards(batch, shards)):
      _, u, states[i] = step(params, states[i], shard)
      updates.append(helpers.to_numpy(u))
    mean = jax.tree.map(lambda *u: np.mean(u, axis=0), *updates)
    params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, mean)
  return params, states


def _assert_close(actual, expected, rtol=1e-5, atol=1e-7):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol, atol)


def _shard_state(state, *index):
  return jax.tree.map(lambda x: x[index], state)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_matches_its_shard_by_shard_reference(name):
  factory, kwargs, kind = VARIANTS[name]
  params, batches = _setup()
  expected, ref_states = reference_run(
    factory(optax.sgd(LR), **kwargs), kind, params, batches, K
  )
  tx = factory(optax.sgd(LR), **kwargs, micro_shards=K)
  actual, state = _run(_micro_step(tx, kind), params, tx.init(params), batches)
  assert helpers.relative_error(actual, helpers.to_numpy(expected)) < 1e-5
  # One ascent state per micro-shard, each the state of its shard's reference.
  for i in range(K):
    _assert_close(_shard_state(state.ascent_state, i), ref_states[i].ascent_state)


# ---------------------------------------------------------------------------------------
# GSAM and LookSAM: the combination acts on the averaged g and g_s.


def _np_dot(a, b):
  return sum(float(np.vdot(a[k], b[k])) for k in a)


def np_gsam(g, h, alpha):
  """d = h - alpha * (g - (g . h_hat) h_hat), h_hat = h / (|h| + eps)."""
  inverse = 1.0 / (helpers.np_norm(h) + EPS)
  coefficient = _np_dot(g, h) * inverse**2
  return {k: h[k] - alpha * (g[k] - coefficient * h[k]) for k in g}


def np_looksam(g, h, stored, step, every, alpha):
  """LookSAM's direction and stored g_v (``h`` is ignored on the steps that reuse g_v)."""
  if step % every == 0:
    coefficient = _np_dot(h, g) / (helpers.np_norm(g) + EPS) ** 2
    return h, {k: h[k] - coefficient * g[k] for k in g}
  ratio = helpers.np_norm(g) / (helpers.np_norm(stored) + EPS)
  return {k: g[k] + alpha * ratio * stored[k] for k in g}, stored


def combine_reference(combine, params, batches, shards, rho):
  """Per-shard SAM gradients h_i and clean g_i, averaged, combined in float64."""
  step = _shard_step(samx.sam(optax.identity(), rho=rho), "grad_fn")
  state = samx.sam(optax.identity(), rho=rho).init(params)
  params, stored = helpers.to_numpy(params), None
  for t, batch in enumerate(batches):
    pieces = [
      step(helpers.to_jax(params, jnp.float32), state, s) for s in _shards(batch, shards)
    ]
    g = jax.tree.map(lambda *x: np.mean(x, axis=0), *[helpers.to_numpy(p[0]) for p in pieces])
    h = jax.tree.map(lambda *x: np.mean(x, axis=0), *[helpers.to_numpy(p[1]) for p in pieces])
    direction, stored = combine(g, h, stored, t)
    params = {k: params[k] - LR * direction[k] for k in params}
  return params


COMBINED = {
  "gsam": (
    samx.gsam,
    {"rho": 0.05, "alpha": 0.4},
    lambda g, h, stored, t: (np_gsam(g, h, 0.4), stored),
  ),
  "looksam": (
    samx.looksam,
    {"rho": 0.05, "k": 2, "alpha": 0.7},
    lambda g, h, stored, t: np_looksam(g, h, stored, t, 2, 0.7),
  ),
}


@pytest.mark.parametrize("name", sorted(COMBINED))
def test_combine_stage_acts_on_the_averaged_gradients(name):
  factory, kwargs, combine = COMBINED[name]
  params, batches = _setup()
  expected = combine_reference(combine, params, batches, K, kwargs["rho"])
  tx = factory(optax.sgd(LR), **kwargs, micro_shards=K)
  actual, state = _run(_micro_step(tx), params, tx.init(params), batches)
  assert helpers.relative_error(actual, expected) < 1e-5
  assert jax.tree.leaves(state.ascent_state) == []  # SAM's ascent: no state to shard


def test_looksam_skips_every_shards_evaluation_on_the_reuse_steps():
  # Each step computes the k clean gradients g_i; the k perturbed ones only every 2 steps.
  calls = []

  def counted_loss(params, batch):
    jax.debug.callback(lambda: calls.append(1))
    return per_example_loss(params, batch)

  params, batches = _setup(steps=4)
  tx = samx.looksam(optax.sgd(LR), rho=0.05, k=2, micro_shards=K)

  @jax.jit
  def step(params, state, batch):
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(
      zeros, state, params, per_example_loss_fn=counted_loss, batch=batch
    )
    return optax.apply_updates(params, updates), state

  state, per_step = tx.init(params), []
  for batch in batches:
    before = len(calls)
    params, state = step(params, state, batch)
    jax.effects_barrier()
    per_step.append(len(calls) - before)
  clean = per_step[1]
  assert clean > 0 and per_step == [2 * clean, clean, 2 * clean, clean]


# ---------------------------------------------------------------------------------------
# What each shard sees.


def test_each_shard_sees_its_own_batch_losses_and_gradient_function():
  # A custom ascent that perturbs along grad_fn(params) (not along its input) and a
  # custom evaluation: both see shard-sized arguments, and the result is mSAM's.
  seen = []

  def ascent_update(updates, state, params=None, *, grad_fn, batch, losses, **extra):
    seen.append(("ascent", batch[0].shape[0], losses.shape, jnp.shape(updates["W1"])))
    return samx.scale_by_sam(0.05).update(grad_fn(params), state, params)

  ascent = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), ascent_update)

  def evaluation(params, perturbation, *, grad_fn, batch, losses, who, **extra):
    seen.append(("evaluation", batch[0].shape[0], losses.shape))
    return grad_fn(optax.apply_updates(params, perturbation))

  def loss(params, batch):
    seen.append(("loss", batch[0].shape[0]))
    return per_example_loss(params, batch)

  params, batches = _setup()
  tx = samx.sharpness_aware(optax.sgd(LR), ascent, evaluation=evaluation, micro_shards=K)

  def step(params, state, batch):
    zeros = jax.tree.map(jnp.zeros_like, params)
    losses = per_example_loss(params, batch)
    updates, state = tx.update(
      zeros, state, params, per_example_loss_fn=loss, batch=batch, losses=losses
    )
    return optax.apply_updates(params, updates), state

  actual, _ = _run(step, params, tx.init(params), batches)
  expected, _ = reference_run(samx.msam(optax.sgd(LR), rho=0.05), "grad_fn", params, batches, K)
  assert helpers.relative_error(actual, helpers.to_numpy(expected)) < 1e-5
  m = BATCH // K
  assert ("ascent", m, (m,), (5, 7)) in seen and ("evaluation", m, (m,)) in seen
  assert {s[1] for s in seen if s[0] == "loss"} == {m}  # never the whole batch


def test_ascent_state_has_a_leading_micro_shard_axis():
  params, _ = _setup(steps=1)
  tx = samx.fsam(optax.sgd(LR, momentum=0.9), micro_shards=K)
  state = tx.init(params)
  plain = samx.fsam(optax.sgd(LR, momentum=0.9)).init(params)
  assert jax.tree.map(jnp.shape, state.ascent_state) == jax.tree.map(
    lambda x: (K, *jnp.shape(x)), plain.ascent_state
  )
  # The combine and base stages are not per shard.
  assert jax.tree.map(jnp.shape, state.base_state) == jax.tree.map(jnp.shape, plain.base_state)
  # optax.tree.map_params finds the per-shard EMA (the params-like part of the state).
  mapped = optax.tree.map_params(tx, lambda v: jnp.shape(v), state)
  assert mapped.ascent_state[0].ema == {"W1": (K, 5, 7), "W2": (K, 7, 3), "b1": (K, 7)}


@pytest.mark.parametrize("name", ["sam", "fsam"])
def test_one_micro_shard_is_the_plain_step_bit_for_bit(name):
  factory, kwargs, kind = VARIANTS[name]
  params, batches = _setup(steps=2)
  plain = factory(optax.sgd(LR), **kwargs)
  one = factory(optax.sgd(LR), **kwargs, micro_shards=1)
  assert jax.tree.structure(one.init(params)) == jax.tree.structure(plain.init(params))
  step = _shard_step(plain, kind)
  step_one = _shard_step(one, kind)
  state, state_one = plain.init(params), one.init(params)
  for batch in batches:
    _, updates, state = step(params, state, batch)
    _, updates_one, state_one = step_one(params, state_one, batch)
    _assert_close(updates_one, updates, rtol=0, atol=0)
  _assert_close(state_one, state, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Bad input.


def test_batch_not_divisible_by_micro_shards_names_the_argument():
  params, batches = _setup(steps=1, batch=6)
  tx = samx.fsam(optax.sgd(LR), micro_shards=4)
  with pytest.raises(ValueError, match=r"batch size 6 must be divisible by micro_shards=4"):
    jax.eval_shape(_micro_step(tx), params, tx.init(params), batches[0])


def test_losses_of_the_wrong_shape_name_the_argument():
  params, batches = _setup(steps=1)
  tx = samx.esam(optax.sgd(LR), micro_shards=K)
  zeros = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError, match=r"losses must be the \(16,\) per-example losses"):
    jax.eval_shape(
      lambda p, s: tx.update(
        zeros, s, p, per_example_loss_fn=per_example_loss, batch=batches[0], losses=jnp.ones(3)
      ),
      params,
      tx.init(params),
    )


@pytest.mark.parametrize(
  "make, error, pattern",
  [
    (lambda: samx.sam(optax.sgd(LR), micro_shards=0), ValueError, "micro_shards must be"),
    (lambda: samx.vasso(optax.sgd(LR), micro_shards=2.0), TypeError, "micro_shards must be"),
    (
      lambda: samx.fsam(optax.sgd(LR), axis_name="d", micro_shards=2),
      ValueError,
      "sync_ascent must be False",
    ),
  ],
)
def test_bad_configuration(make, error, pattern):
  with pytest.raises(error, match=pattern):
    make()


def test_inject_hyperparams_leaves_the_default_alone_and_explains_an_explicit_value():
  params, _ = _setup(steps=1)
  optax.inject_hyperparams(samx.fsam)(optax.sgd(LR), rho=0.1).init(params)
  injected = optax.inject_hyperparams(samx.fsam, static_args="micro_shards")
  state = injected(optax.sgd(LR), rho=0.1, micro_shards=K).init(params)
  assert state.inner_state.ascent_state[0].count.shape == (K,)
  with pytest.raises(TypeError, match=r"static_args=\('micro_shards',\)"):
    optax.inject_hyperparams(samx.fsam)(optax.sgd(LR), rho=0.1, micro_shards=K).init(params)


def test_micro_shards_need_the_per_example_contract():
  params, batches = _setup(steps=1)
  tx = samx.gsam(optax.sgd(LR), micro_shards=K)
  with pytest.raises(TypeError, match="per_example_loss_fn and batch"):
    tx.update(params, tx.init(params), params, grad_fn=lambda p: p)


# ---------------------------------------------------------------------------------------
# Devices x micro-shards under shard_map.


def _shard_map_run(tx, params, batches, *, check_vma):
  """Per-device states (stacked on a leading device axis), the batch split over "d"."""
  mesh = jax.make_mesh((DEVICES,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  inner = _micro_step(tx)

  def step(params, state, batch):
    params, state = inner(params, jax.tree.map(lambda x: x[0], state), batch)
    return params, jax.tree.map(lambda x: x[None], state)

  state = jax.tree.map(lambda x: jnp.broadcast_to(x, (DEVICES, *x.shape)), tx.init(params))
  with jax.set_mesh(mesh):
    sharded = jax.jit(
      jax.shard_map(
        step,
        in_specs=(P(), P("d"), P("d")),
        out_specs=(P(), P("d")),
        check_vma=check_vma,
      )
    )
    for batch in batches:
      params, state = sharded(params, state, jax.device_put(batch, NamedSharding(mesh, P("d"))))
  return params, state


def test_devices_times_micro_shards_per_shard_state():
  # 8 devices x 2 micro-shards = 16 shards of 2 examples, each with its own F-SAM EMA.
  # Under replication checking (check_vma=True) the parameters are replicated: samx
  # takes the shards' gradients w.r.t. varying parameters, so they stay local.
  k = 2
  factory, kwargs, kind = VARIANTS["fsam"]
  params, batches = _setup(batch=32)
  expected, ref_states = reference_run(
    factory(optax.sgd(LR), **kwargs), kind, params, batches, DEVICES * k
  )
  tx = factory(optax.sgd(LR), **kwargs, axis_name="d", sync_ascent=False, micro_shards=k)
  actual, state = _shard_map_run(tx, params, batches, check_vma=True)
  assert helpers.relative_error(actual, helpers.to_numpy(expected)) < 1e-5
  for d in range(DEVICES):
    for j in range(k):
      _assert_close(_shard_state(state.ascent_state, d, j), ref_states[d * k + j].ascent_state)


def test_devices_times_micro_shards_with_a_combination():
  # LookSAM over 8 devices x 2 micro-shards: g and g_s averaged over both, g_v global.
  k = 2
  factory, kwargs, combine = COMBINED["looksam"]
  params, batches = _setup(batch=32)
  expected = combine_reference(combine, params, batches, DEVICES * k, kwargs["rho"])
  tx = factory(optax.sgd(LR), **kwargs, axis_name="d", sync_ascent=False, micro_shards=k)
  actual, _ = _shard_map_run(tx, params, batches, check_vma=False)
  assert helpers.relative_error(actual, expected) < 1e-5


# ---------------------------------------------------------------------------------------
# optax conformance (tests/test_conformance.py) with micro-shards.

CONFORMANCE = {
  "fsam_micro_shards": (
    samx.fsam,
    {"optimizer": optax.sgd(0.1, momentum=0.9), "rho": 0.2, "decay": 0.6, "micro_shards": 2},
  ),
  "ssam_micro_shards": (
    samx.ssam,
    {
      "optimizer": optax.sgd(0.1, momentum=0.9),
      "rho": 0.05,
      "num_samples": 4,
      "micro_shards": 2,
    },
  ),
  "looksam_micro_shards": (
    samx.looksam,
    {"optimizer": optax.sgd(0.1), "rho": 0.05, "k": 2, "micro_shards": 4},
  ),
}

CHECKS = [
  "test_unknown_extra_args_and_no_recompilation",
  "test_inject_hyperparams_gives_identical_results",
  "test_state_stable_through_lax_cond",
]


@pytest.fixture
def registered(monkeypatch):
  conformance.register(monkeypatch, optimizers=CONFORMANCE, per_example=CONFORMANCE)


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize(
  ("name", "check"),
  [("fsam_micro_shards", check) for check in CHECKS]
  + [("ssam_micro_shards", CHECKS[0]), ("looksam_micro_shards", CHECKS[2])],
)
def test_conformance(name, check):
  getattr(conformance, check)(name)


@pytest.mark.usefixtures("registered")
def test_conformance_dtypes():
  conformance.test_dtypes_preserved("fsam_micro_shards", jnp.bfloat16)
