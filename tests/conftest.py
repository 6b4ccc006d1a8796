"""Test configuration: 8 simulated CPU devices and strict rank promotion."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_collection_modifyitems(config, items):
  """The rest of the sharding matrix runs with ``-m slow_matrix`` or SAMX_FULL_SHARDING=1."""
  import os

  import pytest

  if os.environ.get("SAMX_FULL_SHARDING") or "slow_matrix" in (config.getoption("-m") or ""):
    return
  skip = pytest.mark.skip(reason="sharding matrix beyond CI's subset: -m slow_matrix")
  for item in items:
    if item.get_closest_marker("slow_matrix"):
      item.add_marker(skip)
