"""The benchmark harnesses run end to end in tiny configurations (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
  spec = importlib.util.spec_from_file_location(
    f"samx_benchmark_{name}", BENCHMARKS / f"{name}.py"
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def test_speed_benchmark_schema(tmp_path):
  speed = _load("speed")
  argv = ["--quick", "--models", "tiny-mlp", "--variants", "sam,looksam,esam,msam_k4"]
  with jax.numpy_rank_promotion("allow"):  # flax's layers broadcast their biases
    report = speed.main(
      [*argv, "--repeats", "2", "--steps", "5", "--quiet", "--out", str(tmp_path)]
    )
  saved = json.loads((tmp_path / "speed.json").read_text())
  assert saved["settings"]["variants"] == ["sam", "looksam", "esam", "msam_k4"]
  assert set(saved["machine"]) >= {"backend", "jax", "optax", "flax", "cpu", "date"}
  (result,) = saved["results"]
  assert (
    result["model"] == "tiny-mlp" and result["n_params"] == report["results"][0]["n_params"]
  )
  assert list(result["kinds"]) == [
    "sgd",
    "hand",
    "optax_sam",
    "sam",
    "looksam",
    "esam",
    "msam_k4",
  ]
  for row in result["kinds"].values():
    assert len(row["per_repeat_ms"]) == 2 and row["ms"] > 0
    assert row["wall_over_sgd"]["q25"] <= row["wall_over_sgd"]["median"]
    assert row["compile_s"] > 0
    assert row["memory"]["peak"] > 0
  # The three SAM implementations computed the same first step.
  assert max(result["max_abs_param_diff"].values()) < 1e-6
  assert (tmp_path / "speed.md").read_text().count("| sam |") == 1
  assert (tmp_path / "speed.png").stat().st_size > 0


def test_speed_benchmark_rejects_unknown_names():
  speed = _load("speed")
  with pytest.raises(SystemExit):
    speed.main(["--quick", "--variants", "sam,nope"])


def test_models_for_every_preset_build():
  models = _load("models")
  for name in ("tiny-mlp", "resnet-tiny", "vit-tiny"):
    model = models.build(name, 2)
    losses, _ = jax.jit(model.per_example)(model.params, model.rest, model.batch)
    assert losses.shape == (2,)


def test_edge_of_stability_quick_run(tmp_path):
  eos = _load("edge_of_stability")
  with jax.numpy_rank_promotion("allow"):
    eos.main(["--quick", "--steps", "40", "--every", "20", "--out", str(tmp_path)])
  assert (tmp_path / "edge_of_stability.png").exists()
