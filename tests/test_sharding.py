"""Sharding conformance: every variant gives the single-device step under every parallelism.

Over the one registry in ``tests/sharding_registry.py`` (every alias, the README's
composition, per-device eps, micro-shards on top of devices, the non-finite guard),
with JAX's defaults and the loss written the way users write it (a plain mean over
the local batch, no ``pmean`` in the loss):

* ``pmap`` with ``axis_name``;
* ``jax.shard_map`` with ``check_vma=True`` (JAX's default) and ``False``, on the
  mesh ``jax.make_mesh`` builds by default (Explicit axes), params replicated;
* ``jax.jit`` over a sharded batch on an Auto and on an Explicit mesh, no axis name;
* ``jax.jit`` with FSDP-style params (every leaf sharded on dim 0 over the data
  axis), on an Explicit and an Auto mesh.

Each runs 3 steps and must equal the single-device run within float32 tolerance.
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import samx
from tests import sharding_registry as reg

AXIS, DEVICES = reg.AXIS, reg.DEVICES
MODES = [
  "pmap",
  "shard_map_vma",
  "shard_map_no_vma",
  "jit_auto",
  "jit_explicit",
  "fsdp_explicit",
  "fsdp_auto",
]
# CI runs a subset that still covers every variant and every mode: every variant under
# shard_map with replication checking (JAX's default, the trap of summed gradients);
# the variants with Explicit-mesh code paths (sorts, per-example and per-micro-shard
# gradients, LookSAM's cond) and synced SAM with FSDP params on an Explicit mesh; and
# every mode for mSAM. `-m beyond_ci` or SAMX_FULL=1 runs the whole matrix.
EVERY_VARIANT_MODE = "shard_map_vma"
EXPLICIT_PATHS = {
  "sam",
  "ssam_fisher",
  "ssam_2:4",
  "ssam_structured",
  "ssam_dynamic",
  "gsam",
  "looksam",
  "sam_micro_shards",
  "esam_sds",
}
EVERY_MODE = {"msam"}  # per-device eps: pmap/shard_map vs micro_shards under jit


def _in_ci_subset(name, mode):
  return (
    mode == EVERY_VARIANT_MODE
    or (mode == "fsdp_explicit" and name in EXPLICIT_PATHS)
    or name in EVERY_MODE
  )


def _cases():
  for name in sorted(reg.VARIANTS):
    for mode in MODES:
      marks = () if _in_ci_subset(name, mode) else (pytest.mark.beyond_ci,)
      yield pytest.param(name, mode, id=f"{name}-{mode}", marks=marks)


def _extra_args(batch, grad_params=None):
  return {
    "grad_fn": lambda p: jax.grad(reg.loss)(p, batch),
    "per_example_loss_fn": reg.per_example_loss,
    "batch": batch,
  }


def _step(tx, *, cast_for_clean_grads=False):
  """The user's step: clean gradient, one update, apply."""

  def step(params, state, batch):
    local = jax.lax.pcast(params, AXIS, to="varying") if cast_for_clean_grads else params
    grads = jax.grad(reg.loss)(local, batch)
    updates, state = tx.update(grads, state, params, **_extra_args(batch))
    return optax.apply_updates(params, updates), state

  return step


@functools.cache
def _reference(name):
  params, batches = reg.make_problem()
  tx = reg.VARIANTS[name].make("single")
  step = jax.jit(_step(tx))
  p, s = params, tx.init(params)
  for batch in batches:
    p, s = step(p, s, batch)
  return jax.tree.map(np.asarray, p)


def _per_device_leaves(state, per_device):
  """True for the leaves of every ascent state (per device with one eps per device)."""

  def node(x):
    if isinstance(x, samx.SharpnessAwareState):
      return x._replace(
        ascent_state=jax.tree.map(lambda _: per_device, x.ascent_state),
        combine_state=jax.tree.map(lambda _: False, x.combine_state),
        base_state=jax.tree.map(lambda _: False, x.base_state),
      )
    return False

  return jax.tree.map(node, state, is_leaf=lambda x: isinstance(x, samx.SharpnessAwareState))


class Placed(NamedTuple):
  """One parallel step and its inputs placed for it."""

  step: Any  # the jitted (or pmapped) step
  params: Any  # the params placed on the devices
  state: Any  # the optimizer state placed on the devices
  batch: Any  # batch -> the batch placed on the devices
  mesh: Any  # the mesh to set while running (None for pmap)
  first: Any  # placed params -> params of the first replica (for the comparison)


def place(name, mode, params):
  """The user's step for ``mode`` and the params, state and batches placed for it."""
  variant = reg.VARIANTS[name]
  if mode == "pmap":
    tx = variant.make("axis")
    replicate = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (DEVICES, *x.shape)), t)
    return Placed(
      step=jax.pmap(_step(tx), axis_name=AXIS),
      params=replicate(params),
      state=replicate(tx.init(params)),
      batch=lambda b: jax.tree.map(lambda x: x.reshape(DEVICES, -1, *x.shape[1:]), b),
      mesh=None,
      first=lambda p: jax.tree.map(lambda x: x[0], p),
    )
  if mode.startswith("shard_map"):
    # jax.make_mesh's default mesh, params and state replicated. With one eps per
    # device the ascent state (F-SAM's EMA, ...) differs between devices: it travels
    # as P(AXIS) with a leading axis of size DEVICES, dropped on entry, added on exit.
    tx = variant.make("axis")
    check_vma = mode == "shard_map_vma"
    mesh = jax.make_mesh((DEVICES,), (AXIS,))
    state = tx.init(params)
    flags = _per_device_leaves(state, variant.per_device_eps)
    specs = jax.tree.map(lambda f: P(AXIS) if f else P(), flags)
    stacked = jax.tree.map(lambda f, x: jnp.stack([x] * DEVICES) if f else x, flags, state)

    def body(params, state, batch):
      state = jax.tree.map(lambda f, x: x[0] if f else x, flags, state)
      params, state = _step(tx, cast_for_clean_grads=check_vma)(params, state, batch)
      return params, jax.tree.map(lambda f, x: x[None] if f else x, flags, state)

    step = jax.shard_map(
      body, in_specs=(P(), specs, P(AXIS)), out_specs=(P(), specs), check_vma=check_vma
    )
    put = lambda t, sp: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, sp)), t)
    return Placed(
      step=jax.jit(step),
      params=put(params, P()),
      state=jax.tree.map(lambda sp, x: put(x, sp), specs, stacked),
      batch=lambda b: put(b, P(AXIS)),
      mesh=mesh,
      first=lambda p: p,
    )
  tx = variant.make("jit")
  axis_type = AxisType.Explicit if mode.endswith("explicit") else AxisType.Auto
  mesh = jax.make_mesh((DEVICES,), (AXIS,), axis_types=(axis_type,))
  fsdp = mode.startswith("fsdp")
  spec = lambda x: P(AXIS) if fsdp and x.ndim and x.shape[0] % DEVICES == 0 else P()
  with jax.set_mesh(mesh):
    placed = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), params)
    state = tx.init(placed)
  return Placed(
    step=jax.jit(_step(tx)),
    params=placed,
    state=state,
    batch=lambda b: jax.device_put(b, NamedSharding(mesh, P(AXIS))),
    mesh=mesh,
    first=lambda p: p,
  )


def run(name, mode):
  """Three steps of ``name`` under ``mode``; the params of the first and of the last replica."""
  params, batches = reg.make_problem()
  placed = place(name, mode, params)
  with jax.set_mesh(placed.mesh) if placed.mesh is not None else contextlib.nullcontext():
    p, s = placed.params, placed.state
    for batch in batches:
      p, s = placed.step(p, s, placed.batch(batch))
  if mode.startswith("fsdp"):
    for leaf in jax.tree.leaves(p):
      assert leaf.sharding.spec[0] == AXIS, leaf.sharding  # still FSDP-sharded
  last = jax.tree.map(lambda x: x[-1], p) if mode == "pmap" else None
  return placed.first(p), last


def relative_error(actual, expected):
  diff = [
    np.asarray(a, np.float64) - np.asarray(e, np.float64)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
  ]
  norm = lambda xs: np.sqrt(sum(np.sum(np.square(x)) for x in xs))
  return norm(diff) / norm([np.asarray(e, np.float64) for e in jax.tree.leaves(expected)])


@pytest.mark.parametrize("name, mode", list(_cases()))
def test_matches_the_single_device_step(name, mode):
  expected = _reference(name)
  actual, other_replica = run(name, mode)
  err = relative_error(actual, expected)
  assert err < reg.VARIANTS[name].rtol, f"{name} under {mode}: relative error {err:.2e}"
  if other_replica is not None:  # replicas stay identical
    assert relative_error(other_replica, actual) == 0.0
  start = reg.make_problem()[0]
  assert relative_error(start, expected) > 1e-3  # the steps moved the params


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def collective_counts(name, mode):
  """The collectives in the compiled HLO of one step of ``name`` under ``mode``."""
  params, batches = reg.make_problem(steps=1)
  placed = place(name, mode, params)
  with jax.set_mesh(placed.mesh) if placed.mesh is not None else contextlib.nullcontext():
    lowered = placed.step.lower(placed.params, placed.state, placed.batch(batches[0]))
  text = lowered.compile().as_text()
  counts = {}
  for op in COLLECTIVES:
    pattern = re.compile(rf"\s{op}(-start)?\(")  # the opcode, not an operand name
    counts[op] = sum(1 for line in text.splitlines() if pattern.search(line))
  return counts


@pytest.mark.parametrize(
  "mode", ["pmap", "shard_map_vma", "shard_map_no_vma", "jit_auto", "jit_explicit"]
)
def test_per_device_eps_needs_one_gradient_all_reduce(mode):
  # mSAM: one eps per device, no collective before the ascent, one mean of g_s.
  # Under jit over a sharded batch, per-device eps is micro_shards = devices.
  counts = collective_counts("msam", mode)
  assert counts["all-reduce"] == 1, counts
  assert sum(counts.values()) == 1, counts


@pytest.mark.parametrize("mode", ["pmap", "shard_map_vma"])
def test_synced_sam_needs_two_all_reduces(mode):
  counts = collective_counts("sam", mode)
  assert counts["all-reduce"] == 2, counts
