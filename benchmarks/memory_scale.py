"""Peak memory of one jitted training step at ~100M float32 parameters.

Compares ``optax.sgd`` with ``samx.sam``, ``samx.sam_on`` and ``samx.fsam`` on the same
base optimizer (plain SGD, no momentum, so every extra buffer is samx's). The
parameters are ``--layers`` blocks of a ``width x width`` kernel and a norm-like node
(``scale`` and ``bias`` vectors, found by ``samx.masks.norm_layers``); with the defaults
(6 x 4096^2) that is 100.7M parameters, 384 MiB. The loss is a cheap network: a chain of
the blocks, ``h <- tanh(scale_l * (h @ W_l)) + bias_l`` from a batch ``x`` of ``--batch``
rows, and ``L = 0.5 * mean_b ||h_b||^2``. As in any network, every gradient comes from a
matrix product (so it is materialised) and the backward pass needs every kernel. The step
``(params, opt_state, x) -> (params, opt_state)`` is jitted with the parameters and the
state donated, as a training loop does.

Two measurements per variant:

* ``compiled.memory_analysis()`` of the step (compiled from shapes alone, nothing is
  allocated): arguments + outputs - aliased (donated) + temporaries = the peak XLA plans;
* the peak resident set size (``ru_maxrss``) of a fresh process that allocates the
  parameters and the state and runs the step twice, minus that process's RSS before the
  parameters were created (the JAX runtime).

Both are reported as ratios to SGD and as extra bytes in units of ``|params|`` (the
bytes of one float32 copy of the parameters). Expected extras: SAM holds the perturbed
point ``w + eps`` through the second backward pass, which needs its kernels (+1; SGD
updates each kernel as soon as its gradient is ready); SAM-ON perturbs only the norm
leaves, so its ``w + eps`` is ``w`` on the kernels (+0); F-SAM also keeps its EMA of the
gradients in the state (+1 argument, donated and updated in place: +2 in all).

    python benchmarks/memory_scale.py                         # the table (about a minute)
    python benchmarks/memory_scale.py --layers 2 --width 512  # a small check
    python benchmarks/memory_scale.py --no-rss --json /tmp/memory.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402

import samx  # noqa: E402

VARIANTS = ("sgd", "sam", "sam_on", "fsam")


def make_optimizer(name: str, learning_rate: float = 0.1) -> optax.GradientTransformation:
  base = optax.sgd(learning_rate)
  if name == "sgd":
    return base
  if name == "sam":
    return samx.sam(base, rho=0.05)
  if name == "sam_on":
    return samx.sam_on(base, rho=0.5)  # the norm-like nodes, found by structure
  if name == "fsam":
    return samx.fsam(base, rho=0.1)
  raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")


def param_shapes(layers: int, width: int) -> dict:
  """The parameter tree as ``jax.ShapeDtypeStruct`` leaves."""
  leaf = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  return {
    f"layer{i}": {
      "kernel": leaf(width, width),
      "norm": {"scale": leaf(width), "bias": leaf(width)},
    }
    for i in range(layers)
  }


def init_params(shapes: dict, seed: int = 0) -> dict:
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  values = [
    jax.random.normal(k, s.shape, s.dtype) / np.sqrt(s.shape[0])
    for k, s in zip(keys, leaves, strict=True)
  ]
  return jax.tree.unflatten(treedef, values)


def loss_fn(params: dict, x: jax.Array) -> jax.Array:
  """A chain of the blocks, so the backward pass needs every kernel (for dL/dh)."""
  h = x
  for block in params.values():
    h = jnp.tanh(block["norm"]["scale"][None, :] * (h @ block["kernel"]))
    h = h + block["norm"]["bias"][None, :]
  return 0.5 * jnp.mean(jnp.sum(h * h, axis=-1))


def make_step(tx: optax.GradientTransformation):
  def step(params, opt_state, x):
    grads = jax.grad(loss_fn)(params, x)
    updates, opt_state = tx.update(
      grads, opt_state, params, grad_fn=lambda p: jax.grad(loss_fn)(p, x)
    )
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step, donate_argnums=(0, 1))


def compiled_memory(name: str, layers: int, width: int, batch: int) -> dict:
  """XLA's memory plan of the step, compiled from shapes only."""
  tx = make_optimizer(name)
  shapes = param_shapes(layers, width)
  state_shapes = jax.eval_shape(tx.init, shapes)
  x = jax.ShapeDtypeStruct((batch, width), jnp.float32)
  analysis = make_step(tx).lower(shapes, state_shapes, x).compile().memory_analysis()
  sizes = {
    "argument": analysis.argument_size_in_bytes,
    "output": analysis.output_size_in_bytes,
    "alias": analysis.alias_size_in_bytes,
    "temp": analysis.temp_size_in_bytes,
  }
  sizes["peak"] = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
  sizes["state"] = sum(
    int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(state_shapes)
  )
  return sizes


def _rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def measure_rss(name: str, layers: int, width: int, batch: int) -> dict:
  """In this (fresh) process: allocate, run the step twice, read the peak RSS."""
  tx = make_optimizer(name)
  x = jnp.ones((batch, width), jnp.float32)
  jax.block_until_ready(jnp.ones(8) + 1)  # the runtime is up
  before = _rss_bytes()
  params = init_params(param_shapes(layers, width))
  state = tx.init(params)
  step = make_step(tx)
  for _ in range(2):
    params, state = step(params, state, x)
  jax.block_until_ready((params, state))
  peak = _rss_bytes()
  return {"rss_before": before, "rss_peak": peak, "rss_delta": peak - before}


def _rss_in_fresh_process(name: str, args: argparse.Namespace) -> dict:
  command = [
    sys.executable,
    str(Path(__file__).resolve()),
    "--rss-worker",
    name,
    "--layers",
    str(args.layers),
    "--width",
    str(args.width),
    "--batch",
    str(args.batch),
  ]
  result = subprocess.run(command, capture_output=True, text=True, check=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: dict, params_bytes: int, with_rss: bool) -> str:
  mib = lambda b: f"{b / 2**20:,.0f}"
  units = lambda b: f"{b / params_bytes:+.2f}"
  sgd = rows["sgd"]
  header = (
    "| variant | arguments MiB | outputs MiB | aliased MiB | temporaries MiB | XLA peak MiB "
    "| / SGD | extra (x params) |"
  )
  rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
  if with_rss:
    header += " peak RSS MiB | / SGD | extra (x params) |"
    rule += "---:|---:|---:|"
  lines = [header, rule]
  for name, row in rows.items():
    cells = [
      name,
      mib(row["argument"]),
      mib(row["output"]),
      mib(row["alias"]),
      mib(row["temp"]),
      mib(row["peak"]),
      f"{row['peak'] / sgd['peak']:.2f}",
      units(row["peak"] - sgd["peak"]),
    ]
    if with_rss:
      cells += [
        mib(row["rss_delta"]),
        f"{row['rss_delta'] / sgd['rss_delta']:.2f}",
        units(row["rss_delta"] - sgd["rss_delta"]),
      ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def machine() -> dict:
  import flax

  return {
    "cpu": cpu_model(),
    "cores": os.cpu_count(),
    "backend": jax.default_backend(),
    "python": sys.version.split()[0],
    "jax": jax.__version__,
    "optax": optax.__version__,
    "flax": flax.__version__,
    "numpy": np.__version__,
    "date": datetime.date.today().isoformat(),
  }


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--width", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--no-rss", action="store_true", help="skip the fresh-process runs")
  parser.add_argument("--json", help="also write the results to this file")
  parser.add_argument("--rss-worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.rss_worker:
    print(json.dumps(measure_rss(args.rss_worker, args.layers, args.width, args.batch)))
    return {}
  variants = [v for v in args.variants.split(",") if v]
  if variants[0] != "sgd":
    variants = ["sgd", *[v for v in variants if v != "sgd"]]
  for name in variants:
    make_optimizer(name)  # unknown names fail before any work
  shapes = param_shapes(args.layers, args.width)
  n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  params_bytes = 4 * n_params
  rows = {}
  for name in variants:
    rows[name] = compiled_memory(name, args.layers, args.width, args.batch)
    if not args.no_rss:
      rows[name].update(_rss_in_fresh_process(name, args))
  report = {
    "settings": vars(args) | {"n_params": n_params, "params_bytes": params_bytes},
    "machine": machine(),
    "results": rows,
  }
  print(
    f"{n_params:,} float32 parameters ({params_bytes / 2**20:,.0f} MiB), "
    f"{args.layers} x {args.width}^2 kernels + norm leaves, batch {args.batch}"
  )
  print(table(rows, params_bytes, with_rss=not args.no_rss))
  if args.json:
    Path(args.json).write_text(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  main()
