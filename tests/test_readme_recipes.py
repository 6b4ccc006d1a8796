"""The README's data-parallel recipes, executed as written, give the single-device update.

Every fenced Python block of the README's "Data parallel" section (and of the
scale-out guide) runs on 8 simulated devices with a plain-mean loss; each leaves
``new_params``, which must equal one single-device SAM step.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import samx
from tests import sharding_registry as reg

ROOT = Path(__file__).resolve().parents[1]


def _section_blocks(path, heading):
  text = (ROOT / path).read_text()
  start = text.index(heading)
  rest = text[start + len(heading) :]
  end = re.search(r"^#{2,3} ", rest, flags=re.M)  # a heading, not a Python comment
  section = rest[: end.start()] if end else rest
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)


BLOCKS = [
  pytest.param(block, id=f"{path}-{i}")
  for path, heading in (
    ("README.md", "### Data parallel\n"),
    ("docs/guides/scale_out.md", "## Recipes\n"),
  )
  for i, block in enumerate(_section_blocks(path, heading))
]


def test_the_sections_have_recipes():
  assert len(BLOCKS) >= 6


@pytest.mark.parametrize("block", BLOCKS)
def test_recipe_gives_the_single_device_update(block):
  params, batches = reg.make_problem(steps=1)
  batch = batches[0]
  namespace = {
    "jax": jax,
    "jnp": jnp,
    "np": np,
    "optax": optax,
    "samx": samx,
    "functools": functools,
    "P": P,
    "NamedSharding": NamedSharding,
    "params": params,
    "batch": batch,
    "loss_fn": reg.loss,
    "per_example_loss_fn": reg.per_example_loss,
  }
  exec(compile(block, "<recipe>", "exec"), namespace)
  expected_tx = namespace.get("reference_tx") or samx.sam(
    optax.sgd(0.1, momentum=0.9), rho=0.05
  )
  extra = {"grad_fn": lambda p: jax.grad(reg.loss)(p, batch)}
  if "reference_tx" in namespace:
    extra.update(per_example_loss_fn=reg.per_example_loss, batch=batch)
  grads = jax.grad(reg.loss)(params, batch)
  updates, _ = expected_tx.update(grads, expected_tx.init(params), params, **extra)
  expected = optax.apply_updates(params, updates)
  actual = namespace["new_params"]
  for name in expected:
    np.testing.assert_allclose(
      np.asarray(actual[name]), np.asarray(expected[name]), rtol=2e-5, atol=1e-6
    )
  assert not all(np.allclose(expected[k], params[k]) for k in params)
