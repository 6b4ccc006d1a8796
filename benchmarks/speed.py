"""Step time, peak memory and compile time of every samx variant against three references.

The references are an SGD step, a hand-written SAM step and ``optax.contrib.sam``.

Every step maps ``((params, rest), opt_state, batch)`` to the same triple with the
loss, on a Flax NNX model split into pure functions (``benchmarks/models.py``;
``rest`` holds BatchNorm's running statistics, updated from the clean pass). The
base optimizer is ``optax.sgd(lr, momentum=0.9)`` everywhere. The reference steps:

* ``sgd``:  ``g = grad L(w)``; the optax update.
* ``hand``: ``g = grad L(w)``; ``e = rho * g / (||g|| + 1e-12)``;
  ``g_s = grad L(w + e)``; the same optax update applied to ``g_s``.
* ``optax_sam``: ``optax.contrib.sam`` in opaque mode (``sync_period=2``, its
  adversarial optimizer ``chain(normalize(), sgd(rho))``), the same algorithm.

and one step per samx variant (``VARIANTS``), each through its documented call
contract (``grad_fn``; ``per_example_loss_fn`` and ``batch`` for SSAM-F, ESAM and
micro-shard mSAM). Timed steps start from the state after one step (so SSAM's
mask refresh, every 100 steps, and LookSAM's phase are at their steady state);
LookSAM's time is the average over the ``--steps`` steps of a sample (use a
multiple of ``k``).

Measured, in one process:

* time: the steps are compiled ahead of time; in every repeat each kind runs
  ``--steps`` consecutive steps, the kinds in an order rotated from one repeat to
  the next, so machine noise hits all kinds alike. Ratios are medians (and
  interquartile ranges) of per-repeat ratios. Wall-clock time and, on the CPU
  backend, the CPU time of this process (less sensitive to other jobs).
* peak memory: XLA's own accounting of the compiled step
  (``compiled.memory_analysis()``: arguments + outputs + temporaries - aliased;
  nothing is donated), and the temporaries alone; the extra over SGD is given in
  units of the parameters' bytes (SAM needs one extra copy: ``w + eps``).
* compile time: lowering + compilation, with JAX's caches cleared.

Run from the repository root::

  python benchmarks/speed.py --quick            # a short smoke run (tiny models)
  python benchmarks/speed.py                    # CPU defaults: mlp, resnet-small, vit-mini
  python benchmarks/speed.py --preset gpu       # resnet18 and vit-s at batch 256
  python benchmarks/speed.py --models mlp --variants sam,looksam --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, models.py
import models  # noqa: E402
from common import cpu_model, median_iqr, ratio_stats, time_loop  # noqa: E402

import samx

LEARNING_RATE = 0.01
MOMENTUM = 0.9
RHO = 0.05
NORM_EPS = 1e-12
REFERENCES = ("sgd", "hand", "optax_sam")
LOOKSAM_K = 5
MSAM_SHARDS = 4


def _sgd() -> optax.GradientTransformation:
  return optax.sgd(LEARNING_RATE, momentum=MOMENTUM)


def _sam_on(model: models.Model) -> Any:
  """SAM-ON on the model's normalization layers; None for a model without any."""
  try:
    mask = samx.masks.norm_layers(model.module)
  except ValueError:
    return None
  return samx.sam_on(_sgd(), rho=0.5, mask=mask)


# name -> (factory(model) -> transform, contract). contract "grad_fn" or "per_example";
# the factory returns None where the variant does not apply to the model.
VARIANTS: dict[str, tuple[Callable[[models.Model], Any], str]] = {
  "sam": (lambda m: samx.sam(_sgd(), rho=RHO), "grad_fn"),
  "asam": (lambda m: samx.asam(_sgd(), rho=0.5), "grad_fn"),
  "msam_k4": (lambda m: samx.msam(_sgd(), rho=RHO, micro_shards=MSAM_SHARDS), "micro"),
  "fsam": (lambda m: samx.fsam(_sgd(), rho=RHO), "grad_fn"),
  "vasso": (lambda m: samx.vasso(_sgd(), rho=RHO), "grad_fn"),
  "random_sam": (lambda m: samx.random_sam(_sgd(), rho=RHO), "grad_fn"),
  "sam_on": (lambda m: _sam_on(m), "grad_fn"),
  "ssam_f": (lambda m: samx.ssam(_sgd(), rho=RHO, sparsity=0.5), "per_example"),
  "ssam_d": (
    lambda m: samx.ssam(_sgd(), rho=RHO, sparsity=0.5, mask_type="dynamic"),
    "grad_fn",
  ),
  "gsam": (lambda m: samx.gsam(_sgd(), rho=RHO, alpha=0.4), "grad_fn"),
  "wsam": (lambda m: samx.wsam(_sgd(), rho=RHO, learning_rate=LEARNING_RATE), "grad_fn"),
  "looksam": (lambda m: samx.looksam(_sgd(), rho=RHO, k=LOOKSAM_K), "grad_fn"),
  "esam": (lambda m: samx.esam(_sgd(), rho=RHO, beta=0.5, gamma=0.5), "per_example"),
  "esam_tensor": (
    lambda m: samx.esam(_sgd(), rho=RHO, beta=0.5, gamma=0.5, per_tensor=True),
    "per_example",
  ),
}

PRESETS = {
  "quick": {"models": ("tiny-mlp", "resnet-tiny", "vit-tiny"), "batch_size": 16},
  "cpu": {"models": ("mlp", "resnet-small", "vit-mini"), "batch_size": 128},
  "gpu": {"models": ("mlp", "resnet18", "vit-s"), "batch_size": 256},
}
TIMING = {  # preset -> (repeats, steps per sample, warmup rounds)
  "quick": (4, 5, 1),
  "cpu": (15, 10, 1),
  "gpu": (20, 10, 2),
}

# ---------------------------------------------------------------------------
# The step functions: ((params, rest), opt_state, batch) -> (same, opt_state, loss).
# ---------------------------------------------------------------------------


def make_steps(model: models.Model, kinds: list[str]) -> dict[str, tuple[Any, Callable]]:
  per_example = model.per_example

  def clean(params, rest, batch):
    def mean_loss(p):
      losses, new_rest = per_example(p, rest, batch)
      return losses.mean(), (losses, new_rest)

    (loss, (losses, new_rest)), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    grad_fn = jax.grad(lambda p: per_example(p, rest, batch)[0].mean())
    return loss, losses, new_rest, grads, grad_fn

  def optax_step(tx):
    def step(variables, opt_state, batch):
      params, rest = variables
      loss, _, new_rest, grads, _ = clean(params, rest, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), new_rest), opt_state, loss

    return step

  def hand_step(variables, opt_state, batch):
    params, rest = variables
    loss, _, new_rest, grads, grad_fn = clean(params, rest, batch)
    scale = RHO / (optax.tree.norm(grads) + NORM_EPS)
    sam_grads = grad_fn(jax.tree.map(lambda w, g: w + scale * g, params, grads))
    updates, opt_state = base.update(sam_grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_rest), opt_state, loss

  def contrib_step(variables, opt_state, batch):
    params, rest = variables
    loss, _, new_rest, grads, grad_fn = clean(params, rest, batch)
    updates, opt_state = contrib.update(
      grads, opt_state, params, grad_fn=lambda p, _: grad_fn(p)
    )
    return (optax.apply_updates(params, updates), new_rest), opt_state, loss

  def samx_step(tx, contract):
    def step(variables, opt_state, batch):
      params, rest = variables
      pe = lambda p, b: per_example(p, rest, b)[0]
      if contract == "micro":
        # Each micro-shard's clean gradient is computed by samx: no clean pass here
        # (the step costs SAM's FLOPs); the loss is not reported.
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, opt_state = tx.update(
          zeros, opt_state, params, per_example_loss_fn=pe, batch=batch
        )
        return (optax.apply_updates(params, updates), rest), opt_state, jnp.zeros(())
      loss, losses, new_rest, grads, grad_fn = clean(params, rest, batch)
      if contract == "per_example":
        extra = {"per_example_loss_fn": pe, "batch": batch, "losses": losses}
      else:
        extra = {"grad_fn": grad_fn}
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
      return (optax.apply_updates(params, updates), new_rest), opt_state, loss

    return step

  base = _sgd()
  contrib = optax.contrib.sam(
    _sgd(), optax.chain(optax.contrib.normalize(), optax.sgd(RHO)), opaque_mode=True
  )
  steps = {"sgd": (base, optax_step(base)), "hand": (base, hand_step)}
  steps["optax_sam"] = (contrib, contrib_step)
  for kind in kinds:
    if kind in REFERENCES:
      continue
    factory, contract = VARIANTS[kind]
    tx = factory(model)
    if tx is not None:
      steps[kind] = (tx, samx_step(tx, contract))
  return steps


# ---------------------------------------------------------------------------
# Measuring.
# ---------------------------------------------------------------------------


def compile_step(step: Callable, args: tuple) -> tuple[Any, float, float]:
  """Lowers and compiles ``step`` ahead of time; returns (executable, lower s, compile s)."""
  t0 = time.perf_counter()
  lowered = jax.jit(step).lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, t1 - t0, t2 - t1


def memory(compiled: Any) -> dict[str, int] | None:
  """XLA's memory accounting of a compiled step, in bytes (None where unavailable)."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 (backends without the analysis)
    return None
  if stats is None:
    return None
  args, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
  temp, alias = stats.temp_size_in_bytes, stats.alias_size_in_bytes
  return {
    "argument": int(args),
    "output": int(out),
    "temp": int(temp),
    "alias": int(alias),
    "peak": int(args + out + temp - alias),
  }


def max_abs_diff(a: Any, b: Any) -> float:
  return max(
    float(jnp.max(jnp.abs(x - y)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def benchmark_model(
  name: str,
  batch_size: int,
  kinds: list[str],
  repeats: int,
  steps: int,
  warmup: int,
  compile_repeats: int,
  progress: Callable[[str], None] = print,
) -> dict[str, Any]:
  model = models.build(name, batch_size)
  step_fns = make_steps(model, kinds)
  kinds = [k for k in step_fns]
  variables = (model.params, model.rest)
  batch = model.batch

  compiled, lower_s, compile_s, mem, start = {}, {}, {}, {}, {}
  for kind in kinds:
    tx, step = step_fns[kind]
    state = tx.init(model.params)
    lowers, compiles = [], []
    for _ in range(compile_repeats):
      jax.clear_caches()  # otherwise JAX reuses the executable and nothing is compiled
      exe, lo, co = compile_step(step, (variables, state, batch))
      lowers.append(lo)
      compiles.append(co)
    compiled[kind] = exe
    lower_s[kind], compile_s[kind] = statistics.median(lowers), statistics.median(compiles)
    mem[kind] = memory(exe)
    # One step first: timing starts from the steady state (and checks the step runs).
    first_vars, first_state, _ = exe(variables, state, batch)
    start[kind] = (first_vars, first_state)
    progress(f"  compiled {name} {kind}: {lower_s[kind]:.2f} + {compile_s[kind]:.2f} s")

  # The three SAM implementations compute the same step.
  diffs = {
    f"{ref}_vs_samx_sam": max_abs_diff(start[ref][0][0], start["sam"][0][0])
    for ref in ("hand", "optax_sam")
    if "sam" in start
  }

  for _ in range(warmup):
    for kind in kinds:
      time_loop(compiled[kind], *start[kind], batch, steps)
  wall = {kind: [] for kind in kinds}
  cpu = {kind: [] for kind in kinds}
  for r in range(repeats):
    order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
    for kind in order:
      w, c = time_loop(compiled[kind], *start[kind], batch, steps)
      wall[kind].append(w)
      cpu[kind].append(c)
    progress(f"  timed {name}: repeat {r + 1}/{repeats}")

  param_bytes = model.param_bytes
  per_kind = {}
  for kind in kinds:
    row = {
      "ms": 1e3 * statistics.median(wall[kind]),
      "per_repeat_ms": [1e3 * t for t in wall[kind]],
      "wall_over_sgd": ratio_stats(wall[kind], wall["sgd"]),
      "wall_over_hand": ratio_stats(wall[kind], wall["hand"]),
      "wall_over_optax_sam": ratio_stats(wall[kind], wall["optax_sam"]),
      "cpu_over_sgd": ratio_stats(cpu[kind], cpu["sgd"]),
      "cpu_over_hand": ratio_stats(cpu[kind], cpu["hand"]),
      "lower_s": lower_s[kind],
      "compile_s": compile_s[kind],
      "memory": mem[kind],
    }
    if mem[kind] and mem["sgd"]:
      row["peak_over_sgd"] = mem[kind]["peak"] / mem["sgd"]["peak"]
      row["extra_peak_params"] = (mem[kind]["peak"] - mem["sgd"]["peak"]) / param_bytes
      row["extra_temp_params"] = (mem[kind]["temp"] - mem["sgd"]["temp"]) / param_bytes
    per_kind[kind] = row
  return {
    "model": name,
    "description": model.description,
    "n_params": model.n_params,
    "param_bytes": param_bytes,
    "batch_size": batch_size,
    "max_abs_param_diff": diffs,
    "kinds": per_kind,
  }


# ---------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".2f") -> str:
  return "-" if x is None else format(x, spec)


def table(results: list[dict[str, Any]], cpu_clock: bool) -> str:
  lines = []
  for res in results:
    lines.append(
      f"\n### {res['model']}: {res['description']}; {res['n_params']:,} params, "
      f"batch {res['batch_size']}\n"
    )
    header = (
      "| step | ms | /SGD wall [IQR] | /hand SAM | /optax SAM | "
      + ("/SGD cpu | " if cpu_clock else "")
      + "peak /SGD | extra peak MB (params) | extra temp (params) | compile s |"
    )
    lines.append(header)
    lines.append("|" + "---|" * (header.count("|") - 1))
    for kind, row in res["kinds"].items():
      cells = [
        kind,
        f"{row['ms']:.3g}",
        median_iqr(row["wall_over_sgd"]),
        f"{row['wall_over_hand']['median']:.3f}",
        f"{row['wall_over_optax_sam']['median']:.3f}",
      ]
      if cpu_clock:
        cells.append(f"{row['cpu_over_sgd']['median']:.3f}")
      cells += [
        _fmt(row.get("peak_over_sgd"), ".3f"),
        "-"
        if row.get("extra_peak_params") is None
        else f"{row['extra_peak_params'] * res['param_bytes'] / 2**20:+.1f} "
        f"({row['extra_peak_params']:+.2f})",
        _fmt(row.get("extra_temp_params"), "+.2f"),
        f"{row['lower_s'] + row['compile_s']:.2f}",
      ]
      lines.append("| " + " | ".join(cells) + " |")
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in res["max_abs_param_diff"].items())
    lines.append(f"\nmax |w - w_samx_sam| after one step: {diffs}")
  return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> str:
  """The issue's targets, each met or with the measured gap."""
  lines = ["\nTargets (median wall-clock ratios):"]
  for res in results:
    kinds = res["kinds"]
    if "sam" not in kinds:
      continue
    sam_hand = kinds["sam"]["wall_over_hand"]["median"]
    lines.append(
      f"  {res['model']}: samx SAM / hand-written = {sam_hand:.3f} "
      f"({'met' if sam_hand <= 1.03 else 'NOT met'}: <= 1.03)"
    )
    hand_sgd = kinds["hand"]["wall_over_sgd"]["median"]
    sam_sgd = kinds["sam"]["wall_over_sgd"]["median"]
    lines.append(
      f"  {res['model']}: SAM / SGD = {sam_sgd:.3f}, hand SAM / SGD = {hand_sgd:.3f} "
      f"(2x +- 5%: {'met' if abs(sam_sgd - 2) <= 0.1 else 'not met'})"
    )
    extra = kinds["sam"].get("extra_temp_params")
    if extra is not None:
      lines.append(
        f"  {res['model']}: SAM's extra temporaries over SGD = {extra:+.2f} x params "
        f"({'met' if extra <= 1.05 else 'NOT met'}: <= 1 copy)"
      )
  return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str) -> str:
  """Bars of step time over SGD (median, IQR as error bars), one panel per model."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(
    len(results), 1, figsize=(9, 2.8 * len(results)), squeeze=False, constrained_layout=True
  )
  for ax, res in zip(axes[:, 0], results, strict=True):
    kinds = list(res["kinds"])
    stats = [res["kinds"][k]["wall_over_sgd"] for k in kinds]
    medians = [s["median"] for s in stats]
    errors = [
      [m - s["q25"] for m, s in zip(medians, stats, strict=True)],
      [s["q75"] - m for m, s in zip(medians, stats, strict=True)],
    ]
    colors = ["tab:gray" if k in REFERENCES else "tab:blue" for k in kinds]
    ax.bar(kinds, medians, yerr=errors, color=colors, capsize=2)
    ax.axhline(2.0, color="tab:red", lw=0.8, ls="--", label="2x SGD")
    ax.set_ylabel("step time / SGD")
    ax.set_title(f"{res['model']}: {res['description']}, batch {res['batch_size']}", fontsize=9)
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.legend(fontsize=8)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="the 'quick' preset")
  parser.add_argument("--preset", choices=list(PRESETS), default=None)
  parser.add_argument(
    "--models", default=None, help=f"comma-separated, of {list(models.SPECS)}"
  )
  parser.add_argument(
    "--variants", default=None, help=f"comma-separated, of {list(VARIANTS)} (default: all)"
  )
  parser.add_argument("--batch-size", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None, help="steps per timed sample")
  parser.add_argument("--warmup", type=int, default=None, help="untimed rounds")
  parser.add_argument("--compile-repeats", type=int, default=1)
  parser.add_argument("--json", metavar="PATH", help="save the results as JSON")
  parser.add_argument(
    "--out", metavar="DIR", help="write speed.json, speed.md and speed.png there"
  )
  parser.add_argument("--quiet", action="store_true", help="no progress lines")
  args = parser.parse_args(argv)

  preset = "quick" if args.quick else (args.preset or "cpu")
  model_names = args.models.split(",") if args.models else list(PRESETS[preset]["models"])
  for name in model_names:
    if name not in models.SPECS:
      parser.error(f"--models: unknown model {name!r}; expected some of {list(models.SPECS)}")
  kinds = args.variants.split(",") if args.variants else list(VARIANTS)
  for kind in kinds:
    if kind not in VARIANTS:
      parser.error(f"--variants: unknown variant {kind!r}; expected some of {list(VARIANTS)}")
  if "sam" not in kinds:
    kinds.insert(0, "sam")
  batch_size = args.batch_size or PRESETS[preset]["batch_size"]
  repeats, steps, warmup = TIMING[preset]
  repeats = args.repeats or repeats
  steps = args.steps or steps
  warmup = args.warmup if args.warmup is not None else warmup

  backend = jax.default_backend()
  machine = {
    "cpu": cpu_model(),
    "cores": os.cpu_count(),
    "backend": backend,
    "devices": [str(d) for d in jax.devices()],
    "device_kind": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "optax": optax.__version__,
    "flax": flax.__version__,
    "python": platform.python_version(),
    "date": datetime.date.today().isoformat(),
  }
  settings = {
    "preset": preset,
    "models": model_names,
    "variants": kinds,
    "batch_size": batch_size,
    "repeats": repeats,
    "steps": steps,
    "warmup": warmup,
    "compile_repeats": args.compile_repeats,
    "rho": RHO,
    "learning_rate": LEARNING_RATE,
    "momentum": MOMENTUM,
    "looksam_k": LOOKSAM_K,
    "msam_micro_shards": MSAM_SHARDS,
  }
  header = (
    f"jax {machine['jax']} ({backend}: {machine['device_kind']}), {machine['cpu']}, "
    f"{machine['cores']} cores; batch {batch_size}, repeats {repeats} x {steps} steps"
  )
  print(header)
  progress = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
  paths = [args.json] if args.json else []
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    paths.append(os.path.join(args.out, "speed.json"))
  results = []
  for name in model_names:
    results.append(
      benchmark_model(
        name, batch_size, kinds, repeats, steps, warmup, args.compile_repeats, progress
      )
    )
    report = {"machine": machine, "settings": settings, "results": results}
    for path in paths:  # after every model, so a long run keeps what it has measured
      with open(path, "w") as f:
        json.dump(report, f, indent=2)
  text = table(results, cpu_clock=backend == "cpu") + "\n" + targets(results)
  print(text)
  if args.out:
    with open(os.path.join(args.out, "speed.md"), "w") as f:
      f.write(header + "\n" + text + "\n")
    paths.append(plot(results, os.path.join(args.out, "speed.png")))
  for path in paths:
    print(f"saved {path}")
  return report


if __name__ == "__main__":
  main()
