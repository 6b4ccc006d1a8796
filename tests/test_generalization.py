"""The generalization benchmark (benchmarks/generalization.py) runs end to end in a tiny
configuration and writes the documented results; nothing is timed."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samx import __main__ as cli
from samx import demo
from samx.masks import count_selected, norm_layers

ROW_KEYS = {
  "suite": str,
  "variant": str,
  "setting": str,
  "noise": float,
  "rho": (float, type(None)),
  "seeds": int,
  "final_mean": float,
  "final_std": float,
  "best_mean": float,
  "best_std": float,
  "epochs": int,
  "seconds": float,
}


@pytest.fixture(scope="module")
def generalization():
  return cli.load_benchmark("generalization")


def test_tiny_run_writes_json_tables_and_plots(generalization, tmp_path, capsys):
  argv = ["--quick", "--suites", "noise", "--noise-variants", "sgd,sgd_2x,sam"]
  argv += ["--epochs", "2", "--seeds", "2", "--out", str(tmp_path), "--quiet"]
  assert generalization.main(argv) == 0

  report = json.loads((tmp_path / "results.json").read_text())
  assert {"config", "environment", "rows", "tables", "files", "seconds"} <= report.keys()
  assert report["config"]["epochs"] == 2 and report["config"]["seeds"] == 2
  assert report["environment"]["cpu"] and report["environment"]["jax"] == jax.__version__
  rows = report["rows"]
  noises = generalization.QUICK_GRID.noises
  assert len(rows) == 3 * len(noises)
  for row in rows:
    for key, kind in ROW_KEYS.items():
      assert isinstance(row[key], kind), (key, row[key])
    assert row["suite"] == "noise" and row["seeds"] == 2 and row["noise"] in noises
    assert 0.0 <= row["final_mean"] <= row["best_mean"] <= 1.0
    assert row["final_std"] >= 0.0 and row["best_std"] >= 0.0 and row["seconds"] > 0.0
    np.testing.assert_allclose(row["final_mean"], np.mean(row["final_per_seed"]), rtol=1e-6)
    np.testing.assert_allclose(row["best_std"], np.std(row["best_per_seed"]), atol=1e-7)
    assert len(row["curve_mean"]) == row["epochs"]
    assert all(b >= f for b, f in zip(row["best_per_seed"], row["final_per_seed"], strict=True))
  by_variant = {(r["variant"], r["noise"]): r for r in rows}
  assert {v for v, _ in by_variant} == {"sgd", "sgd_2x", "sam"}
  # The compute-matched SGD baseline trains twice the epochs of the others.
  assert by_variant["sgd_2x", 0.0]["epochs"] == 2 * by_variant["sgd", 0.0]["epochs"] == 4
  assert by_variant["sam", 0.4]["rho"] == generalization.RHO["sam"]
  assert by_variant["sgd", 0.4]["rho"] is None
  # The first epochs of SGD and SGD-2x are the same run (same seeds, same program).
  np.testing.assert_allclose(
    by_variant["sgd_2x", 0.4]["curve_mean"][:2], by_variant["sgd", 0.4]["curve_mean"], atol=2e-3
  )

  png = tmp_path / "generalization_noise.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert report["files"]["noise"] == str(png)
  tables = (tmp_path / "tables.md").read_text()
  out = capsys.readouterr().out
  for text in (tables, out):
    assert "### noise" in text and "| SGD (2x epochs) |" in text and "± " in text


def test_every_suite_plans_buildable_optimizers(generalization):
  config = generalization.Config()
  builders = generalization.SUITE_BUILDERS
  requests = [r for s in generalization.SUITES for r in builders[s](config)]
  assert {r.suite for r in requests} == set(generalization.SUITES)
  noise_rows = {r.variant for r in requests if r.suite == "noise"}
  assert noise_rows == set(generalization.NOISE_VARIANTS)
  sparsities = {r.x for r in requests if r.suite == "ssam" and r.variant.startswith("ssam")}
  assert sparsities == {0.5, 0.9, 0.99}
  assert {r.x for r in requests if r.suite == "msam" and r.variant == "msam"} == {64, 16, 4, 1}
  jobs = generalization.plan_jobs(requests)
  # One program per configuration without its radius, for every (radius, noise) run
  # any suite needs, for the most epochs any row needs (SGD and SGD-2x share one).
  assert len(jobs) < len({r.spec for r in requests}) < len(requests)
  sam = jobs["sam", None, None, None]
  grid = generalization.Grid()
  rho_sam = generalization.RHO["sam"]
  assert {(rho_sam, noise) for noise in grid.noises} <= set(sam.runs)
  assert {(rho, 0.4) for rho in grid.sam_rhos} <= set(sam.runs)
  assert len(set(sam.runs)) == len(sam.runs) and sam.epochs == config.epochs
  assert jobs["sgd", None, None, None].epochs == 2 * config.epochs
  for job in jobs.values():
    variant = generalization.make_variant(job.spec, config.lr, config.batch_size)
    assert variant.rho == job.spec.rho and variant.seed_axis in ("vmap", "map")
    # train_job sets the radius per run: every optimizer but SGD has a factory.
    assert (variant.factory is None) == (job.spec.kind == "sgd")


def _perturbation(variant, params):
  """The eps of one step: the perturbed params seen by grad_fn, minus params."""
  seen = []
  grad_fn = lambda p: (seen.append(p), jax.tree.map(jnp.ones_like, p))[1]
  grads = jax.tree.map(jnp.ones_like, params)
  variant.tx.update(grads, variant.tx.init(params), params, grad_fn=grad_fn)
  return jax.tree.map(lambda p, q: np.asarray(p - q), seen[0], params)


def test_sam_on_controls_perturb_the_right_entries(generalization):
  params = demo.init_mlp(jax.random.key(0), (64, 32, 32, 10), layer_norm=True)
  num_norm = count_selected(norm_layers, params)
  spec = lambda kind, rho: generalization.Spec(kind, rho, 1)
  eps = {
    kind: _perturbation(generalization.make_variant(spec(kind, 2.0), 0.05, 64), params)
    for kind in ("sam_on", "sam_on_random", "no_norm")
  }
  nonzero = lambda tree: sum(int((leaf != 0).sum()) for leaf in jax.tree.leaves(tree))
  norm_part = lambda tree: [layer["norm"] for layer in tree[:-1]]
  # SAM-ON: exactly the LayerNorm entries; the control: as many entries, not those.
  assert nonzero(eps["sam_on"]) == nonzero(norm_part(eps["sam_on"])) == num_norm
  assert nonzero(eps["sam_on_random"]) == num_norm
  assert nonzero(norm_part(eps["sam_on_random"])) < num_norm // 2
  # No-norm: everything but the LayerNorms.
  total = sum(leaf.size for leaf in jax.tree.leaves(params))
  assert nonzero(norm_part(eps["no_norm"])) == 0
  assert nonzero(eps["no_norm"]) == total - num_norm
  for tree in eps.values():  # every ascent is normalised over what it perturbs
    norm = np.sqrt(sum(float((leaf**2).sum()) for leaf in jax.tree.leaves(tree)))
    assert norm == pytest.approx(2.0, rel=1e-4)


@pytest.mark.parametrize(
  "argv", [["--suites", "sharpness"], ["--noises", "0.2,1.5"], ["--noise-variants", "adam"]]
)
def test_bad_flags_are_usage_errors(generalization, argv, capsys):
  with pytest.raises(SystemExit) as exc:
    generalization.main(argv)
  assert exc.value.code == 2 and "error" in capsys.readouterr().err
