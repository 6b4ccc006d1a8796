"""Checkpoint and resume: every variant's state survives orbax and a fresh process bit for bit.

For every optimizer of the conformance registry (collected by :func:`every_optimizer`)
the uninterrupted run of ``N_STEPS`` jitted steps is compared, bit for bit, with the run
saved with orbax after ``SAVE_AT`` steps, restored into the structure of a freshly built
optimizer's ``init`` and continued. For ``FRESH_PROCESS``, a subset that holds every kind
of state leaf, the restore and the continuation run in a fresh Python process (one
subprocess, another ``PYTHONHASHSEED``), which also runs each variant from scratch: the
same seeds give the same bits in another process.

The states hold int32 step counters, boolean masks, raw uint32 PRNG key data, EMAs and
stored directions; ``SAVE_AT = 3`` makes LookSAM (k = 2) resume on a step that reuses its
stored direction and the Fisher mask refresh (every 2 steps) fall after the restore. The
recipes of docs/guides/checkpointing.md (plain optax, NNX with nnx.state and with
nnx.split, linen) run verbatim in a fresh process.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import samx
from samx.nonfinite import skip_nonfinite
from tests import helpers, test_combine_variants, test_efficient, test_sam_on, test_sparse
from tests import test_conformance as conformance

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guides" / "checkpointing.md"
N_STEPS, SAVE_AT = 5, 3


def _static_args(factory) -> tuple[str, ...]:
  """The structural arguments inject_hyperparams leaves static (as the conformance suite)."""
  parameters = inspect.signature(factory).parameters
  return tuple(name for name in conformance.STATIC_ARGS if name in parameters)


# Cases of this file: the per-example contract with micro-shards, a typed PRNG key, the
# inject_hyperparams state and the non-finite wrapper's counters.
EXTRA = {
  "msam_micro_shards": (
    samx.msam,
    {"optimizer": optax.sgd(0.1, momentum=0.9), "rho": 0.05, "micro_shards": 2},
  ),
  "random_sam_typed_key": (
    samx.random_sam,
    {"optimizer": optax.adam(1e-2), "rho": 0.05, "key": jax.random.key(7)},
  ),
  "sam_injected": (
    optax.inject_hyperparams(samx.sam, static_args=_static_args(samx.sam)),
    {"optimizer": optax.sgd(0.1, momentum=0.9), "rho": 0.05},
  ),
  # sam_adam wrapped (tests/test_nonfinite.py compares the two).
  "sam_skip_nonfinite": (
    lambda **kwargs: skip_nonfinite(samx.sam(**kwargs)),
    conformance.OPTIMIZERS["sam_adam"][1],
  ),
}


def every_optimizer() -> dict[str, tuple]:
  """Every full optimizer of the conformance registry: ``name -> (factory, kwargs)``.

  The tables of tests/test_conformance.py and of the test files that register their
  variants there (SAM-ON, SSAM, GSAM/WSAM/LookSAM, ESAM, micro-shards), plus ``EXTRA``.
  Each is called with both contracts (``grad_fn`` and ``per_example_loss_fn``/``batch``),
  so no table of which contract a variant uses is needed.
  """
  cases = dict(conformance.OPTIMIZERS)
  cases.update(test_sam_on.CONFORMANCE)
  cases.update(test_sparse.CONFORMANCE)
  cases.update(test_combine_variants.OPTIMIZERS)
  cases.update(test_combine_variants.MORE_OPTIMIZERS)
  cases.update(test_efficient.OPTIMIZERS)
  try:
    micro_shards = importlib.import_module("tests.test_micro_shards")
  except ModuleNotFoundError:
    micro_shards = None
  if micro_shards is not None:
    cases.update(getattr(micro_shards, "CONFORMANCE", {}))
  cases.update(EXTRA)
  return cases


def initial_params():
  return helpers.to_jax(helpers.make_problem(0)[0], jnp.float32)


def batches():
  """One batch per step, the same in every process."""
  return [helpers.to_jax(helpers.make_problem(100 + t)[1], jnp.float32) for t in range(N_STEPS)]


# (g multiplier, g_s multiplier, added to g_s): the plain step. tests/test_nonfinite.py
# runs other scales (zero, large, NaN, inf gradients) through the same compiled step.
CLEAN = (1.0, 1.0, 0.0)


def _tree_sum(tree):
  return sum(jnp.sum(jnp.asarray(x, jnp.float32)) for x in jax.tree.leaves(tree))


def make_step(tx):
  """The jitted training step, with both contracts' extra arguments.

  ``step(params, state, batch, scales) -> (params, state, updates)``. With ``scales =
  (a, b, c)`` the step sees ``g = a * grad`` and ``g_s = b * grad + c`` (the per-example
  losses are scaled alike, so both contracts see the same gradients); ``CLEAN`` is the
  plain step.
  """

  @jax.jit
  def step(params, state, batch, scales):
    g_mult, gs_mult, gs_add = scales[0], scales[1], scales[2]

    def loss(p):
      return helpers.loss_jax(p, batch)

    def scaled(grads, mult, add):
      return jax.tree.map(lambda x: (mult * x + add).astype(x.dtype), grads)

    def per_example_loss(p, b):
      return gs_mult * helpers.per_example_loss(p, b) + gs_add * _tree_sum(p)

    updates, state = tx.update(
      scaled(jax.grad(loss)(params), g_mult, 0.0),
      state,
      params,
      grad_fn=lambda p: scaled(jax.grad(loss)(p), gs_mult, gs_add),
      per_example_loss_fn=per_example_loss,
      batch=batch,
    )
    return optax.apply_updates(params, updates), state, updates

  return step


@functools.cache
def compiled(name):
  """``(tx, step)`` for a registry entry, one per process: the step compiles once for the
  checkpoint, determinism and non-finite tests."""
  factory, kwargs = every_optimizer()[name]
  tx = factory(**kwargs)
  return tx, make_step(tx)


def run(step, params, state, steps, scales=CLEAN):
  data = batches()
  scales = jnp.asarray(scales, jnp.float32)
  for t in steps:
    params, state, _ = step(params, state, data[t], scales)
  return params, state


def save(path, params, state) -> None:
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.fspath(path), {"params": params, "opt_state": state})


def restore(path, params_like, state_like):
  """Restores into the structure, shapes and dtypes of ``(params_like, state_like)``."""
  target = jax.tree.map(
    ocp.utils.to_shape_dtype_struct, {"params": params_like, "opt_state": state_like}
  )
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(os.fspath(path), target)
  return restored["params"], restored["opt_state"]


def bitwise_differences(actual, expected) -> list[str]:
  """The leaf paths where two trees differ in structure, dtype, shape or any bit."""
  if jax.tree.structure(actual) != jax.tree.structure(expected):
    return [f"structure {jax.tree.structure(actual)} vs {jax.tree.structure(expected)}"]
  differences = []
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True
  ):
    a, b = _raw(a), _raw(b)
    if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
      differences.append(jax.tree_util.keystr(path))
  return differences


def _raw(x) -> np.ndarray:
  if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _worker(directory: str) -> None:
  """In a fresh process: restore each variant of ``FRESH_PROCESS`` after ``SAVE_AT`` steps
  and continue; also run it from scratch. Both results are saved next to the checkpoint."""
  directory = pathlib.Path(directory)
  params0 = initial_params()
  for name in FRESH_PROCESS:
    tx, step = compiled(name)
    state0 = tx.init(params0)
    params, state = restore(directory / name / "saved", params0, state0)
    params, state = run(step, params, state, range(SAVE_AT, N_STEPS))
    save(directory / name / "resumed", params, state)
    params, state = run(step, params0, state0, range(N_STEPS))
    save(directory / name / "fresh", params, state)


def _fresh_process(
  code: str, *, cwd=ROOT, timeout=600, test_config=True
) -> subprocess.CompletedProcess:
  # The configuration of tests/conftest.py, set before anything touches a device.
  prelude = (
    "import jax\n"
    "jax.config.update('jax_num_cpu_devices', 8)\n"
    "jax.config.update('jax_numpy_rank_promotion', 'raise')\n"
  )
  if not test_config:
    prelude = ""
  env = {**os.environ, "PYTHONPATH": os.fspath(ROOT), "PYTHONHASHSEED": "12345"}
  return subprocess.run(
    [sys.executable, "-c", prelude + code],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_every_variant_is_in_the_registry():
  factories = {factory for factory, _ in every_optimizer().values()}
  missing = [name for name in samx.aliases.__all__ if getattr(samx, name) not in factories]
  assert not missing, f"aliases missing from the checkpoint registry: {missing}"


# Every kind of state leaf: int32 counters (F-SAM, LookSAM, inject_hyperparams, Adam),
# EMAs and momentum, LookSAM's stored direction, boolean masks (Fisher, dynamic), raw PRNG
# key data (a typed key given to random_sam, SSAM-D's regrowth), the non-finite wrapper's
# counters, micro-shards' per-shard states with the per-example contract. The state round
# trip does not depend on the process; the fresh process shows that nothing outside the
# saved state (jit caches, Python hash seeds, module globals) feeds into the run.
FRESH_PROCESS = (
  "fsam",
  "looksam",
  "ssam_fisher",
  "ssam_dynamic",
  "random_sam_typed_key",
  "sam_injected",
  "sam_skip_nonfinite",
  "msam_micro_shards",
)


def _uninterrupted_and_saved(name, directory):
  """Runs ``name`` for ``N_STEPS``; saves the run after ``SAVE_AT`` steps under ``directory``.

  Returns the uninterrupted ``(params, state)``, the jitted step and the initial state.
  """
  tx, step = compiled(name)
  params0 = initial_params()
  state0 = tx.init(params0)
  expected = run(step, params0, state0, range(N_STEPS))
  params, state = run(step, params0, state0, range(SAVE_AT))
  save(directory / name / "saved", params, state)
  return expected, step, state0


@pytest.mark.parametrize("name", sorted(set(every_optimizer()) - set(FRESH_PROCESS)))
def test_resume_is_bitwise_identical(name, tmp_path):
  # (The variants of FRESH_PROCESS resume in another process, below.)
  # The restore target comes from a freshly built optimizer's init, as after a restart.
  expected, step, _ = _uninterrupted_and_saved(name, tmp_path)
  factory, kwargs = every_optimizer()[name]
  params0 = initial_params()
  params, state = restore(tmp_path / name / "saved", params0, factory(**kwargs).init(params0))
  resumed = run(step, params, state, range(SAVE_AT, N_STEPS))
  assert not bitwise_differences(resumed, expected)


def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path):
  expected, initial = {}, {}
  for name in FRESH_PROCESS:
    expected[name], _, initial[name] = _uninterrupted_and_saved(name, tmp_path)
  result = _fresh_process(
    f"from tests.test_checkpoint import _worker\n_worker({os.fspath(tmp_path)!r})\n"
  )
  assert result.returncode == 0, result.stderr[-5000:]
  params0 = initial_params()
  failures = {}
  for name in FRESH_PROCESS:
    for run_kind in ("resumed", "fresh"):
      got = restore(tmp_path / name / run_kind, params0, initial[name])
      differences = bitwise_differences(got, expected[name])
      if differences:
        failures[f"{name} ({run_kind})"] = differences
  assert not failures, f"runs that differ from the uninterrupted one: {failures}"


def test_restored_state_has_the_saved_dtypes(tmp_path):
  # Masks stay boolean, counters int32, key data uint32, after the round trip.
  tx, step = compiled("ssam_dynamic")
  params0 = initial_params()
  params, state = run(step, params0, tx.init(params0), range(2))
  save(tmp_path / "saved", params, state)
  _, restored = restore(tmp_path / "saved", params0, tx.init(params0))
  mask_state = restored.ascent_state[1]
  assert jax.tree.map(lambda m: m.dtype, mask_state.mask) == jax.tree.map(
    lambda _: np.dtype(bool), params0
  )
  assert mask_state.count.dtype == np.int32 and int(mask_state.count) == 2
  assert mask_state.key.dtype == np.uint32
  assert not bitwise_differences(restored, state)


def guide_code() -> str:
  """The ``python`` blocks of docs/guides/checkpointing.md, in order: one program."""
  blocks = re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(encoding="utf-8"), re.S | re.M)
  assert blocks, f"{GUIDE} has no python block"
  return "\n".join(blocks)


def test_checkpointing_guide_runs(tmp_path):
  # The guide's own asserts compare the resumed runs with uninterrupted ones, bit for bit.
  # As a user runs it: without the test suite's strict rank promotion.
  result = _fresh_process(guide_code(), cwd=tmp_path, test_config=False)
  assert result.returncode == 0, result.stderr[-5000:]
  for recipe in ("optax", "nnx", "nnx.split", "linen"):
    assert f"{recipe}: resumed run is bitwise identical" in result.stdout, result.stdout
