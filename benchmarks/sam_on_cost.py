"""Is a SAM-ON step cheaper than a SAM step? Interleaved timings in one process.

SAM-ON perturbs only the normalization layers, so the ascent needs the clean
gradient of those few parameters only. When the clean gradient is computed in the
same jitted step, ``samx.sam_on`` replaces the unselected leaves by zeros and XLA
drops the work that produced them: the weight-gradient products of the clean
backward pass (and the input-gradient products below the first normalization
layer). The perturbed pass is needed in full, since every parameter is updated
with ``g_s``.

Five step functions share one loss and one base optimizer
(``optax.sgd(lr, momentum=0.9)``), each ``(params, opt_state, batch) -> (params,
opt_state, loss)``:

* ``sgd``:     one gradient, the optax update;
* ``sam``:     ``samx.sam``;
* ``sam_on``:  ``samx.sam_on`` with the normalization layers found by structure;
* ``hand_on``: SAM-ON by hand, the clean gradient taken only w.r.t. the
  normalization parameters (the lower bound of what pruning can reach);
* ``random``:  ``samx.sam_on`` with SAM-ON's control mask, as many entries chosen
  at random over all leaves (``samx.masks.random_entries``): every kernel has
  selected entries, so nothing can be pruned.

The steps are compiled ahead of time; the number of dot / convolution
instructions in each optimized HLO module is printed (a deterministic measure of
the pruning). In every repeat each kind runs ``--steps`` consecutive steps, in an
order rotated from one repeat to the next; the reported ratios are medians (and
interquartile ranges) over repeats of per-repeat ratios, for wall-clock time and
for the CPU time of this process.

Run from the repository root::

  python benchmarks/sam_on_cost.py              # defaults: batch 128, 40 repeats of 10 steps
  python benchmarks/sam_on_cost.py --quick      # smoke run
  python benchmarks/sam_on_cost.py --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
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
from common import cpu_model as _cpu_model  # noqa: E402
from common import median_iqr, ratio_stats, time_loop  # noqa: E402

import samx
from samx import masks, selective

LEARNING_RATE, MOMENTUM = 0.01, 0.9
RHO_SAM, RHO_SAM_ON, NORM_EPS = 0.05, 0.5, 1e-12
KINDS = ("sgd", "sam", "sam_on", "hand_on", "random")

# ---------------------------------------------------------------------------
# Models with normalization layers, in plain jax. A normalization layer is a
# {"scale", "bias"} node: samx.masks.norm_layers finds it by structure.
# ---------------------------------------------------------------------------


def _normalize(h: jax.Array, axes: tuple[int, ...], layer: dict[str, jax.Array]) -> jax.Array:
  mean = h.mean(axes, keepdims=True)
  var = jnp.mean(jnp.square(h - mean), axes, keepdims=True)
  shape = (1,) * (h.ndim - 1) + (-1,)
  h = (h - mean) * jax.lax.rsqrt(var + 1e-5)
  return h * layer["scale"].reshape(shape) + layer["bias"].reshape(shape)


def _norm(n: int) -> dict[str, jax.Array]:
  return {"scale": jnp.ones((n,), jnp.float32), "bias": jnp.zeros((n,), jnp.float32)}


def _he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> jax.Array:
  # NumPy draws: no eager jax.random programs to compile before the benchmark starts.
  return jnp.asarray(rng.normal(size=shape) * np.sqrt(2.0 / fan_in), jnp.float32)


def ln_mlp_init(seed: int, sizes=(784, 512, 512, 10)) -> dict[str, Any]:
  """An MLP with LayerNorm after each hidden layer."""
  rng = np.random.default_rng(seed)
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    params[f"dense{i}"] = {"w": _he_normal(rng, (a, b), a), "b": jnp.zeros((b,), jnp.float32)}
    if i < len(sizes) - 2:
      params[f"ln{i}"] = _norm(b)
  return params


def ln_mlp_apply(params, x: jax.Array) -> jax.Array:
  h = x.reshape(x.shape[0], -1)
  n = sum(1 for k in params if k.startswith("dense"))
  for i in range(n):
    layer = params[f"dense{i}"]
    h = h @ layer["w"] + layer["b"][None, :]
    if i < n - 1:
      h = jax.nn.relu(_normalize(h, (-1,), params[f"ln{i}"]))
  return h


def bn_cnn_init(seed: int) -> dict[str, Any]:
  """Two strided 3x3 convolutions, each followed by BatchNorm (batch statistics)."""
  rng = np.random.default_rng(seed)
  return {
    "conv1": {"w": _he_normal(rng, (3, 3, 1, 32), 9)},
    "bn1": _norm(32),
    "conv2": {"w": _he_normal(rng, (3, 3, 32, 64), 9 * 32)},
    "bn2": _norm(64),
    "dense": {"w": _he_normal(rng, (7 * 7 * 64, 10), 3136), "b": jnp.zeros((10,), jnp.float32)},
  }


def bn_cnn_apply(params, x: jax.Array) -> jax.Array:
  h = x
  for conv, norm in (("conv1", "bn1"), ("conv2", "bn2")):
    h = jax.lax.conv_general_dilated(
      h, params[conv]["w"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jax.nn.relu(_normalize(h, (0, 1, 2), params[norm]))
  h = h.reshape(h.shape[0], -1)
  return h @ params["dense"]["w"] + params["dense"]["b"][None, :]


MODELS = {
  "ln-mlp 784-512-512-10": (ln_mlp_init, ln_mlp_apply),
  "bn-cnn conv32-conv64-dense": (bn_cnn_init, bn_cnn_apply),
  "tiny ln-mlp 784-16-16-10": (lambda seed: ln_mlp_init(seed, (784, 16, 16, 10)), ln_mlp_apply),
}
DEFAULT_MODELS = ("ln-mlp 784-512-512-10", "bn-cnn conv32-conv64-dense")


def make_loss(apply: Callable) -> Callable:
  def loss_fn(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()

  return loss_fn


# ---------------------------------------------------------------------------
# The step functions.
# ---------------------------------------------------------------------------


def make_steps(loss_fn: Callable, params: Any) -> dict[str, tuple[Any, Callable]]:
  def base():
    return optax.sgd(LEARNING_RATE, momentum=MOMENTUM)

  norm = masks.norm_layers(params)
  control = masks.random_entries(masks.count_selected(norm, params), seed=0)
  txs = {
    "sgd": base(),
    "sam": samx.sam(base(), rho=RHO_SAM),
    "sam_on": selective.sam_on(base(), rho=RHO_SAM_ON),
    "hand_on": base(),
    "random": selective.sam_on(base(), rho=RHO_SAM_ON, mask=control),
  }

  def sgd_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = txs["sgd"].update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def samx_step(kind):
    def step(params, opt_state, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = txs[kind].update(
        grads, opt_state, params, grad_fn=lambda p: jax.grad(loss_fn)(p, batch)
      )
      return optax.apply_updates(params, updates), opt_state, loss

    return step

  def hand_on_step(params, opt_state, batch):
    # The clean gradient w.r.t. the normalization parameters only.
    def loss_of_norm(selected):
      merged = jax.tree.map(lambda s, p, m: s if m else p, selected, params, norm)
      return loss_fn(merged, batch)

    # Unselected leaves enter as empty arrays: no gradient is asked for them.
    selected = jax.tree.map(lambda p, m: p if m else jnp.zeros((0,), p.dtype), params, norm)
    loss, g = jax.value_and_grad(loss_of_norm)(selected)
    scale = RHO_SAM_ON / (optax.tree.norm(g) + NORM_EPS)
    perturbed = jax.tree.map(lambda p, x, m: p + scale * x if m else p, params, g, norm)
    sam_grads = jax.grad(loss_fn)(perturbed, batch)
    updates, opt_state = txs["hand_on"].update(sam_grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  steps = {
    "sgd": sgd_step,
    "sam": samx_step("sam"),
    "sam_on": samx_step("sam_on"),
    "hand_on": hand_on_step,
    "random": samx_step("random"),
  }
  return {kind: (txs[kind], steps[kind]) for kind in KINDS}


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


def product_count(hlo_text: str) -> int:
  """dot and convolution instructions in an optimized HLO module (all computations)."""
  return len(re.findall(r"\b(?:dot|convolution)\(", hlo_text))


RATIOS = (("sam_on", "sam"), ("hand_on", "sam"), ("random", "sam"), ("sam_on", "hand_on"))


def benchmark_model(name: str, batch_size: int, repeats: int, steps: int, warmup: int) -> dict:
  init, apply = MODELS[name]
  loss_fn = make_loss(apply)
  rng = np.random.default_rng(0)
  batch = (
    jnp.asarray(rng.normal(size=(batch_size, 28, 28, 1)), jnp.float32),
    jnp.asarray(rng.integers(0, 10, size=batch_size), jnp.int32),
  )
  params = init(1)
  norm = masks.norm_layers(params)
  step_fns = make_steps(loss_fn, params)
  states = {kind: tx.init(params) for kind, (tx, _) in step_fns.items()}
  compiled, compile_s, products = {}, {}, {}
  for kind, (_, step) in step_fns.items():
    t0 = time.perf_counter()
    compiled[kind] = jax.jit(step).lower(params, states[kind], batch).compile()
    compile_s[kind] = time.perf_counter() - t0
    products[kind] = product_count(compiled[kind].as_text())

  # samx's SAM-ON and the hand-written one compute the same step.
  p_samx = compiled["sam_on"](params, states["sam_on"], batch)[0]
  p_hand = compiled["hand_on"](params, states["hand_on"], batch)[0]
  max_diff = max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for a, b in zip(jax.tree.leaves(p_samx), jax.tree.leaves(p_hand), strict=True)
  )

  for _ in range(warmup):
    for kind in KINDS:
      time_loop(compiled[kind], params, states[kind], batch, steps)
  wall = {kind: [] for kind in KINDS}
  cpu = {kind: [] for kind in KINDS}
  for r in range(repeats):
    for kind in KINDS[r % len(KINDS) :] + KINDS[: r % len(KINDS)]:
      w, c = time_loop(compiled[kind], params, states[kind], batch, steps)
      wall[kind].append(w)
      cpu[kind].append(c)

  def summary(samples):
    return {
      "median_ms": {k: 1e3 * statistics.median(v) for k, v in samples.items()},
      **{f"{a}_over_{b}": ratio_stats(samples[a], samples[b]) for a, b in RATIOS},
      "sam_over_sgd": ratio_stats(samples["sam"], samples["sgd"]),
    }

  return {
    "model": name,
    "n_params": int(sum(x.size for x in jax.tree.leaves(params))),
    "n_perturbed": masks.count_selected(norm, params),
    "batch_size": batch_size,
    "max_abs_param_diff_sam_on_vs_hand_on": max_diff,
    "compile_s": compile_s,
    "dot_and_convolution_instructions": products,
    "wall": summary(wall),
    "cpu": summary(cpu),
  }


# ---------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------


def print_table(results: list[dict[str, Any]]) -> None:
  for clock in ("wall", "cpu"):
    print(f"\n{clock}: median ms per step, and ratios median [25%, 75%] over repeats")
    header = f"{'model':<28} " + " ".join(f"{k:>8}" for k in KINDS)
    header += "".join(f" {a + '/' + b:>24}" for a, b in RATIOS)
    print(header)
    print("-" * len(header))
    for res in results:
      ms = res[clock]["median_ms"]
      line = f"{res['model']:<28} " + " ".join(f"{ms[k]:>8.3g}" for k in KINDS)
      line += "".join(f" {median_iqr(res[clock][f'{a}_over_{b}']):>24}" for a, b in RATIOS)
      print(line)
  print("\n95% bootstrap interval of the median sam_on/sam; dot+convolution instructions:")
  for res in results:
    for clock in ("wall", "cpu"):
      s = res[clock]["sam_on_over_sam"]
      lo, hi = s["median_ci95"]
      sam_sgd = res[clock]["sam_over_sgd"]["median"]
      print(
        f"  {res['model']:<28} {clock:<4} {s['median']:.3f} CI [{lo:.3f}, {hi:.3f}]  "
        f"min/min {s['ratio_of_minima']:.3f}  SAM/SGD {sam_sgd:.3f}"
      )
    products = ", ".join(f"{k} {v}" for k, v in res["dot_and_convolution_instructions"].items())
    print(f"  {'':<28} products: {products}")
    diff = res["max_abs_param_diff_sam_on_vs_hand_on"]
    print(
      f"  {'':<28} params {res['n_params']:,}, perturbed by SAM-ON {res['n_perturbed']:,}; "
      f"max |w_sam_on - w_hand_on| after one step {diff:.1e}"
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="few repeats, small batches")
  parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 40)")
  parser.add_argument("--batch-size", type=int, default=None, help="batch size (default 128)")
  parser.add_argument("--steps", type=int, default=None, help="steps per sample (default 10)")
  parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2)")
  parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS), choices=list(MODELS))
  parser.add_argument("--json", metavar="PATH", help="save the results as JSON")
  args = parser.parse_args(argv)
  repeats = args.repeats or (4 if args.quick else 40)
  batch_size = args.batch_size or (16 if args.quick else 128)
  steps = args.steps or (2 if args.quick else 10)
  warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)

  machine = {
    "cpu": _cpu_model(),
    "cores": os.cpu_count(),
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "jax": jax.__version__,
    "optax": optax.__version__,
    "python": platform.python_version(),
    "date": datetime.date.today().isoformat(),
  }
  print(
    f"jax {machine['jax']} ({machine['backend']}), {machine['cpu']}, {machine['cores']} cores; "
    f"repeats={repeats}, steps/sample={steps}, batch={batch_size}, "
    f"rho: SAM {RHO_SAM}, SAM-ON {RHO_SAM_ON}"
  )
  results = [benchmark_model(name, batch_size, repeats, steps, warmup) for name in args.models]
  print_table(results)
  if args.json:
    settings = {"repeats": repeats, "steps": steps, "warmup": warmup, "batch_size": batch_size}
    with open(args.json, "w") as f:
      json.dump({"machine": machine, "settings": settings, "results": results}, f, indent=2)
    print(f"\nsaved {args.json}")
  return results


if __name__ == "__main__":
  main()
