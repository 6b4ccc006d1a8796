"""The edge of stability of full-batch GD and SAM (Long & Bartlett, arXiv 2309.12488).

Full-batch gradient descent and SAM train an MLP on the 1,000 training digits of
``samx.demo.load_digits_split()`` (pixels / 16) with the squared error on one-hot
targets,

  L(w) = (1 / 2n) sum_i ||f(x_i; w) - onehot(y_i)||^2

(Cohen et al.'s convention: half the mean over examples of the squared norm). Each rho
in ``--rhos`` gets its own run from the same initialisation:

* ``rho = 0``: plain GD, ``optax.sgd(eta)``;
* ``rho > 0``: ``samx.sam(optax.sgd(eta), rho=rho)``, one ``update`` per step with
  ``grad_fn`` on the full batch (normalised SAM, as in the paper).

Every ``--every`` steps (a jitted ``lax.scan`` of that many steps runs in between) the
script records the top eigenvalue ``lambda_max`` of the full-batch training-loss Hessian
(``samx.diagnostics.hessian_eigenvalues``: by default Lanczos with full
reorthogonalisation, 20 steps of exact Hessian-vector products from the same random start
each time; ``--eig power`` uses power iteration instead, also cold-started, as the function
takes no start vector), the gradient norm ``||g||`` at the measured iterate, ``2/eta`` and
the SAM edge ``lambda_SAM = samx.diagnostics.sam_edge(eta, rho, ||g||)``. The loss and
``||g||`` (at ``w_t``, before the update) are also kept for every step. At the end of each
run the final ``lambda_max`` is recomputed by 100 Lanczos steps and by 500 power-iteration
steps as a check of the cheap estimate.

Outputs (under ``--out``; default ``benchmarks/out/eos``, ``benchmarks/out/eos_quick``
with ``--quick``): ``edge_of_stability.png`` (``lambda_max`` per rho, with ``2/eta`` and
each ``lambda_SAM`` dashed; the training loss and ``||g||`` at every step; the ratio
``lambda_max / lambda_SAM``), ``edge_of_stability.json`` (all series) and
``edge_of_stability.md`` (the table). The table, also printed, gives per rho the medians
over the measurements in the last ``--tail`` fraction of the run of ``lambda_max``,
``lambda_SAM``, ``2/eta`` and ``lambda_max / lambda_SAM``, and the same ratio with
``lambda_SAM`` from the mean ``||g||`` of the ``--every`` steps before each measurement.

Expected (the paper): GD's ``lambda_max`` rises to about ``2/eta`` and hovers there;
SAM's hovers near ``lambda_SAM``, below ``2/eta``.

Run from the repository root::

  python benchmarks/edge_of_stability.py              # the recorded run
  python benchmarks/edge_of_stability.py --quick      # a short smoke run
  python benchmarks/edge_of_stability.py --eta 0.1 --out benchmarks/out/eos_eta0.1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
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
from common import cpu_model  # noqa: E402

import samx
from samx import diagnostics
from samx.demo import load_digits_split

NUM_EXAMPLES = 1000
NUM_CLASSES = 10
NUM_INPUTS = 64
ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}

# ---------------------------------------------------------------------------
# Data, model, loss.
# ---------------------------------------------------------------------------


def load_data(num_examples: int = NUM_EXAMPLES) -> tuple[jax.Array, jax.Array]:
  """The first ``num_examples`` digits training examples and their one-hot targets."""
  x_train, y_train, _, _ = load_digits_split()
  x = jnp.asarray(x_train[:num_examples])
  y = jax.nn.one_hot(jnp.asarray(y_train[:num_examples]), NUM_CLASSES, dtype=jnp.float32)
  return x, y


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> list[dict[str, jax.Array]]:
  """LeCun-normal kernels (variance 1/fan_in) and zero biases."""
  keys = jax.random.split(key, len(sizes) - 1)
  return [
    {
      "w": jax.random.normal(k, (m, n), jnp.float32) / np.sqrt(m),
      "b": jnp.zeros((n,), jnp.float32),
    }
    for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
  ]


def make_loss(x: jax.Array, y: jax.Array, activation: str) -> Callable[[Any], jax.Array]:
  """The full-batch loss ``(1/2n) sum_i ||f(x_i) - y_i||^2`` as a function of params."""
  act = ACTIVATIONS[activation]

  def loss_fn(params):
    h = x
    for layer in params[:-1]:
      h = act(h @ layer["w"] + layer["b"])
    out = h @ params[-1]["w"] + params[-1]["b"]
    return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

  return loss_fn


# ---------------------------------------------------------------------------
# Training with measurements.
# ---------------------------------------------------------------------------


def make_optimizer(eta: float, rho: float) -> optax.GradientTransformation:
  if rho == 0:
    return optax.sgd(eta)
  return samx.sam(optax.sgd(eta), rho=rho)


def make_chunk(loss_fn: Callable, tx: optax.GradientTransformation, rho: float, length: int):
  """A jitted function running ``length`` full-batch steps; returns per-step loss, ||g||."""
  grad_fn = jax.grad(loss_fn)

  def step(carry, _):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params)
    if rho == 0:
      updates, opt_state = tx.update(grads, opt_state, params)
    else:
      updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), (loss, optax.tree.norm(grads))

  @jax.jit
  def chunk(params, opt_state):
    (params, opt_state), (losses, gnorms) = jax.lax.scan(
      step, (params, opt_state), None, length=length
    )
    return params, opt_state, losses, gnorms

  return chunk


def make_measure(loss_fn: Callable, method: str, iters: int):
  """A jitted ``params -> (loss, ||g||, lambda_max)``."""

  @jax.jit
  def measure(params):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    eig = diagnostics.hessian_eigenvalues(
      loss_fn, params, k=1, method=method, num_iterations=iters
    )
    return loss, optax.tree.norm(grads), eig.eigenvalues[0]

  return measure


def run_one(
  loss_fn: Callable,
  params: Any,
  *,
  eta: float,
  rho: float,
  steps: int,
  every: int,
  eig_method: str,
  eig_iters: int,
) -> dict[str, Any]:
  tx = make_optimizer(eta, rho)
  opt_state = tx.init(params)
  chunk = make_chunk(loss_fn, tx, rho, every)
  measure = make_measure(loss_fn, eig_method, eig_iters)

  t0 = time.perf_counter()
  m_steps, m_loss, m_gnorm, m_lmax = [], [], [], []
  losses, gnorms = [], []
  for start in range(0, steps + 1, every):
    loss, gnorm, lmax = measure(params)
    m_steps.append(start)
    m_loss.append(float(loss))
    m_gnorm.append(float(gnorm))
    m_lmax.append(float(lmax))
    if start + every > steps:
      break
    params, opt_state, l_chunk, g_chunk = chunk(params, opt_state)
    losses.append(np.asarray(l_chunk))
    gnorms.append(np.asarray(g_chunk))
  jax.block_until_ready(params)
  wall = time.perf_counter() - t0

  # A check of the last measurement by many more iterations of both methods.
  final = {
    f"{method}_{iters}": float(
      jax.jit(
        lambda p, method=method, iters=iters: diagnostics.hessian_eigenvalues(
          loss_fn, p, k=1, method=method, num_iterations=iters
        ).eigenvalues[0]
      )(params)
    )
    for method, iters in (("lanczos", 100), ("power", 500))
  }

  m_gnorm_arr = np.asarray(m_gnorm)
  lam_sam = np.asarray(diagnostics.sam_edge(eta, rho, np.maximum(m_gnorm_arr, 1e-30)))
  # The same edge from the mean ||g|| over the `every` steps before each measurement:
  # ||g|| oscillates at the edge, and a single sample of it could bias lambda_SAM.
  step_g = np.concatenate(gnorms) if gnorms else np.zeros(0)
  window_g = np.asarray(
    [m_gnorm[0]] + [step_g[i * every : (i + 1) * every].mean() for i in range(len(m_steps) - 1)]
  )
  lam_sam_window = np.asarray(diagnostics.sam_edge(eta, rho, np.maximum(window_g, 1e-30)))
  return {
    "rho": rho,
    "measure_steps": m_steps,
    "loss": m_loss,
    "grad_norm": m_gnorm,
    "lambda_max": m_lmax,
    "lambda_sam": lam_sam.tolist(),
    "lambda_sam_window": lam_sam_window.tolist(),
    "step_loss": np.concatenate(losses).tolist() if losses else [],
    "step_grad_norm": np.concatenate(gnorms).tolist() if gnorms else [],
    "final_check": final,
    "final_lambda_max": m_lmax[-1],
    "wall_s": wall,
  }


# ---------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------


def summarize(run: dict[str, Any], eta: float, tail: float) -> dict[str, float]:
  steps = np.asarray(run["measure_steps"])
  keep = steps >= steps[-1] * (1.0 - tail)
  lmax = np.asarray(run["lambda_max"])[keep]
  lsam = np.asarray(run["lambda_sam"])[keep]
  return {
    "rho": run["rho"],
    "lambda_max": float(np.median(lmax)),
    "lambda_max_q25": float(np.percentile(lmax, 25)),
    "lambda_max_q75": float(np.percentile(lmax, 75)),
    "lambda_sam": float(np.median(lsam)),
    "two_over_eta": 2.0 / eta,
    "ratio_sam": float(np.median(lmax / lsam)),
    "ratio_sam_window": float(np.median(lmax / np.asarray(run["lambda_sam_window"])[keep])),
    "ratio_gd": float(np.median(lmax) * eta / 2.0),
    "grad_norm": float(np.median(np.asarray(run["grad_norm"])[keep])),
    "final_loss": float(run["loss"][-1]),
    "num_measurements": int(keep.sum()),
    "from_step": int(steps[keep][0]),
  }


def markdown_table(rows: list[dict[str, float]]) -> str:
  lines = [
    "| rho | lambda_max (median [IQR]) | lambda_SAM | 2/eta | lambda_max / lambda_SAM "
    "| same, window ‖g‖ | lambda_max / (2/eta) | median ‖g‖ | final loss |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['rho']:g} | {r['lambda_max']:.2f} [{r['lambda_max_q25']:.2f}, "
      f"{r['lambda_max_q75']:.2f}] | {r['lambda_sam']:.2f} | {r['two_over_eta']:.2f} | "
      f"{r['ratio_sam']:.3f} | {r['ratio_sam_window']:.3f} | {r['ratio_gd']:.3f} | "
      f"{r['grad_norm']:.3g} | {r['final_loss']:.3g} |"
    )
  return "\n".join(lines)


def plot(runs: list[dict[str, Any]], eta: float, path: Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(4, 1, figsize=(8, 12), sharex=True)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  ax = axes[0]
  for i, run in enumerate(runs):
    c = colors[i % len(colors)]
    label = "GD" if run["rho"] == 0 else f"SAM rho={run['rho']:g}"
    steps = run["measure_steps"]
    ax.plot(steps, run["lambda_max"], color=c, lw=1.2, label=f"{label} lambda_max")
    if run["rho"] > 0:
      ax.plot(
        steps,
        run["lambda_sam"],
        color=c,
        lw=1.0,
        ls="--",
        label=f"lambda_SAM(rho={run['rho']:g})",
      )
  ax.axhline(2.0 / eta, color="k", ls="--", lw=1.0, label="2/eta")
  ax.set_ylabel("lambda_max of the training-loss Hessian")
  ax.set_ylim(0, 1.6 * 2.0 / eta)
  ax.legend(fontsize=8, ncol=2)
  ax.set_title(title, fontsize=9)

  ax = axes[1]
  for i, run in enumerate(runs):
    c = colors[i % len(colors)]
    label = "GD" if run["rho"] == 0 else f"SAM rho={run['rho']:g}"
    ax.plot(np.arange(len(run["step_loss"])), run["step_loss"], color=c, lw=0.8, label=label)
  ax.set_yscale("log")
  ax.set_ylabel("training loss (every step)")
  ax.legend(fontsize=8)

  ax = axes[2]
  for i, run in enumerate(runs):
    c = colors[i % len(colors)]
    label = "GD" if run["rho"] == 0 else f"SAM rho={run['rho']:g}"
    ax.plot(
      np.arange(len(run["step_grad_norm"])), run["step_grad_norm"], color=c, lw=0.5, label=label
    )
  ax.set_yscale("log")
  ax.set_ylabel("||g|| (every step)")
  ax.legend(fontsize=8)

  ax = axes[3]
  for i, run in enumerate(runs):
    c = colors[i % len(colors)]
    label = "GD" if run["rho"] == 0 else f"SAM rho={run['rho']:g}"
    ratio = np.asarray(run["lambda_max"]) / np.asarray(run["lambda_sam"])
    ax.plot(run["measure_steps"], ratio, color=c, lw=1.0, label=label)
  ax.axhline(1.0, color="k", ls="--", lw=1.0)
  ax.set_ylabel("lambda_max / lambda_SAM (GD: / (2/eta))")
  ax.set_xlabel("step")
  ax.set_ylim(0.8, 1.4)
  ax.legend(fontsize=8)

  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--eta", type=float, default=0.0625, help="step size (default 0.0625)")
  parser.add_argument(
    "--rhos", type=float, nargs="+", default=[0.0, 0.05, 0.1], help="SAM radii; 0 is GD"
  )
  parser.add_argument("--steps", type=int, default=None, help="steps per run (default 4000)")
  parser.add_argument("--every", type=int, default=None, help="steps between measurements (20)")
  parser.add_argument("--tail", type=float, default=0.5, help="fraction of the run summarised")
  parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default="tanh")
  parser.add_argument(
    "--hidden", type=int, nargs="+", default=[64, 64], help="hidden widths (default 64 64)"
  )
  parser.add_argument("--eig", choices=("lanczos", "power"), default="lanczos")
  parser.add_argument(
    "--eig-iters", type=int, default=None, help="iterations (default: Lanczos 20, power 100)"
  )
  parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
  parser.add_argument(
    "--out", default=None, help="output folder (default benchmarks/out/eos, or eos_quick)"
  )
  parser.add_argument("--quick", action="store_true", help="a short smoke run")
  args = parser.parse_args(argv)

  eta = args.eta
  steps = args.steps or (300 if args.quick else 4000)
  eig_iters = args.eig_iters or (20 if args.eig == "lanczos" else 100)
  every = args.every or (10 if args.quick else 20)
  if steps % every:
    raise SystemExit(f"--steps ({steps}) must be a multiple of --every ({every})")
  if eta <= 0 or any(rho < 0 for rho in args.rhos) or not 0 < args.tail <= 1:
    raise SystemExit("need --eta > 0, every --rhos >= 0 and 0 < --tail <= 1")
  sizes = (NUM_INPUTS, *args.hidden, NUM_CLASSES)
  out = Path(args.out or ("benchmarks/out/eos_quick" if args.quick else "benchmarks/out/eos"))
  out.mkdir(parents=True, exist_ok=True)

  machine = {
    "cpu": cpu_model(),
    "cores": os.cpu_count(),
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "python": platform.python_version(),
    "date": datetime.date.today().isoformat(),
  }
  settings = {
    "eta": eta,
    "rhos": args.rhos,
    "steps": steps,
    "every": every,
    "tail": args.tail,
    "activation": args.activation,
    "sizes": list(sizes),
    "eig": args.eig,
    "eig_iters": eig_iters,
    "seed": args.seed,
    "num_examples": NUM_EXAMPLES,
    "loss": "0.5 * mean_i ||f(x_i) - onehot(y_i)||^2",
  }
  print(
    f"jax {machine['jax']} ({machine['backend']}), {machine['cpu']}, {machine['cores']} cores\n"
    f"MLP {'-'.join(map(str, sizes))} {args.activation}, n={NUM_EXAMPLES}, eta={eta}, "
    f"2/eta={2 / eta:g}, steps={steps}, every={every}, lambda_max by {args.eig} "
    f"({eig_iters} iterations)\n"
  )

  x, y = load_data()
  loss_fn = make_loss(x, y, args.activation)
  params0 = init_mlp(jax.random.key(args.seed), sizes)

  t_all = time.perf_counter()
  runs = []
  for rho in args.rhos:
    run = run_one(
      loss_fn,
      params0,
      eta=eta,
      rho=rho,
      steps=steps,
      every=every,
      eig_method=args.eig,
      eig_iters=eig_iters,
    )
    runs.append(run)
    check = ", ".join(f"{k} {v:.3f}" for k, v in run["final_check"].items())
    print(
      f"rho={rho:g}: {run['wall_s']:.1f} s; final loss {run['loss'][-1]:.4g}, "
      f"lambda_max {run['final_lambda_max']:.3f} (check: {check})"
    )
  total = time.perf_counter() - t_all

  rows = [summarize(run, eta, args.tail) for run in runs]
  table = markdown_table(rows)
  print(
    f"\nmedians over the measurements from step {rows[0]['from_step']} on "
    f"(last {args.tail:.0%} of {steps} steps):\n"
  )
  legend = (
    "lambda_max / lambda_SAM: median of the per-measurement ratio (GD: lambda_SAM = 2/eta); "
    "'same, window ‖g‖': lambda_SAM from the mean ‖g‖ of the --every steps before each "
    "measurement instead of ‖g‖ at the measured iterate; median ‖g‖: at the measurements."
  )
  print(table)
  print("\n" + legend)
  print(f"\ntotal wall time {total:.1f} s")

  title = (
    f"full-batch GD/SAM, digits n={NUM_EXAMPLES}, MLP {'-'.join(map(str, sizes))} "
    f"{args.activation}, MSE, eta={eta:g}"
  )
  plot(runs, eta, out / "edge_of_stability.png", title)
  (out / "edge_of_stability.md").write_text(table + "\n\n" + legend + "\n")
  with open(out / "edge_of_stability.json", "w") as f:
    json.dump(
      {
        "machine": machine,
        "settings": settings,
        "summary": rows,
        "runs": runs,
        "total_wall_s": total,
      },
      f,
    )
  print(f"saved {out / 'edge_of_stability.png'}, .md, .json")


if __name__ == "__main__":
  main()
