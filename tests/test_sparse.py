"""SSAM (samx.sparse): Fisher and dynamic masks and their patterns, against NumPy references."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import samx
from samx import sparse
from tests import helpers
from tests import test_conformance as conformance

LR, MOMENTUM, RHO = 0.1, 0.9, 0.05
KEYS = ("W1", "W2", "b1")  # jax.tree.leaves order of the helpers' params


per_example_loss = helpers.per_example_loss


def np_fisher(params, batch, num_samples):
  """Brute force: one hand-derived gradient per example, squared and summed."""
  x, y = batch
  grads = [helpers.grad_numpy(params, (x[n : n + 1], y[n : n + 1])) for n in range(num_samples)]
  return {k: sum(g[k] ** 2 for g in grads) for k in params}


def np_top_k(scores, k):
  """The k largest entries over the leaves in KEYS order; ties to the earlier entry."""
  flat = np.concatenate([np.ravel(scores[key]) for key in KEYS])
  keep = np.zeros(flat.size, bool)
  keep[np.argsort(-flat, kind="stable")[:k]] = True
  out, start = {}, 0
  for key in KEYS:
    size = np.size(scores[key])
    out[key] = keep[start : start + size].reshape(np.shape(scores[key]))
    start += size
  return out


def np_ssam_fisher_run(params, batches, *, sparsity, num_samples, refresh_every):
  """SSAM-F + SGD momentum from the equations, masks from np_fisher / np_top_k."""
  params = dict(params)
  total = sum(v.size for v in params.values())
  trace = {k: np.zeros_like(v) for k, v in params.items()}
  masks = []
  for t, batch in enumerate(batches):
    if t % refresh_every == 0:
      mask = np_top_k(np_fisher(params, batch, num_samples), round((1 - sparsity) * total))
    masks.append(mask)
    g = helpers.grad_numpy(params, batch)
    norm = helpers.np_norm(g)
    e = {k: RHO * g[k] * mask[k] / (norm + 1e-12) for k in params}
    gs = helpers.grad_numpy({k: params[k] + e[k] for k in params}, batch)
    trace = {k: gs[k] + MOMENTUM * trace[k] for k in params}
    params = {k: params[k] - LR * trace[k] for k in params}
  return params, masks


def run_per_example(tx, params, batches):
  """Jitted steps with the second contract; returns the params and each step's state."""

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(helpers.loss_jax)(params, batch)
    updates, state = tx.update(
      grads, state, params, per_example_loss_fn=per_example_loss, batch=batch
    )
    return optax.apply_updates(params, updates), state

  state, states = tx.init(params), []
  for batch in batches:
    params, state = step(params, state, batch)
    states.append(state)
  return params, states


def _batches(n, seed=1):
  return [helpers.make_problem(seed + i)[1] for i in range(n)]


def _mask_of(state):
  return state.ascent_state[1].mask


def _sgd():
  return optax.sgd(LR, momentum=MOMENTUM)


PARAMS0, _ = helpers.make_problem(0)
TOTAL = sum(v.size for v in PARAMS0.values())  # 63


# ---------------------------------------------------------------------------------------
# Pure mask functions


def test_top_k_is_exact_and_breaks_ties_by_order():
  scores = {"a": jnp.array([1.0, 2.0, 2.0]), "b": jnp.array([[2.0, 0.5], [2.0, 3.0]])}
  chosen = sparse.top_k_mask(scores, 3)
  np.testing.assert_array_equal(chosen["a"], [False, True, True])  # 2.0s of "a" come first
  np.testing.assert_array_equal(chosen["b"], [[False, False], [False, True]])
  for k in range(8):
    assert sum(int(m.sum()) for m in jax.tree.leaves(sparse.top_k_mask(scores, k))) == k
  traced = jax.jit(sparse.top_k_mask)(scores, jnp.asarray(4))
  assert sum(int(m.sum()) for m in jax.tree.leaves(traced)) == 4


def np_n_m(scores, n, m, input_axis=-2):
  """N:M by explicit loops over every group of m consecutive input channels."""
  s = np.moveaxis(np.asarray(scores), input_axis, -1)
  keep = np.zeros(s.shape, bool)
  for index in np.ndindex(*s.shape[:-1]):
    for start in range(0, s.shape[-1], m):
      group = s[index][start : start + m]
      best = np.argsort(-group, kind="stable")[:n]
      keep[index + (start + best,)] = True
  return np.moveaxis(keep, -1, input_axis)


@pytest.mark.parametrize(
  ("shape", "n", "m"),
  [((12, 5), 2, 4), ((2, 3, 6, 4), 1, 3)],
  ids=["dense-2:4", "conv-1:3"],
)
def test_n_m_keeps_the_right_positions(shape, n, m):
  scores = jax.random.normal(jax.random.key(sum(shape)), shape)
  n_m_mask = jax.jit(sparse.n_m_mask, static_argnums=(1, 2))
  chosen = n_m_mask({"kernel": scores, "bias": jnp.zeros(shape[-1])}, n, m)
  np.testing.assert_array_equal(chosen["kernel"], np_n_m(scores, n, m))
  assert chosen["bias"].all()
  # Every (output, kernel position) keeps n of every m consecutive input channels.
  groups = np.moveaxis(np.asarray(chosen["kernel"]), -2, -1).reshape(-1, m)
  assert (groups.sum(-1) == n).all()


def test_n_m_groups_run_along_the_input_axis_of_a_conv_kernel():
  # [kh, kw, in, out]: the best input channel of each group differs per output channel.
  scores = np.zeros((1, 1, 4, 2))
  scores[0, 0, :, 0] = [0.0, 9.0, 1.0, 0.0]  # output 0 prefers inputs 1 and 2
  scores[0, 0, :, 1] = [5.0, 0.0, 0.0, 7.0]  # output 1 prefers inputs 0 and 3
  chosen = np.asarray(sparse.n_m_mask(jnp.asarray(scores), 1, 2))
  np.testing.assert_array_equal(chosen[0, 0, :, 0], [False, True, True, False])
  np.testing.assert_array_equal(chosen[0, 0, :, 1], [True, False, False, True])


def test_structured_covers_the_target_with_whole_leaves():
  scores = {
    "a": jnp.full((10,), 1.0),
    "b": jnp.full((3, 3), 5.0),
    "c": jnp.full((20,), 0.5),
    "d": jnp.full((4,), 2.0),
  }
  total = 43
  structured_mask = jax.jit(sparse.structured_mask)
  for sparsity in (0.0, 0.3, 0.5, 0.8, 0.95):
    k = round((1 - sparsity) * total)
    chosen = structured_mask(scores, k)
    on = {key for key, m in chosen.items() if bool(m.all())}
    assert all(bool(m.all()) or not bool(m.any()) for m in chosen.values())  # whole leaves
    covered = sum(int(np.size(scores[key])) for key in on)
    assert covered >= k
    # The best leaves by mean score, and no more than needed.
    means = {key: float(v.mean()) for key, v in scores.items()}
    assert all(means[a] >= means[b] for a in on for b in set(scores) - on)
    if on:
      worst = min(on, key=means.get)
      assert covered - int(np.size(scores[worst])) < k


# ---------------------------------------------------------------------------------------
# Fisher masks


def test_fisher_information_matches_brute_force():
  expected = np_fisher(PARAMS0, _batches(1)[0], 6)
  with jax.enable_x64(True):
    params = helpers.to_jax(PARAMS0, jnp.float64)
    batch = helpers.to_jax(_batches(1)[0], jnp.float64)
    for chunk_size in (None, 3):
      fisher = sparse.fisher_information(
        per_example_loss, params, batch, num_samples=6, chunk_size=chunk_size
      )
      for key in KEYS:
        np.testing.assert_allclose(fisher[key], expected[key], rtol=1e-12)


@pytest.mark.parametrize("sparsity", [0.9])
def test_ssam_fisher_matches_numpy_float64(sparsity):
  batches = _batches(4)
  expected, expected_masks = np_ssam_fisher_run(
    PARAMS0, batches, sparsity=sparsity, num_samples=8, refresh_every=2
  )
  tx = sparse.ssam(_sgd(), rho=RHO, sparsity=sparsity, num_samples=8, refresh_every=2)
  with jax.enable_x64(True):
    actual, states = run_per_example(
      tx, helpers.to_jax(PARAMS0, jnp.float64), helpers.to_jax(batches, jnp.float64)
    )
  assert helpers.relative_error(actual, expected) < 1e-12
  kept = round((1 - sparsity) * TOTAL)
  for state, mask in zip(states, expected_masks, strict=True):
    for key in KEYS:
      np.testing.assert_array_equal(_mask_of(state)[key], mask[key])
    assert sum(int(m.sum()) for m in jax.tree.leaves(_mask_of(state))) == kept
  assert any(  # the refresh at step 2 changed the mask
    not np.array_equal(_mask_of(states[1])[k], _mask_of(states[2])[k]) for k in KEYS
  )


def test_ssam_fisher_float32_and_grad_fn_contract():
  batches = helpers.to_jax(_batches(2), jnp.float32)
  params = helpers.to_jax(PARAMS0, jnp.float32)
  expected, _ = np_ssam_fisher_run(
    PARAMS0, _batches(2), sparsity=0.5, num_samples=16, refresh_every=100
  )
  tx = sparse.ssam(_sgd(), rho=RHO, sparsity=0.5, num_samples=None)
  actual, _ = run_per_example(tx, params, batches)
  assert helpers.relative_error(actual, expected) < 1e-6

  # grad_fn given as well: g_s comes from it, with the same result.
  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(helpers.loss_jax)(params, batch)
    updates, state = tx.update(
      grads,
      state,
      params,
      grad_fn=lambda p: jax.grad(helpers.loss_jax)(p, batch),
      per_example_loss_fn=per_example_loss,
      batch=batch,
    )
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for batch in batches:
    params, state = step(params, state, batch)
  assert helpers.relative_error(params, expected) < 1e-6


def test_fisher_refresh_runs_only_on_refresh_steps():
  calls = []

  def counted_loss(params, batch):
    jax.debug.callback(lambda: calls.append(1))
    return per_example_loss(params, batch)

  tx = sparse.ssam(_sgd(), rho=RHO, sparsity=0.5, num_samples=4, refresh_every=3)
  params = helpers.to_jax(PARAMS0, jnp.float32)
  batch = helpers.to_jax(_batches(1)[0], jnp.float32)

  @jax.jit
  def step(params, state):
    grads = jax.grad(helpers.loss_jax)(params, batch)
    updates, state = tx.update(
      grads,
      state,
      params,
      grad_fn=lambda p: jax.grad(helpers.loss_jax)(p, batch),
      per_example_loss_fn=counted_loss,
      batch=batch,
    )
    return optax.apply_updates(params, updates), state

  state, refreshed = tx.init(params), []
  for _ in range(7):
    before = len(calls)
    params, state = step(params, state)
    jax.effects_barrier()
    refreshed.append(len(calls) > before)
  assert refreshed == [True, False, False, True, False, False, True]


def test_fisher_n_m_end_to_end_on_a_conv_net():
  # A small conv net: conv kernel [3, 3, 4, 8], dense kernel [8, 4], two biases.
  rng = np.random.default_rng(0)
  params = {
    "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)) * 0.3, jnp.float32)},
    "dense": {"kernel": jnp.asarray(rng.normal(size=(8, 4)) * 0.3, jnp.float32)},
  }
  params["conv"]["bias"], params["dense"]["bias"] = jnp.zeros(8), jnp.zeros(4)

  def losses(params, batch):
    # The 3x3 convolution evaluated at one output position (a 3x3 input patch).
    x, y = batch
    h = jnp.einsum("bhwi,hwio->bo", x, params["conv"]["kernel"])
    h = jnp.tanh(h + params["conv"]["bias"][None, :])
    out = h @ params["dense"]["kernel"] + params["dense"]["bias"][None, :]
    return jnp.sum((out - y) ** 2, axis=-1)

  batch = (jnp.asarray(rng.normal(size=(6, 3, 3, 4)), jnp.float32), jnp.ones((6, 4)))
  # Brute-force Fisher: one jax.grad per example, in a Python loop.
  example_grad = jax.jit(jax.grad(lambda p, one: losses(p, one)[0]))
  fisher = jax.tree.map(jnp.zeros_like, params)
  for n in range(4):
    g = example_grad(params, jax.tree.map(lambda x, n=n: x[n : n + 1], batch))
    fisher = jax.tree.map(lambda f, gi: f + gi**2, fisher, g)

  tx = sparse.fisher_mask(pattern="2:4", num_samples=4, refresh_every=5)
  update = jax.jit(lambda u, s, p, b: tx.update(u, s, p, per_example_loss_fn=losses, batch=b))
  u, state = update(jax.tree.map(jnp.ones_like, params), tx.init(params), params, batch)
  for layer in ("conv", "dense"):
    np.testing.assert_array_equal(
      state.mask[layer]["kernel"], np_n_m(fisher[layer]["kernel"], 2, 4)
    )
    assert state.mask[layer]["bias"].all()
  for update, mask in zip(jax.tree.leaves(u), jax.tree.leaves(state.mask), strict=True):
    np.testing.assert_array_equal(np.asarray(update) != 0, mask)


def test_fisher_structured_end_to_end():
  batch = _batches(1)[0]
  fisher = np_fisher(PARAMS0, batch, 8)
  means = {k: float(v.mean()) for k, v in fisher.items()}
  tx = sparse.fisher_mask(0.5, pattern="structured", num_samples=8)
  params = helpers.to_jax(PARAMS0, jnp.float32)
  update = jax.jit(
    lambda s, b: tx.update(params, s, params, per_example_loss_fn=per_example_loss, batch=b)
  )
  _, state = update(tx.init(params), helpers.to_jax(batch, jnp.float32))
  # W1 (35 entries) and W2 (21) and b1 (7): by mean Fisher, until >= 32 entries.
  order = sorted(KEYS, key=lambda k: -means[k])
  on, covered = set(), 0
  for key in order:
    if covered >= 32:
      break
    on.add(key)
    covered += PARAMS0[key].size
  for key in KEYS:
    assert bool(state.mask[key].all()) == (key in on)
    assert bool(state.mask[key].any()) == (key in on)


class BatchNormMLP(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, use_running_average=False, momentum=0.9, rngs=rngs)
    self.b = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.b(jnp.tanh(self.bn(self.a(x))))


def test_fisher_refresh_leaves_batch_norm_statistics_untouched():
  model = BatchNormMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
    model, sparse.ssam(_sgd(), rho=RHO, sparsity=0.5, num_samples=8), wrt=nnx.Param
  )
  x = jax.random.normal(jax.random.key(1), (16, 4))
  y = jax.random.randint(jax.random.key(2), (16,), 0, 3)

  def loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  @nnx.jit
  def train_step(model, optimizer, x, y):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.as_pure(rest)

    def per_example_loss_fn(params, batch):
      copy = nnx.merge(graphdef, params, rest, copy=True)
      return optax.softmax_cross_entropy_with_integer_labels(copy(batch[0]), batch[1])

    grads = nnx.grad(loss)(model, x, y)  # the clean pass writes the statistics once
    optimizer.update(model, grads, per_example_loss_fn=per_example_loss_fn, batch=(x, y))

  clean_only = nnx.clone(model)
  nnx.jit(lambda m, x: m(x))(clean_only, x)
  params_before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  train_step(model, optimizer, x, y)
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-8),
    nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
    nnx.to_pure_dict(nnx.state(clean_only, nnx.BatchStat)),
  )
  params_after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), params_after, params_before)
  # Every parameter moved but the bias right before BatchNorm, which has no gradient.
  assert moved == {
    "a": {"bias": False, "kernel": True},
    "bn": {"bias": True, "scale": True},
    "b": {"bias": True, "kernel": True},
  }
  mask = nnx.as_pure(optimizer.opt_state.ascent_state[1].mask)
  assert sum(int(m.sum()) for m in jax.tree.leaves(mask)) == round(
    0.5 * sum(int(np.size(p)) for p in jax.tree.leaves(params_before))
  )


# ---------------------------------------------------------------------------------------
# Dynamic masks


def test_dynamic_mask_keeps_density_and_drops_the_smallest():
  sparsity, alpha, total_steps = 0.7, 0.5, 12
  kept = round((1 - sparsity) * TOTAL)
  tx = sparse.ssam(
    _sgd(),
    rho=RHO,
    sparsity=sparsity,
    mask_type="dynamic",
    drop_fraction=alpha,
    total_steps=total_steps,
    refresh_every=2,
    seed=3,
  )
  params = helpers.to_jax(PARAMS0, jnp.float32)
  state = tx.init(params)
  assert sum(int(m.sum()) for m in jax.tree.leaves(_mask_of(state))) == kept

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(helpers.loss_jax)(params, batch)
    updates, state = tx.update(
      grads, state, params, grad_fn=lambda p: jax.grad(helpers.loss_jax)(p, batch)
    )
    return optax.apply_updates(params, updates), state, grads

  for t, batch in enumerate(helpers.to_jax(_batches(7), jnp.float32)):
    old, old_key = _mask_of(state), state.ascent_state[1].key
    params, state, grads = step(params, state, batch)
    new = _mask_of(state)
    old_flat = np.concatenate([np.ravel(m) for m in jax.tree.leaves(old)])
    new_flat = np.concatenate([np.ravel(m) for m in jax.tree.leaves(new)])
    assert new_flat.sum() == kept
    if t % 2:
      np.testing.assert_array_equal(new_flat, old_flat)
      np.testing.assert_array_equal(state.ascent_state[1].key, old_key)
      continue
    alpha_t = alpha * (1 + math.cos(math.pi * min(t / total_steps, 1.0))) / 2
    dropped, grown = old_flat & ~new_flat, new_flat & ~old_flat
    assert dropped.sum() == grown.sum() == math.floor(alpha_t * kept)
    magnitude = np.concatenate([np.abs(np.ravel(g)) for g in jax.tree.leaves(grads)])
    survivors = old_flat & new_flat
    assert magnitude[dropped].max() <= magnitude[survivors].min()
    assert not np.array_equal(state.ascent_state[1].key, old_key)


def test_dynamic_initial_masks_are_random_with_exact_density():
  params = helpers.to_jax(PARAMS0, jnp.float32)
  masks = [
    np.concatenate(
      [np.ravel(m) for m in jax.tree.leaves(sparse.dynamic_mask(0.6, seed=s).init(params).mask)]
    )
    for s in range(3)
  ]
  assert all(m.sum() == round(0.4 * TOTAL) for m in masks)
  assert not np.array_equal(masks[0], masks[1])


# ---------------------------------------------------------------------------------------
# Reductions: sparsity 0 (or M:M) is SAM.


@pytest.mark.parametrize(
  "kwargs",
  [
    {"sparsity": 0.0},
    {"sparsity": 0.0, "pattern": "structured"},
    {"sparsity": 0.0, "mask_type": "dynamic", "refresh_every": 1},
  ],
  ids=["unstructured", "structured", "dynamic"],
)
def test_sparsity_zero_is_sam(kwargs):
  params = helpers.to_jax(PARAMS0, jnp.float32)
  batches = helpers.to_jax(_batches(3), jnp.float32)
  actual, _ = run_per_example(
    sparse.ssam(_sgd(), rho=0.08, num_samples=4, **kwargs), params, batches
  )
  assert helpers.relative_error(actual, _sam_reference()) < 1e-7


@functools.cache
def _sam_reference():
  params = helpers.to_jax(PARAMS0, jnp.float32)
  batches = helpers.to_jax(_batches(3), jnp.float32)
  return helpers.to_numpy(helpers.run_steps(samx.sam(_sgd(), rho=0.08), params, batches)[0])


# ---------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
  "make, error, pattern",
  [
    (
      lambda: sparse.ssam(_sgd(), sparsity=1.0),
      ValueError,
      r"sparsity must be in \[0, 1\).*1.0",
    ),
    (lambda: sparse.ssam(_sgd(), sparsity=-0.1), ValueError, r"sparsity must be in \[0, 1\)"),
    (
      lambda: sparse.ssam(_sgd(), sparsity=1.0, mask_type="dynamic"),
      ValueError,
      r"sparsity must be in \[0, 1\)",
    ),
    (lambda: sparse.ssam(_sgd(), pattern="5:4"), ValueError, r"1 <= N <= M.*pattern='5:4'"),
    (lambda: sparse.ssam(_sgd(), pattern="2-4"), ValueError, r"pattern must be .*'2-4'"),
    (
      lambda: sparse.ssam(_sgd(), pattern="2:4", sparsity=0.5),
      ValueError,
      r"leave sparsity=None",
    ),
    (lambda: sparse.ssam(_sgd(), mask_type="grad"), ValueError, r"mask_type must be one of"),
    (
      lambda: sparse.ssam(_sgd(), mask_type="dynamic", pattern="structured"),
      ValueError,
      r"dynamic masks are unstructured.*pattern='structured'",
    ),
    (
      lambda: sparse.ssam(_sgd(), refresh_every=0),
      ValueError,
      r"refresh_every must be an integer",
    ),
    (lambda: sparse.ssam(_sgd(), num_samples=0), ValueError, r"num_samples must be a positive"),
    (lambda: sparse.ssam(_sgd(), rho=-1.0), ValueError, r"rho must be a non-negative"),
    (
      lambda: sparse.dynamic_mask(drop_fraction=1.5),
      ValueError,
      r"drop_fraction must be in \[0, 1\]",
    ),
  ],
)
def test_bad_configuration(make, error, pattern):
  with pytest.raises(error, match=pattern):
    make()


def test_m_not_dividing_the_input_dimension_names_the_pattern_and_leaf():
  params = {"conv": {"kernel": jnp.ones((3, 3, 6, 8))}, "bias": jnp.ones(8)}
  tx = sparse.ssam(_sgd(), pattern="2:4")
  with pytest.raises(
    ValueError, match=r"pattern='2:4' groups M=4.*'conv/kernel' of shape \(3, 3, 6, 8\) has 6"
  ):
    tx.init(params)


def test_missing_per_example_arguments_are_named():
  params = helpers.to_jax(PARAMS0, jnp.float32)
  tx = sparse.ssam(_sgd(), num_samples=4)
  grads = jax.tree.map(jnp.ones_like, params)
  grad_fn = lambda p: grads
  with pytest.raises(TypeError, match=r"per_example_loss_fn and batch \(missing: per_example"):
    tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
  batch = helpers.to_jax(_batches(1)[0], jnp.float32)
  with pytest.raises(ValueError, match=r"num_samples=32 .* the batch has 16"):
    sparse.ssam(_sgd(), num_samples=32).update(
      grads, tx.init(params), params, per_example_loss_fn=per_example_loss, batch=batch
    )
  with pytest.raises(
    TypeError, match=r"needs the keyword argument grad_fn(.|\n)*or\n(.|\n)*batch"
  ):
    dynamic = sparse.ssam(_sgd(), mask_type="dynamic")
    dynamic.update(grads, dynamic.init(params), params)


def test_inject_hyperparams_needs_num_samples_static():
  params = helpers.to_jax(PARAMS0, jnp.float32)
  batch = helpers.to_jax(_batches(1)[0], jnp.float32)
  grads = jax.grad(helpers.loss_jax)(params, batch)
  kwargs = {"rho": RHO, "sparsity": 0.5, "num_samples": 8, "refresh_every": 2}
  tx = sparse.ssam(_sgd(), **kwargs)
  injected = optax.inject_hyperparams(sparse.ssam, static_args="num_samples")(_sgd(), **kwargs)
  step = lambda tx: jax.jit(
    lambda s: tx.update(grads, s, params, per_example_loss_fn=per_example_loss, batch=batch)
  )
  expected, state = step(tx)(tx.init(params))
  actual, injected_state = step(injected)(injected.init(params))
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-8), actual, expected
  )
  for a, e in zip(
    jax.tree.leaves(injected_state.inner_state), jax.tree.leaves(state), strict=True
  ):
    np.testing.assert_array_equal(a, e)
  not_static = optax.inject_hyperparams(sparse.ssam)(_sgd(), **kwargs)
  with pytest.raises(TypeError, match=r"num_samples sets an array shape.*static_args"):
    step(not_static)(not_static.init(params))


# ---------------------------------------------------------------------------------------
# The optax conformance contract, reusing tests/test_conformance.py.

CONFORMANCE = {
  "ssam_fisher": (
    sparse.ssam,
    {"optimizer": _sgd(), "rho": RHO, "sparsity": 0.5, "num_samples": None, "refresh_every": 2},
  ),
  "ssam_dynamic": (
    sparse.ssam,
    {
      "optimizer": optax.adam(1e-2),
      "rho": RHO,
      "sparsity": 0.6,
      "mask_type": "dynamic",
      "refresh_every": 1,
      "total_steps": 10,
    },
  ),
}


@pytest.fixture
def registered(monkeypatch):
  conformance.register(monkeypatch, optimizers=CONFORMANCE, per_example=("ssam_fisher",))


CHECKS = conformance.NAMED_CHECKS
# The dynamic mask shares the Fisher mask's plumbing (the alias, the evaluation, the
# refresh under lax.cond); the last checks run for the Fisher mask only.
CONFORMANCE_CASES = [("ssam_fisher", check) for check in CHECKS] + [
  ("ssam_dynamic", check) for check in CHECKS[:3]
]


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize(("name", "check"), CONFORMANCE_CASES)
def test_conformance(name, check):
  getattr(conformance, check)(name)


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize(
  ("name", "dtype"),
  [("ssam_fisher", jnp.bfloat16), ("ssam_fisher", jnp.float32), ("ssam_dynamic", jnp.bfloat16)],
)
def test_conformance_dtypes(name, dtype):
  conformance.test_dtypes_preserved(name, dtype)
