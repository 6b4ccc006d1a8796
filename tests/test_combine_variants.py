"""GSAM, WSAM and LookSAM against NumPy float64 references, reductions, errors, conformance."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from samx import combine_variants as cv
from samx.aliases import sam
from samx.ascent import scale_by_sam
from samx.pipeline import sharpness_aware
from tests import helpers
from tests import test_conformance as conformance

LR, MOMENTUM = 0.1, 0.9


def _batches(n, seed=1):
  return [helpers.make_problem(seed + i)[1] for i in range(n)]


def _f32(tree):
  return helpers.to_jax(tree, jnp.float32)


# ---------------------------------------------------------------------------
# NumPy float64 references, written from VARIANTS.md.
# ---------------------------------------------------------------------------


def _dot(a, b):
  return sum(float(np.sum(a[k] * b[k])) for k in a)


def _lin(a, sa, b, sb):
  return {k: sa * a[k] + sb * b[k] for k in a}


def _unit(v, eps=1e-12):
  n = helpers.np_norm(v)
  return {k: x / (n + eps) for k, x in v.items()}


def _perturbed_grad(params, g, batch, rho, eps=1e-12):
  e = {k: rho * x for k, x in _unit(g, eps).items()}
  return helpers.grad_numpy({k: params[k] + e[k] for k in params}, batch)


def np_run(params, batches, direction, *, rho=0.05, lr=LR, momentum=MOMENTUM, extra_step=None):
  """SGD with heavy-ball momentum (optax's form) on ``direction(t, g, g_s_fn)``."""
  params = dict(params)
  trace = {k: np.zeros_like(v) for k, v in params.items()}
  for t, batch in enumerate(batches):
    g = helpers.grad_numpy(params, batch)
    r = rho(t) if callable(rho) else rho
    d = direction(t, g, lambda p=params, g=g, b=batch, r=r: _perturbed_grad(p, g, b, r))
    if extra_step is not None:
      d, sharp = d
    trace = {k: d[k] + momentum * trace[k] for k in params}
    lr_t = lr(t) if callable(lr) else lr
    params = {k: params[k] - lr_t * trace[k] for k in params}
    if extra_step is not None:
      s = extra_step(t)
      params = {k: params[k] - s * sharp[k] for k in params}
  return params


def gsam_direction(alpha, minimize_fp):
  def direction(t, g, g_s_fn):
    gs = g_s_fn()
    if minimize_fp:
      u = _unit(gs)
      vertical = _lin(g, 1.0, u, -_dot(g, u))
      return _lin(gs, 1.0, vertical, -alpha)
    u = _unit(g)
    return _lin(g, 1.0, _lin(gs, 1.0, u, -_dot(gs, u)), alpha)

  return direction


def wsam_direction(gamma, decouple):
  alpha = gamma / (1 - gamma)

  def direction(t, g, g_s_fn):
    gs = g_s_fn()
    if decouple:
      return g, _lin(gs, alpha, g, -alpha)
    return _lin(gs, alpha, g, 1 - alpha)

  return direction


def looksam_direction(k, alpha, eps=1e-12):
  stored = {}

  def direction(t, g, g_s_fn):
    if t % k == 0:
      gs = g_s_fn()
      u = _unit(g, eps)
      stored["v"] = _lin(gs, 1.0, u, -_dot(gs, u))
      return gs
    v = stored["v"]
    return _lin(g, 1.0, v, alpha * helpers.np_norm(g) / (helpers.np_norm(v) + eps))

  return direction


# optax.linear_schedule computes in float32 even under x64; this one keeps the dtype.
LR_SCHEDULE = lambda t: 0.2 + (0.02 - 0.2) * jnp.minimum(t, 4) / 4
RHO_SCHEDULE = cv.gsam_rho_schedule(
  LR_SCHEDULE, rho_max=0.2, rho_min=0.02, lr_max=0.2, lr_min=0.02
)


def _np_lr(t):
  return 0.2 + (0.02 - 0.2) * min(t, 4) / 4


CASES = {
  "gsam_clean_loss": (
    lambda: cv.gsam(optax.sgd(LR, momentum=MOMENTUM), rho=0.1, alpha=0.3, minimize_fp=False),
    lambda b: np_run(b[0], b[1], gsam_direction(0.3, False), rho=0.1),
  ),
  "gsam_rho_schedule": (
    lambda: cv.gsam(optax.sgd(LR_SCHEDULE, momentum=MOMENTUM), rho=RHO_SCHEDULE, alpha=0.5),
    lambda b: np_run(
      b[0],
      b[1],
      gsam_direction(0.5, True),
      rho=lambda t: 0.02 + 0.18 * (_np_lr(t) - 0.02) / 0.18,
      lr=_np_lr,
    ),
  ),
  "wsam_coupled": (
    lambda: cv.wsam(optax.sgd(LR, momentum=MOMENTUM), rho=0.05, gamma=0.8, decouple=False),
    lambda b: np_run(b[0], b[1], wsam_direction(0.8, False)),
  ),
  "wsam_decoupled_schedule": (
    lambda: cv.wsam(
      optax.sgd(LR_SCHEDULE, momentum=MOMENTUM), rho=0.05, gamma=0.9, learning_rate=LR_SCHEDULE
    ),
    lambda b: np_run(b[0], b[1], wsam_direction(0.9, True), lr=_np_lr, extra_step=_np_lr),
  ),
  "wsam_decoupled_injected_lr": (
    lambda: cv.wsam(
      optax.inject_hyperparams(optax.sgd)(learning_rate=LR_SCHEDULE, momentum=MOMENTUM),
      rho=0.05,
      gamma=0.9,
    ),
    lambda b: np_run(b[0], b[1], wsam_direction(0.9, True), lr=_np_lr, extra_step=_np_lr),
  ),
  "looksam": (
    lambda: cv.looksam(optax.sgd(LR, momentum=MOMENTUM), rho=0.05, k=3, alpha=0.7),
    lambda b: np_run(b[0], b[1], looksam_direction(3, 0.7)),
  ),
}


FLOAT32_CASES = ("gsam_rho_schedule", "wsam_decoupled_schedule", "looksam")


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy(case):
  make_tx, reference = CASES[case]
  params, _ = helpers.make_problem(0)
  batches = _batches(7)
  expected = reference((params, batches))
  if case in FLOAT32_CASES:
    actual, _ = helpers.run_steps(make_tx(), _f32(params), _f32(batches))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(actual))
    # float32: g_v is a difference of nearly parallel vectors, so rounding shows
    # (~2e-6 after 7 LookSAM steps); float64 below is the strict check.
    assert helpers.relative_error(actual, expected) < 1e-5
  with jax.enable_x64(True):
    actual64, _ = helpers.run_steps(
      make_tx(), helpers.to_jax(params, jnp.float64), helpers.to_jax(batches, jnp.float64)
    )
  assert helpers.relative_error(actual64, expected) < 1e-12
  # The variant differs from SAM: the test would catch a silent fall-back.
  plain_sam = np_run(params, batches, lambda t, g, gs: gs(), rho=0.05)
  assert helpers.relative_error(plain_sam, expected) > 1e-4


# ---------------------------------------------------------------------------
# Reductions (VARIANTS.md): each equals samx.sam or the base optimizer.
# ---------------------------------------------------------------------------

REDUCTIONS = {
  "gsam_alpha0": lambda base: cv.gsam(base, rho=0.07, alpha=0.0),
  "wsam_coupled_gamma_half": lambda base: cv.wsam(base, rho=0.07, gamma=0.5, decouple=False),
  "looksam_k1": lambda base: cv.looksam(base, rho=0.07, k=1, alpha=0.7),
}
# The reductions to the base optimizer use adam (a preconditioned, stateful base).
BASES = {"momentum": lambda: optax.sgd(LR, momentum=MOMENTUM), "adam": lambda: optax.adam(1e-2)}


@functools.cache
def _reference_run(kind, base):
  """Params after 4 steps of samx.sam (kind="sam") or of the base optimizer."""
  params, _ = helpers.make_problem(0)
  tx = sam(BASES[base](), rho=0.07) if kind == "sam" else BASES[base]()
  return helpers.to_numpy(helpers.run_steps(tx, _f32(params), _f32(_batches(4)))[0])


def _run(tx):
  params, _ = helpers.make_problem(0)
  return helpers.run_steps(tx, _f32(params), _f32(_batches(4)))[0]


@pytest.mark.parametrize(
  "variant, base",
  [(v, "momentum") for v in sorted(REDUCTIONS)],
)
def test_reduces_to_sam(variant, base):
  actual = _run(REDUCTIONS[variant](BASES[base]()))
  # The directions are g_s exactly; XLA may fuse the two programs differently.
  assert helpers.relative_error(actual, _reference_run("sam", base)) < 1e-7


@pytest.mark.parametrize(
  "make",
  [
    lambda base: cv.gsam(base, rho=0.07, alpha=0.0, minimize_fp=False),
    lambda base: cv.wsam(base, rho=0.07, gamma=0.0, decouple=False),
    lambda base: cv.wsam(base, rho=0.07, gamma=0.0, learning_rate=1e-2),
  ],
  ids=["gsam_clean_alpha0", "wsam_coupled_gamma0", "wsam_decoupled_gamma0"],
)
def test_reduces_to_the_base_optimizer(make):
  actual = _run(make(BASES["adam"]()))
  assert helpers.relative_error(actual, _reference_run("base", "adam")) < 1e-7


def test_gsam_rho_schedule_is_linear_in_the_learning_rate():
  lr = optax.cosine_decay_schedule(0.3, decay_steps=10, alpha=0.1)
  rho = cv.gsam_rho_schedule(lr, rho_max=0.5, rho_min=0.1, lr_max=0.3, lr_min=0.03)
  for t in range(11):
    expected = 0.1 + 0.4 * (float(lr(t)) - 0.03) / 0.27
    np.testing.assert_allclose(float(rho(t)), expected, rtol=1e-5)
  flat = cv.gsam_rho_schedule(0.1, rho_max=0.2, rho_min=0.05, lr_max=0.1, lr_min=0.1)
  assert float(flat(3)) == pytest.approx(0.2)


# ---------------------------------------------------------------------------
# LookSAM really skips the second pass.
# ---------------------------------------------------------------------------


def _count_grad_fn_calls(tx, steps):
  params, batch = helpers.make_problem(0)
  params, batch = _f32(params), _f32(batch)
  calls = []

  def grad_fn(p):
    jax.debug.callback(lambda: calls.append(1))
    return jax.grad(helpers.loss_jax)(p, batch)

  @jax.jit
  def step(params, state):
    grads = jax.grad(helpers.loss_jax)(params, batch)
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  jax.effects_barrier()
  return len(calls), state


@pytest.mark.parametrize("k, steps, expected", [(5, 10, 2), (1, 3, 3)])
def test_looksam_calls_grad_fn_only_every_k_steps(k, steps, expected):
  calls, state = _count_grad_fn_calls(cv.looksam(optax.sgd(LR), k=k), steps)
  assert calls == expected
  assert int(state.combine_state.count) == steps


def test_looksam_injected_k_skips_too():
  # Under inject_hyperparams k is a traced int32 array: count % k is still jnp.
  injected = optax.inject_hyperparams(cv.looksam)(optax.sgd(LR), k=3)
  assert _count_grad_fn_calls(injected, 7)[0] == 3


def test_deferred_ascent_computes_the_same_step():
  # A scheduled radius keeps a count in the ascent state: the deferred ascent
  # must advance it once per step and use the old value inside the evaluation.
  rho = lambda t: 0.02 + 0.03 * t
  ascent, evaluation = cv.defer_ascent(scale_by_sam(rho))
  deferred = sharpness_aware(optax.sgd(LR), ascent, evaluation=evaluation)
  actual = _run(deferred)
  expected = _run(sharpness_aware(optax.sgd(LR), scale_by_sam(rho)))
  assert helpers.relative_error(actual, helpers.to_numpy(expected)) < 1e-7


def test_looksam_without_grad_fn_shows_the_call():
  tx = cv.looksam(optax.sgd(LR))
  params = {"w": jnp.ones(2)}
  with pytest.raises(TypeError, match=r"grad_fn\(params\) -> grads(.|\n)*tx.update"):
    tx.update(params, tx.init(params), params)


def test_sam_calls_grad_fn_every_step():
  # The counting method itself: SAM evaluates on every step.
  assert _count_grad_fn_calls(sam(optax.sgd(LR)), 3)[0] == 3


# ---------------------------------------------------------------------------
# Errors name the argument.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "make, pattern",
  [
    (lambda: cv.looksam(optax.sgd(0.1), k=0), r"k must be a positive integer.*k=0"),
    (lambda: cv.looksam(optax.sgd(0.1), k=-2), r"k must be a positive integer"),
    (lambda: cv.looksam(optax.sgd(0.1), k=2.5), r"k must be a positive integer.*k=2.5"),
    (lambda: cv.looksam(optax.sgd(0.1), alpha=-0.1), r"alpha must be a non-negative"),
    (
      lambda: cv.wsam(optax.sgd(0.1), gamma=1.0, learning_rate=0.1),
      r"gamma must be a number in \[0, 1\).*gamma=1.0",
    ),
    (lambda: cv.wsam(optax.sgd(0.1), gamma=-0.1, decouple=False), r"gamma must be.*gamma=-0.1"),
    (lambda: cv.wsam(optax.sgd(0.1), gamma=1.5, decouple=False), r"gamma must be"),
    (lambda: cv.wsam(optax.sgd(0.1), decouple=False, learning_rate=0.1), r"learning_rate"),
    (lambda: cv.wsam(optax.sgd(0.1), learning_rate=-0.1), r"learning_rate must be"),
    (lambda: cv.gsam(optax.sgd(0.1), alpha=-1.0), r"alpha must be a non-negative.*alpha=-1.0"),
    (lambda: cv.gsam(optax.sgd(0.1), rho=-0.1), r"rho must be"),
    (lambda: cv.gsam(optax.sgd(0.1), eps=0.0), r"eps must be"),
    (lambda: cv.gsam_rho_schedule(0.1, 0.2, 0.1, lr_max=0.1, lr_min=0.2), r"lr_min must be"),
    (lambda: cv.gsam_rho_schedule(0.1, -0.2, 0.1, lr_max=0.2, lr_min=0.1), r"rho_max must be"),
  ],
)
def test_bad_hyperparameters_raise_value_error(make, pattern):
  with pytest.raises(ValueError, match=pattern):
    make()


def test_decoupled_wsam_without_a_learning_rate_says_how_to_give_one():
  tx = cv.wsam(optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"learning_rate=(.|\n)*inject_hyperparams"):
    tx.init({"w": jnp.zeros(2)})


def test_add_sharpness_step_needs_the_decoupled_direction():
  tx = cv.add_sharpness_step(optax.sgd(0.1), learning_rate=0.1)
  with pytest.raises(TypeError, match="SharpnessDirection"):
    tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))


# ---------------------------------------------------------------------------
# optax conformance: tests/test_conformance.py's checks over these variants.
# ---------------------------------------------------------------------------

OPTIMIZERS = {
  "gsam": (cv.gsam, {"optimizer": optax.sgd(0.1, momentum=0.9), "rho": 0.05, "alpha": 0.3}),
  "wsam_decoupled": (
    cv.wsam,
    {
      "optimizer": optax.sgd(0.1, momentum=0.9),
      "rho": 0.05,
      "gamma": 0.9,
      "learning_rate": 0.1,
    },
  ),
  "looksam": (
    cv.looksam,
    {"optimizer": optax.sgd(0.1, momentum=0.9), "rho": 0.05, "k": 2, "alpha": 0.7},
  ),
}
# Other settings of the same code paths: fewer checks.
MORE_OPTIMIZERS = {
  "gsam_clean_loss": (
    cv.gsam,
    {"optimizer": optax.adam(1e-2), "rho": 0.05, "alpha": 0.3, "minimize_fp": False},
  ),
  "wsam_coupled": (
    cv.wsam,
    {"optimizer": optax.adam(1e-2), "rho": 0.05, "gamma": 0.8, "decouple": False},
  ),
  "wsam_decoupled_injected_lr": (
    cv.wsam,
    # (not adam: optax's injected adam rounds b2 = 0.999 to 1 in bfloat16 and gives NaN)
    {
      "optimizer": optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
      "rho": 0.05,
    },
  ),
}

CONFORMANCE_CHECKS = conformance.NAMED_CHECKS[:4]


@pytest.fixture
def registered(monkeypatch):
  """Adds this file's variants to the conformance suite's tables for one test."""
  conformance.register(monkeypatch, optimizers={**OPTIMIZERS, **MORE_OPTIMIZERS})


@pytest.mark.parametrize(
  "name, check",
  [(name, check) for name in ("looksam", "wsam_decoupled") for check in CONFORMANCE_CHECKS]
  # GSAM's combination has no state: its inject_hyperparams check runs on
  # gsam_clean_loss below, and MultiSteps adds nothing to the SAM pipeline's.
  + [
    ("gsam", check)
    for check in CONFORMANCE_CHECKS
    if "inject" not in check and "multi" not in check
  ],
)
def test_optax_conformance(registered, name, check):
  getattr(conformance, check)(name)


@pytest.mark.parametrize("name", sorted(MORE_OPTIMIZERS))
def test_inject_hyperparams_more(registered, name):
  conformance.test_inject_hyperparams_gives_identical_results(name)


@pytest.mark.parametrize("name", sorted({**OPTIMIZERS, **MORE_OPTIMIZERS}))
def test_dtypes_preserved(registered, name):
  # bfloat16 params, batch and updates; float32 is what every other test runs.
  conformance.test_dtypes_preserved(name, jnp.bfloat16)


@pytest.mark.parametrize("name", sorted({**OPTIMIZERS, **MORE_OPTIMIZERS}))
def test_map_params(name):
  # optax.tree.map_params initialises with a placeholder for params (no update
  # here: the updates are covered above).
  factory, kwargs = {**OPTIMIZERS, **MORE_OPTIMIZERS}[name]
  tx = factory(**kwargs)
  state = tx.init(_f32(helpers.make_problem(0)[0]))
  mapped = optax.tree.map_params(tx, lambda v: v + 1, state)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)


# Data parallelism (synced and per-device eps, pmap, shard_map, sharded jit, FSDP) is
# tests/test_sharding.py, over the registry in tests/sharding_registry.py.
