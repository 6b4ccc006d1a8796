"""The speed benchmark runs end to end (a smoke run on a tiny model; no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def test_speed_benchmark_quick_run(tmp_path):
  spec = importlib.util.spec_from_file_location("samx_speed_benchmark", SPEED)
  speed = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(speed)
  out = tmp_path / "speed.json"
  # The benchmark's models use ordinary bias broadcasting.
  with jax.numpy_rank_promotion("allow"):
    speed.main(
      ["--quick", "--models", "tiny-mlp 784-8-10", "--compile-repeats", "1", "--json", str(out)]
    )
  results = json.loads(out.read_text())
  assert results
  text = json.dumps(results)
  # samx's step and the hand-written one computed the same parameters.
  assert "max_abs_param_diff_hand_vs_samx" in text


def test_edge_of_stability_quick_run(tmp_path):
  spec = importlib.util.spec_from_file_location(
    "samx_eos_benchmark", SPEED.parent / "edge_of_stability.py"
  )
  eos = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(eos)
  with jax.numpy_rank_promotion("allow"):
    eos.main(["--quick", "--steps", "40", "--every", "20", "--out", str(tmp_path)])
  assert (tmp_path / "edge_of_stability.png").exists()
