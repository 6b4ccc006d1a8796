"""Scaling of mSAM: per-device eps over 1-8 devices, and micro-shards on one device.

Two parts, both on an MLP (784-512-512-10, ReLU, mean softmax cross-entropy) with
``optax.sgd(0.01, momentum=0.9)`` as the base optimizer and ``rho=0.05``:

**Devices.** For ``n`` in 1, 2, 4, 8 (simulated CPU devices, ``jax_num_cpu_devices=8``),
a fixed global batch is split over ``n`` devices and one training step runs as
``jax.jit(jax.shard_map(step))`` over a 1-D mesh ``("d",)`` of the first ``n`` devices:

* ``msam``: ``samx.msam(sgd, rho, axis_name="d")``: each device perturbs along its own
  gradient, the perturbed gradients are averaged (one all-reduce per step);
* ``sam``: ``samx.sam(sgd, rho, axis_name="d")``: synced SAM, the clean gradient is
  averaged first and every device uses one global eps (two all-reduces per step).

Each step maps ``(params, opt_state, batch)`` to ``(params, opt_state, local loss)``
(the loss is not reduced, so it adds no collective). Reported per ``n`` and kind: the
median step time, the number of ``all-reduce`` instructions in the compiled HLO, and
the relative error of the parameters after ``--check-steps`` steps against a
single-device reference that processes the ``n`` shards one by one (plain ``jax``:
per-shard gradients, the ascent written out, the same optax update), i.e.
``max over leaves of ||w - w_ref|| / ||w_ref||``.

**Micro-shards.** On one device, ``samx.msam(sgd, rho, micro_shards=k)`` for ``k`` in
1, 2, 4, 8, 16 (``m = batch / k``) against ``samx.sam`` at the same batch. The mSAM
step uses the per-example contract and passes zero gradients, which micro-shard mSAM
does not use, so both steps cost two gradient passes over the batch: the ratio
``msam_k / sam`` should be about 1. (``samx.msam(micro_shards=1)`` is the plain step,
``samx.sam``'s, and runs with ``grad_fn`` like it.) Also reported: the
FLOPs of the compiled step (XLA's cost analysis) and its temporary memory, which grows
with ``k`` copies of the parameters (perturbed points and per-shard gradients).

Timing as in ``speed.py``: steps are compiled ahead of time; in every repeat each kind
runs ``--steps`` consecutive steps from the same start, in an order rotated from one
repeat to the next, and ratios are medians of per-repeat ratios. Wall-clock and process
CPU time are both recorded.

Simulated CPU devices share the machine's cores: on a CPU machine the device-count
timings measure the overhead of splitting a step (collectives, per-device dispatch,
smaller matmuls), not a speed-up.

Run from the repository root::

  python benchmarks/scaling.py               # the default settings
  python benchmarks/scaling.py --quick       # a short smoke run
  python benchmarks/scaling.py --json scaling.json
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
from common import cpu_model  # noqa: E402

import samx

jax.config.update("jax_num_cpu_devices", 8)  # before any JAX work

LEARNING_RATE = 0.01
MOMENTUM = 0.9
RHO = 0.05
NORM_EPS = 1e-12
AXIS = "d"

# ---------------------------------------------------------------------------
# Model and data.
# ---------------------------------------------------------------------------


def mlp_init(key: jax.Array, sizes: Sequence[int]) -> list[dict[str, jax.Array]]:
  keys = jax.random.split(key, len(sizes) - 1)
  return [
    {
      "w": jax.random.normal(k, (a, b), jnp.float32) * np.sqrt(2.0 / a),
      "b": jnp.zeros((b,), jnp.float32),
    }
    for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
  ]


def mlp_apply(params, x: jax.Array) -> jax.Array:
  h = x
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"][None, :])
  return h @ params[-1]["w"] + params[-1]["b"][None, :]


def per_example_loss(params, batch) -> jax.Array:
  """The ``(B,)`` cross-entropies: samx's per-example contract."""
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(params, x), y)


def loss_fn(params, batch) -> jax.Array:
  return jnp.mean(per_example_loss(params, batch))


def make_batches(key: jax.Array, count: int, batch_size: int, n_in: int, n_out: int):
  batches = []
  for k in jax.random.split(key, count):
    kx, ky = jax.random.split(k)
    batches.append(
      (
        jax.random.normal(kx, (batch_size, n_in), jnp.float32),
        jax.random.randint(ky, (batch_size,), 0, n_out),
      )
    )
  return batches


def base_optimizer() -> optax.GradientTransformation:
  return optax.sgd(LEARNING_RATE, momentum=MOMENTUM)


# ---------------------------------------------------------------------------
# The single-device reference: the shards one by one, written out in plain jax.
# ---------------------------------------------------------------------------


def _ascent(g):
  scale = RHO / (optax.tree.norm(g) + NORM_EPS)
  return jax.tree.map(lambda v: scale * v, g)


def _mean(trees):
  return jax.tree.map(lambda *v: sum(v) / len(v), *trees)


def reference_step(shards: int, synced: bool) -> Callable:
  """``(params, opt_state, batch) -> (params, opt_state)`` with the batch split in order
  into ``shards`` parts, each processed in turn (a Python loop)."""
  base = base_optimizer()

  def step(params, opt_state, batch):
    size = batch[0].shape[0] // shards
    parts = [
      jax.tree.map(lambda v, i=i: v[i * size : (i + 1) * size], batch) for i in range(shards)
    ]
    grads = [jax.grad(loss_fn)(params, part) for part in parts]
    if synced:
      eps = [_ascent(_mean(grads))] * shards
    else:
      eps = [_ascent(g) for g in grads]
    perturbed = [
      jax.grad(loss_fn)(jax.tree.map(jnp.add, params, e), part)
      for e, part in zip(eps, parts, strict=True)
    ]
    updates, opt_state = base.update(_mean(perturbed), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step)


def max_relative_error(actual, expected) -> float:
  """``max over leaves of ||actual - expected|| / ||expected||`` in float64."""
  errors = []
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    errors.append(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))
  return float(max(errors))


# ---------------------------------------------------------------------------
# The steps.
# ---------------------------------------------------------------------------


def device_step(tx: optax.GradientTransformationExtraArgs, mesh: Mesh) -> Callable:
  """A data-parallel step over ``mesh``: replicated params and state, batch split.

  JAX's defaults (replication checking): the clean gradient is taken with respect
  to the params cast to varying, i.e. each device's own; samx averages them.
  """

  def step(params, opt_state, batch):
    local = jax.lax.pcast(params, AXIS, to="varying")
    loss, grads = jax.value_and_grad(loss_fn)(local, batch)
    updates, opt_state = tx.update(
      grads, opt_state, params, grad_fn=lambda p: jax.grad(loss_fn)(p, batch)
    )
    return optax.apply_updates(params, updates), opt_state, loss[None]  # local loss

  return jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(AXIS)), out_specs=(P(), P(), P(AXIS)))
  )


def sam_step(tx: optax.GradientTransformationExtraArgs) -> Callable:
  def step(params, opt_state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(
      grads, opt_state, params, grad_fn=lambda p: jax.grad(loss_fn)(p, batch)
    )
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step)


def per_example_step(tx: optax.GradientTransformationExtraArgs) -> Callable:
  def step(params, opt_state, batch):
    zeros = jax.tree.map(jnp.zeros_like, params)  # not used by micro-shard mSAM
    updates, opt_state = tx.update(
      zeros, opt_state, params, per_example_loss_fn=per_example_loss, batch=batch
    )
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step)


def all_reduce_count(hlo_text: str) -> int:
  return sum(
    1 for line in hlo_text.splitlines() if re.search(r"= .*all-reduce(-start)?\(", line)
  )


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def temp_bytes(compiled) -> int:
  return int(compiled.memory_analysis().temp_size_in_bytes)


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


class Case:
  """One timed kind: a compiled step and the arguments it starts from."""

  def __init__(self, name: str, compiled, args: tuple):
    self.name, self.compiled, self.args = name, compiled, args

  def time(self, steps: int) -> tuple[float, float]:
    """(wall s, process CPU s) per step over ``steps`` consecutive steps."""
    params, opt_state, batch = self.args
    jax.block_until_ready((params, opt_state))
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
      params, opt_state, *_ = self.compiled(params, opt_state, batch)
    jax.block_until_ready((params, opt_state))
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def time_interleaved(
  cases: list[Case], repeats: int, steps: int, warmup: int
) -> dict[str, dict[str, list[float]]]:
  """Per case, ``{"wall": [...], "cpu": [...]}`` seconds per step, one entry per repeat."""
  for _ in range(warmup):
    for case in cases:
      case.time(steps)
  samples = {c.name: {"wall": [], "cpu": []} for c in cases}
  for r in range(repeats):
    shift = r % len(cases)
    for case in cases[shift:] + cases[:shift]:
      wall, cpu = case.time(steps)
      samples[case.name]["wall"].append(wall)
      samples[case.name]["cpu"].append(cpu)
  return samples


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
  """Median and quartiles of the per-repeat ratios ``num / den``."""
  q1, q2, q3 = np.percentile(np.asarray(num) / np.asarray(den), [25, 50, 75])
  return {"median": float(q2), "q25": float(q1), "q75": float(q3)}


def _ms(samples: dict[str, list[float]]) -> dict[str, float]:
  return {clock: 1e3 * statistics.median(v) for clock, v in samples.items()}


# ---------------------------------------------------------------------------
# The two parts.
# ---------------------------------------------------------------------------


def bench_devices(
  params, batches, device_counts: Sequence[int], repeats: int, steps: int, warmup: int
) -> list[dict[str, Any]]:
  devices = jax.devices()
  batch_size = batches[0][0].shape[0]
  kinds = {
    "msam": lambda: samx.msam(base_optimizer(), rho=RHO, axis_name=AXIS),
    "sam": lambda: samx.sam(base_optimizer(), rho=RHO, axis_name=AXIS),
  }
  rows, cases = [], []
  for n in device_counts:
    if batch_size % n:
      raise ValueError(f"the batch size {batch_size} must be divisible by {n} devices")
    mesh = Mesh(np.asarray(devices[:n]), (AXIS,))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    for kind, make in kinds.items():
      tx = make()
      p0 = jax.device_put(params, replicated)
      s0 = jax.device_put(tx.init(params), replicated)
      on_mesh = [jax.device_put(b, split) for b in batches]
      t0 = time.perf_counter()
      compiled = device_step(tx, mesh).lower(p0, s0, on_mesh[0]).compile()
      compile_s = time.perf_counter() - t0
      # Equality with the shard-by-shard reference after len(batches) steps.
      p, s = p0, s0
      for b in on_mesh:
        p, s, _ = compiled(p, s, b)
      ref = reference_step(n, synced=kind == "sam")
      rp, rs = params, base_optimizer().init(params)
      for b in batches:
        rp, rs = ref(rp, rs, b)
      rows.append(
        {
          "devices": n,
          "kind": kind,
          "local_batch": batch_size // n,
          "all_reduces": all_reduce_count(compiled.as_text()),
          "max_rel_err_vs_reference": max_relative_error(p, rp),
          "compile_s": compile_s,
          "final_params": p,
        }
      )
      cases.append(Case(f"{kind}@{n}", compiled, (p0, s0, on_mesh[0])))
  # How far apart mSAM and synced SAM end (what the equality check can tell apart).
  for n in device_counts:
    pair = [r for r in rows if r["devices"] == n]
    gap = max_relative_error(pair[0]["final_params"], pair[1]["final_params"])
    for r in pair:
      r["max_rel_diff_msam_vs_sam"] = gap
  for r in rows:
    del r["final_params"]

  samples = time_interleaved(cases, repeats, steps, warmup)
  for r in rows:
    own = samples[f"{r['kind']}@{r['devices']}"]
    r["ms"] = _ms(own)
    r["per_repeat_ms"] = {c: [1e3 * t for t in v] for c, v in own.items()}
    sam, one = samples[f"sam@{r['devices']}"], samples[f"{r['kind']}@{device_counts[0]}"]
    r["over_sam"] = {c: ratio_stats(own[c], sam[c]) for c in own}
    r["over_first_count"] = {c: ratio_stats(own[c], one[c]) for c in own}
  return rows


def bench_micro_shards(
  params, batches, micro_shards: Sequence[int], repeats: int, steps: int, warmup: int
) -> list[dict[str, Any]]:
  device = jax.devices()[0]
  batch_size = batches[0][0].shape[0]
  params = jax.device_put(params, device)
  batches = [jax.device_put(b, device) for b in batches]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  rows, cases = [], []
  kinds = [("sam", 0)] + [(f"msam_k{k}", k) for k in micro_shards]
  for name, k in kinds:
    if k and batch_size % k:
      raise ValueError(f"the batch size {batch_size} must be divisible by micro_shards={k}")
    if k == 0:
      tx = samx.sam(base_optimizer(), rho=RHO)
    else:
      tx = samx.msam(base_optimizer(), rho=RHO, micro_shards=k)
    step = sam_step(tx) if k <= 1 else per_example_step(tx)
    s0 = tx.init(params)
    t0 = time.perf_counter()
    compiled = step.lower(params, s0, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    p, s = params, s0
    for b in batches:
      p, s = compiled(p, s, b)
    ref = reference_step(max(k, 1), synced=False)
    rp, rs = params, base_optimizer().init(params)
    for b in batches:
      rp, rs = ref(rp, rs, b)
    rows.append(
      {
        "kind": name,
        "micro_shards": k or None,
        "m": batch_size // k if k else batch_size,
        "flops": flops(compiled),
        "temp_mb": temp_bytes(compiled) / 2**20,
        "param_copies_mb": (k or 1) * n_params * 4 / 2**20,
        "max_rel_err_vs_reference": max_relative_error(p, rp),
        "compile_s": compile_s,
      }
    )
    cases.append(Case(name, compiled, (params, s0, batches[0])))

  samples = time_interleaved(cases, repeats, steps, warmup)
  sam_flops = rows[0]["flops"]
  for r in rows:
    own = samples[r["kind"]]
    r["ms"] = _ms(own)
    r["per_repeat_ms"] = {c: [1e3 * t for t in v] for c, v in own.items()}
    r["over_sam"] = {c: ratio_stats(own[c], samples["sam"][c]) for c in own}
    r["flops_over_sam"] = r["flops"] / sam_flops
  return rows


# ---------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------


def _iqr(s: dict[str, float]) -> str:
  return f"{s['median']:.3f} [{s['q25']:.3f}, {s['q75']:.3f}]"


def print_devices(rows: list[dict[str, Any]], first: int) -> None:
  header = (
    f"{'devices':>7} {'kind':<5} {'local B':>7} {'all-red':>7} {'ms':>7} {'cpu ms':>7} "
    f"{'/ sam (wall) [IQR]':>22} {f'/ {first} dev (wall) [IQR]':>24} "
    f"{'rel err vs ref':>14} {'msam-sam':>9}"
  )
  print(header)
  print("-" * len(header))
  for r in rows:
    print(
      f"{r['devices']:>7} {r['kind']:<5} {r['local_batch']:>7} {r['all_reduces']:>7} "
      f"{r['ms']['wall']:>7.3g} {r['ms']['cpu']:>7.3g} {_iqr(r['over_sam']['wall']):>22} "
      f"{_iqr(r['over_first_count']['wall']):>24} {r['max_rel_err_vs_reference']:>14.1e} "
      f"{r['max_rel_diff_msam_vs_sam']:>9.1e}"
    )
  print(
    "\nall-red: all-reduce instructions in the compiled HLO. ms / cpu ms: median wall-clock\n"
    "and process CPU time per step. Ratios: median [25%, 75%] of per-repeat ratios of\n"
    "interleaved runs. rel err vs ref: max over leaves of ||w - w_ref|| / ||w_ref|| after\n"
    "the check steps, against the shards processed one by one on one device. msam-sam: the\n"
    "same measure between the mSAM and synced-SAM results (0 for one device).\n"
  )


def print_micro(rows: list[dict[str, Any]]) -> None:
  header = (
    f"{'kind':<10} {'m':>4} {'ms':>7} {'cpu ms':>7} {'/ sam (wall) [IQR]':>22} "
    f"{'/ sam (cpu)':>11} {'GFLOP':>7} {'/ sam':>6} {'temp MB':>8} {'k|p| MB':>8} "
    f"{'rel err vs ref':>14}"
  )
  print(header)
  print("-" * len(header))
  for r in rows:
    print(
      f"{r['kind']:<10} {r['m']:>4} {r['ms']['wall']:>7.3g} {r['ms']['cpu']:>7.3g} "
      f"{_iqr(r['over_sam']['wall']):>22} {r['over_sam']['cpu']['median']:>11.3f} "
      f"{r['flops'] / 1e9:>7.3f} {r['flops_over_sam']:>6.3f} {r['temp_mb']:>8.1f} "
      f"{r['param_copies_mb']:>8.1f} {r['max_rel_err_vs_reference']:>14.1e}"
    )
  print(
    "\nm: examples per micro-shard. GFLOP: XLA's cost analysis of the compiled step.\n"
    "temp MB: the compiled step's temporary buffers; k|p| MB: k float32 copies of the\n"
    "parameters (what the k perturbed points and k per-shard gradients need).\n"
  )


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="a small model, few repeats")
  parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 30)")
  parser.add_argument("--steps", type=int, default=None, help="steps per sample (10)")
  parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2)")
  parser.add_argument("--batch-size", type=int, default=None, help="global batch (256)")
  parser.add_argument("--check-steps", type=int, default=3, help="steps compared (3)")
  parser.add_argument("--devices", default="1,2,4,8", help="device counts (%(default)s)")
  parser.add_argument("--micro-shards", default="1,2,4,8,16", help="k values (%(default)s)")
  parser.add_argument("--skip-devices", action="store_true", help="only the micro-shards")
  parser.add_argument("--skip-micro", action="store_true", help="only the device counts")
  parser.add_argument("--json", metavar="PATH", help="save the results as JSON")
  args = parser.parse_args(argv)

  repeats = args.repeats or (4 if args.quick else 30)
  steps = args.steps or (3 if args.quick else 10)
  warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
  batch_size = args.batch_size or (64 if args.quick else 256)
  sizes = (784, 64, 10) if args.quick else (784, 512, 512, 10)
  device_counts = [int(v) for v in args.devices.split(",")]
  micro_shards = [int(v) for v in args.micro_shards.split(",")]
  if len(jax.devices()) < max(device_counts):
    raise RuntimeError(
      f"{max(device_counts)} devices needed, {len(jax.devices())} found: jax was "
      "initialised before jax_num_cpu_devices was set"
    )

  machine = {
    "cpu": cpu_model(),
    "cores": os.cpu_count(),
    "backend": jax.default_backend(),
    "devices": len(jax.devices()),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "python": platform.python_version(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "date": datetime.date.today().isoformat(),
  }
  settings = {
    "repeats": repeats,
    "steps": steps,
    "warmup": warmup,
    "batch_size": batch_size,
    "check_steps": args.check_steps,
    "mlp": list(sizes),
    "device_counts": device_counts,
    "micro_shards": micro_shards,
    "rho": RHO,
    "learning_rate": LEARNING_RATE,
    "momentum": MOMENTUM,
  }
  kp, kb = jax.random.split(jax.random.key(0))
  params = mlp_init(kp, sizes)
  batches = make_batches(kb, args.check_steps, batch_size, sizes[0], sizes[-1])
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(
    f"jax {machine['jax']} ({machine['backend']}, {machine['devices']} devices), "
    f"{machine['cpu']}, {machine['cores']} cores; MLP {'-'.join(map(str, sizes))} "
    f"({n_params:,} params), global batch {batch_size}, repeats={repeats}, "
    f"steps/sample={steps}, rho={RHO}, sgd(lr={LEARNING_RATE}, momentum={MOMENTUM}); "
    f"XLA_FLAGS={machine['xla_flags']!r}\n"
  )
  results: dict[str, Any] = {"machine": machine, "settings": settings, "n_params": n_params}
  if not args.skip_devices:
    print(f"mSAM (per-device eps) and synced SAM over simulated devices, batch {batch_size}")
    results["devices"] = bench_devices(params, batches, device_counts, repeats, steps, warmup)
    print_devices(results["devices"], device_counts[0])
  if not args.skip_micro:
    print(
      f"micro-shard mSAM (zero grads, per-example contract) vs SAM, one device, "
      f"batch {batch_size}"
    )
    results["micro_shards"] = bench_micro_shards(
      params, batches, micro_shards, repeats, steps, warmup
    )
    print_micro(results["micro_shards"])
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
    print(f"saved {args.json}")
  return results


if __name__ == "__main__":
  main()
