"""F-SAM, VaSSO and the random direction: NumPy float64 references, reductions, conformance.

The references are written from VARIANTS.md (F-SAM in the official code's order), with
the hand-derived gradient of ``tests.helpers``; they share nothing with samx.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samx
from samx.directions import (
  fsam,
  fsam_direction,
  random_direction,
  random_sam,
  vasso,
  vasso_direction,
)
from tests import helpers

LR, MOMENTUM = 0.1, 0.9


# ------------------------------------------------------------------ NumPy references


def np_fsam(sigma, decay, *, update_ema_with_modified=False):
  """F-SAM's direction as a stateful function g -> d.

  ``update_ema_with_modified=True`` is the bug of a popular PyTorch port (the EMA
  absorbs d_t instead of the raw g_t); used only to show the tests tell them apart.
  """
  ema = None

  def direction(g):
    nonlocal ema
    if ema is None:
      ema = dict(g)
      return dict(g)
    d = {k: g[k] - sigma * ema[k] for k in g}
    absorbed = d if update_ema_with_modified else g
    ema = {k: decay * ema[k] + (1 - decay) * absorbed[k] for k in g}
    return d

  return direction


def np_vasso(theta):
  """VaSSO's direction as a stateful function g -> d."""
  previous = None

  def direction(g):
    nonlocal previous
    if previous is None:
      previous = dict(g)
    else:
      previous = {k: (1 - theta) * previous[k] + theta * g[k] for k in g}
    return previous

  return direction


def np_sam_direction():
  return lambda g: g


def np_run(params, batches, direction, *, rho, eps=1e-12, asam_eta=None):
  """Steps of SGD + heavy-ball momentum (optax's form) on g_s, with eps from ``direction``.

  ``asam_eta`` applies ASAM's T_w = |w| + eta to the leaves with ndim >= 2 around the
  normalisation: eps = rho * T (T u) / (||T u|| + eps).
  """
  params = dict(params)
  trace = {k: np.zeros_like(v) for k, v in params.items()}
  for batch in batches:
    g = helpers.grad_numpy(params, batch)
    u = direction(g)
    if asam_eta is None:
      t = {k: np.ones_like(w) for k, w in params.items()}
    else:
      t = {
        k: np.abs(w) + asam_eta if w.ndim >= 2 else np.ones_like(w) for k, w in params.items()
      }
    tu = {k: t[k] * u[k] for k in params}
    norm = helpers.np_norm(tu)
    e = {k: rho * t[k] * tu[k] / (norm + eps) for k in params}
    gs = helpers.grad_numpy({k: params[k] + e[k] for k in params}, batch)
    trace = {k: gs[k] + MOMENTUM * trace[k] for k in params}
    params = {k: params[k] - LR * trace[k] for k in params}
  return params


def _batches(n, seed=1):
  return [helpers.make_problem(seed + i)[1] for i in range(n)]


def _base():
  return optax.sgd(LR, momentum=MOMENTUM)


def _fsam_asam(sigma, decay, rho, eta):
  magnitude = samx.scale_by_weight_magnitude(eta)
  ascent = optax.chain(
    fsam_direction(sigma, decay), magnitude, samx.scale_by_sam(rho), magnitude
  )
  return samx.sharpness_aware(_base(), ascent)


CASES = {
  "fsam_default": (lambda: fsam(_base()), lambda: np_fsam(1.0, 0.9), {"rho": 0.1}),
  "fsam_script": (
    lambda: fsam(_base(), rho=0.2, sigma=0.5, decay=0.6),
    lambda: np_fsam(0.5, 0.6),
    {"rho": 0.2},
  ),
  "vasso_default": (lambda: vasso(_base()), lambda: np_vasso(0.9), {"rho": 0.05}),
  "vasso_slow": (
    lambda: vasso(_base(), rho=0.1, theta=0.3),
    lambda: np_vasso(0.3),
    {"rho": 0.1},
  ),
  "fsam_direction_with_asam": (
    lambda: _fsam_asam(1.0, 0.9, 0.5, 0.01),
    lambda: np_fsam(1.0, 0.9),
    {"rho": 0.5, "asam_eta": 0.01},
  ),
}


# Float32 over 5 steps reaches ~1e-7 relative error: the perturbation's direction has
# O(1e-7) relative error (d_t = g_t - sigma m_{t-1} loses a few bits to cancellation),
# but it enters the step multiplied by rho * lr, and SGD's momentum accumulates only
# float32 round-off of the parameters themselves.
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_float32(case):
  make_tx, make_direction, kwargs = CASES[case]
  params, _ = helpers.make_problem(0)
  batches = _batches(5)
  expected = np_run(params, batches, make_direction(), **kwargs)
  actual, _ = helpers.run_steps(
    make_tx(), helpers.to_jax(params, jnp.float32), helpers.to_jax(batches, jnp.float32)
  )
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(actual))
  assert helpers.relative_error(actual, expected) < 1e-6
  # The variant is not SAM with the same radius: the direction matters.
  sam_expected = np_run(params, batches, np_sam_direction(), **kwargs)
  assert helpers.relative_error(sam_expected, expected) > 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_float64(case):
  make_tx, make_direction, kwargs = CASES[case]
  params, _ = helpers.make_problem(0)
  batches = _batches(5)
  expected = np_run(params, batches, make_direction(), **kwargs)
  with jax.enable_x64(True):
    actual, state = helpers.run_steps(
      make_tx(), helpers.to_jax(params, jnp.float64), helpers.to_jax(batches, jnp.float64)
    )
    assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(actual))
    assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(state) if v.ndim)
  assert helpers.relative_error(actual, expected) < 1e-12


# ------------------------------------------------------------------ F-SAM's EMA


def _gradient_sequence(n, seed=0):
  rng = np.random.default_rng(seed)
  mean = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=(3,))}
  # A shared mean plus noise: the situation F-SAM is built for.
  return [{k: v + 0.5 * rng.normal(size=v.shape) for k, v in mean.items()} for _ in range(n)]


def test_fsam_ema_absorbs_the_raw_gradient():
  sigma, decay = 1.0, 0.6
  grads = _gradient_sequence(5)
  reference = np_fsam(sigma, decay)
  ported = np_fsam(sigma, decay, update_ema_with_modified=True)
  tx = fsam_direction(sigma, decay)
  update = jax.jit(tx.update)
  state = tx.init(helpers.to_jax(grads[0], jnp.float32))
  raw_ema = None
  for t, g in enumerate(grads):
    d, state = update(helpers.to_jax(g, jnp.float32), state)
    expected, wrong = reference(g), ported(g)
    assert helpers.relative_error(d, expected) < 1e-6
    raw_ema = dict(g) if raw_ema is None else {k: decay * raw_ema[k] + 0.4 * g[k] for k in g}
    assert helpers.relative_error(state.ema, raw_ema) < 1e-6
    assert int(state.count) == t + 1
    if t >= 2:  # the two forms first differ in m_1, hence in d_2
      assert helpers.relative_error(d, wrong) > 1e-2


def test_direction_blocks_seed_with_the_first_gradient():
  g = {"w": jnp.array([[1.0, -2.0]]), "b": jnp.array([3.0])}
  for tx in [fsam_direction(2.0, 0.3), vasso_direction(0.25)]:
    d, state = tx.update(g, tx.init(g))
    assert jax.tree.map(lambda a, b: bool(jnp.all(a == b)), d, g) == {"w": True, "b": True}
    stored = state.ema if hasattr(state, "ema") else state.direction
    assert jax.tree.map(lambda a, b: bool(jnp.all(a == b)), stored, g) == {"w": True, "b": True}


@pytest.mark.parametrize("block", ["fsam", "vasso"])
def test_accumulator_dtype(block):
  params = {"w": jnp.ones((3, 2), jnp.bfloat16)}
  make = fsam_direction if block == "fsam" else vasso_direction
  tx = make(accumulator_dtype=jnp.float32)
  state = tx.init(params)
  g = {"w": jnp.full((3, 2), 0.1, jnp.bfloat16)}
  d, new_state = jax.jit(tx.update)(g, state)
  assert d["w"].dtype == jnp.bfloat16
  stored = new_state.ema if block == "fsam" else new_state.direction
  assert stored["w"].dtype == jnp.float32
  assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)
  # Default: the parameters' dtype.
  assert jax.tree.leaves(make().init(params))[1].dtype == jnp.bfloat16


# ------------------------------------------------------------------ reductions


def _run(tx, steps=5):
  params, _ = helpers.make_problem(0)
  params = helpers.to_jax(params, jnp.float32)
  return helpers.run_steps(tx, params, helpers.to_jax(_batches(steps), jnp.float32))[0]


@pytest.mark.parametrize(
  "variant",
  [
    lambda: fsam(_base(), rho=0.1, sigma=0.0, decay=0.9),
    lambda: vasso(_base(), rho=0.1, theta=1.0),
  ],
  ids=["fsam_sigma_0", "vasso_theta_1"],
)
def test_reduces_to_sam(variant):
  actual = _run(variant())
  expected = _run(samx.sam(_base(), rho=0.1))
  assert helpers.relative_error(actual, helpers.to_numpy(expected)) < 1e-7


def test_reductions_hold_with_injected_hyperparameters():
  # sigma / theta arrive as traced arrays: the reduction must not rely on Python checks.
  fsam_tx = optax.inject_hyperparams(fsam)(_base(), rho=0.1, sigma=1.0)
  vasso_tx = optax.inject_hyperparams(vasso)(_base(), rho=0.1, theta=0.5)
  expected = helpers.to_numpy(_run(samx.sam(_base(), rho=0.1), steps=3))

  params, _ = helpers.make_problem(0)
  params = helpers.to_jax(params, jnp.float32)
  batches = helpers.to_jax(_batches(3), jnp.float32)
  for tx, name, value in [(fsam_tx, "sigma", 0.0), (vasso_tx, "theta", 1.0)]:

    @jax.jit
    def step(params, state, batch, tx=tx):
      grads = jax.grad(helpers.loss_jax)(params, batch)
      grad_fn = lambda p: jax.grad(helpers.loss_jax)(p, batch)  # noqa: B023
      updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), state

    state = tx.init(params)
    state.hyperparams[name] = jnp.asarray(value, jnp.float32)
    p = params
    for batch in batches:
      p, state = step(p, state, batch)
    assert helpers.relative_error(p, expected) < 1e-7


@pytest.mark.parametrize(
  "variant",
  [
    lambda base: fsam(base, rho=0.0),
    lambda base: vasso(base, rho=0.0),
    lambda base: random_sam(base, rho=0.0),
  ],
  ids=["fsam", "vasso", "random_sam"],
)
def test_rho_zero_is_the_base_optimizer(variant):
  base = optax.adam(1e-2)
  actual = _run(variant(base), steps=3)
  expected = _run(base, steps=3)
  assert helpers.relative_error(actual, helpers.to_numpy(expected)) < 1e-7


# ------------------------------------------------------------------ random direction


@functools.cache
def _random_update(rho, ball):
  # One compiled update serves every key: the key lives in the state.
  return jax.jit(optax.chain(random_direction(0), samx.scale_by_sam(rho, ball=ball)).update)


def _random_eps(key, steps, rho=0.3, ball="l2", grads=None):
  grads = {"w": jnp.zeros((5, 4)), "b": jnp.zeros(4)} if grads is None else grads
  state = optax.chain(random_direction(key), samx.scale_by_sam(rho, ball=ball)).init(grads)
  update = _random_update(rho, ball)
  out = []
  for _ in range(steps):
    eps, state = update(grads, state)
    out.append(eps)
  return out


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def test_random_direction_has_norm_rho_and_changes_every_step():
  sequence = _random_eps(0, 4, rho=0.3)
  for eps in sequence:
    np.testing.assert_allclose(helpers.np_norm(eps), 0.3, rtol=1e-6)
  flats = [_flat(e) for e in sequence]
  for i in range(len(flats)):
    for j in range(i):
      assert np.max(np.abs(flats[i] - flats[j])) > 1e-3
  # Every leaf is perturbed (the direction spans the whole parameter space).
  assert all(bool(jnp.all(x != 0)) for x in jax.tree.leaves(sequence[0]))


def test_random_direction_ignores_the_gradient():
  zeros = _random_eps(7, 2)
  grads = {"w": jnp.ones((5, 4)), "b": -jnp.ones(4)}
  ones = _random_eps(7, 2, grads=grads)
  for a, b in zip(zeros, ones, strict=True):
    np.testing.assert_array_equal(_flat(a), _flat(b))


def test_random_direction_is_deterministic_given_the_key():
  first = [_flat(e) for e in _random_eps(3, 3)]
  again = [_flat(e) for e in _random_eps(3, 3)]
  typed = [_flat(e) for e in _random_eps(jax.random.key(3), 3)]
  raw = [_flat(e) for e in _random_eps(jax.random.PRNGKey(3), 3)]
  other = [_flat(e) for e in _random_eps(4, 3)]
  for a, b, c, d, e in zip(first, again, typed, raw, other, strict=True):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a, d)
    assert np.max(np.abs(a - e)) > 1e-3


def test_random_direction_linf_ball():
  (eps,) = _random_eps(0, 1, rho=0.02, ball="linf")
  np.testing.assert_allclose(np.abs(_flat(eps)), 0.02, rtol=1e-6)


def test_random_direction_low_precision():
  grads = {"w": jnp.zeros((64, 8), jnp.bfloat16)}
  (eps,) = _random_eps(0, 1, rho=0.5, grads=grads)
  assert eps["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(helpers.np_norm(eps), 0.5, rtol=1e-2)


def test_random_sam_perturbs_by_rho():
  # With L = |w|^2 / 2, g_s = w + eps, so plain SGD(1) returns updates = -(w + eps).
  params = helpers.to_jax(helpers.make_problem(0)[0], jnp.float32)
  grad_fn = lambda p: p
  tx = random_sam(optax.sgd(1.0), rho=0.05, key=11)

  @jax.jit
  def perturbation(state):
    updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    return jax.tree.map(lambda u, w: -u - w, updates, params), state

  first, state = perturbation(tx.init(params))
  second, _ = perturbation(state)
  for eps in (first, second):
    np.testing.assert_allclose(helpers.np_norm(eps), 0.05, rtol=1e-4)
  assert np.max(np.abs(_flat(first) - _flat(second))) > 1e-4


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
  ("make", "error", "match"),
  [
    (lambda: fsam_direction(sigma=-0.1), ValueError, r"sigma.*got sigma=-0\.1"),
    (lambda: fsam_direction(decay=1.5), ValueError, r"decay must be a number in \[0, 1\]"),
    (lambda: fsam_direction(decay=-0.1), ValueError, r"decay.*got decay=-0\.1"),
    (lambda: fsam_direction(sigma=lambda t: 1.0), TypeError, "sigma"),
    (lambda: fsam_direction(decay={"w": 0.9}), TypeError, "decay"),
    (lambda: vasso_direction(theta=0.0), ValueError, r"theta must be a number in \(0, 1\]"),
    (lambda: vasso_direction(theta=1.01), ValueError, r"got theta=1\.01"),
    (lambda: vasso_direction(theta=np.array([0.5, 0.9])), TypeError, "theta.*scalar"),
    (lambda: random_direction(key=1.5), TypeError, r"key.*got key=1\.5"),
    (lambda: random_direction(key="seed"), TypeError, "key"),
    (lambda: fsam(optax.sgd(0.1), rho=-1.0), ValueError, r"got rho=-1\.0"),
    (lambda: fsam(optax.sgd(0.1), sigma=-1.0), ValueError, "sigma"),
    (lambda: fsam(optax.sgd(0.1), eps=0.0), ValueError, "eps"),
    (lambda: vasso(optax.sgd(0.1), theta=2.0), ValueError, "theta"),
    (lambda: vasso(optax.sgd(0.1), ball="l3"), ValueError, "ball"),
    (lambda: random_sam(optax.sgd(0.1), rho=-0.5), ValueError, "rho"),
  ],
)
def test_bad_hyperparameters_raise(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_edge_values_are_accepted():
  fsam_direction(sigma=0.0, decay=0.0)
  fsam_direction(decay=1.0)
  vasso_direction(theta=1.0)
  random_direction(key=np.int32(5))


# ------------------------------------------------------------------ optax conformance

OPTIMIZERS = {
  "fsam": (
    fsam,
    {"optimizer": optax.sgd(0.1, momentum=0.9), "rho": 0.2, "sigma": 0.5, "decay": 0.6},
  ),
  "vasso": (vasso, {"optimizer": optax.sgd(0.1, momentum=0.9), "rho": 0.05, "theta": 0.9}),
  "random_sam": (random_sam, {"optimizer": optax.sgd(0.1), "rho": 0.05, "key": 3}),
}

BLOCKS = {
  "fsam_direction": (fsam_direction, {"sigma": 1.0, "decay": 0.9}),
  "vasso_direction": (vasso_direction, {"theta": 0.9}),
  "random_direction": (random_direction, {"key": 3}),
}

ALL = {**OPTIMIZERS, **BLOCKS}


def test_fsam_constant_gradient_gives_zero_perturbation_not_nan():
  # m_1 = g, so d_1 = (1 - sigma) g = 0 for sigma = 1: eps must be 0, never NaN.
  tx = optax.chain(fsam_direction(1.0, 0.9), samx.scale_by_sam(0.1))
  g = {"w": jnp.array([[1.0, -2.0]]), "b": jnp.array([3.0])}
  eps0, state = tx.update(g, tx.init(g))
  np.testing.assert_allclose(helpers.np_norm(eps0), 0.1, rtol=1e-6)
  eps1, _ = tx.update(g, state)
  assert all(bool(jnp.all(e == 0)) for e in jax.tree.leaves(eps1))
