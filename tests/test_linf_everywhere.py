"""Every alias accepts the l-inf ball: eps = rho * sign(g) through its ascent."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samx

ALIASES = {
  "sam": lambda **kw: samx.sam(optax.sgd(0.1), **kw),
  "fsam": lambda **kw: samx.fsam(optax.sgd(0.1), **kw),
  "vasso": lambda **kw: samx.vasso(optax.sgd(0.1), **kw),
  "gsam": lambda **kw: samx.gsam(optax.sgd(0.1), alpha=0.0, **kw),
  "wsam": lambda **kw: samx.wsam(optax.sgd(0.1), gamma=0.5, decouple=False, **kw),
  "looksam": lambda **kw: samx.looksam(optax.sgd(0.1), k=1, **kw),
}


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_linf_ball_perturbs_by_rho_sign_g(name):
  # Every alias above reduces to SAM with these settings, so each evaluates g_s at
  # w + rho * sign(g) exactly once on the first step.
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.5, -4.0, 0.0])}
  seen = []

  def grad_fn(p):  # records the evaluated point (LookSAM evaluates inside lax.cond)
    jax.debug.callback(lambda w: seen.append(np.asarray(w)), p["w"])
    return grads

  tx = ALIASES[name](rho=0.1, ball="linf")
  tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
  expected = params["w"] + 0.1 * jnp.sign(grads["w"])
  assert len(seen) == 1
  np.testing.assert_allclose(seen[0], np.asarray(expected), rtol=1e-6)


def test_esam_linf_ball():
  tx = samx.esam(optax.sgd(0.1), rho=0.1, beta=1.0, gamma=1.0, ball="linf")
  params = jnp.array([1.0, -2.0])
  batch = {"x": jnp.array([[1.0, 2.0], [3.0, -1.0]])}
  losses = lambda w, b: (b["x"] @ w) ** 2
  grads = jax.grad(lambda w: losses(w, batch).mean())(params)
  updates, _ = tx.update(
    grads, tx.init(params), params, per_example_loss_fn=losses, batch=batch
  )
  perturbed = params + 0.1 * jnp.sign(grads)
  expected = -0.1 * jax.grad(lambda w: losses(w, batch).mean())(perturbed)
  assert bool(jnp.allclose(updates, expected, rtol=1e-6))
