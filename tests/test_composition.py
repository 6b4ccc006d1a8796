"""The README's composed ascent (F-SAM direction + ASAM scaling + SAM-ON mask) against NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import samx


def test_f_asam_on_ascent_matches_numpy():
  rng = np.random.default_rng(0)
  params = {
    "dense": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)},
    "norm": {"scale": 1.0 + 0.1 * rng.normal(size=3), "bias": 0.1 * rng.normal(size=3)},
  }
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape), params) for _ in range(3)]
  sigma, decay, eta, rho = 1.0, 0.9, 0.01, 1.0

  norm = samx.masks.norm_layers(params)
  ascent = samx.masked_ascent(
    optax.chain(
      samx.fsam_direction(sigma=sigma, decay=decay),
      samx.scale_by_weight_magnitude(eta=eta, mask=norm),
      samx.scale_by_sam(rho=rho),
      samx.scale_by_weight_magnitude(eta=eta, mask=norm),
    ),
    mask=norm,
  )
  to32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  state = ascent.init(to32(params))

  # NumPy, from the equations: only the norm leaves move; the F-SAM EMA sees the
  # masked gradient; T = |w| + eta on the norm leaves; ||eps|| = rho.
  w = params["norm"]
  t = {k: np.abs(v) + eta for k, v in w.items()}
  ema = None
  for step, g in enumerate(grads):
    gn = g["norm"]
    if step == 0:
      d = dict(gn)
      ema = dict(gn)
    else:
      d = {k: gn[k] - sigma * ema[k] for k in gn}
      ema = {k: decay * ema[k] + (1 - decay) * gn[k] for k in gn}
    td = {k: t[k] * d[k] for k in d}
    norm_td = np.sqrt(sum(np.sum(v**2) for v in td.values()))
    expected = {k: rho * t[k] * td[k] / (norm_td + 1e-12) for k in d}

    eps, state = ascent.update(to32(g), state, to32(params))
    for k in expected:
      np.testing.assert_allclose(np.asarray(eps["norm"][k]), expected[k], rtol=2e-5, atol=1e-7)
    assert all(bool(jnp.all(e == 0)) for e in jax.tree.leaves(eps["dense"]))
    eps_norm = np.sqrt(
      sum(np.sum(np.asarray(e, np.float64) ** 2) for e in jax.tree.leaves(eps))
    )
    expected_norm = np.sqrt(sum(np.sum(v**2) for v in expected.values()))
    np.testing.assert_allclose(eps_norm, expected_norm, rtol=1e-5)
