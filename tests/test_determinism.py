"""Determinism: the same seeds give bitwise-identical runs on CPU, for every variant.

For every optimizer of the conformance registry, two optimizers built from the same
arguments give the same initial state and lower to the same program, and the compiled
step run twice from those states gives the same bits. Together with the fresh-process runs
of tests/test_checkpoint.py (a run from scratch in another Python process, another hash
seed, equals the in-process run bit for bit), a run is a function of its seeds only.

The random blocks take their seed as an ``int``, a typed key (``jax.random.key``) or a
raw key (``jax.random.PRNGKey``); the three give the same draws, and another seed gives
other draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samx
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

STEPS = 4


@pytest.mark.parametrize("name", sorted(every_optimizer()))
def test_same_arguments_same_program_same_bits(name):
  factory, kwargs = every_optimizer()[name]
  params0 = initial_params()
  data = batches()
  clean = jnp.asarray(CLEAN, jnp.float32)
  tx, step = compiled(name)  # one build, compiled once for the whole suite
  fresh = factory(**kwargs)  # a second build from the same arguments
  state0, fresh_state0 = tx.init(params0), fresh.init(params0)
  assert not bitwise_differences(fresh_state0, state0)
  programs = [
    s.lower(params0, state0, data[0], clean).as_text() for s in (step, make_step(fresh))
  ]
  assert programs[0] == programs[1], "two builds with the same arguments lower differently"
  first = run(step, params0, state0, range(STEPS))
  second = run(step, params0, fresh_state0, range(STEPS))
  assert not bitwise_differences(first, second)
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(first[0]))


TREE = {"w": jnp.ones((3, 4)), "b": jnp.ones(4), "s": jnp.ones(())}

# (name, block factory taking the seed); the seed is the only argument that changes.
RANDOM_BLOCKS = [
  ("random_direction", lambda key: samx.random_direction(key=key)),
  ("bernoulli_mask", lambda key: samx.scale_by_bernoulli_mask(0.5, key=key)),
  (
    "bernoulli_mask_per_tensor",
    lambda key: samx.scale_by_bernoulli_mask(0.5, key=key, per_tensor=True),
  ),
  ("swp", lambda key: samx.scale_by_swp(0.05, 0.5, key=key)),
]


def _draws(tx, steps=2, update=None):
  """The outputs of ``steps`` consecutive updates on ``TREE`` (eager unless ``update``)."""
  update = tx.update if update is None else update
  state = tx.init(TREE)
  outputs = []
  for _ in range(steps):
    out, state = update(TREE, state, TREE)
    outputs.append(out)
  return outputs, state


@pytest.mark.parametrize("name, make", RANDOM_BLOCKS, ids=[n for n, _ in RANDOM_BLOCKS])
def test_int_typed_and_raw_keys_give_the_same_draws(name, make):
  reference, reference_state = _draws(make(3))
  for key in (np.int32(3), jax.random.key(3), jax.random.PRNGKey(3)):
    outputs, state = _draws(make(key))
    assert not bitwise_differences(outputs, reference), f"{name} with key={key!r}"
    assert not bitwise_differences(state, reference_state)
  other, _ = _draws(make(4))
  assert bitwise_differences(other, reference), "another seed must give other draws"
  assert bitwise_differences(reference[0], reference[1]), "each step must draw afresh"


def test_dynamic_mask_seed():
  # The seed draws the initial mask; the regrowth key is then carried in the state.
  update = jax.jit(samx.dynamic_mask(0.5, refresh_every=1).update)

  def masks_of(seed):
    _, state = _draws(samx.dynamic_mask(0.5, refresh_every=1, seed=seed), 3, update)
    return state.mask

  assert not bitwise_differences(masks_of(0), masks_of(0))
  assert bitwise_differences(masks_of(0), masks_of(1))


def test_random_entries_seed():
  params = {"w": np.ones((5, 6)), "b": np.ones(6)}
  same = [samx.masks.random_entries(7, seed=2)(params) for _ in range(2)]
  other = samx.masks.random_entries(7, seed=3)(params)
  assert not bitwise_differences(same[0], same[1])
  assert bitwise_differences(same[0], other)


def test_alias_keys_reach_the_blocks():
  # An alias passes its key to its random block: the same key, the same step. The loss
  # is 0.5 * ||w||^2, so g_s = w + eps shows the perturbation.
  params = initial_params()

  def update(key):
    tx = samx.random_sam(optax.sgd(0.1), rho=0.05, key=key)
    return tx.update(params, tx.init(params), params, grad_fn=lambda p: p)[0]

  assert not bitwise_differences(update(5), update(jax.random.key(5)))
  assert not bitwise_differences(update(5), update(jax.random.PRNGKey(5)))
  assert bitwise_differences(update(5), update(6))
