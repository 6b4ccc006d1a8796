"""SAM-ON and the masking ascent blocks (samx.selective) against a NumPy float64 reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import samx
from samx import directions, masks, selective
from tests import helpers
from tests import test_conformance as conformance

LR, MOMENTUM = 0.1, 0.9
B1_ONLY = {"W1": False, "b1": True, "W2": False}


def np_sam_on_perturbation(params, g, *, rho, selection, ascent="sam", eta=0.01, **kwargs):
  """eps of SAM-ON from the equations: T and the norm restricted to the selection."""
  layerwise, ball, eps = kwargs.get("layerwise", False), kwargs.get("ball", "l2"), 1e-12
  m = {
    k: np.broadcast_to(np.asarray(selection[k], np.float64), params[k].shape) for k in params
  }
  if ascent == "sam":
    t = {k: np.ones_like(w) for k, w in params.items()}
  elif layerwise:
    t = {k: np.full_like(w, np.sqrt(np.sum(w**2)) + eta) for k, w in params.items()}
  else:
    t = {k: np.abs(w) + eta for k, w in params.items()}
  if ball == "linf":
    return {k: m[k] * rho * t[k] * np.sign(g[k]) for k in params}
  tg = {k: m[k] * t[k] * g[k] for k in params}
  norm = helpers.np_norm(tg)
  return {k: m[k] * rho * t[k] * tg[k] / (norm + eps) for k in params}


def np_sam_on_run(params, batches, **kwargs):
  """SAM-ON steps with SGD + heavy-ball momentum (optax's form), all params updated."""
  params = dict(params)
  trace = {k: np.zeros_like(v) for k, v in params.items()}
  for batch in batches:
    g = helpers.grad_numpy(params, batch)
    e = np_sam_on_perturbation(params, g, **kwargs)
    gs = helpers.grad_numpy({k: params[k] + e[k] for k in params}, batch)
    trace = {k: gs[k] + MOMENTUM * trace[k] for k in params}
    params = {k: params[k] - LR * trace[k] for k in params}
  return params


def _batches(n, seed=1):
  return [helpers.make_problem(seed + i)[1] for i in range(n)]


PARAMS0, _ = helpers.make_problem(0)
RANDOM_ENTRIES = masks.random_entries(9, seed=0)(PARAMS0)  # NumPy boolean arrays
COMPLEMENT_OF_B1 = {"W1": True, "b1": False, "W2": True}


def _sgd():
  return optax.sgd(LR, momentum=MOMENTUM)


CASES = {
  "sam_on": (
    lambda: selective.sam_on(_sgd(), rho=0.5, mask=B1_ONLY),
    {"rho": 0.5, "selection": B1_ONLY},
  ),
  "sam_on_complement": (
    lambda: selective.sam_on(_sgd(), rho=0.3, mask=B1_ONLY, complement=True),
    {"rho": 0.3, "selection": COMPLEMENT_OF_B1},
  ),
  "sam_on_random_entries": (
    lambda: selective.sam_on(_sgd(), rho=0.4, mask=masks.random_entries(9, seed=0)),
    {"rho": 0.4, "selection": RANDOM_ENTRIES},
  ),
  "asam_on_elementwise": (
    lambda: selective.sam_on(_sgd(), rho=2.0, mask=COMPLEMENT_OF_B1, ascent="asam", eta=0.05),
    {"rho": 2.0, "selection": COMPLEMENT_OF_B1, "ascent": "asam", "eta": 0.05},
  ),
  "asam_on_layerwise": (
    lambda: selective.sam_on(_sgd(), rho=0.5, mask=B1_ONLY, ascent="asam", layerwise=True),
    {"rho": 0.5, "selection": B1_ONLY, "ascent": "asam", "layerwise": True},
  ),
  "asam_on_linf": (
    lambda: selective.sam_on(
      _sgd(), rho=0.02, mask=COMPLEMENT_OF_B1, ascent="asam", ball="linf"
    ),
    {"rho": 0.02, "selection": COMPLEMENT_OF_B1, "ascent": "asam", "ball": "linf"},
  ),
  "sam_on_linf_random_entries": (
    lambda: selective.sam_on(_sgd(), rho=0.01, mask=RANDOM_ENTRIES, ball="linf"),
    {"rho": 0.01, "selection": RANDOM_ENTRIES, "ball": "linf"},
  ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_float64(case):
  make_tx, reference_kwargs = CASES[case]
  batches = _batches(3)
  expected = np_sam_on_run(PARAMS0, batches, **reference_kwargs)
  with jax.enable_x64(True):
    actual, _ = helpers.run_steps(
      make_tx(), helpers.to_jax(PARAMS0, jnp.float64), helpers.to_jax(batches, jnp.float64)
    )
  assert helpers.relative_error(actual, expected) < 1e-12
  # The perturbation mattered: plain SGD and full SAM both end elsewhere.
  plain = np_sam_on_run(PARAMS0, batches, **{**reference_kwargs, "rho": 0.0})
  assert helpers.relative_error(plain, expected) > 1e-6


@pytest.mark.parametrize("case", ["asam_on_elementwise"])
def test_matches_numpy_float32(case):
  make_tx, reference_kwargs = CASES[case]
  batches = _batches(2)
  expected = np_sam_on_run(PARAMS0, batches, **reference_kwargs)
  actual, _ = helpers.run_steps(
    make_tx(), helpers.to_jax(PARAMS0, jnp.float32), helpers.to_jax(batches, jnp.float32)
  )
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(actual))
  assert helpers.relative_error(actual, expected) < 1e-6


def _run(tx, steps=3):
  params = helpers.to_jax(PARAMS0, jnp.float32)
  return helpers.run_steps(tx, params, helpers.to_jax(_batches(steps), jnp.float32))[0]


def test_all_leaves_mask_is_sam():
  base = _sgd()
  actual = _run(selective.sam_on(base, rho=0.07, mask=masks.all_leaves))
  expected = _run(samx.sam(base, rho=0.07))
  assert helpers.relative_error(actual, helpers.to_numpy(expected)) < 1e-7
  # ASAM-ON over every leaf, T_w on the kernels only, is ASAM.
  actual = _run(
    selective.sam_on(
      base, rho=0.5, mask=True, ascent="asam", adaptive_mask=samx.weight_leaves, eta=0.01
    )
  )
  expected = _run(samx.asam(base, rho=0.5, eta=0.01))
  assert helpers.relative_error(actual, helpers.to_numpy(expected)) < 1e-7


def test_norm_over_the_selection_only():
  g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0, 0.0]]), "c": jnp.array([1.0, 1.0])}
  mask = {"a": True, "b": False, "c": np.array([True, False])}
  selected_norm = np.sqrt(9.0 + 16.0 + 1.0)
  tx = selective.masked_ascent(samx.scale_by_sam(0.2), mask)
  eps = tx.update(g, tx.init(g), g)[0]
  np.testing.assert_allclose(eps["a"], 0.2 * np.array([3.0, 4.0]) / selected_norm, rtol=1e-6)
  np.testing.assert_array_equal(eps["b"], 0.0)
  np.testing.assert_allclose(eps["c"], [0.2 / selected_norm, 0.0], rtol=1e-6)
  np.testing.assert_allclose(float(samx.numerics.global_norm(eps)), 0.2, rtol=1e-6)
  # SSAM's scope: the norm of the full gradient, ||eps|| <= rho.
  tx = selective.masked_ascent(samx.scale_by_sam(0.2), mask, norm_scope="all")
  eps = tx.update(g, tx.init(g), g)[0]
  full_norm = np.sqrt(9.0 + 16.0 + 144.0 + 2.0)
  np.testing.assert_allclose(eps["a"], 0.2 * np.array([3.0, 4.0]) / full_norm, rtol=1e-6)
  np.testing.assert_allclose(eps["c"], [0.2 / full_norm, 0.0], rtol=1e-6)
  assert float(samx.numerics.global_norm(eps)) < 0.2


def test_masked_ascent_keeps_zeros_off_the_selection_for_any_ascent():
  # An ascent that does not map 0 to 0 (here: adds 1) still perturbs only the selection.
  add_one = optax.GradientTransformation(
    lambda p: optax.EmptyState(), lambda u, s, p=None: (jax.tree.map(lambda x: x + 1, u), s)
  )
  fsam_like = optax.chain(add_one, samx.scale_by_sam(1.0))
  g = {"a": jnp.array([3.0]), "b": jnp.array([5.0, 5.0])}
  tx = selective.masked_ascent(fsam_like, {"a": True, "b": False})
  eps = tx.update(g, tx.init(g), g)[0]
  # The inner ascent saw (3 + 1, 0 + 1, 0 + 1): its output is masked again.
  np.testing.assert_allclose(eps["a"], [4.0 / np.sqrt(18.0)], rtol=1e-6)
  np.testing.assert_array_equal(eps["b"], [0.0, 0.0])
  # The same block composes through samx.sharpness_aware (e.g. an F-SAM-ON ascent).
  tx = samx.sharpness_aware(
    optax.sgd(1.0), selective.masked_ascent(fsam_like, {"a": True, "b": False})
  )
  assert jax.tree.structure(tx.init(g)) is not None


def test_fsam_on_matches_numpy_float64():
  # F-SAM-ON: the F-SAM direction on the selected gradient, normalised over the selection.
  sigma, decay, rho = 1.0, 0.6, 0.4
  selection = COMPLEMENT_OF_B1
  batches = _batches(3)
  params = dict(PARAMS0)
  trace = {k: np.zeros_like(v) for k, v in params.items()}
  ema = {k: np.zeros_like(v) for k, v in params.items()}
  for t, batch in enumerate(batches):
    g = helpers.grad_numpy(params, batch)
    g = {k: g[k] * selection[k] for k in params}
    d = {k: g[k] - (sigma * ema[k] if t else 0.0) for k in params}
    ema = {k: (decay * ema[k] + (1 - decay) * g[k]) if t else g[k] for k in params}
    norm = helpers.np_norm(d)
    gs = helpers.grad_numpy({k: params[k] + rho * d[k] / (norm + 1e-12) for k in params}, batch)
    trace = {k: gs[k] + MOMENTUM * trace[k] for k in params}
    params = {k: params[k] - LR * trace[k] for k in params}

  ascent = optax.chain(directions.fsam_direction(sigma, decay), samx.scale_by_sam(rho))
  tx = samx.sharpness_aware(_sgd(), selective.masked_ascent(ascent, selection))
  with jax.enable_x64(True):
    actual, _ = helpers.run_steps(
      tx, helpers.to_jax(PARAMS0, jnp.float64), helpers.to_jax(batches, jnp.float64)
    )
  assert helpers.relative_error(actual, params) < 1e-12


# ---------------------------------------------------------------------------------------
# Flax: NNX by module type, linen by structure.


class MyNorm(nnx.LayerNorm):
  pass


class NnxNormMLP(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(4, 8, rngs=rngs)
    self.b = MyNorm(8, rngs=rngs)
    self.c = nnx.Linear(8, 8, rngs=rngs)
    self.d = nnx.RMSNorm(8, rngs=rngs)
    self.e = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.e(jnp.tanh(self.d(self.c(jnp.tanh(self.b(self.a(x)))))))


def _data(seed=0, n=16):
  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (n, 4)), jax.random.randint(ky, (n,), 0, 3)


def _xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _hand_written_sam_on(loss_of_params, params, trace, norm_mask, rho):
  """One SAM-ON + momentum step in jnp: eps on the norm leaves, normalised over them."""
  g = jax.grad(loss_of_params)(params)
  g_sel = jax.tree.map(lambda x, m: x if m else jnp.zeros_like(x), g, norm_mask)
  norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g_sel)))
  perturbed = jax.tree.map(lambda w, x: w + rho * x / norm, params, g_sel)
  g_s = jax.grad(loss_of_params)(perturbed)
  trace = jax.tree.map(lambda t, x: x + MOMENTUM * t, trace, g_s)
  return jax.tree.map(lambda w, t: w - LR * t, params, trace), trace


def test_nnx_optimizer_with_norm_layers_by_type():
  model = NnxNormMLP(nnx.Rngs(0))
  norm_mask = masks.norm_layers(model)
  assert set(masks.selected_paths(norm_mask, nnx.state(model, nnx.Param))) == {
    "b/scale",
    "b/bias",
    "d/scale",
  }
  optimizer = nnx.Optimizer(
    model, selective.sam_on(_sgd(), rho=0.5, mask=norm_mask), wrt=nnx.Param
  )
  loss = lambda m, x, y: _xent(m(x), y)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  trace = jax.tree.map(jnp.zeros_like, params)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    grads = nnx.grad(loss)(model, x, y)
    optimizer.update(model, grads, grad_fn=samx.nnx_grad_fn(model, loss, x, y))

  @jax.jit
  def reference_step(params, trace, x, y):
    def loss_of_params(p):
      return loss(nnx.merge(graphdef, p, rest, copy=True), x, y)

    return _hand_written_sam_on(loss_of_params, params, trace, norm_mask, 0.5)

  for seed in range(3):
    x, y = _data(seed)
    train_step(model, optimizer, x, y)
    params, trace = reference_step(params, trace, x, y)
    actual = nnx.as_pure(nnx.state(model, nnx.Param))
    jax.tree.map(
      lambda a, e: np.testing.assert_allclose(a, e, rtol=2e-5, atol=1e-6), actual, params
    )


class LinenNormNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8, name="in_proj")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="w_stats")(x)
    x = nn.Dense(8, name="mid")(jnp.tanh(x))
    x = nn.LayerNorm(name="the_rest")(x)
    return nn.Dense(3, name="scale")(jnp.tanh(x))  # a Dense named "scale"


class BatchStatsState(train_state.TrainState):
  batch_stats: Any


def test_linen_train_state_with_the_structural_default():
  model = LinenNormNet()
  variables = model.init(jax.random.key(0), jnp.ones((1, 4)), train=False)
  state = BatchStatsState.create(
    apply_fn=model.apply,
    params=variables["params"],
    tx=selective.sam_on(_sgd(), rho=0.5),  # mask=None: normalization layers by structure
    batch_stats=variables["batch_stats"],
  )
  norm_mask = masks.norm_layers(state.params)
  assert set(masks.selected_paths(norm_mask, state.params)) == {
    "w_stats/scale",
    "w_stats/bias",
    "the_rest/scale",
    "the_rest/bias",
  }

  def clean_loss(params, batch_stats, x, y):
    logits, mutated = model.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return _xent(logits, y), mutated["batch_stats"]

  @jax.jit
  def train_step(state, x, y):
    (_, stats), grads = jax.value_and_grad(clean_loss, has_aux=True)(
      state.params, state.batch_stats, x, y
    )
    grad_fn = samx.linen_grad_fn(
      state.apply_fn, _xent, x, y, collections={"batch_stats": state.batch_stats}, train=True
    )
    return samx.apply_gradients(state, grads=grads, grad_fn=grad_fn, batch_stats=stats)

  @jax.jit
  def reference_step(params, trace, batch_stats, x, y):
    return _hand_written_sam_on(
      lambda p: clean_loss(p, batch_stats, x, y)[0], params, trace, norm_mask, 0.5
    )

  params, trace = state.params, jax.tree.map(jnp.zeros_like, state.params)
  for seed in range(2):
    x, y = _data(seed)
    stats = state.batch_stats
    state = train_step(state, x, y)
    params, trace = reference_step(params, trace, stats, x, y)
    jax.tree.map(
      lambda a, e: np.testing.assert_allclose(a, e, rtol=2e-5, atol=1e-6), state.params, params
    )


# ---------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
  "make, error, pattern",
  [
    (lambda: selective.sam_on(_sgd(), ascent="fsam"), ValueError, r"ascent must be one of"),
    (lambda: selective.sam_on(_sgd(), layerwise=True), ValueError, r"need ascent='asam'"),
    (lambda: selective.sam_on(_sgd(), rho=-1.0), ValueError, r"rho must be a non-negative"),
    (
      lambda: selective.masked_ascent(samx.scale_by_sam(), norm_scope="global"),
      ValueError,
      r"norm_scope must be one of \('selected', 'all'\)",
    ),
  ],
)
def test_bad_configuration(make, error, pattern):
  with pytest.raises(error, match=pattern):
    make()


def test_bad_masks_fail_at_init_and_name_the_argument():
  params = helpers.to_jax(PARAMS0, jnp.float32)
  with pytest.raises(ValueError, match=r"mask must be a pytree of booleans(.|\n)*b1"):
    selective.sam_on(_sgd(), mask={"W1": True, "W2": True}).init(params)
  with pytest.raises(ValueError, match=r"mask selects no parameter entry(.|\n)*W1 \(5, 7\)"):
    selective.sam_on(_sgd(), mask={"W1": False, "b1": False, "W2": False}).init(params)
  with pytest.raises(ValueError, match=r"norm_layers found no normalization layer(.|\n)*W2"):
    selective.sam_on(_sgd()).init(params)  # the default finds no normalization layer
  with pytest.raises(ValueError, match="selects no parameter entry"):
    selective.sam_on(_sgd(), mask=True, complement=True).init(params)


def test_missing_grad_fn_is_named():
  params = helpers.to_jax(PARAMS0, jnp.float32)
  tx = selective.sam_on(_sgd(), mask=B1_ONLY)
  with pytest.raises(TypeError, match=r"samx.sam_on needs the keyword argument grad_fn"):
    tx.update(params, tx.init(params), params)


# ---------------------------------------------------------------------------------------
# Cost: the clean gradient of unselected leaves is pruned by XLA.


def test_cost_benchmark_quick_run():
  path = Path(__file__).resolve().parents[1] / "benchmarks" / "sam_on_cost.py"
  spec = importlib.util.spec_from_file_location("samx_sam_on_cost_benchmark", path)
  benchmark = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(benchmark)
  args = ["--quick", "--models", "tiny ln-mlp 784-16-16-10", "--repeats", "1", "--steps", "1"]
  (result,) = benchmark.main(args)
  products = result["dot_and_convolution_instructions"]
  # SGD: 3 forward products, 2 input- and 3 weight-gradient products. SAM: twice that.
  assert (products["sgd"], products["sam"]) == (8, 16)
  # SAM-ON: the clean pass needs no weight gradient, and its first product is shared
  # with the perturbed pass (the first kernel is not perturbed): 16 - 3 - 1.
  assert products["sam_on"] == products["hand_on"] == 12
  # The random control (as many entries, spread over the kernels) prunes (almost) nothing.
  assert products["random"] > products["sam_on"]
  assert result["max_abs_param_diff_sam_on_vs_hand_on"] < 1e-6


# ---------------------------------------------------------------------------------------
# The optax conformance contract, reusing tests/test_conformance.py.

CONFORMANCE = {
  "sam_on": (
    selective.sam_on,
    {"optimizer": optax.sgd(0.1, momentum=0.9), "rho": 0.5, "mask": B1_ONLY},
  ),
  "asam_on_layerwise_random_entries": (
    selective.sam_on,
    {
      "optimizer": optax.adam(1e-2),
      "rho": 1.0,
      "mask": RANDOM_ENTRIES,
      "ascent": "asam",
      "layerwise": True,
    },
  ),
}


@pytest.fixture
def registered(monkeypatch):
  conformance.register(monkeypatch, optimizers=CONFORMANCE)


CHECKS = conformance.NAMED_CHECKS


# Both cases share the plumbing; the second runs the checks where its state matters.
CONFORMANCE_CASES = [("sam_on", check) for check in CHECKS] + [
  ("asam_on_layerwise_random_entries", check) for check in CHECKS[:4]
]


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize(("name", "check"), CONFORMANCE_CASES)
def test_conformance(name, check):
  getattr(conformance, check)(name)


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", sorted(CONFORMANCE))
def test_conformance_dtypes(name, dtype):
  conformance.test_dtypes_preserved(name, dtype)


def test_inject_hyperparams_with_a_callable_mask():
  params = helpers.to_jax(PARAMS0, jnp.float32)
  batch = helpers.to_jax(_batches(1)[0], jnp.float32)
  mask = masks.by_path("^b1$")
  tx = selective.sam_on(_sgd(), rho=0.5, mask=mask)
  injected = optax.inject_hyperparams(selective.sam_on, static_args="mask")(
    _sgd(), rho=0.5, mask=mask
  )
  grads = jax.grad(helpers.loss_jax)(params, batch)
  grad_fn = lambda p: jax.grad(helpers.loss_jax)(p, batch)
  expected = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)[0]
  actual = jax.jit(lambda s: injected.update(grads, s, params, grad_fn=grad_fn)[0])(
    injected.init(params)
  )
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-8), actual, expected
  )
