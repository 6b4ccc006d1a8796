"""Helpers shared by the benchmark scripts (imported next to them, not part of samx)."""

from __future__ import annotations

import platform
import time
from typing import Any

import jax
import numpy as np


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo, or what ``platform`` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def time_loop(compiled, params, opt_state, batch, steps: int) -> tuple[float, float]:
  """Seconds per step of ``steps`` consecutive steps from (params, opt_state).

  Returns (wall-clock seconds, CPU seconds of this process summed over all its
  threads), both per step.
  """
  jax.block_until_ready((params, opt_state))
  c0, t0 = time.process_time(), time.perf_counter()
  for _ in range(steps):
    params, opt_state, loss = compiled(params, opt_state, batch)
  jax.block_until_ready((params, opt_state, loss))
  return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def ratio_stats(num: list[float], den: list[float], seed: int = 0) -> dict[str, Any]:
  """Median, quartiles and a 95% bootstrap interval of the per-repeat ratios num/den."""
  ratios = np.asarray(num) / np.asarray(den)
  q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
  rng = np.random.default_rng(seed)
  boot = np.median(rng.choice(ratios, (2000, ratios.size)), axis=1)
  lo, hi = np.percentile(boot, [2.5, 97.5])
  return {
    "median": float(q2),
    "q25": float(q1),
    "q75": float(q3),
    "median_ci95": [float(lo), float(hi)],
    # Noise only ever adds time, so the ratio of the fastest samples is a second,
    # independent estimate of the same quantity.
    "ratio_of_minima": float(min(num) / min(den)),
  }


def median_iqr(stats: dict[str, float]) -> str:
  """``median [q25, q75]`` of a :func:`ratio_stats` result, for tables."""
  return f"{stats['median']:.3f} [{stats['q25']:.3f}, {stats['q75']:.3f}]"
