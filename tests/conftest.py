"""Test configuration: 8 simulated CPU devices and strict rank promotion."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_collection_modifyitems(config, items):
  """Tests marked ``beyond_ci`` run with ``-m beyond_ci`` (or ``-m notebook`` for the
  notebooks) or SAMX_FULL=1; otherwise they are skipped, and CI runs the subset.

  The subsets keep every class of test: the sharding matrix runs every variant and every
  mode (tests/test_sharding.py), the notebooks run quickstart, msam and sparse_sam, and
  every committed notebook's stored outputs are checked.
  """
  import os

  import pytest

  selected = config.getoption("-m") or ""
  if os.environ.get("SAMX_FULL") or "beyond_ci" in selected:
    return
  skip = pytest.mark.skip(reason="beyond the CI subset: -m beyond_ci or SAMX_FULL=1")
  for item in items:
    if item.get_closest_marker("beyond_ci"):
      if "notebook" in selected and item.get_closest_marker("notebook"):
        continue
      item.add_marker(skip)
