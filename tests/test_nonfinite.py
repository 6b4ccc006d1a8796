"""Non-finite values: samx's policy for NaN/inf in g and g_s, and ``skip_nonfinite``.

The policy (module docstring of samx/nonfinite.py): without a wrapper samx propagates
non-finite values and never creates them from finite input. For every variant of the
conformance registry the compiled step of tests/test_checkpoint.py (which scales ``g`` and
``g_s``) runs these scenarios from the initial state:

* zero gradients (``g = g_s = 0``, a stationary point): the update is exactly zero and
  the state finite (no ``0/0`` in any normalisation);
* large gradients (300 times the usual ones): finite;
* NaN in ``g``, NaN in ``g_s``, inf in ``g_s``: the update is not finite (samx does not
  hide them), except where a variant does not use ``g`` at all.

float16 and bfloat16 trees with large entries: the norms accumulate in float32 (below,
and for every alias in tests/test_properties.py). (optax.adam itself gives NaN for a zero
float16 gradient: its eps = 1e-8 rounds to 0 in float16.)

``skip_nonfinite`` (and ``optax.apply_if_finite`` for ``g``) skip a bad step and keep
the state: the next good step equals the one from the untouched state, bit for bit.
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samx
from samx import numerics
from samx.nonfinite import SkipNonfiniteState, all_finite, skip_nonfinite
from tests import helpers
from tests import test_conformance as conformance
from tests.test_checkpoint import (
  CLEAN,
  batches,
  bitwise_differences,
  compiled,
  every_optimizer,
  initial_params,
  make_step,
  run,
)

LARGE = 300.0  # gradients 300 times the usual ones (entries of tens to hundreds)

# (g multiplier, g_s multiplier, added to g_s): see tests/test_checkpoint.py's make_step.
SCENARIOS = {
  "good": CLEAN,
  "zero": (0.0, 0.0, 0.0),
  "large": (LARGE, LARGE, 0.0),
  "nan_g": (np.nan, 1.0, 0.0),
  "nan_g_s": (1.0, 1.0, np.nan),
  "inf_g_s": (1.0, 1.0, np.inf),
}

# Variants whose update does not depend on the clean gradient g: the random direction
# ignores it, micro-shards compute each shard's gradient themselves.
IGNORE_G = ("random_sam", "micro_shards")


def _scenario(step, state, scenario):
  """``(updates, state)`` of one step from ``state`` in the named scenario."""
  scales = jnp.asarray(SCENARIOS[scenario], jnp.float32)
  _, state, updates = step(initial_params(), state, batches()[0], scales)
  return updates, state


def _zero(tree):
  return all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(every_optimizer()))
def test_policy_for_every_variant(name):
  tx, step = compiled(name)  # the step of the checkpoint and determinism tests
  initial = tx.init(initial_params())
  for scenario in ("good", "zero", "large"):
    updates, state = _scenario(step, initial, scenario)
    assert all_finite(updates) and all_finite(state), f"{scenario}: finite input, NaN out"
  assert _zero(_scenario(step, initial, "zero")[0]), "a zero gradient must give a zero step"
  skipping = "skip_nonfinite" in name
  for scenario in ("nan_g", "nan_g_s", "inf_g_s"):
    updates, _ = _scenario(step, initial, scenario)
    if skipping:
      assert _zero(updates), scenario
    elif scenario == "nan_g" and any(part in name for part in IGNORE_G):
      assert all_finite(updates), "this variant does not use g"
    else:
      assert not all_finite(updates), f"{scenario}: samx must not hide non-finite values"


# ---------------------------------------------------------------------------------------
# Skipping bad steps: skip_nonfinite, and optax.apply_if_finite for the clean gradient.

# Every kind of state that a bad step could poison: momentum, an EMA and its counter
# (F-SAM), LookSAM's stored direction, a dynamic mask and its PRNG key with Adam's
# moments (SSAM-D), the per-example contract with micro-shards (g unused).
STATEFUL = ("fsam", "looksam", "ssam_dynamic", "msam_micro_shards")


def _sequence(step, state, scenarios):
  """Runs the named scenarios one after the other from ``state``."""
  outputs = []
  for scenario in scenarios:
    updates, state = _scenario(step, state, scenario)
    outputs.append((updates, state))
  return outputs


@pytest.mark.parametrize("name", STATEFUL)
def test_skip_nonfinite_skips_and_keeps_the_state(name):
  factory, kwargs = every_optimizer()[name]
  tx = skip_nonfinite(factory(**kwargs))
  step = make_step(tx)
  initial = tx.init(initial_params())
  outputs = _sequence(step, initial, ["nan_g", "nan_g_s", "inf_g_s", "good", "good"])
  for updates, state in outputs[:3]:
    assert _zero(updates)
    assert not bitwise_differences(state.inner_state, initial.inner_state)
    assert not bool(state.last_finite)
  after_bad, reference = outputs[3], _sequence(step, initial, ["good"])[0]
  assert not bitwise_differences(after_bad[0], reference[0]), "the state was poisoned"
  assert not bitwise_differences(after_bad[1].inner_state, reference[1].inner_state)
  final = outputs[-1][1]
  assert (int(final.notfinite_count), int(final.total_notfinite)) == (0, 3)
  assert bool(final.last_finite)
  assert int(outputs[2][1].notfinite_count) == 3


@pytest.mark.parametrize("name", ["fsam", "looksam"])
def test_apply_if_finite_skips_a_bad_clean_gradient(name):
  factory, kwargs = every_optimizer()[name]
  tx = optax.apply_if_finite(factory(**kwargs), max_consecutive_errors=10)
  step = make_step(tx)
  initial = tx.init(initial_params())
  # (LookSAM, k = 2, evaluates g_s on the fourth step.)
  outputs = _sequence(step, initial, ["nan_g", "good", "good", "nan_g_s"])
  updates, state = outputs[0]
  assert _zero(updates)
  assert not bitwise_differences(state.inner_state, initial.inner_state)
  reference = _sequence(step, initial, ["good"])[0]
  assert not bitwise_differences(outputs[1][0], reference[0]), "the state was poisoned"
  # apply_if_finite sees g only: a NaN that appears at w + eps passes into the state.
  updates, state = outputs[3]
  assert not all_finite(updates) and not all_finite(state.inner_state)
  assert bool(state.last_finite)


def test_skip_nonfinite_gives_up_after_max_consecutive_errors():
  tx = skip_nonfinite(optax.sgd(1.0), max_consecutive_errors=2)
  params = jnp.zeros(2)
  state = tx.init(params)
  applied = []
  for _ in range(4):
    updates, state = tx.update(jnp.array([1.0, jnp.nan]), state, params)
    applied.append(not bool(jnp.all(updates == 0)))
  assert applied == [False, False, True, True]
  assert int(state.total_notfinite) == 4 and int(state.notfinite_count) == 4


def test_skip_nonfinite_on_any_device_skips_on_every_device():
  # vmap with an axis name stands in for pmap: one replica sees a NaN gradient.
  grads = jnp.array([[1.0, 2.0], [jnp.nan, 1.0]])
  params = jnp.zeros(2)

  def step(axis_name):
    tx = skip_nonfinite(optax.sgd(1.0), axis_name=axis_name)
    return jax.vmap(lambda g: tx.update(g, tx.init(params), params)[0], axis_name="i")(grads)

  np.testing.assert_array_equal(step("i"), np.zeros((2, 2)))
  np.testing.assert_array_equal(step(None)[0], [-1.0, -2.0])


def test_skip_nonfinite_is_transparent_when_finite():
  # The registry's sam_skip_nonfinite is sam_adam wrapped: the same bits, every step.
  params0 = initial_params()
  wrapped, wrapped_step = compiled("sam_skip_nonfinite")
  inner, inner_step = compiled("sam_adam")
  params, state = run(wrapped_step, params0, wrapped.init(params0), range(3))
  expected = run(inner_step, params0, inner.init(params0), range(3))
  assert not bitwise_differences((params, state.inner_state), expected)
  assert isinstance(state, SkipNonfiniteState) and int(state.total_notfinite) == 0


CONFORMANCE = {
  "skip_nonfinite_fsam": (
    lambda **kwargs: skip_nonfinite(samx.fsam(**kwargs)),
    {"optimizer": optax.sgd(0.1, momentum=0.9), "rho": 0.2},
  ),
}


@pytest.mark.parametrize(
  "check",
  [
    "test_unknown_extra_args_and_no_recompilation",
    "test_state_stable_through_lax_cond",
    "test_inside_optax_chain",
    "test_inside_multi_steps",
    "test_map_params",
  ],
)
def test_conformance(monkeypatch, check):
  conformance.register(monkeypatch, optimizers=CONFORMANCE)
  getattr(conformance, check)("skip_nonfinite_fsam")


def test_bad_max_consecutive_errors():
  with pytest.raises(ValueError, match=r"max_consecutive_errors must be None .* integer >= 0"):
    skip_nonfinite(optax.sgd(0.1), max_consecutive_errors=-1)


def test_unbound_axis_name_names_it():
  tx = skip_nonfinite(optax.sgd(0.1), axis_name="batch")
  with pytest.raises(NameError, match=r"axis_name='batch' is not bound"):
    tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), jnp.zeros(2))


# ---------------------------------------------------------------------------------------
# Low precision: norms accumulate in float32.


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_norms_of_low_precision_trees_do_not_overflow(dtype):
  # 1000 entries of 300: sum of squares 9e7, far above float16's 65504.
  tree = {"a": jnp.full((10, 50), 300.0, dtype), "b": jnp.full((500,), -300.0, dtype)}
  norm = numerics.global_norm(tree)
  assert norm.dtype == jnp.float32
  np.testing.assert_allclose(float(norm), 300.0 * np.sqrt(1000.0), rtol=1e-6)
  eps, _ = samx.scale_by_sam(0.05).update(tree, optax.EmptyState())
  assert all(e.dtype == dtype for e in jax.tree.leaves(eps))
  np.testing.assert_allclose(helpers.np_norm(eps), 0.05, rtol=1e-2)


def test_float16_training_stays_finite():
  # A few GSAM and LookSAM steps (norms, dot products, stored norms) on float16 params
  # with gradients whose squares overflow float16.
  dtype = jnp.float16
  params = helpers.to_jax(helpers.make_problem(0)[0], dtype)
  data = [helpers.to_jax(helpers.make_problem(s)[1], dtype) for s in range(4)]

  def loss(p, batch):
    return 3000.0 * helpers.loss_jax(p, batch)

  largest = max(
    float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(jax.grad(loss)(params, data[0]))
  )
  assert largest**2 > float(jnp.finfo(dtype).max)
  for tx in (
    samx.gsam(optax.sgd(1e-5), rho=0.05, alpha=0.3),
    samx.looksam(optax.sgd(1e-5), rho=0.05, k=2),
  ):
    final, state = helpers.run_steps(tx, params, data, loss=loss)
    assert all_finite(final) and all_finite(state)
    assert jax.tree.map(lambda p: p.dtype, final) == jax.tree.map(lambda p: p.dtype, params)


# float32 entries of 4e19: ||g||^2 overflows float32 (3.4e38), the entries do not.
HUGE = jnp.array([3e19, -4e19, 1.0])
ORTHOGONAL_PART_FIX = (
  "samx/combine_variants.py _orthogonal_part(u, v, eps): the coefficient "
  "_tree_dot(u, v) * inverse * inverse is inf * 0 = NaN when ||v|| overflows float32 "
  "(and inf when ||u|| ||v|| does); normalise first: v_hat = v * inverse, coefficient = "
  "_tree_dot(u, v_hat), result u - coefficient * v_hat (|coefficient| <= ||u||)"
)
LOOKSAM_FIX = ORTHOGONAL_PART_FIX + (
  "; and reuse_orthogonal_component's reuse(): ratio = ||g|| * safe_inverse(||g_v|| + "
  "eps) is inf * 0 = NaN when both norms overflow: use ratio = 0 where ||g_v|| is inf"
)


@pytest.mark.parametrize(
  "name, make",
  [
    ("sam", lambda: samx.sam(optax.sgd(0.1), rho=0.05)),
    ("asam", lambda: samx.asam(optax.sgd(0.1), rho=0.5)),
    pytest.param(
      "gsam",
      lambda: samx.gsam(optax.sgd(0.1), rho=0.05, alpha=0.3),
      marks=pytest.mark.xfail(strict=True, reason=ORTHOGONAL_PART_FIX),
    ),
    pytest.param(
      "gsam_clean_loss",
      lambda: samx.gsam(optax.sgd(0.1), rho=0.05, alpha=0.3, minimize_fp=False),
      marks=pytest.mark.xfail(strict=True, reason=ORTHOGONAL_PART_FIX),
    ),
    pytest.param(
      "looksam",
      lambda: samx.looksam(optax.sgd(0.1), rho=0.05, k=2),
      marks=pytest.mark.xfail(strict=True, reason=LOOKSAM_FIX),
    ),
  ],
)
def test_huge_finite_gradients_give_finite_updates(name, make):
  # The policy's limit: the float32 norm overflows to inf, so the normalised ascent gives
  # eps = 0 (documented); the updates must stay finite. (LookSAM's second step reuses the
  # direction stored at the first.)
  tx = make()
  params = jnp.zeros(3)
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(HUGE, state, params, grad_fn=lambda p: HUGE + p)
    assert all_finite(updates), name


def test_guide_example(capsys):
  # The python block of docs/guides/nonfinite.md prints what its comment says.
  guide = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides" / "nonfinite.md"
  (code,) = re.findall(r"^```python\n(.*?)^```", guide.read_text(encoding="utf-8"), re.S | re.M)
  exec(compile(code, str(guide), "exec"), {})
  expected = re.search(r"^# (.*)$", code, re.M).group(1)
  assert capsys.readouterr().out.strip() == expected
