"""Diagnostics against dense float64 references and closed forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from samx import diagnostics
from tests import helpers


@pytest.fixture(scope="module")
def problem64():
  with jax.enable_x64(True):
    params, batch = helpers.make_problem(3)
    params, batch = helpers.to_jax(params, jnp.float64), helpers.to_jax(batch, jnp.float64)
    loss = lambda p: helpers.loss_jax(p, batch)
    flat, unravel = ravel_pytree(params)
    dense = np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat))
  return params, batch, loss, dense


def _eigvalsh(dense):
  return np.sort(np.linalg.eigvalsh(dense))[::-1]


def test_hvp_matches_the_dense_hessian(problem64):
  params, _, loss, dense = problem64
  with jax.enable_x64(True):
    flat, unravel = ravel_pytree(params)
    v = np.random.default_rng(0).normal(size=flat.shape)
    hv = ravel_pytree(diagnostics.hvp(loss, params, unravel(jnp.asarray(v))))[0]
  np.testing.assert_allclose(np.asarray(hv), dense @ v, rtol=1e-10, atol=1e-12)


def test_lanczos_top_k_matches_the_dense_spectrum(problem64):
  params, _, loss, dense = problem64
  expected = _eigvalsh(dense)[:3]
  with jax.enable_x64(True):
    eig = diagnostics.hessian_eigenvalues(loss, params, k=3, num_iterations=40)
    vectors = jax.vmap(lambda t: ravel_pytree(t)[0])(eig.eigenvectors)
  np.testing.assert_allclose(np.asarray(eig.eigenvalues), expected, rtol=1e-8)
  for value, vector in zip(np.asarray(eig.eigenvalues), np.asarray(vectors), strict=True):
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, rtol=1e-10)
    np.testing.assert_allclose(dense @ vector, value * vector, atol=1e-7)


def test_power_iteration_matches_the_largest_magnitude_eigenvalues(problem64):
  params, _, loss, dense = problem64
  spectrum = np.linalg.eigvalsh(dense)
  by_magnitude = spectrum[np.argsort(-np.abs(spectrum))][:2]
  with jax.enable_x64(True):
    eig = diagnostics.hessian_eigenvalues(
      loss, params, k=2, method="power", num_iterations=3000
    )
  np.testing.assert_allclose(
    np.asarray(eig.eigenvalues), np.sort(by_magnitude)[::-1], rtol=1e-6
  )


def test_hutchinson_trace_within_its_standard_error(problem64):
  params, _, loss, dense = problem64
  samples = 2000
  off_diagonal = np.sum(dense**2) - np.sum(np.diag(dense) ** 2)
  standard_error = np.sqrt(2.0 * off_diagonal / samples)
  with jax.enable_x64(True):
    estimate = float(diagnostics.hessian_trace(loss, params, num_samples=samples))
  assert abs(estimate - np.trace(dense)) < 4.0 * standard_error
  assert standard_error < 0.2 * abs(np.trace(dense))  # the test has power


def test_trace_is_exact_for_a_diagonal_hessian():
  loss = lambda w: 0.5 * jnp.sum(jnp.arange(1.0, 6.0) * w**2)
  assert float(diagnostics.hessian_trace(loss, jnp.zeros(5), num_samples=3)) == 15.0


def test_gradient_alignment_against_numpy(problem64):
  params, batch, loss, dense = problem64
  with jax.enable_x64(True):
    eig = diagnostics.hessian_eigenvalues(loss, params, k=1, num_iterations=40)
    top = jax.tree.map(lambda v: v[0], eig.eigenvectors)
    out = diagnostics.gradient_alignment(loss, params, top, rho=0.1)
    v = np.asarray(ravel_pytree(top)[0])
  p = helpers.to_numpy(params)
  g = helpers.grad_numpy(p, helpers.to_numpy(batch))
  e = {k: 0.1 * v / (helpers.np_norm(g) + 1e-12) for k, v in g.items()}
  gs = helpers.grad_numpy({k: p[k] + e[k] for k in p}, helpers.to_numpy(batch))
  for key, grad in (("gradient", g), ("sam_gradient", gs)):
    flat = np.concatenate([np.ravel(grad[k]) for k in sorted(grad)])
    cosine = flat @ v / np.linalg.norm(flat)
    np.testing.assert_allclose(float(out[key]), cosine, rtol=1e-6)


def test_sam_edge_limits_and_value():
  eta, g = 0.05, 2.0
  assert float(diagnostics.sam_edge(eta, 0.0, g)) == pytest.approx(2.0 / eta)
  assert float(diagnostics.sam_edge(eta, 1e-9, g)) == pytest.approx(2.0 / eta, rel=1e-6)
  for rho in (0.01, 0.1, 1.0):
    assert float(diagnostics.sam_edge(eta, rho, g)) < 2.0 / eta
  # Hand-computed: (g / 2 rho) (sqrt(1 + 8 rho / (eta g)) - 1) with eta=0.05, rho=0.1, g=2:
  # 10 * (sqrt(1 + 8) - 1) = 20.
  assert float(diagnostics.sam_edge(eta, 0.1, g)) == pytest.approx(20.0, rel=1e-6)
  # Decreasing in rho, increasing in the gradient norm.
  edges = np.asarray(diagnostics.sam_edge(eta, jnp.array([0.01, 0.1, 1.0]), g))
  assert np.all(np.diff(edges) < 0)
  assert float(diagnostics.sam_edge(eta, 0.1, 10.0)) > float(
    diagnostics.sam_edge(eta, 0.1, 1.0)
  )


def test_m_sharpness_on_a_quadratic_matches_its_closed_form():
  # l_n(w) = 0.5 (x_n . w)^2; at w = 0 the worst rise in the rho-ball over a shard is
  # 0.5 rho^2 lambda_max(X_s^T X_s / m).
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 4))
  losses = lambda w, b: 0.5 * (b["x"] @ w) ** 2
  rho = 0.3
  for m in (1, 2, 4, 8):
    expected = np.mean(
      [
        0.5 * rho**2 * np.linalg.eigvalsh(x[i : i + m].T @ x[i : i + m] / m)[-1]
        for i in range(0, 8, m)
      ]
    )
    with jax.enable_x64(True):
      value = diagnostics.m_sharpness(
        losses, jnp.zeros(4, jnp.float64), {"x": jnp.asarray(x)}, m=m, rho=rho, num_steps=200
      )
    np.testing.assert_allclose(float(value), expected, rtol=1e-6)


def test_m_sharpness_adaptive_and_masked_balls_on_a_linear_loss():
  # Linear loss b . w: the max over ||T^{-1} eps|| <= rho is rho ||T b||.
  w = {"k": jnp.array([[2.0, -1.0]]), "b": jnp.array([0.5])}
  b = {"k": np.array([[1.0, 3.0]]), "b": np.array([2.0])}

  def losses(p, batch):
    return batch["s"] * (jnp.sum(p["k"] * b["k"]) + jnp.sum(p["b"] * b["b"]))

  batch = {"s": jnp.ones(2)}
  eta, rho = 0.1, 0.2
  t_b = np.concatenate([(np.abs(np.asarray(w["k"])) + eta).ravel() * b["k"].ravel(), b["b"]])
  adaptive = diagnostics.m_sharpness(
    losses, w, batch, m=2, rho=rho, ball="adaptive", eta=eta, num_steps=20
  )
  np.testing.assert_allclose(float(adaptive), rho * np.linalg.norm(t_b), rtol=1e-5)
  only_bias = diagnostics.m_sharpness(
    losses, w, batch, m=1, rho=rho, mask={"k": False, "b": True}, num_steps=20
  )
  np.testing.assert_allclose(float(only_bias), rho * 2.0, rtol=1e-5)


def test_landscape_slices():
  loss = lambda p: jnp.sum(p["w"] ** 2) + p["b"][0] ** 4
  params = {"w": jnp.array([[1.0, -2.0], [0.5, 0.0]]), "b": jnp.array([1.0])}
  d1 = diagnostics.filter_normalized_direction(params, jax.random.key(0))
  np.testing.assert_allclose(
    np.linalg.norm(np.asarray(d1["w"]), axis=0),
    np.linalg.norm(np.asarray(params["w"]), axis=0),
    rtol=1e-6,
  )
  assert float(jnp.abs(d1["b"]).sum()) == 0.0
  d2 = diagnostics.filter_normalized_direction(params, jax.random.key(1), ignore_1d=False)
  np.testing.assert_allclose(float(jnp.abs(d2["b"][0])), 1.0, rtol=1e-6)
  alphas, betas = jnp.linspace(-1, 1, 5), jnp.linspace(-0.5, 0.5, 3)
  line = diagnostics.loss_slice_1d(loss, params, d1, alphas)
  grid = diagnostics.loss_slice_2d(loss, params, (d1, d2), alphas, betas)
  for i, a in enumerate(np.asarray(alphas)):
    moved = jax.tree.map(lambda w, d, a=a: w + a * d, params, d1)
    np.testing.assert_allclose(float(line[i]), float(loss(moved)), rtol=1e-6)
    for j, b in enumerate(np.asarray(betas)):
      moved2 = jax.tree.map(lambda w, x, y, a=a, b=b: w + a * x + b * y, params, d1, d2)
      np.testing.assert_allclose(float(grid[i, j]), float(loss(moved2)), rtol=1e-5)
  other = jax.tree.map(lambda x: x + 1.0, params)
  between = diagnostics.loss_slice_1d(
    loss, params, diagnostics.interpolation_direction(params, other), jnp.array([0.0, 1.0])
  )
  np.testing.assert_allclose(np.asarray(between), [float(loss(params)), float(loss(other))])


def test_functions_jit_without_retracing():
  params, batch = helpers.to_jax(helpers.make_problem(3), jnp.float32)
  loss = lambda p: helpers.loss_jax(p, batch)
  traces = []

  @jax.jit
  def measure(p, key):
    traces.append(1)
    eig = diagnostics.hessian_eigenvalues(loss, p, k=2, num_iterations=10, key=key)
    trace = diagnostics.hessian_trace(loss, p, num_samples=4, key=key)
    top = jax.tree.map(lambda v: v[0], eig.eigenvectors)
    align = diagnostics.gradient_alignment(loss, p, top)
    line = diagnostics.loss_slice_1d(loss, p, top, jnp.linspace(-1, 1, 3))
    d = diagnostics.filter_normalized_direction(p, key)
    plane = diagnostics.loss_slice_2d(loss, p, (top, d), jnp.zeros(2), jnp.ones(2))
    per_example = lambda q, b: (
      0.5
      * jnp.sum((jnp.tanh(b[0] @ q["W1"] + q["b1"][None, :]) @ q["W2"] - b[1]) ** 2, axis=-1)
    )
    sharp = diagnostics.m_sharpness(per_example, p, batch, m=4, num_steps=2, key=key)
    edge = diagnostics.sam_edge(0.1, 0.05, trace)
    return eig.eigenvalues, trace, align, line, plane, sharp, edge

  measure(params, jax.random.key(0))
  moved = jax.tree.map(lambda x: x * 1.1, params)
  measure(moved, jax.random.key(1))
  assert len(traces) == 1


def test_nnx_loss_leaves_the_model_untouched():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
      return self.norm(self.dense(x))

  model = Net(nnx.Rngs(0))
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  loss, params = diagnostics.nnx_loss(model, lambda m, x: jnp.mean(m(x) ** 2), jnp.ones((5, 3)))
  eig = diagnostics.hessian_eigenvalues(loss, params, k=1, num_iterations=5)
  assert np.isfinite(float(eig.eigenvalues[0]))
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  assert jax.tree.all(jax.tree.map(np.array_equal, before, after))


@pytest.mark.parametrize(
  "call, pattern",
  [
    (
      lambda loss, p: diagnostics.hessian_eigenvalues(loss, p, k=100),
      r"k must be at most .*63",
    ),
    (
      lambda loss, p: diagnostics.hessian_eigenvalues(loss, p, k=0),
      r"k must be an integer >= 1",
    ),
    (
      lambda loss, p: diagnostics.hessian_eigenvalues(loss, p, num_iterations=0),
      r"num_iterations must be an integer >= 1",
    ),
    (
      lambda loss, p: diagnostics.hessian_trace(loss, p, num_samples=-1),
      r"num_samples must be",
    ),
    (lambda loss, p: diagnostics.hessian_eigenvalues(loss, p, method="qr"), r"method must be"),
    (lambda loss, p: diagnostics.sam_edge(0.0, 0.1, 1.0), r"learning_rate must be a positive"),
  ],
)
def test_bad_input(call, pattern):
  params, batch = helpers.to_jax(helpers.make_problem(3), jnp.float32)
  with pytest.raises(ValueError, match=pattern):
    call(lambda p: helpers.loss_jax(p, batch), params)


def test_non_scalar_loss_is_reported():
  with pytest.raises(ValueError, match=r"loss_fn must return a scalar loss.*\(3,\)"):
    diagnostics.hessian_eigenvalues(lambda w: w**2, jnp.ones(3))
