"""The main job (``python -m samx``): a tiny end-to-end run, the CLI and the label noise."""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from samx import __main__ as cli
from samx import demo


@pytest.fixture(scope="module")
def digits():
  return demo.load_digits_split()


def test_split_is_fixed_and_scaled(digits):
  x_train, y_train, x_test, y_test = digits
  assert x_train.shape == (1000, 64) and x_test.shape == (797, 64)
  assert y_train.shape == (1000,) and y_test.shape == (797,)
  assert x_train.dtype == np.float32 and y_train.dtype == np.int32
  assert 0.0 <= x_train.min() and x_train.max() <= 1.0
  again = demo.load_digits_split()
  for a, b in zip(digits, again, strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("noise", [0.0, 0.05, 0.4, 1.0])
def test_label_noise_flips_exactly_round_noise_n(digits, noise):
  labels = jnp.asarray(digits[1])
  for seed in range(3):
    noisy = demo.symmetric_label_noise(jax.random.key(seed), labels, noise)
    assert noisy.shape == labels.shape and noisy.dtype == labels.dtype
    assert int(noisy.min()) >= 0 and int(noisy.max()) < demo.NUM_CLASSES
    # Every chosen example gets a different class, so exactly that many differ.
    assert int((noisy != labels).sum()) == round(noise * labels.shape[0])


def test_label_noise_is_symmetric_and_seeded(digits):
  labels = digits[1]
  keys = jax.random.split(jax.random.key(0), 50)
  draw = jax.jit(jax.vmap(lambda k: demo.symmetric_label_noise(k, jnp.asarray(labels), 0.4)))
  noisy = np.asarray(draw(keys))
  flipped = noisy != labels[None, :]
  assert (flipped.sum(axis=1) == 400).all()
  assert (flipped[0] != flipped[1]).any()  # the key changes which examples flip
  # Given its original class, each of the nine other classes is equally likely.
  old = np.broadcast_to(labels, noisy.shape)[flipped]
  shifts = np.bincount((noisy[flipped] - old) % 10, minlength=10)
  assert shifts[0] == 0
  np.testing.assert_allclose(shifts[1:] / shifts.sum(), 1 / 9, atol=0.01)


def test_label_noise_rejects_bad_rate():
  with pytest.raises(ValueError, match="noise"):
    demo.symmetric_label_noise(jax.random.key(0), jnp.zeros(4, jnp.int32), 1.5)


def test_tiny_run_writes_plot_and_json(tmp_path, capsys):
  epochs, seeds = 3, 2
  argv = ["--epochs", str(epochs), "--seeds", str(seeds), "--out", str(tmp_path), "--quiet"]
  # The default variants plus mSAM with m=16: four micro-shards of the batch of 64 (the
  # per-example contract with zero grads).
  argv += ["--variants", "sgd,sam,asam,msam", "--msam-m", "16"]
  assert cli.main(argv) == 0  # no subcommand: runs "demo"

  table = capsys.readouterr().out
  labels = ["SGD", "SAM (rho=1)", f"ASAM (rho={demo.DEFAULT_RHO_ASAM:g})"]
  for label in [*labels, "mSAM (m=16)"]:
    assert label in table
  assert "±" in table

  png = tmp_path / "accuracy.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  report = json.loads((tmp_path / "results.json").read_text())
  assert {"config", "data", "results", "files", "seconds"} <= report.keys()
  assert report["config"]["epochs"] == epochs and report["config"]["seeds"] == seeds
  assert report["data"]["num_train"] == 1000 and report["data"]["num_test"] == 797
  assert report["data"]["num_flipped"] == 400
  results = report["results"]
  assert list(results) == ["sgd", "sam", "asam", "msam_m16"]
  assert results["sgd"]["rho"] is None
  assert results["sam"]["rho"] == demo.DEFAULT_RHO_SAM
  assert results["asam"]["rho"] == demo.DEFAULT_RHO_ASAM
  assert results["msam_m16"]["rho"] == demo.DEFAULT_RHO_MSAM
  assert [results[k].get("m") for k in results] == [None, None, None, 16]
  # Same rho as SAM, but four perturbations per step: a different trajectory (the
  # logged loss is the clean batch loss, from a forward pass).
  assert results["msam_m16"]["train_loss"] != results["sam"]["train_loss"]
  assert 1.5 < results["msam_m16"]["train_loss"][0][0] < 3.0
  for entry in report["results"].values():
    acc = np.asarray(entry["test_accuracy"])
    assert acc.shape == (seeds, epochs)
    assert np.asarray(entry["train_loss"]).shape == (seeds, epochs)
    assert ((0.0 <= acc) & (acc <= 1.0)).all()
    for key, expected in (("final", acc[:, -1]), ("best", acc.max(axis=1))):
      summary = entry[key]
      np.testing.assert_allclose(summary["per_seed"], expected)
      assert summary["mean"] == pytest.approx(expected.mean())
      assert summary["std"] == pytest.approx(expected.std())
  # SGD learns something even in three epochs with 40% noise.
  assert report["results"]["sgd"]["final"]["mean"] > 0.5


def test_tiny_run_ln_mlp_with_sam_on_ssam_fsam_vasso(tmp_path, capsys):
  epochs, seeds = 2, 2
  argv = ["--epochs", str(epochs), "--seeds", str(seeds), "--out", str(tmp_path), "--quiet"]
  argv += ["--model", "ln-mlp", "--variants", "sam_on,ssam,fsam,vasso"]
  assert cli.main(argv) == 0

  table = capsys.readouterr().out
  for label in ["SAM-ON (rho=", "SSAM-F (rho=", "F-SAM (rho=", "VaSSO (rho="]:
    assert label in table
  report = json.loads((tmp_path / "results.json").read_text())
  assert report["config"]["model"] == "ln-mlp" and report["data"]["layer_norm"]
  assert report["config"]["sparsity"] == demo.DEFAULT_SPARSITY
  results = report["results"]
  assert list(results) == ["sam_on", "ssam", "fsam", "vasso"]
  expected_rho = {
    "sam_on": demo.DEFAULT_RHO_SAM_ON,
    "ssam": demo.DEFAULT_RHO_SSAM,
    "fsam": demo.DEFAULT_RHO_FSAM,
    "vasso": demo.DEFAULT_RHO_VASSO,
  }
  for key, entry in results.items():
    assert entry["rho"] == expected_rho[key]
    acc = np.asarray(entry["test_accuracy"])
    loss = np.asarray(entry["train_loss"])
    assert acc.shape == loss.shape == (seeds, epochs)
    assert np.isfinite(loss).all() and ((0.0 <= acc) & (acc <= 1.0)).all()
    # The logged loss is the clean batch loss; large radii lift it early on.
    assert 1.0 < loss[0, 0] < 10.0
    np.testing.assert_allclose(entry["final"]["per_seed"], acc[:, -1])
  # Four different ascents: four different trajectories from the same start.
  losses = [results[k]["train_loss"] for k in results]
  assert all(a != b for i, a in enumerate(losses) for b in losses[i + 1 :])


def test_ln_mlp_params_expose_norm_layers_by_structure():
  from samx.masks import selected_paths

  sizes = (64, 8, 8, demo.NUM_CLASSES)
  params = demo.init_mlp(jax.random.key(0), sizes, layer_norm=True)
  assert selected_paths(demo.norm_layers, params) == [
    "0/norm/bias",
    "0/norm/scale",
    "1/norm/bias",
    "1/norm/scale",
  ]
  with pytest.raises(ValueError, match="no normalization layer"):
    selected_paths(demo.norm_layers, demo.init_mlp(jax.random.key(0), sizes))
  logits = demo.mlp_apply(params, jnp.ones((5, 64)))
  assert logits.shape == (5, demo.NUM_CLASSES) and bool(jnp.isfinite(logits).all())


def test_sam_on_needs_ln_mlp(tmp_path, capsys):
  argv = ["--variants", "sgd,sam_on", "--out", str(tmp_path), "--quiet"]
  with pytest.raises(SystemExit) as exc:
    cli.main(argv)
  assert exc.value.code == 2
  err = capsys.readouterr().err
  assert "error" in err and "--model ln-mlp" in err
  assert not (tmp_path / "results.json").exists()
  with pytest.raises(ValueError, match="--model ln-mlp"):
    demo.run_demo(demo.DemoConfig(variants=("sam_on",), out=str(tmp_path), progress=False))


def test_msam_rows_from_the_config():
  config = demo.DemoConfig(variants=("msam",), msam_m=(64, 16, 1), rho_msam=0.25)
  rows = demo.VARIANTS["msam"](config)
  assert [r.label for r in rows] == ["mSAM (m=64)", "mSAM (m=16)", "mSAM (m=1)"]
  assert [r.key for r in rows] == ["msam_m64", "msam_m16", "msam_m1"]
  # m = batch size is one shard, i.e. SAM, through the grad_fn contract.
  assert [r.contract for r in rows] == ["grad_fn", "per_example", "per_example"]
  assert {r.rho for r in rows} == {0.25}
  assert demo.DemoConfig().rho_msam == demo.DEFAULT_RHO_MSAM
  assert demo.DemoConfig().variants == ("sgd", "sam", "asam")  # mSAM is opt-in
  with pytest.raises(ValueError, match="divide the batch size 64"):
    demo.VARIANTS["msam"](dataclasses.replace(config, msam_m=(48,)))


def test_parser_demo_subcommand_and_flags():
  args = cli.build_parser().parse_args(
    ["demo", "--variants", "sgd, SAM", "--rho-sam", "0.5", "--noise", "0.2", "--quiet"]
  )
  config = demo.config_from_args(args)
  assert config.variants == ("sgd", "sam")
  assert config.rho_sam == 0.5 and config.noise == 0.2 and not config.progress
  assert config.rho_asam == demo.DEFAULT_RHO_ASAM and config.epochs == 150
  assert config.rho_msam == demo.DEFAULT_RHO_MSAM and config.msam_m == demo.DEFAULT_MSAM_M
  args = cli.build_parser().parse_args(
    ["demo", "--variants", "sgd,msam", "--msam-m", "64, 16,4,1", "--rho-msam", "0.1"]
  )
  config = demo.config_from_args(args)
  assert config.variants == ("sgd", "msam") and config.msam_m == (64, 16, 4, 1)
  assert config.rho_msam == 0.1
  config = demo.config_from_args(cli.build_parser().parse_args(["demo"]))
  assert config.model == "mlp" and config.variants == ("sgd", "sam", "asam")
  args = cli.build_parser().parse_args(
    ["demo", "--model", "ln-mlp", "--variants", "sam_on,ssam", "--rho-sam-on", "5"]
    + ["--sparsity", "0.8", "--rho-ssam", "0.5", "--rho-fsam", "0.2", "--rho-vasso", "0.3"]
  )
  config = demo.config_from_args(args)
  assert config.model == "ln-mlp" and config.variants == ("sam_on", "ssam")
  assert (config.rho_sam_on, config.sparsity, config.rho_ssam) == (5.0, 0.8, 0.5)
  assert (config.rho_fsam, config.rho_vasso) == (0.2, 0.3)


def test_msam_m_must_divide_the_batch_size(tmp_path, capsys):
  argv = ["--variants", "msam", "--msam-m", "16,5", "--out", str(tmp_path), "--quiet"]
  assert cli.main(argv) == 2
  assert "divide the batch size 64" in capsys.readouterr().err
  assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
  "argv",
  [
    ["--variants", "adam"],
    ["--noise", "1.5"],
    ["--epochs", "0"],
    ["--rho-sam", "-1"],
    ["--rho-msam", "-1"],
    ["--msam-m", "0"],
    ["--msam-m", "4,4"],
    ["--msam-m", "a"],
    ["--model", "cnn"],
    ["--rho-fsam", "-1"],
    ["--rho-sam-on", "nan"],
    ["--sparsity", "1.5"],
    ["--variants", "ssam", "--sparsity", "1"],
  ],
)
def test_parser_rejects_bad_flags(argv, capsys):
  with pytest.raises(SystemExit):
    cli.main(argv)
  assert "error" in capsys.readouterr().err


def test_ssam_kinds_give_one_row_each():
  config = demo.DemoConfig(
    model="ln-mlp", variants=("ssam",), ssam_kinds=("fisher", "structured", "2:4", "dynamic")
  )
  rows = demo.VARIANTS["ssam"](config)
  assert [r.key for r in rows] == ["ssam", "ssam_structured", "ssam_2_4", "ssam_dynamic"]
  assert rows[2].label == "SSAM-F (rho=1, 2:4)" and rows[3].label.startswith("SSAM-D")
  parser = argparse.ArgumentParser()
  demo.add_demo_arguments(parser)
  assert parser.parse_args(["--ssam-kinds", "2:4,dynamic"]).ssam_kinds == ("2:4", "dynamic")
  with pytest.raises(SystemExit):
    parser.parse_args(["--ssam-kinds", "3:4"])


@pytest.mark.parametrize("name", ["gsam", "wsam", "looksam", "esam"])
def test_combination_and_efficient_variants_take_one_step(name):
  config = demo.DemoConfig(variants=(name,))
  (variant,) = demo.VARIANTS[name](config)
  params = demo.init_mlp(jax.random.key(0))
  x, y, _, _ = demo.load_digits_split()
  x, y = jnp.asarray(x[:8]), jnp.asarray(y[:8])
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    demo.mlp_apply(p, x), y
  ).mean()
  per_example = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
    demo.mlp_apply(p, b[0]), b[1]
  )
  extra = {"grad_fn": jax.grad(loss)}
  if variant.contract == "per_example_grads":
    extra = {"per_example_loss_fn": per_example, "batch": (x, y)}
  updates, _ = variant.tx.update(
    jax.grad(loss)(params), variant.tx.init(params), params, **extra
  )
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


# ---------------------------------------------------------------------------- subcommands


class _FakeBenchmark:
  """Stands in for a benchmarks/ script: records its argv and program name."""

  def __init__(self, result):
    self.result = result
    self.calls = []

  def main(self, argv):
    import sys

    self.calls.append((argv, sys.argv[0]))
    return self.result


@pytest.mark.parametrize(
  ("name", "result", "status"),
  [("speed", {"rows": []}, 0), ("generalization", 0, 0), ("generalization", 3, 3)],
)
def test_benchmark_subcommands_pass_their_flags_on(monkeypatch, name, result, status):
  import sys

  fake = _FakeBenchmark(result)
  loaded = []
  monkeypatch.setattr(cli, "load_benchmark", lambda n: (loaded.append(n), fake)[1])
  argv = ["--quick", "--out", "some/dir", "--suites", "noise"]
  program = sys.argv[0]
  assert cli.main([name, *argv]) == status
  assert loaded == [name]
  # Unchanged flags, run under the program name "samx NAME", sys.argv restored.
  assert fake.calls == [(argv, f"samx {name}")]
  assert sys.argv[0] == program


def test_demo_stays_the_default_next_to_the_benchmarks(monkeypatch):
  ran = []
  monkeypatch.setattr(cli, "load_benchmark", lambda n: pytest.fail("no benchmark"))
  monkeypatch.setattr(demo, "run_command", lambda args: ran.append(args) or 0)
  assert cli.main([]) == 0 and cli.main(["--epochs", "3"]) == 0
  assert cli.main(["demo", "--epochs", "4"]) == 0
  assert [a.command for a in ran] == ["demo"] * 3
  assert [a.epochs for a in ran] == [150, 3, 4]
  help_text = cli.build_parser().format_help()
  for name in ("demo", "speed", "generalization"):
    assert name in help_text


def test_missing_benchmarks_say_they_ship_with_the_source(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path / "benchmarks")
  with pytest.raises(cli.BenchmarkNotFoundError, match="source checkout"):
    cli.load_benchmark("speed")
  assert cli.main(["generalization", "--quick"]) == 2
  err = capsys.readouterr().err
  assert "samx generalization: error:" in err and "source checkout" in err
  assert str(tmp_path / "benchmarks" / "generalization.py") in err


def test_benchmarks_are_found_next_to_the_package():
  folder = cli.benchmarks_dir()
  assert (folder / "speed.py").is_file() and (folder / "generalization.py").is_file()
  module = cli.load_benchmark("generalization")
  assert callable(module.main) and module.SUITES[0] == "noise"


def test_demo_train_runs_seeds_under_map_or_vmap():
  data = demo.load_digits_split()
  init = demo.init_seeds(jnp.arange(2), jnp.asarray(data[1]), 0.4, "ln-mlp")
  (variant,) = demo.VARIANTS["sam"](demo.DemoConfig())
  seen = []
  curves = {
    axis: demo.train(
      variant, 2, 64, data, init, seed_axis=axis, on_epoch=lambda e, a: seen.append(e)
    )
    for axis in ("vmap", "map")
  }
  assert seen == [0, 1, 0, 1]
  for axis in ("vmap", "map"):
    assert curves[axis]["test_accuracy"].shape == curves[axis]["train_loss"].shape == (2, 2)
  # The same runs; batching changes rounding only.
  np.testing.assert_allclose(
    curves["vmap"]["train_loss"], curves["map"]["train_loss"], rtol=1e-4
  )
  assert [v.seed_axis for v in demo.VARIANTS["ssam"](demo.DemoConfig())] == ["map"]
  with pytest.raises(ValueError, match="seed_axis"):
    demo.make_epoch(variant, 64, data, seed_axis="pmap")
