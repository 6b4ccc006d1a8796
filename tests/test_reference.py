"""SAM and ASAM against an independent NumPy float64 reference written from the equations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samx
from tests import helpers

LR, MOMENTUM = 0.1, 0.9


def _np_asam_t(params, eta, mask, layerwise):
  def t(name, w):
    if not mask[name]:
      return np.ones_like(w)
    return (np.sqrt(np.sum(w**2)) if layerwise else np.abs(w)) + eta

  return {k: t(k, w) for k, w in params.items()}


def np_perturbation(params, g, *, rho, eps=1e-12, ball="l2", asam=None):
  """eps of SAM (asam=None) or ASAM (asam=dict(eta, mask, layerwise)), from VARIANTS.md."""
  if isinstance(rho, dict):
    radius = rho
  else:
    radius = {k: rho for k in params}
  if asam is None:
    t = {k: np.ones_like(w) for k, w in params.items()}
  else:
    t = _np_asam_t(params, **asam)
  if ball == "linf":
    return {k: radius[k] * t[k] * np.sign(g[k]) for k in params}
  tg = {k: t[k] * g[k] for k in params}
  norm = helpers.np_norm(tg)
  return {k: radius[k] * t[k] * tg[k] / (norm + eps) for k in params}


def np_sam_run(params, batches, *, rho, lr=LR, momentum=MOMENTUM, **kwargs):
  """Several SAM/ASAM steps with SGD + heavy-ball momentum (optax's form)."""
  params = dict(params)
  trace = {k: np.zeros_like(v) for k, v in params.items()}
  for t, batch in enumerate(batches):
    g = helpers.grad_numpy(params, batch)
    r = rho(t) if callable(rho) else rho
    e = np_perturbation(params, g, rho=r, **kwargs)
    gs = helpers.grad_numpy({k: params[k] + e[k] for k in params}, batch)
    trace = {k: gs[k] + momentum * trace[k] for k in params}
    params = {k: params[k] - lr * trace[k] for k in params}
  return params


def _batches(n, seed=1):
  return [helpers.make_problem(seed + i)[1] for i in range(n)]


CASES = {
  "sam": (lambda: samx.sam(optax.sgd(LR, momentum=MOMENTUM), rho=0.05), {"rho": 0.05}),
  "sam_linf": (
    lambda: samx.sam(optax.sgd(LR, momentum=MOMENTUM), rho=0.01, ball="linf"),
    {"rho": 0.01, "ball": "linf"},
  ),
  "asam": (
    lambda: samx.asam(optax.sgd(LR, momentum=MOMENTUM)),
    {
      "rho": 0.5,
      "asam": {"eta": 0.01, "mask": {"W1": True, "b1": False, "W2": True}, "layerwise": False},
    },
  ),
  "asam_pytorch_form": (
    lambda: samx.asam(
      optax.sgd(LR, momentum=MOMENTUM),
      rho=0.3,
      eta=0.0,
      mask=lambda p: jax.tree.map(lambda _: True, p),
    ),
    {
      "rho": 0.3,
      "asam": {"eta": 0.0, "mask": {"W1": True, "b1": True, "W2": True}, "layerwise": False},
    },
  ),
  "asam_layerwise": (
    lambda: samx.asam(optax.sgd(LR, momentum=MOMENTUM), rho=0.2, eta=0.1, layerwise=True),
    {
      "rho": 0.2,
      "asam": {"eta": 0.1, "mask": {"W1": True, "b1": False, "W2": True}, "layerwise": True},
    },
  ),
  "asam_linf": (
    lambda: samx.asam(optax.sgd(LR, momentum=MOMENTUM), rho=0.05, ball="linf"),
    {
      "rho": 0.05,
      "ball": "linf",
      "asam": {"eta": 0.01, "mask": {"W1": True, "b1": False, "W2": True}, "layerwise": False},
    },
  ),
  "sam_per_leaf_rho": (
    lambda: samx.sam(optax.sgd(LR, momentum=MOMENTUM), rho={"W1": 0.1, "b1": 0.0, "W2": 0.03}),
    {"rho": {"W1": 0.1, "b1": 0.0, "W2": 0.03}},
  ),
  "sam_schedule_rho": (
    lambda: samx.sam(
      optax.sgd(LR, momentum=MOMENTUM), rho=lambda t: 0.02 + 0.05 * jnp.minimum(t, 4)
    ),
    {"rho": lambda t: 0.02 + 0.05 * min(t, 4)},
  ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("steps", [1, 5])
def test_matches_numpy_float32(case, steps):
  make_tx, reference_kwargs = CASES[case]
  params, _ = helpers.make_problem(0)
  batches = _batches(steps)
  expected = np_sam_run(params, batches, **reference_kwargs)
  actual, _ = helpers.run_steps(
    make_tx(), helpers.to_jax(params, jnp.float32), helpers.to_jax(batches, jnp.float32)
  )
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(actual))
  assert helpers.relative_error(actual, expected) < 1e-6
  # The step is not the identity: the perturbation changes the result.
  plain = helpers.run_steps(
    optax.sgd(LR, momentum=MOMENTUM),
    helpers.to_jax(params, jnp.float32),
    helpers.to_jax(batches, jnp.float32),
  )[0]
  assert helpers.relative_error(plain, expected) > 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_float64(case):
  make_tx, reference_kwargs = CASES[case]
  params, _ = helpers.make_problem(0)
  batches = _batches(3)
  expected = np_sam_run(params, batches, **reference_kwargs)
  with jax.enable_x64(True):
    actual, _ = helpers.run_steps(
      make_tx(), helpers.to_jax(params, jnp.float64), helpers.to_jax(batches, jnp.float64)
    )
    assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(actual))
  assert helpers.relative_error(actual, expected) < 1e-12


@pytest.mark.parametrize(
  "base",
  [optax.sgd(LR), optax.sgd(LR, momentum=MOMENTUM), optax.adam(1e-2)],
  ids=["sgd", "momentum", "adam"],
)
@pytest.mark.parametrize("alias", ["sam", "asam"])
def test_rho_zero_is_the_base_optimizer(base, alias):
  params, _ = helpers.make_problem(0)
  params = helpers.to_jax(params, jnp.float32)
  batches = helpers.to_jax(_batches(4), jnp.float32)
  tx = samx.sam(base, rho=0.0) if alias == "sam" else samx.asam(base, rho=0.0)
  actual, _ = helpers.run_steps(tx, params, batches)
  expected, _ = helpers.run_steps(base, params, batches)
  assert helpers.relative_error(actual, helpers.to_numpy(expected)) < 1e-7


def test_asam_with_unit_t_is_sam():
  # T = 1 everywhere: no leaf selected, so T_w is the identity.
  params, _ = helpers.make_problem(0)
  params = helpers.to_jax(params, jnp.float32)
  batches = helpers.to_jax(_batches(4), jnp.float32)
  base = optax.sgd(LR, momentum=MOMENTUM)
  no_leaves = lambda p: jax.tree.map(lambda _: False, p)
  actual, _ = helpers.run_steps(samx.asam(base, rho=0.07, mask=no_leaves), params, batches)
  expected, _ = helpers.run_steps(samx.sam(base, rho=0.07), params, batches)
  assert helpers.relative_error(actual, helpers.to_numpy(expected)) < 1e-7


@pytest.mark.parametrize("base", [optax.sgd(LR), optax.adam(1e-2)], ids=["sgd", "adam"])
def test_equals_optax_contrib_sam_opaque(base):
  rho = 0.05
  params, _ = helpers.make_problem(0)
  params = helpers.to_jax(params, jnp.float32)
  batches = helpers.to_jax(_batches(5), jnp.float32)
  contrib = optax.contrib.sam(
    base,
    optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
    opaque_mode=True,
  )

  @jax.jit
  def contrib_step(params, state, batch):
    grads = jax.grad(helpers.loss_jax)(params, batch)
    updates, state = contrib.update(
      grads, state, params, grad_fn=lambda p, _: jax.grad(helpers.loss_jax)(p, batch)
    )
    return optax.apply_updates(params, updates), state

  expected, state = params, contrib.init(params)
  for batch in batches:
    expected, state = contrib_step(expected, state, batch)
  actual, _ = helpers.run_steps(samx.sam(base, rho=rho), params, batches)
  assert helpers.relative_error(actual, helpers.to_numpy(expected)) < 1e-6


def test_zero_gradient_gives_zero_perturbation():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  seen = []

  def grad_fn(p):
    seen.append(p)
    return jax.tree.map(jnp.zeros_like, p)

  for tx in [samx.sam(optax.sgd(0.1)), samx.asam(optax.sgd(0.1))]:
    seen.clear()
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params, grad_fn=grad_fn)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    # grad_fn saw exactly the clean params: eps == 0, no NaN.
    assert all(
      bool(jnp.all(a == b))
      for a, b in zip(jax.tree.leaves(seen[0]), jax.tree.leaves(params), strict=True)
    )


def test_eps_underflowing_under_inject_hyperparams_is_reported():
  # inject_hyperparams casts eps to the params dtype; 1e-12 is 0 in float16.
  tx = optax.inject_hyperparams(samx.sam)(optax.sgd(0.1), rho=0.05)
  params = {"w": jnp.ones(3, jnp.float16)}
  zeros = {"w": jnp.zeros(3, jnp.float16)}
  with pytest.raises(ValueError, match="eps.*hyperparam_dtype"):
    tx.init(params)
  tx = optax.inject_hyperparams(samx.sam, hyperparam_dtype=jnp.float32)(optax.sgd(0.1))
  updates, _ = tx.update(zeros, tx.init(params), params, grad_fn=lambda p: zeros)
  assert updates["w"].dtype == jnp.float16
  assert bool(jnp.all(updates["w"] == 0))


def test_safe_inverse_never_divides_by_zero():
  inverse = samx.numerics.safe_inverse(jnp.array([0.0, 4.0, -1.0]))
  np.testing.assert_array_equal(np.asarray(inverse), [0.0, 0.25, 0.0])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_norm_accumulates_in_float32(dtype):
  # 300^2 * 4 overflows float16 (max 65504); the float32 norm does not.
  g = {"w": jnp.full((4,), 300.0, dtype)}
  tx = samx.scale_by_sam(rho=1.0)
  eps, _ = tx.update(g, tx.init(g))
  assert eps["w"].dtype == dtype
  np.testing.assert_allclose(np.asarray(eps["w"], np.float32), 0.5, rtol=1e-2)


def test_schedule_rho_is_evaluated_at_the_step_count():
  schedule = optax.linear_schedule(0.1, 0.5, 4)
  tx = samx.scale_by_sam(rho=schedule)
  g = {"w": jnp.array([3.0, 4.0])}
  state = tx.init(g)
  for t in range(6):
    eps, state = tx.update(g, state)
    np.testing.assert_allclose(float(jnp.linalg.norm(eps["w"])), float(schedule(t)), rtol=1e-6)


def test_clipping_chained_before_samx_affects_only_the_ascent():
  # Global-norm clipping rescales g; the ascent normalises it away and g_s is not
  # clipped, so the step equals unclipped SAM. (Per-leaf clipping would change eps.)
  params, _ = helpers.make_problem(0)
  params = helpers.to_jax(params, jnp.float32)
  batches = helpers.to_jax(_batches(3), jnp.float32)
  base = optax.sgd(LR, momentum=MOMENTUM)
  clipped = optax.chain(optax.clip_by_global_norm(1e-3), samx.sam(base, rho=0.05))
  actual, _ = helpers.run_steps(clipped, params, batches)
  expected, _ = helpers.run_steps(samx.sam(base, rho=0.05), params, batches)
  assert helpers.relative_error(actual, helpers.to_numpy(expected)) < 1e-6
  # Clipping after samx clips the update itself.
  after = optax.chain(samx.sam(base, rho=0.05), optax.clip_by_global_norm(1e-3))
  clipped_after, _ = helpers.run_steps(after, params, batches)
  assert helpers.relative_error(clipped_after, helpers.to_numpy(expected)) > 1e-3
