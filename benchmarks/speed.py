"""Speed of one jitted ``samx.sam`` step against a hand-written SAM step and plain SGD.

The step functions share one loss and one base optimizer
(``optax.sgd(lr, momentum=0.9)``); each maps ``(params, opt_state, batch)`` to
``(params, opt_state, loss)``:

* ``sgd``:  ``g = grad L(w)``; the optax update.
* ``hand``: ``g = grad L(w)``; ``e = rho * g / (||g|| + 1e-12)``;
  ``g_s = grad L(w + e)``; the same optax update applied to ``g_s``.
* ``samx``: ``g = grad L(w)``; ``samx.sam(sgd, rho).update(g, ..., grad_fn=...)``.

and the efficient variants, timed next to SAM:

* ``looksam``: ``looksam(sgd, rho, k=5)``, with ``grad_fn``; ``g_s`` is evaluated
  on one step in five, so its time is an average over the ``--steps`` steps of a
  sample (a multiple of ``k`` gives exactly one evaluation in five).
* ``esam``: ``esam(sgd, rho, beta=0.5, gamma=0.5)`` through the per-example
  contract (the first pass's per-example losses passed as ``losses``); one
  random bit per weight and step (the paper's SWP).
* ``esam_tensor``: the same with ``per_tensor=True`` (the official code's SWP:
  one random bit per tensor).

The steps are compiled ahead of time, ``--compile-repeats`` times each with
JAX's caches cleared (the median compile times are printed); nothing is donated.
In every repeat each step kind runs ``--steps`` consecutive steps from the same
start, the kinds in an order rotated from one repeat to the next (round robin),
so that machine noise hits all kinds alike. The reported ratios are medians (and
interquartile ranges) of the per-repeat ratios, which are robust to a busy
machine. Each sample records wall-clock time and the CPU time of this process
(all threads); on the CPU backend the latter is even less sensitive to other
jobs, elsewhere only the wall-clock numbers mean anything.

Run from the repository root::

  python benchmarks/speed.py                 # the default settings
  python benchmarks/speed.py --quick         # a short smoke run
  python benchmarks/speed.py --json out.json --dump-hlo /tmp/hlo
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

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
from common import cpu_model, median_iqr, ratio_stats, time_loop  # noqa: E402

import samx
from samx import combine_variants, efficient

LEARNING_RATE = 0.01
MOMENTUM = 0.9
RHO = 0.05
NORM_EPS = 1e-12
KINDS = ("sgd", "hand", "samx", "looksam", "esam", "esam_tensor")
VARIANTS = ("looksam", "esam", "esam_tensor")  # reported against sgd and samx
LOOKSAM_K = 5
ESAM_BETA = ESAM_GAMMA = 0.5

# ---------------------------------------------------------------------------
# Models: pure-jax MLP and CNN on 28x28x1 images, 10 classes.
# ---------------------------------------------------------------------------


def _dense_init(key: jax.Array, n_in: int, n_out: int) -> dict[str, jax.Array]:
  return {
    "w": jax.random.normal(key, (n_in, n_out), jnp.float32) * np.sqrt(2.0 / n_in),
    "b": jnp.zeros((n_out,), jnp.float32),
  }


def _conv_init(key: jax.Array, c_in: int, c_out: int, k: int = 3) -> dict[str, jax.Array]:
  fan_in = c_in * k * k
  return {
    "w": jax.random.normal(key, (k, k, c_in, c_out), jnp.float32) * np.sqrt(2.0 / fan_in),
    "b": jnp.zeros((c_out,), jnp.float32),
  }


def mlp_init(key: jax.Array, sizes=(784, 512, 512, 10)) -> list[dict[str, jax.Array]]:
  keys = jax.random.split(key, len(sizes) - 1)
  return [_dense_init(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)]


def mlp_apply(params, x: jax.Array) -> jax.Array:
  h = x.reshape(x.shape[0], -1)
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  return h @ params[-1]["w"] + params[-1]["b"]


def cnn_init(key: jax.Array) -> dict[str, Any]:
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    "conv1": _conv_init(k1, 1, 32),  # 28x28x1 -> 14x14x32 (stride 2)
    "conv2": _conv_init(k2, 32, 64),  # 14x14x32 -> 7x7x64 (stride 2)
    "dense": _dense_init(k3, 7 * 7 * 64, 10),
  }


def _conv(x: jax.Array, layer, stride: int) -> jax.Array:
  y = jax.lax.conv_general_dilated(
    x,
    layer["w"],
    window_strides=(stride, stride),
    padding="SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  return jax.nn.relu(y + layer["b"])


def cnn_apply(params, x: jax.Array) -> jax.Array:
  h = _conv(x, params["conv1"], 2)
  h = _conv(h, params["conv2"], 2)
  h = h.reshape(h.shape[0], -1)
  return h @ params["dense"]["w"] + params["dense"]["b"]


MODELS = {
  "mlp 784-512-512-10": (mlp_init, mlp_apply),
  "cnn conv32-conv64-dense": (cnn_init, cnn_apply),
  # Not run by default: a step of a few tens of microseconds, where the fixed
  # per-step cost of the optimizer (extra state leaves, scalar kernels) shows.
  "tiny-mlp 784-8-10": (lambda key: mlp_init(key, (784, 8, 10)), mlp_apply),
}
DEFAULT_MODELS = ("mlp 784-512-512-10", "cnn conv32-conv64-dense")


def make_per_example_loss(apply: Callable) -> Callable:
  def per_example_loss_fn(params, batch):
    x, y = batch
    logits = apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  return per_example_loss_fn


def make_loss(apply: Callable) -> Callable:
  per_example_loss_fn = make_per_example_loss(apply)

  def loss_fn(params, batch):
    return per_example_loss_fn(params, batch).mean()

  return loss_fn


# ---------------------------------------------------------------------------
# The step functions: (params, opt_state, batch) -> (params, opt_state, loss).
# ---------------------------------------------------------------------------


def make_steps(
  loss_fn: Callable, per_example_loss_fn: Callable
) -> dict[str, tuple[optax.GradientTransformation, Callable]]:
  base = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
  sam_tx = samx.sam(optax.sgd(LEARNING_RATE, momentum=MOMENTUM), rho=RHO)
  looksam_tx = combine_variants.looksam(
    optax.sgd(LEARNING_RATE, momentum=MOMENTUM), rho=RHO, k=LOOKSAM_K
  )
  esam_txs = {
    kind: efficient.esam(
      optax.sgd(LEARNING_RATE, momentum=MOMENTUM),
      rho=RHO,
      beta=ESAM_BETA,
      gamma=ESAM_GAMMA,
      per_tensor=kind == "esam_tensor",
    )
    for kind in ("esam", "esam_tensor")
  }

  def sgd_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = base.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def hand_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    scale = RHO / (optax.tree.norm(grads) + NORM_EPS)
    perturbed = jax.tree.map(lambda w, g: w + scale * g, params, grads)
    sam_grads = jax.grad(loss_fn)(perturbed, batch)
    updates, opt_state = base.update(sam_grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def samx_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = sam_tx.update(
      grads, opt_state, params, grad_fn=lambda p: jax.grad(loss_fn)(p, batch)
    )
    return optax.apply_updates(params, updates), opt_state, loss

  def looksam_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = looksam_tx.update(
      grads, opt_state, params, grad_fn=lambda p: jax.grad(loss_fn)(p, batch)
    )
    return optax.apply_updates(params, updates), opt_state, loss

  def make_esam_step(tx):
    def esam_step(params, opt_state, batch):
      def mean_loss(p):
        losses = per_example_loss_fn(p, batch)
        return losses.mean(), losses

      (loss, losses), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
      updates, opt_state = tx.update(
        grads,
        opt_state,
        params,
        per_example_loss_fn=per_example_loss_fn,
        batch=batch,
        losses=losses,
      )
      return optax.apply_updates(params, updates), opt_state, loss

    return esam_step

  return {
    "sgd": (base, sgd_step),
    "hand": (base, hand_step),
    "samx": (sam_tx, samx_step),
    "looksam": (looksam_tx, looksam_step),
    **{kind: (tx, make_esam_step(tx)) for kind, tx in esam_txs.items()},
  }


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


def entry_instruction_count(hlo_text: str) -> int:
  """Instructions in the ENTRY computation of an optimized HLO module (fusions count once)."""
  entry = hlo_text[hlo_text.index("\nENTRY") :]
  body = entry[: entry.index("\n}")]
  return sum(1 for line in body.splitlines()[1:] if " = " in line)


def compile_step(step: Callable, args: tuple) -> tuple[Any, float, float]:
  """Lowers and compiles ``step`` ahead of time; returns (executable, lower s, compile s)."""
  t0 = time.perf_counter()
  lowered = jax.jit(step).lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, t1 - t0, t2 - t1


def summarize(per_step: dict[str, list[float]]) -> dict[str, Any]:
  variants = {
    f"{kind}_over_{ref}": ratio_stats(per_step[kind], per_step[ref])
    for kind in VARIANTS
    for ref in ("sgd", "samx")
  }
  return {
    "median_ms": {k: 1e3 * statistics.median(v) for k, v in per_step.items()},
    "per_repeat_ms": {k: [1e3 * t for t in v] for k, v in per_step.items()},
    "samx_over_hand": ratio_stats(per_step["samx"], per_step["hand"]),
    "hand_over_sgd": ratio_stats(per_step["hand"], per_step["sgd"]),
    "samx_over_sgd": ratio_stats(per_step["samx"], per_step["sgd"]),
    "samx_minus_hand_us": float(
      1e6 * np.median(np.asarray(per_step["samx"]) - np.asarray(per_step["hand"]))
    ),
    **variants,
  }


def benchmark_model(
  name: str,
  batch_size: int,
  repeats: int,
  steps: int,
  warmup: int,
  compile_repeats: int,
  hlo_dir: str | None,
) -> dict[str, Any]:
  init, apply = MODELS[name]
  loss_fn = make_loss(apply)
  per_example_loss_fn = make_per_example_loss(apply)
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  batch = (
    jax.random.normal(kx, (batch_size, 28, 28, 1), jnp.float32),
    jax.random.randint(ky, (batch_size,), 0, 10),
  )
  params = init(kp)
  n_params = sum(x.size for x in jax.tree.leaves(params))

  step_fns = make_steps(loss_fn, per_example_loss_fn)
  states = {kind: tx.init(params) for kind, (tx, _) in step_fns.items()}
  compiled, lower_times, compile_times = {}, {k: [] for k in KINDS}, {k: [] for k in KINDS}
  for _ in range(compile_repeats):
    for kind in KINDS:
      jax.clear_caches()  # otherwise JAX reuses the executable and nothing is compiled
      exe, lower_s, comp_s = compile_step(step_fns[kind][1], (params, states[kind], batch))
      compiled[kind] = exe
      lower_times[kind].append(lower_s)
      compile_times[kind].append(comp_s)
  compile_s = {
    kind: {
      "lower_s": statistics.median(lower_times[kind]),
      "compile_s": statistics.median(compile_times[kind]),
      "compile_s_all": compile_times[kind],
      "hlo_entry_instructions": entry_instruction_count(compiled[kind].as_text()),
    }
    for kind in KINDS
  }
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    slug = name.split()[0]
    for kind, (_, step) in step_fns.items():
      with open(os.path.join(hlo_dir, f"{slug}_{kind}.hlo.txt"), "w") as f:
        f.write(compiled[kind].as_text())
      with open(os.path.join(hlo_dir, f"{slug}_{kind}.jaxpr.txt"), "w") as f:
        f.write(str(jax.make_jaxpr(step)(params, states[kind], batch)))

  # The two SAM steps must compute the same thing.
  p_hand, _, _ = compiled["hand"](params, states["hand"], batch)
  p_samx, _, _ = compiled["samx"](params, states["samx"], batch)
  max_diff = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(p_hand), jax.tree.leaves(p_samx), strict=True)
  )

  for _ in range(warmup):
    for kind in KINDS:
      time_loop(compiled[kind], params, states[kind], batch, steps)

  wall = {kind: [] for kind in KINDS}
  cpu = {kind: [] for kind in KINDS}
  for r in range(repeats):
    order = KINDS[r % len(KINDS) :] + KINDS[: r % len(KINDS)]
    for kind in order:
      w, c = time_loop(compiled[kind], params, states[kind], batch, steps)
      wall[kind].append(w)
      cpu[kind].append(c)

  return {
    "model": name,
    "n_params": int(n_params),
    "batch_size": batch_size,
    "max_abs_param_diff_hand_vs_samx": max_diff,
    "compile": compile_s,
    "wall": summarize(wall),
    "cpu": summarize(cpu),
  }


# ---------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------


def print_variants(results: list[dict[str, Any]]) -> None:
  header = (
    f"{'model':<24} {'variant':<11} {'ms':>6} {'/SGD wall [IQR]':>22} "
    f"{'/SAM wall [IQR]':>22} {'/SGD cpu':>8} {'/SAM cpu':>8}"
  )
  print(header)
  print("-" * len(header))
  for res in results:
    for kind in VARIANTS:
      wall, cpu = res["wall"], res["cpu"]
      print(
        f"{res['model']:<24} {kind:<11} {wall['median_ms'][kind]:>6.3g} "
        f"{median_iqr(wall[f'{kind}_over_sgd']):>22} "
        f"{median_iqr(wall[f'{kind}_over_samx']):>22} "
        f"{cpu[f'{kind}_over_sgd']['median']:>8.3f} {cpu[f'{kind}_over_samx']['median']:>8.3f}"
      )
  print(
    f"\nlooksam: k={LOOKSAM_K}, the time averaged over the steps of a sample; esam: "
    f"beta={ESAM_BETA}, gamma={ESAM_GAMMA}, one mask bit per weight (esam) or per tensor\n"
    "(esam_tensor). /SAM is over samx's SAM step, medians of per-repeat ratios.\n"
  )


def print_table(results: list[dict[str, Any]]) -> None:
  header = (
    f"{'model':<24} {'batch':>5} {'sgd ms':>7} {'hand ms':>7} {'samx ms':>7} "
    f"{'samx/hand wall [IQR]':>22} {'samx/hand cpu [IQR]':>22} {'SAM/SGD':>7} "
    f"{'(cpu)':>6}"
  )
  print(header)
  print("-" * len(header))
  for res in results:
    ms, wall, cpu = res["wall"]["median_ms"], res["wall"], res["cpu"]
    print(
      f"{res['model']:<24} {res['batch_size']:>5} {ms['sgd']:>7.3g} {ms['hand']:>7.3g} "
      f"{ms['samx']:>7.3g} {median_iqr(wall['samx_over_hand']):>22} "
      f"{median_iqr(cpu['samx_over_hand']):>22} {wall['samx_over_sgd']['median']:>7.3f} "
      f"{cpu['samx_over_sgd']['median']:>6.3f}"
    )
  print(
    "\nms: median wall-clock time per step. Ratios: median [25%, 75%] over repeats of the\n"
    "per-repeat ratio of interleaved runs; wall = wall-clock time, cpu = CPU time of this\n"
    "process (all threads), less sensitive to other jobs on a busy CPU machine. SAM/SGD is\n"
    "samx's SAM step over the SGD step.\n"
  )
  print_variants(results)
  print("samx/hand: 95% bootstrap interval of the median; min/min = ratio of fastest samples")
  for res in results:
    for clock in ("wall", "cpu"):
      s = res[clock]["samx_over_hand"]
      lo, hi = s["median_ci95"]
      hand_sgd = res[clock]["hand_over_sgd"]["median"]
      diff_us = res[clock]["samx_minus_hand_us"]
      print(
        f"  {res['model']:<24} {clock:<4} median {s['median']:.3f} CI [{lo:.3f}, {hi:.3f}]"
        f"  min/min {s['ratio_of_minima']:.3f}  samx-hand {diff_us:+.1f} us/step"
        f"  hand/sgd {hand_sgd:.3f}"
      )
  print(
    "\ncompile times in s, median over rounds (lower + compile) "
    "[instructions in the optimized HLO entry]:"
  )
  for res in results:
    parts = ", ".join(
      f"{k} {c['lower_s']:.2f} + {c['compile_s']:.2f} [{c['hlo_entry_instructions']}]"
      for k, c in res["compile"].items()
    )
    print(f"  {res['model']:<24} {parts}")
  print()
  for res in results:
    print(
      f"  {res['model']:<24} params {res['n_params']:,}; max |w_hand - w_samx| after one "
      f"step: {res['max_abs_param_diff_hand_vs_samx']:.2e}"
    )


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="few repeats, small batches")
  parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 60)")
  parser.add_argument("--batch-size", type=int, default=None, help="batch size (default 128)")
  parser.add_argument("--steps", type=int, default=None, help="steps per timed sample (20)")
  parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2)")
  parser.add_argument(
    "--compile-repeats", type=int, default=None, help="compilations per step (default 3)"
  )
  parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS), choices=list(MODELS))
  parser.add_argument("--json", metavar="PATH", help="save the results as JSON")
  parser.add_argument("--dump-hlo", metavar="DIR", help="write each step's HLO and jaxpr")
  args = parser.parse_args(argv)

  repeats = args.repeats or (6 if args.quick else 60)
  batch_size = args.batch_size or (32 if args.quick else 128)
  steps = args.steps or (5 if args.quick else 20)
  warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
  compile_repeats = args.compile_repeats or (1 if args.quick else 3)

  machine = {
    "cpu": cpu_model(),
    "cores": os.cpu_count(),
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "jax": jax.__version__,
    "optax": optax.__version__,
    "python": platform.python_version(),
    "date": datetime.date.today().isoformat(),
  }
  if steps % LOOKSAM_K:
    print(f"note: --steps {steps} is not a multiple of k={LOOKSAM_K}: LookSAM's mean is biased")
  print(
    f"jax {machine['jax']} ({machine['backend']}), {machine['cpu']}, {machine['cores']} "
    f"cores; repeats={repeats}, steps/sample={steps}, batch={batch_size}, rho={RHO}, "
    f"sgd(lr={LEARNING_RATE}, momentum={MOMENTUM})\n"
  )

  results = [
    benchmark_model(name, batch_size, repeats, steps, warmup, compile_repeats, args.dump_hlo)
    for name in args.models
  ]
  print_table(results)

  if args.json:
    settings = {
      "repeats": repeats,
      "steps": steps,
      "warmup": warmup,
      "compile_repeats": compile_repeats,
      "batch_size": batch_size,
      "models": args.models,
      "rho": RHO,
      "learning_rate": LEARNING_RATE,
      "momentum": MOMENTUM,
      "looksam_k": LOOKSAM_K,
      "esam_beta": ESAM_BETA,
      "esam_gamma": ESAM_GAMMA,
    }
    with open(args.json, "w") as f:
      json.dump({"machine": machine, "settings": settings, "results": results}, f, indent=2)
    print(f"\nsaved {args.json}")


if __name__ == "__main__":
  main()
