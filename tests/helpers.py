"""Shared test fixtures: a small model with a hand-derived NumPy float64 gradient.

The model is a one-hidden-layer tanh network with squared error,

    L(W1, b1, W2) = 0.5 * mean_n || tanh(x_n W1 + b1) W2 - y_n ||^2,

whose gradient is written out by hand below, so NumPy references never use JAX's
autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IN, HIDDEN, OUT, BATCH = 5, 7, 3, 16


def make_problem(seed: int = 0, batch: int = BATCH):
  """Params (float64 NumPy) and a batch (x, y)."""
  rng = np.random.default_rng(seed)
  params = {
    "W1": rng.normal(size=(IN, HIDDEN)) / np.sqrt(IN),
    "b1": rng.normal(size=(HIDDEN,)) * 0.1,
    "W2": rng.normal(size=(HIDDEN, OUT)) / np.sqrt(HIDDEN),
  }
  x = rng.normal(size=(batch, IN))
  y = rng.normal(size=(batch, OUT))
  return params, (x, y)


def loss_jax(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["W1"] + params["b1"][None, :])
  r = h @ params["W2"] - y
  return 0.5 * jnp.mean(jnp.sum(r**2, axis=-1))


def per_example_loss(params, batch):
  """The per-example losses whose mean is ``loss_jax`` (the second contract)."""
  x, y = batch
  h = jnp.tanh(x @ params["W1"] + params["b1"][None, :])
  r = h @ params["W2"] - y
  return 0.5 * jnp.sum(r**2, axis=-1)


def grad_numpy(params, batch):
  """The hand-derived float64 gradient of ``loss_jax``."""
  x, y = batch
  n = x.shape[0]
  a = x @ params["W1"] + params["b1"]
  h = np.tanh(a)
  r = h @ params["W2"] - y
  d_w2 = h.T @ r / n
  d_h = r @ params["W2"].T / n
  d_a = d_h * (1.0 - h**2)
  return {"W1": x.T @ d_a, "b1": d_a.sum(axis=0), "W2": d_w2}


def to_jax(tree, dtype):
  return jax.tree.map(lambda v: jnp.asarray(v, dtype), tree)


def to_numpy(tree):
  return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def np_norm(tree):
  return np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in jax.tree.leaves(tree)))


def relative_error(actual, expected):
  """Global relative error ||actual - expected|| / ||expected|| over two trees."""
  diff = jax.tree.map(lambda a, e: np.asarray(a, np.float64) - e, actual, expected)
  return np_norm(diff) / np_norm(expected)


def run_steps(tx, params, batches, loss=loss_jax):
  """Runs one jitted ``tx.update`` per batch; returns the final params and state."""

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))
    return jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates), state

  state = tx.init(params)
  for batch in batches:
    params, state = step(params, state, batch)
  return params, state
