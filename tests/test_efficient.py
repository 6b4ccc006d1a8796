"""ESAM (SWP ascent, SDS evaluation) against a NumPy float64 reference; masks, costs, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from samx import efficient
from samx.aliases import sam
from tests import helpers
from tests import test_conformance as conformance

LR, MOMENTUM = 0.1, 0.9


def _batches(n, seed=1, batch=helpers.BATCH):
  return [helpers.make_problem(seed + i, batch=batch)[1] for i in range(n)]


def _f32(tree):
  return helpers.to_jax(tree, jnp.float32)


per_example_loss = helpers.per_example_loss


def np_per_example_loss(params, batch):
  x, y = batch
  r = np.tanh(x @ params["W1"] + params["b1"]) @ params["W2"] - y
  return 0.5 * np.sum(r**2, axis=-1)


def swp_masks(seed, params, beta, steps, per_tensor=False):
  """The masks of ``steps`` SWP steps, drawn as scale_by_bernoulli_mask documents."""
  key = jax.random.key(seed)
  leaves, treedef = jax.tree.flatten(params)
  masks = []
  for _ in range(steps):
    key, sample = jax.random.split(key)
    keys = jax.random.split(sample, len(leaves))
    drawn = [
      np.asarray(jax.random.bernoulli(k, jnp.float32(beta), () if per_tensor else np.shape(x)))
      for k, x in zip(keys, leaves, strict=True)
    ]
    full = [np.broadcast_to(m, np.shape(x)) for m, x in zip(drawn, leaves, strict=True)]
    masks.append(treedef.unflatten(full))
  return masks


def np_esam_run(params, batches, *, rho, beta, gamma, masks, norm_scope="all", eps=1e-12):
  """ESAM with SGD + heavy-ball momentum, from VARIANTS.md, given the SWP masks."""
  params = dict(params)
  trace = {k: np.zeros_like(v) for k, v in params.items()}
  for t, batch in enumerate(batches):
    g = helpers.grad_numpy(params, batch)
    m = masks[t]
    masked = {k: m[k] * g[k] for k in g}
    norm = helpers.np_norm(masked if norm_scope == "selected" else g)
    e = {k: rho * masked[k] / (beta * (norm + eps)) for k in g}
    perturbed = {k: params[k] + e[k] for k in params}
    rise = np_per_example_loss(perturbed, batch) - np_per_example_loss(params, batch)
    size = len(rise)
    count = int(np.ceil(round(gamma * size, 9)))
    selected = np.argsort(-rise, kind="stable")[:count]
    x, y = batch
    gs = helpers.grad_numpy(perturbed, (x[selected], y[selected]))
    trace = {k: gs[k] + MOMENTUM * trace[k] for k in params}
    params = {k: params[k] - LR * trace[k] for k in params}
  return params


def run_esam(tx, params, batches, *, with_losses=True):
  """One jitted update per batch through the per-example contract."""

  @jax.jit
  def step(params, state, batch):
    def mean_loss(p):
      losses = per_example_loss(p, batch)
      return losses.mean(), losses

    (_, losses), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    extra = {"losses": losses} if with_losses else {}
    updates, state = tx.update(
      grads, state, params, per_example_loss_fn=per_example_loss, batch=batch, **extra
    )
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for batch in batches:
    params, state = step(params, state, batch)
  return params, state


CASES = {
  "esam": {"rho": 0.1, "beta": 0.5, "gamma": 0.5},
  "esam_per_tensor": {"rho": 0.1, "beta": 0.6, "gamma": 0.3, "per_tensor": True},
  "esam_selected_norm": {"rho": 0.1, "beta": 0.5, "gamma": 0.7, "norm_scope": "selected"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy(case):
  kwargs = CASES[case]
  params, _ = helpers.make_problem(0)
  batches = _batches(4)
  masks = swp_masks(
    3, params, kwargs["beta"], len(batches), per_tensor=kwargs.get("per_tensor", False)
  )
  expected = np_esam_run(
    params, batches, masks=masks, **{k: v for k, v in kwargs.items() if k != "per_tensor"}
  )

  def make():
    return efficient.esam(optax.sgd(LR, momentum=MOMENTUM), key=3, **kwargs)

  if case == "esam":
    actual, _ = run_esam(make(), _f32(params), _f32(batches))
    assert helpers.relative_error(actual, expected) < 1e-5
  with jax.enable_x64(True):
    actual64, _ = run_esam(
      make(), helpers.to_jax(params, jnp.float64), helpers.to_jax(batches, jnp.float64)
    )
    assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(actual64))
  assert helpers.relative_error(actual64, expected) < 1e-12
  # Neither SAM nor a run with other masks or without the selection.
  other_masks = swp_masks(
    4, params, kwargs["beta"], len(batches), kwargs.get("per_tensor", False)
  )
  ones = [jax.tree.map(np.ones_like, params)] * len(batches)
  for reference in [
    np_esam_run(params, batches, rho=kwargs["rho"], beta=1.0, gamma=1.0, masks=ones),
    np_esam_run(
      params,
      batches,
      masks=other_masks,
      **{k: v for k, v in kwargs.items() if k != "per_tensor"},
    ),
  ]:
    assert helpers.relative_error(reference, expected) > 1e-4


def test_clean_losses_argument_changes_nothing():
  params, _ = helpers.make_problem(0)
  batches = _f32(_batches(3))
  tx = lambda: efficient.esam(optax.sgd(LR, momentum=MOMENTUM), rho=0.1, beta=0.5, gamma=0.5)
  given, _ = run_esam(tx(), _f32(params), batches, with_losses=True)
  recomputed, _ = run_esam(tx(), _f32(params), batches, with_losses=False)
  assert helpers.relative_error(given, helpers.to_numpy(recomputed)) < 1e-7


@pytest.mark.parametrize("base", [optax.adam(1e-2)])
def test_beta_gamma_one_is_sam(base):
  params, _ = helpers.make_problem(0)
  batches = _f32(_batches(4))
  actual, _ = run_esam(
    efficient.esam(base, rho=0.07, beta=1.0, gamma=1.0), _f32(params), batches
  )
  expected, _ = helpers.run_steps(sam(base, rho=0.07), _f32(params), batches)
  assert helpers.relative_error(actual, helpers.to_numpy(expected)) < 1e-6


# ---------------------------------------------------------------------------
# SDS: the second gradient really runs on the static-size sub-batch.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "gamma, with_losses, expected",
  [
    (0.5, True, [16, 8]),  # losses at w + eps, then the gradient on 8 examples
    (0.5, False, [16, 16, 8]),  # the clean losses are recomputed
    (0.3, True, [16, 5]),  # ceil(0.3 * 16) = 5
    (0.25, True, [16, 4]),  # exact: no rounding up of 0.25 * 16
    (1.0, True, [16]),  # no selection: the gradient on the whole batch
  ],
)
def test_sds_evaluates_on_the_selected_sub_batch(gamma, with_losses, expected):
  sizes = []

  def recording_loss(params, batch):
    sizes.append(batch[0].shape[0])
    return per_example_loss(params, batch)

  params, batch = helpers.make_problem(0)
  params, batch = _f32(params), _f32(batch)
  tx = efficient.esam(optax.sgd(LR), beta=1.0, gamma=gamma)

  def step(params, state):
    grads = jax.grad(helpers.loss_jax)(params, batch)
    extra = {"losses": per_example_loss(params, batch)} if with_losses else {}
    return tx.update(
      grads, state, params, per_example_loss_fn=recording_loss, batch=batch, **extra
    )

  jax.eval_shape(step, params, tx.init(params))  # traces the step once, as jit would
  assert sizes == expected


def test_sds_selects_the_examples_whose_loss_rose_most():
  # Two examples share w; the loss of the second rises most under the perturbation.
  def loss_fn(w, batch):
    return (w * batch["x"]) ** 2 + batch["c"] * w

  batch = {"x": jnp.array([1.0, 2.0, 0.1]), "c": jnp.array([0.0, 0.0, -10.0])}
  evaluation = efficient.gradient_on_sharpest_examples(gamma=0.34)  # ceil(1.02) = 2
  g_s = evaluation(jnp.array(1.0), jnp.array(0.5), per_example_loss_fn=loss_fn, batch=batch)
  # Rises: 1.25, 5.0, -4.98: the first two; mean of 2 w x^2 + c at w = 1.5.
  np.testing.assert_allclose(float(g_s), (3.0 * 1.0 + 3.0 * 4.0) / 2, rtol=1e-6)


# ---------------------------------------------------------------------------
# SWP: the masks.
# ---------------------------------------------------------------------------


def test_coordinate_masks_have_density_beta_and_rescale():
  tx = efficient.scale_by_bernoulli_mask(beta=0.3, key=1)
  u = {"a": jnp.ones((200, 50)), "b": jnp.ones(1000)}
  state, update = tx.init(u), jax.jit(tx.update)
  kept, previous = [], None
  for _ in range(5):
    masked, state = update(u, state)
    for leaf in jax.tree.leaves(masked):
      values = np.unique(np.asarray(leaf))
      np.testing.assert_allclose(values, [0.0, 1 / 0.3], rtol=1e-6)
    mask = np.concatenate([np.asarray(x).ravel() > 0 for x in jax.tree.leaves(masked)])
    kept.append(mask.mean())
    assert previous is None or (mask != previous).any()  # a fresh mask every step
    previous = mask
  # 11,000 entries per step: the standard deviation of the density is 0.004.
  assert abs(np.mean(kept) - 0.3) < 0.01


def test_per_tensor_masks_keep_or_drop_whole_leaves():
  tx = efficient.scale_by_bernoulli_mask(beta=0.5, key=0, per_tensor=True)
  u = {f"leaf{i}": jnp.ones((3, 4)) for i in range(40)}
  state, update = tx.init(u), jax.jit(tx.update)
  kept = 0
  for _ in range(5):
    masked, state = update(u, state)
    for leaf in jax.tree.leaves(masked):
      assert len(np.unique(np.asarray(leaf))) == 1
      kept += bool(np.asarray(leaf)[0, 0] > 0)
  assert 70 <= kept <= 130  # of 200 leaves, about half


def test_masks_follow_the_documented_draw():
  params, _ = helpers.make_problem(0)
  g = helpers.to_jax(jax.tree.map(np.ones_like, params), jnp.float32)
  tx = efficient.scale_by_bernoulli_mask(beta=0.5, key=7, rescale=False)
  state, update = tx.init(g), jax.jit(tx.update)
  for expected in swp_masks(7, params, 0.5, 3):
    masked, state = update(g, state)
    for k in params:
      np.testing.assert_array_equal(np.asarray(masked[k]), expected[k].astype(np.float32))


def test_typed_and_raw_keys_give_the_same_masks():
  u = {"w": jnp.ones(64)}
  draws = []
  for key in [5, jax.random.key(5), jax.random.PRNGKey(5)]:
    tx = efficient.scale_by_bernoulli_mask(beta=0.5, key=key)
    draws.append(np.asarray(tx.update(u, tx.init(u))[0]["w"]))
  np.testing.assert_array_equal(draws[0], draws[1])
  np.testing.assert_array_equal(draws[0], draws[2])


def test_swp_zero_gradient_gives_zero_perturbation():
  tx = efficient.scale_by_swp(rho=0.1, beta=0.5, norm_scope="selected")
  g = {"w": jnp.zeros(5)}
  eps, _ = tx.update(g, tx.init(g))
  assert np.all(np.asarray(eps["w"]) == 0)


# ---------------------------------------------------------------------------
# Errors name the argument.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "make, pattern",
  [
    (lambda: efficient.esam(optax.sgd(0.1), beta=0.0), r"beta must be a number in \(0, 1\].*"),
    (lambda: efficient.esam(optax.sgd(0.1), beta=1.5), r"beta must be.*beta=1.5"),
    (lambda: efficient.esam(optax.sgd(0.1), beta=-0.2), r"beta must be"),
    (lambda: efficient.esam(optax.sgd(0.1), gamma=0.0), r"gamma must be a number in \(0, 1\]"),
    (lambda: efficient.esam(optax.sgd(0.1), gamma=1.01), r"gamma must be.*gamma=1.01"),
    (lambda: efficient.esam(optax.sgd(0.1), rho=-0.1), r"rho must be"),
    (lambda: efficient.esam(optax.sgd(0.1), norm_scope="some"), r"norm_scope must be one of"),
    (lambda: efficient.scale_by_bernoulli_mask(beta=2.0), r"beta must be"),
  ],
)
def test_bad_hyperparameters_raise_value_error(make, pattern):
  with pytest.raises(ValueError, match=pattern):
    make()


def test_bad_key_raises_type_error():
  with pytest.raises(TypeError, match="key must be an integer seed or a jax.random key"):
    efficient.esam(optax.sgd(0.1), key=0.5)


def test_missing_per_example_arguments_show_the_call():
  tx = efficient.esam(optax.sgd(0.1))
  params = {"w": jnp.ones(3)}
  with pytest.raises(TypeError, match=r"per_example_loss_fn and batch(.|\n)*tx.update"):
    tx.update(params, tx.init(params), params, grad_fn=lambda p: p)


def test_traced_gamma_asks_for_static_args():
  params, batch = _f32(helpers.make_problem(0)[0]), _f32(helpers.make_problem(0)[1])
  tx = optax.inject_hyperparams(efficient.esam)(optax.sgd(0.1), gamma=0.5)
  grads = jax.grad(helpers.loss_jax)(params, batch)
  with pytest.raises(TypeError, match=r"static_args=\('gamma',\)"):
    jax.jit(
      lambda p, s: tx.update(grads, s, p, per_example_loss_fn=per_example_loss, batch=batch)
    )(params, tx.init(params))


# ---------------------------------------------------------------------------
# optax conformance: tests/test_conformance.py's checks, with the per-example contract.
# ---------------------------------------------------------------------------

OPTIMIZERS = {
  "esam": (
    efficient.esam,
    {"optimizer": optax.sgd(0.1, momentum=0.9), "rho": 0.05, "beta": 0.5, "gamma": 0.5},
  ),
  "esam_per_tensor_selected_norm": (
    efficient.esam,
    {
      "optimizer": optax.adam(1e-2),
      "rho": 0.05,
      "beta": 0.6,
      "gamma": 0.75,
      "per_tensor": True,
      "norm_scope": "selected",
    },
  ),
}
BLOCKS = {
  "scale_by_swp": (efficient.scale_by_swp, {"rho": 0.05, "beta": 0.5}),
  "scale_by_bernoulli_mask": (efficient.scale_by_bernoulli_mask, {"beta": 0.5}),
}


@pytest.fixture
def registered(monkeypatch):
  """Adds ESAM to the conformance suite's tables, with the per-example contract."""
  conformance.register(
    monkeypatch, optimizers=OPTIMIZERS, blocks=BLOCKS, per_example=OPTIMIZERS
  )


@pytest.mark.parametrize(
  "name, check",
  [
    ("esam", "test_unknown_extra_args_and_no_recompilation"),
    ("esam", "test_state_stable_through_lax_cond"),
    ("esam", "test_inside_multi_steps"),
    ("esam_per_tensor_selected_norm", "test_state_stable_through_lax_cond"),
    ("scale_by_bernoulli_mask", "test_unknown_extra_args_and_no_recompilation"),
    ("scale_by_bernoulli_mask", "test_inject_hyperparams_gives_identical_results"),
    ("scale_by_bernoulli_mask", "test_state_stable_through_lax_cond"),
    ("scale_by_swp", "test_state_stable_through_lax_cond"),
  ],
)
def test_optax_conformance(registered, name, check):
  getattr(conformance, check)(name)


@pytest.mark.parametrize(
  "name", ["esam", "esam_per_tensor_selected_norm", "scale_by_bernoulli_mask"]
)
def test_dtypes_preserved(registered, name):
  conformance.test_dtypes_preserved(name, jnp.bfloat16)


@pytest.mark.parametrize("name", sorted({**OPTIMIZERS, **BLOCKS}))
def test_map_params(name):
  # optax.tree.map_params initialises with a placeholder for params.
  factory, kwargs = {**OPTIMIZERS, **BLOCKS}[name]
  tx = factory(**kwargs)
  state = tx.init(_f32(helpers.make_problem(0)[0]))
  mapped = optax.tree.map_params(tx, lambda v: v + 1, state)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)


def test_inject_hyperparams_with_static_gamma(registered):
  # gamma fixes a shape, so it is a static argument; rho, beta and key are injected.
  name = "esam"
  factory, kwargs = OPTIMIZERS[name]
  params, batch = conformance._problem()
  tx = factory(**kwargs)
  injected = optax.inject_hyperparams(factory, static_args=("gamma",))(**kwargs)
  state, injected_state = tx.init(params), injected.init(params)
  assert set(injected_state.hyperparams) >= {"rho", "beta", "key"}
  step = jax.jit(
    lambda t, p, s: conformance._one_update(name, t, p, batch, s), static_argnums=0
  )
  for _ in range(2):
    updates, state = step(tx, params, state)
    injected_updates, injected_state = step(injected, params, injected_state)
    conformance._assert_trees_close(injected_updates, updates)
    conformance._assert_trees_close(injected_state.inner_state, state)
    params = optax.apply_updates(params, updates)
