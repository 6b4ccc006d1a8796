"""Sharpness diagnostics: Hessian spectrum and trace, the SAM edge, m-sharpness, landscapes.

Every function works on any params pytree and a loss function ``loss_fn(params) ->
scalar`` (close over the batch), runs under ``jax.jit`` (the loss function and the
integer settings are static; PRNG keys are explicit arguments), and uses exact
Hessian-vector products by forward-over-reverse differentiation.

For a Flax NNX model, :func:`nnx_loss` turns ``loss_fn(model, *batch)`` into a
function of the parameter state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from samx import checks, masks, numerics

__all__ = [
  "HessianEigen",
  "filter_normalized_direction",
  "gradient_alignment",
  "hessian_eigenvalues",
  "hessian_trace",
  "hvp",
  "interpolation_direction",
  "loss_slice_1d",
  "loss_slice_2d",
  "m_sharpness",
  "nnx_loss",
  "plot_loss_slice",
  "sam_edge",
]


class HessianEigen(NamedTuple):
  """Top eigenpairs of a Hessian.

  Attributes:
    eigenvalues: ``(k,)`` eigenvalues, largest first.
    eigenvectors: a pytree like ``params`` whose leaves have a leading axis of size
      ``k``; ``jax.tree.map(lambda v: v[i], eigenvectors)`` is the ``i``-th unit
      eigenvector (global L2 norm 1).
  """

  eigenvalues: jax.Array
  eigenvectors: Any


def _check_scalar_loss(loss_fn: Callable[[Any], Any], params: Any) -> None:
  out = jax.eval_shape(loss_fn, params)
  if not hasattr(out, "shape") or out.shape != ():
    shape = getattr(out, "shape", type(out).__name__)
    raise ValueError(
      f"loss_fn must return a scalar loss (shape ()); got {shape}. Average per-example "
      "losses, e.g. loss_fn = lambda p: jnp.mean(per_example_loss(p, batch))."
    )


def _check_count(name: str, value: int, minimum: int = 1) -> None:
  if not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}; got {name}={value!r}")


def _num_params(params: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def hvp(loss_fn: Callable[[Any], Any], params: Any, vector: Any) -> Any:
  r"""The exact Hessian-vector product :math:`H v` by forward-over-reverse.

  .. math::
    H v = \frac{\partial}{\partial t} \nabla L(w + t v) \Big|_{t=0}

  Args:
    loss_fn: ``loss_fn(params) -> scalar``.
    params: the point :math:`w`.
    vector: :math:`v`, with the structure of ``params``.

  Returns:
    :math:`H v`, with the structure of ``params``.

  >>> loss = lambda w: 0.5 * (3.0 * w[0] ** 2 + w[1] ** 2)
  >>> hvp(loss, jnp.zeros(2), jnp.array([1.0, 1.0]))
  Array([3., 1.], dtype=float32)
  """
  checks.check_same_structure("vector", vector, "params", params)
  return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def _flat_operator(loss_fn, params):
  flat, unravel = ravel_pytree(params)

  def matvec(v):
    return ravel_pytree(hvp(loss_fn, params, unravel(v.astype(flat.dtype))))[0]

  return flat, unravel, matvec


def _normalize(v):
  return v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(v.dtype).tiny)


def _power_iteration(matvec, v0, deflate, num_iterations):
  def body(_, v):
    return _normalize(deflate(matvec(deflate(v))))

  v = jax.lax.fori_loop(0, num_iterations, body, _normalize(deflate(v0)))
  return jnp.vdot(v, deflate(matvec(v))), v


def _lanczos(matvec, v0, num_iterations):
  """Lanczos with full reorthogonalisation; returns the tridiagonal T and the basis Q."""
  n = v0.shape[0]
  m = num_iterations
  basis = jnp.zeros((m, n), v0.dtype)
  alphas = jnp.zeros(m, v0.dtype)
  betas = jnp.zeros(m, v0.dtype)

  def body(i, carry):
    basis, alphas, betas, v, v_prev, beta = carry
    basis = basis.at[i].set(v)
    w = matvec(v)
    alpha = jnp.vdot(w, v)
    w = w - alpha * v - beta * v_prev
    # Twice-applied full reorthogonalisation against the basis built so far.
    active = (jnp.arange(m) <= i)[:, None]
    for _ in range(2):
      w = w - (basis * active).T @ ((basis * active) @ w)
    beta_next = jnp.linalg.norm(w)
    v_next = w / jnp.maximum(beta_next, jnp.finfo(v0.dtype).tiny)
    return (
      basis,
      alphas.at[i].set(alpha),
      betas.at[i].set(beta_next),
      v_next,
      v,
      beta_next,
    )

  init = (basis, alphas, betas, _normalize(v0), jnp.zeros_like(v0), jnp.zeros((), v0.dtype))
  basis, alphas, betas, *_ = jax.lax.fori_loop(0, m, body, init)
  tridiagonal = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
  return tridiagonal, basis


def hessian_eigenvalues(
  loss_fn: Callable[[Any], Any],
  params: Any,
  k: int = 1,
  *,
  method: Literal["lanczos", "power"] = "lanczos",
  num_iterations: int = 50,
  key: jax.Array | None = None,
) -> HessianEigen:
  r"""The top-``k`` eigenvalues and eigenvectors of the Hessian of ``loss_fn`` at ``params``.

  Uses exact Hessian-vector products (:func:`hvp`) on the flattened parameters.

  - ``method="lanczos"``: ``num_iterations`` Lanczos steps with full
    reorthogonalisation; returns the ``k`` largest (algebraic) Ritz values. Memory
    ``num_iterations x n`` for ``n`` parameters.
  - ``method="power"``: power iteration with deflation, ``num_iterations`` steps per
    eigenpair; returns the eigenvalues of largest *magnitude* (sign kept), which are
    the largest ones whenever the spectrum's positive end dominates, as it does near
    a minimum.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``.
    params: where to take the Hessian.
    k: how many eigenpairs, ``1 <= k <= n``.
    method: ``"lanczos"`` or ``"power"``.
    num_iterations: Lanczos steps (at least ``k``, at most ``n``) or power steps per
      eigenpair, >= 1.
    key: PRNG key of the random start vector (default ``jax.random.key(0)``).

  Returns:
    A :class:`HessianEigen`, eigenvalues sorted largest first.

  >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([5.0, 2.0, 1.0]) * w ** 2)
  >>> eig = hessian_eigenvalues(loss, jnp.zeros(3), k=2, num_iterations=3)
  >>> [round(float(x), 4) for x in eig.eigenvalues]
  [5.0, 2.0]

  References:
    Ghorbani et al., `An Investigation into Neural Net Optimization via Hessian
    Eigenvalue Density <https://arxiv.org/abs/1901.10159>`_, 2019
  """
  _check_count("k", k)
  _check_count("num_iterations", num_iterations)
  if method not in ("lanczos", "power"):
    raise ValueError(f"method must be 'lanczos' or 'power'; got method={method!r}")
  n = _num_params(params)
  if k > n:
    raise ValueError(f"k must be at most the number of parameters ({n}); got k={k}")
  _check_scalar_loss(loss_fn, params)
  key = jax.random.key(0) if key is None else key
  flat, unravel, matvec = _flat_operator(loss_fn, params)
  v0 = jax.random.normal(key, flat.shape, numerics.accumulation_dtype(flat.dtype))

  if method == "lanczos":
    if num_iterations < k:
      raise ValueError(
        f"num_iterations must be >= k for Lanczos; got num_iterations={num_iterations}, k={k}"
      )
    steps = min(num_iterations, n)
    tridiagonal, basis = _lanczos(matvec, v0, steps)
    ritz_values, ritz_vectors = jnp.linalg.eigh(tridiagonal)
    order = jnp.argsort(-ritz_values)[:k]
    values = ritz_values[order]
    vectors = (basis.T @ ritz_vectors[:, order]).T
  else:
    values, vectors = [], []
    for _ in range(k):
      found = list(zip(values, vectors, strict=True))

      def deflate(v, found=found):
        for _, vector in found:
          v = v - jnp.vdot(vector, v) * vector
        return v

      value, vector = _power_iteration(matvec, v0, deflate, num_iterations)
      values.append(value)
      vectors.append(vector)
    values, vectors = jnp.stack(values), jnp.stack(vectors)
    order = jnp.argsort(-values)
    values, vectors = values[order], vectors[order]

  vectors = vectors / jnp.linalg.norm(vectors, axis=1, keepdims=True)
  tree = jax.vmap(lambda v: unravel(v.astype(flat.dtype)))(vectors)
  return HessianEigen(values, tree)


def hessian_trace(
  loss_fn: Callable[[Any], Any],
  params: Any,
  *,
  num_samples: int = 100,
  key: jax.Array | None = None,
) -> jax.Array:
  r"""Hutchinson's estimate of the Hessian trace, :math:`\mathbb{E}_z[z^\top H z]`.

  ``z`` has independent Rademacher (±1) entries; the estimate is the mean over
  ``num_samples`` draws (unbiased; its variance is
  :math:`2\sum_{i \ne j} H_{ij}^2 / \text{num\_samples}`).

  Args:
    loss_fn: ``loss_fn(params) -> scalar``.
    params: where to take the Hessian.
    num_samples: the number of probe vectors, >= 1.
    key: PRNG key (default ``jax.random.key(0)``).

  Returns:
    The scalar estimate.

  >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([5.0, 2.0, 1.0]) * w ** 2)
  >>> float(hessian_trace(loss, jnp.zeros(3), num_samples=4))
  8.0

  References:
    Hutchinson, `A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines <https://doi.org/10.1080/03610918908812806>`_, 1989
  """
  _check_count("num_samples", num_samples)
  _check_scalar_loss(loss_fn, params)
  key = jax.random.key(0) if key is None else key
  flat, _, matvec = _flat_operator(loss_fn, params)

  def one(k):
    z = jax.random.rademacher(k, flat.shape, numerics.accumulation_dtype(flat.dtype))
    return jnp.vdot(z, matvec(z))

  return jnp.mean(jax.lax.map(one, jax.random.split(key, num_samples)))


def _cosine(a: Any, b: Any) -> jax.Array:
  fa, fb = ravel_pytree(a)[0], ravel_pytree(b)[0]
  fa = fa.astype(numerics.accumulation_dtype(fa.dtype))
  fb = fb.astype(fa.dtype)
  return jnp.vdot(fa, fb) * numerics.safe_inverse(jnp.linalg.norm(fa) * jnp.linalg.norm(fb))


def gradient_alignment(
  loss_fn: Callable[[Any], Any],
  params: Any,
  eigenvector: Any,
  *,
  rho: float = 0.05,
  eps: float = 1e-12,
) -> dict[str, jax.Array]:
  r"""Cosines of the gradient and of the SAM gradient with a Hessian eigenvector.

  .. math::
    \cos(g, v), \qquad \cos(g_s, v), \quad
    g_s = \nabla L\big(w + \rho\, g / (\|g\| + \mathrm{eps})\big)

  Args:
    loss_fn: ``loss_fn(params) -> scalar``.
    params: the point :math:`w`.
    eigenvector: :math:`v` (e.g. the top eigenvector from :func:`hessian_eigenvalues`).
    rho: SAM's radius for :math:`g_s`.
    eps: the stabiliser of the normalisation.

  Returns:
    ``{"gradient": cos(g, v), "sam_gradient": cos(g_s, v)}``; the sign of an
    eigenvector is arbitrary, so read absolute values.

  >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([5.0, 1.0]) * w ** 2)
  >>> out = gradient_alignment(loss, jnp.array([1.0, 0.0]), jnp.array([1.0, 0.0]))
  >>> float(out["gradient"]), float(out["sam_gradient"])
  (1.0, 1.0)
  """
  checks.check_same_structure("eigenvector", eigenvector, "params", params)
  _check_scalar_loss(loss_fn, params)
  grad = jax.grad(loss_fn)(params)
  scale = rho * numerics.safe_inverse(numerics.global_norm(grad) + eps)
  perturbed = jax.tree.map(lambda p, g: p + (scale * g).astype(p.dtype), params, grad)
  sam_grad = jax.grad(loss_fn)(perturbed)
  return {
    "gradient": _cosine(grad, eigenvector),
    "sam_gradient": _cosine(sam_grad, eigenvector),
  }


def sam_edge(learning_rate: Any, rho: Any, grad_norm: Any) -> jax.Array:
  r"""The SAM edge of stability of Long & Bartlett.

  .. math::
    \lambda_{\mathrm{SAM}} = \frac{\|g\|}{2\rho}
      \left(\sqrt{1 + \frac{8\rho}{\eta\,\|g\|}} - 1\right)

  It tends to :math:`2/\eta` (GD's edge) as :math:`\rho \to 0` and is below it for
  every :math:`\rho > 0`. ``rho = 0`` returns exactly :math:`2/\eta`.

  Args:
    learning_rate: :math:`\eta > 0`.
    rho: SAM's radius :math:`\rho \ge 0`.
    grad_norm: :math:`\|g\| \ge 0`.

  Returns:
    :math:`\lambda_{\mathrm{SAM}}` (broadcast over array arguments).

  >>> float(sam_edge(0.1, 0.0, 1.0))
  20.0
  >>> round(float(sam_edge(0.1, 0.5, 1.0)), 4)   # (1/1) * (sqrt(1 + 40) - 1)
  5.4031

  References:
    Long and Bartlett, `Sharpness-Aware Minimization and the Edge of Stability
    <https://arxiv.org/abs/2309.12488>`_, 2023
  """
  checks.check_positive("learning_rate", learning_rate)
  checks.check_nonnegative("rho", rho)
  checks.check_nonnegative("grad_norm", grad_norm)
  eta = jnp.asarray(learning_rate, jnp.float32)
  rho = jnp.asarray(rho, eta.dtype)
  g = jnp.asarray(grad_norm, eta.dtype)
  x = 8.0 * rho / (eta * g)
  # (g / 2 rho) (sqrt(1 + x) - 1) = (g / 2 rho) x / (sqrt(1 + x) + 1) = 4 / (eta (sqrt(1+x)+1)):
  # the second form is exact at rho = 0 and stable for small rho.
  return jnp.where(rho > 0, 4.0 / (eta * (jnp.sqrt(1.0 + x) + 1.0)), 2.0 / eta)


Ball = Literal["l2", "adaptive"]


def m_sharpness(
  per_example_loss_fn: Callable[[Any, Any], Any],
  params: Any,
  batch: Any,
  *,
  m: int,
  rho: float = 0.05,
  num_steps: int = 10,
  step_size: float | None = None,
  ball: Ball = "l2",
  eta: float = 0.01,
  mask: masks.Mask = None,
  key: jax.Array | None = None,
) -> jax.Array:
  r"""m-sharpness: the mean over shards of size ``m`` of the worst loss rise in a ball.

  .. math::
    S_m = \frac{1}{k} \sum_{i=1}^{k} \max_{\epsilon \in \mathcal{B}}
      L_{B_i}(w + \epsilon) - L_{B_i}(w)

  with the batch split in order into :math:`k = B/m` shards :math:`B_i`. The inner
  maximum is estimated by projected gradient ascent: ``num_steps`` steps of size
  ``step_size`` (default :math:`\rho`) along the normalised gradient, each followed
  by the projection onto the ball, from a random start on the sphere. Balls:

  - ``"l2"``: :math:`\|\epsilon\| \le \rho` (SAM);
  - ``"adaptive"``: :math:`\|T_w^{-1}\epsilon\| \le \rho` with ASAM's
    :math:`T_w = |w| + \eta` on ``mask`` leaves (default ``ndim >= 2``), 1 elsewhere;
  - with ``mask`` and ``ball="l2"``, only the selected leaves move (the SAM-ON ball).

  Args:
    per_example_loss_fn: ``(params, batch) -> (B,)`` per-example losses.
    params: the point :math:`w`.
    batch: a pytree with a leading example axis of size ``B``, a multiple of ``m``.
    m: the shard size, ``1 <= m <= B``.
    rho: the radius.
    num_steps: ascent steps, >= 1.
    step_size: the step length (default ``rho``).
    ball: ``"l2"`` or ``"adaptive"``.
    eta: ASAM's offset for the adaptive ball.
    mask: leaves allowed to move (``l2``) or to get :math:`T_w` (``adaptive``).
    key: PRNG key of the random starts (default ``jax.random.key(0)``).

  Returns:
    The scalar :math:`S_m` (never negative: the ascent keeps its best point and
    starts no worse than :math:`\epsilon = 0`).

  >>> losses = lambda w, b: b["x"] @ w          # linear: the max is rho * |x_i|
  >>> batch = {"x": jnp.array([[3.0, 4.0], [0.0, 1.0]])}
  >>> round(float(m_sharpness(losses, jnp.zeros(2), batch, m=1, rho=0.1)), 4)
  0.3

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021 (Section 4.1)
  """
  from samx.evaluation import batch_size

  _check_count("m", m)
  _check_count("num_steps", num_steps)
  checks.check_nonnegative("rho", rho)
  if ball not in ("l2", "adaptive"):
    raise ValueError(f"ball must be 'l2' or 'adaptive'; got ball={ball!r}")
  size = batch_size(batch, who="m_sharpness")
  if m > size or size % m:
    raise ValueError(f"m must divide the batch size {size} and be at most it; got m={m}")
  step_size = rho if step_size is None else step_size
  key = jax.random.key(0) if key is None else key
  shards = jax.tree.map(lambda x: x.reshape(size // m, m, *x.shape[1:]), batch)

  if ball == "adaptive":
    selected = masks.resolve_mask(mask, params, default=masks.weight_leaves)
    scale = jax.tree.map(
      lambda w, on: (jnp.abs(w) + eta) if on else jnp.ones_like(w), params, selected
    )
  elif mask is not None:
    selected = masks.resolve_mask(mask, params, default=masks.weight_leaves)
    scale = jax.tree.map(lambda w, on: jnp.ones_like(w) * on, params, selected)
  else:
    scale = jax.tree.map(jnp.ones_like, params)

  def project(delta):  # delta lives in the scaled coordinates: eps = scale * delta
    delta = jax.tree.map(jnp.multiply, delta, jax.tree.map(lambda s: s != 0, scale))
    norm = numerics.global_norm(delta)
    factor = jnp.minimum(1.0, rho * numerics.safe_inverse(norm))
    return jax.tree.map(lambda d: d * factor.astype(d.dtype), delta)

  def one_shard(shard, k):
    def loss(p):
      return jnp.mean(per_example_loss_fn(p, shard))

    def loss_at(delta):
      return loss(jax.tree.map(lambda w, s, d: w + s * d, params, scale, delta))

    base = loss(params)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(k, len(leaves))
    start = jax.tree.unflatten(
      treedef,
      [jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, leaves, strict=True)],
    )
    start = project(jax.tree.map(lambda d: d * 1e6, start))  # onto the sphere

    def body(_, carry):
      delta, best = carry
      g = jax.grad(loss_at)(delta)
      g = jax.tree.map(jnp.multiply, g, jax.tree.map(lambda s: s != 0, scale))
      unit = step_size * numerics.safe_inverse(numerics.global_norm(g))
      delta = project(jax.tree.map(lambda d, gg: d + unit * gg, delta, g))
      return delta, jnp.maximum(best, loss_at(delta))

    _, best = jax.lax.fori_loop(0, num_steps, body, (start, jnp.maximum(base, loss_at(start))))
    return best - base

  rises = jax.lax.map(lambda args: one_shard(*args), (shards, jax.random.split(key, size // m)))
  return jnp.mean(rises)


def filter_normalized_direction(params: Any, key: jax.Array, *, ignore_1d: bool = True) -> Any:
  r"""A random direction with filter normalisation (Li et al., 2018).

  Each leaf with ``ndim >= 2`` gets Gaussian entries rescaled so that every filter
  (slice along the last, output, axis) has the norm of the matching filter of
  ``params``: :math:`d_j \leftarrow d_j \|w_j\| / \|d_j\|`. One-dimensional leaves
  (biases, normalisation scales) get zeros with ``ignore_1d=True`` (the paper's
  choice), or are normalised as a single filter otherwise.

  Args:
    params: the parameters the direction is for.
    key: PRNG key.
    ignore_1d: zero out one-dimensional leaves.

  Returns:
    A direction with the structure of ``params``.

  >>> w = {"k": jnp.ones((3, 2)), "b": jnp.ones(2)}
  >>> d = filter_normalized_direction(w, jax.random.key(0))
  >>> [round(float(x), 4) for x in jnp.linalg.norm(d["k"], axis=0)], float(d["b"].sum())
  ([1.7321, 1.7321], 0.0)

  References:
    Li et al., `Visualizing the Loss Landscape of Neural Nets
    <https://arxiv.org/abs/1712.09913>`_, 2018
  """
  if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
    raise TypeError(f"key must be a PRNG key from jax.random.key(seed); got key={key!r}")
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))

  def one(w, k):
    d = jax.random.normal(k, w.shape, numerics.accumulation_dtype(w.dtype))
    w32 = w.astype(d.dtype)
    if w.ndim >= 2:
      axes = tuple(range(w.ndim - 1))
      d = (
        d
        * jnp.linalg.norm(w32, axis=axes, keepdims=True)
        * numerics.safe_inverse(jnp.linalg.norm(d, axis=axes, keepdims=True))
      )
    elif ignore_1d:
      d = jnp.zeros_like(d)
    else:
      d = d * jnp.linalg.norm(w32) * numerics.safe_inverse(jnp.linalg.norm(d))
    return d.astype(w.dtype)

  return jax.tree.unflatten(treedef, [one(w, k) for w, k in zip(leaves, keys, strict=False)])


def interpolation_direction(params_from: Any, params_to: Any) -> Any:
  """The direction from one parameter set to another, ``params_to - params_from``.

  With :func:`loss_slice_1d` at ``params_from`` and alphas in [0, 1] this is the
  linear interpolation between two solutions (e.g. an SGD and a SAM solution).

  >>> interpolation_direction({"w": jnp.array(1.0)}, {"w": jnp.array(3.0)})
  {'w': Array(2., dtype=float32, weak_type=True)}
  """
  checks.check_same_structure("params_from", params_from, "params_to", params_to)
  return jax.tree.map(lambda a, b: b - a, params_from, params_to)


def loss_slice_1d(
  loss_fn: Callable[[Any], Any], params: Any, direction: Any, alphas: Any
) -> jax.Array:
  r"""The loss along a line, :math:`L(w + \alpha d)` for each ``alpha``.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``.
    params: the centre :math:`w`.
    direction: :math:`d`, with the structure of ``params``.
    alphas: a 1-D array of offsets.

  Returns:
    The losses, shape ``alphas.shape``.

  >>> loss = lambda w: jnp.sum(w ** 2)
  >>> loss_slice_1d(loss, jnp.zeros(2), jnp.ones(2), jnp.array([-1.0, 0.0, 2.0]))
  Array([2., 0., 8.], dtype=float32)
  """
  _check_scalar_loss(loss_fn, params)
  checks.check_same_structure("direction", direction, "params", params)

  def at(alpha):
    return loss_fn(
      jax.tree.map(lambda w, d: w + (alpha * d).astype(w.dtype), params, direction)
    )

  return jax.lax.map(at, jnp.asarray(alphas))


def loss_slice_2d(
  loss_fn: Callable[[Any], Any],
  params: Any,
  directions: Sequence[Any],
  alphas: Any,
  betas: Any,
) -> jax.Array:
  r"""The loss on a plane, :math:`L(w + \alpha d_1 + \beta d_2)` on the grid.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``.
    params: the centre :math:`w`.
    directions: ``(d1, d2)``, each with the structure of ``params``.
    alphas: 1-D offsets along ``d1``.
    betas: 1-D offsets along ``d2``.

  Returns:
    The losses, shape ``(len(alphas), len(betas))``.

  >>> loss = lambda w: jnp.sum(w ** 2)
  >>> grid = loss_slice_2d(loss, jnp.zeros(2), (jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])),
  ...                      jnp.array([0.0, 1.0]), jnp.array([0.0, 2.0]))
  >>> grid
  Array([[0., 4.],
         [1., 5.]], dtype=float32)
  """
  d1, d2 = directions
  alphas, betas = jnp.asarray(alphas), jnp.asarray(betas)
  _check_scalar_loss(loss_fn, params)
  checks.check_same_structure("directions[0]", d1, "params", params)
  checks.check_same_structure("directions[1]", d2, "params", params)

  def at(ab):
    a, b = ab
    return loss_fn(
      jax.tree.map(lambda w, x, y: w + (a * x + b * y).astype(w.dtype), params, d1, d2)
    )

  grid_a, grid_b = jnp.meshgrid(alphas, betas, indexing="ij")
  values = jax.lax.map(at, (grid_a.ravel(), grid_b.ravel()))
  return values.reshape(grid_a.shape)


def plot_loss_slice(alphas: Any, values: Any, betas: Any = None, *, ax: Any = None, label=None):
  """Plots a 1-D slice (a line) or a 2-D slice (contours); needs matplotlib.

  Args:
    alphas: the offsets of the first direction.
    values: the losses from :func:`loss_slice_1d` or :func:`loss_slice_2d`.
    betas: the offsets of the second direction, for a 2-D slice.
    ax: a matplotlib Axes (default: a new figure).
    label: a legend label for a 1-D slice.

  Returns:
    The matplotlib Axes.

  >>> import matplotlib
  >>> matplotlib.use("Agg")
  >>> ax = plot_loss_slice(jnp.array([0.0, 1.0]), jnp.array([1.0, 2.0]), label="SAM")
  >>> ax.get_xlabel()
  'alpha'
  """
  try:
    import matplotlib.pyplot as plt
  except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("plot_loss_slice needs matplotlib: pip install 'samx[examples]'") from err
  expected = (len(alphas),) if betas is None else (len(alphas), len(betas))
  if np.shape(values) != expected:
    raise ValueError(
      f"values must have shape {expected} (one loss per alpha"
      f"{'' if betas is None else ' and beta'}); got shape {np.shape(values)}"
    )
  if ax is None:
    _, ax = plt.subplots(figsize=(5, 4))
  values = np.asarray(values)
  if betas is None:
    ax.plot(np.asarray(alphas), values, label=label)
    ax.set_ylabel("loss")
    if label is not None:
      ax.legend()
  else:
    contours = ax.contour(np.asarray(alphas), np.asarray(betas), values.T, levels=20)
    ax.clabel(contours, fontsize=7)
    ax.set_ylabel("beta")
  ax.set_xlabel("alpha")
  return ax


def nnx_loss(model: Any, loss_fn: Callable[..., Any], *args: Any, wrt: Any = None) -> tuple:
  """Turns ``loss_fn(model, *args)`` of an NNX model into a function of its parameters.

  Args:
    model: a Flax NNX module.
    loss_fn: ``loss_fn(model, *args) -> scalar``.
    *args: the batch.
    wrt: the parameter filter (default ``nnx.Param``).

  Returns:
    ``(loss_of_params, params)``: a pure function and the current parameter state,
    ready for every diagnostic here. State the loss writes (BatchNorm statistics)
    is discarded.

  >>> from flax import nnx
  >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  >>> loss, params = nnx_loss(model, lambda m, x: jnp.sum(m(x) ** 2), jnp.ones((3, 2)))
  >>> hessian_eigenvalues(loss, params, k=1).eigenvalues.shape
  (1,)
  """
  from flax import nnx

  if not isinstance(model, nnx.Module):
    raise TypeError(
      f"model must be a Flax NNX module; got {type(model).__name__}. For linen params "
      "use loss_fn(params) directly"
    )
  wrt = nnx.Param if wrt is None else wrt
  graphdef, params, rest = nnx.split(model, wrt, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)

  def loss_of_params(p):
    return loss_fn(nnx.merge(graphdef, p, rest, copy=True), *args)

  return loss_of_params, params
