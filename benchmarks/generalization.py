"""Generalization: small-scale versions of the SAM papers' claims on scikit-learn's digits.

Every run trains the main job's model (``samx.demo``: the 64-256-256-10 ReLU MLP with
a LayerNorm after each hidden Dense, ``--model ln-mlp``) on the fixed 1,000 / 797
digits split with symmetric label noise on the training labels, ``optax.sgd(0.05,
momentum=0.9)`` as the base optimizer, batch 64, and reports the final and the best
(over epochs) clean test accuracy, mean ± std (``ddof=0``) over seeds. Seed ``s``
fixes the initialisation, the noise draw and the batch order for every optimizer
(paired runs); at a lower noise rate the flipped examples are a subset of those
flipped at a higher one.

Suites (``--suites``, default all):

- ``noise``: label noise 0/20/40/60% for SGD, SGD with twice the epochs (the SAM
  paper's compute-matched baseline: a SAM step costs two gradients) and every
  variant: SAM, ASAM, mSAM, F-SAM, VaSSO, SAM-ON, SSAM-F, GSAM, WSAM, LookSAM,
  ESAM, each at one radius for every noise rate (:data:`RHO`).
- ``sam_on``: SAM-ON (only the LayerNorm scales and biases perturbed) vs SAM-all vs
  the control (as many randomly chosen entries as the LayerNorms hold,
  ``samx.masks.random_entries``, at SAM-ON's radius) vs no-norm (everything but the
  LayerNorms, ``complement=True``, at SAM's radius), with SGD, at 0% and 40% noise.
- ``ssam``: SSAM with a Fisher (SSAM-F) and a dynamic (SSAM-D) mask at sparsity
  0.5/0.9/0.99, at SAM's radius; SAM is sparsity 0 and SGD sparsity 1.
- ``fsam``: F-SAM vs SAM at the same radius (0.5 and 1), noise 0/20/40/60%.
- ``msam``: mSAM, one perturbation per micro-shard of m = 64 (SAM), 16, 4, 1
  examples, at radius 0.1 and 0.3, 40% noise.
- ``rho``: radius sweeps of SAM and ASAM at 0% and 40% noise.

Rows are trained in jobs, one compiled program each: a configuration without its
radius, run for every (radius, noise rate) pair any suite asks of it, ``--seeds`` seeds
each, for the most epochs any of its rows needs (SGD's row reads the first half of the
SGD-2x runs: with a constant learning rate they are the same runs). The radius is a
hyperparameter of ``optax.inject_hyperparams``, set per run in the optimizer state;
the runs go one after another under ``jax.lax.map``, which keeps SSAM's mask refresh
and LookSAM's skipped second pass real branches (under ``vmap`` a ``lax.cond``
runs both sides) and was no slower than ``vmap`` for the others on 2 CPU cores.
Compilation, not training, is most of a small run's time.

Outputs under ``--out``: ``results.json`` (``rows``: one per suite, optimizer and noise
rate, with ``suite, variant, setting, noise, rho, seeds, final_mean, final_std,
best_mean, best_std, epochs, seconds``, plus ``label``, ``model``, the per-seed values
and the mean accuracy curve), ``tables.md`` (the Markdown tables also printed on
stdout) and ``generalization_<suite>.png``, one per suite; ``jobs`` lists what each
program trained and its wall time. A row's ``seconds`` is its job's wall time
(compilation included) divided by the job's number of (radius, noise) runs.

Usage::

  python benchmarks/generalization.py                      # every suite (~15 min, 2 cores)
  python benchmarks/generalization.py --quick              # a smoke run
  python benchmarks/generalization.py --suites noise,rho --seeds 5 --out /tmp/gen
  python -m samx generalization --suites sam_on            # the same, through the samx CLI

Results with the machine they ran on: ``benchmarks/GENERALIZATION.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
from common import cpu_model  # noqa: E402

from samx import demo  # noqa: E402
from samx.masks import norm_layers, random_entries  # noqa: E402
from samx.selective import sam_on  # noqa: E402

SUITES = ("noise", "sam_on", "ssam", "fsam", "msam", "rho")
MODEL = "ln-mlp"
RHO = {
  "sam": 0.5,
  "asam": 2.0,
  "msam": 0.3,
  "fsam": 1.0,
  "vasso": 0.5,
  "sam_on": 2.0,
  "ssam": 0.5,
  "gsam": 0.3,
  "wsam": 0.5,
  "looksam": 0.5,
  "esam": 0.5,
}
"""The radius of each variant in the ``noise`` suite (and of the fixed rows elsewhere):
for each, the radius with the best final accuracy at 40% noise, 80 epochs, 2 seeds
among a few tried, below the radius where training breaks down (ASAM: 0.2-3, breaks at
3; GSAM: 0.05-0.5, breaks at 0.5; SAM: 0.1-1, unstable at 1; SAM-ON: 1-3; mSAM m=16:
0.1-1). F-SAM, VaSSO and SSAM-F keep the main job's (``samx.demo``) radii on this
model; SSAM, WSAM, LookSAM and ESAM use SAM's."""
NOISE_MSAM_M = 16  # mSAM's shard size in the noise suite (4 micro-shards of the batch)
NOISE_VARIANTS = (
  "sgd",
  "sgd_2x",
  "sam",
  "asam",
  "msam",
  "fsam",
  "vasso",
  "sam_on",
  "ssam",
  "gsam",
  "wsam",
  "looksam",
  "esam",
)
RANDOM_MASK_SEED = 0  # the control's mask: the same entries for every seed


@dataclasses.dataclass(frozen=True)
class Grid:
  """The sweeps of the suites."""

  noises: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6)
  noise_variants: tuple[str, ...] = NOISE_VARIANTS
  sam_on_noises: tuple[float, ...] = (0.0, 0.4)
  ssam_noises: tuple[float, ...] = (0.0, 0.4)
  sparsities: tuple[float, ...] = (0.5, 0.9, 0.99)
  fsam_rhos: tuple[float, ...] = (0.5, 1.0)
  fsam_noises: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6)
  msam_m: tuple[int, ...] = (64, 16, 4, 1)
  msam_rhos: tuple[float, ...] = (0.1, 0.3)
  msam_noises: tuple[float, ...] = (0.4,)
  sam_rhos: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
  asam_rhos: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 3.0)
  rho_noises: tuple[float, ...] = (0.0, 0.4)


QUICK_GRID = Grid(
  noises=(0.0, 0.4),
  noise_variants=("sgd", "sgd_2x", "sam", "ssam"),
  sam_on_noises=(0.4,),
  ssam_noises=(0.4,),
  sparsities=(0.9,),
  fsam_rhos=(0.5,),
  fsam_noises=(0.4,),
  msam_m=(64, 16),
  msam_rhos=(0.3,),
  sam_rhos=(0.5, 1.0),
  asam_rhos=(1.0,),
  rho_noises=(0.4,),
)


@dataclasses.dataclass(frozen=True)
class Spec:
  """One row's optimizer configuration (configurations that differ only in the radius
  and the epochs share one job: see :class:`Job`).

  Attributes:
    kind: ``sgd``, a name of ``samx.demo.VARIANTS``, ``sam_on_random`` (the control)
      or ``no_norm`` (SAM-ON's complement).
    rho: the radius, ``None`` for SGD.
    epochs: passes over the training set.
    sparsity: SSAM's sparsity.
    mask: SSAM's mask, ``"fisher"`` or ``"dynamic"``.
    m: mSAM's shard size.
  """

  kind: str
  rho: float | None
  epochs: int
  sparsity: float | None = None
  mask: str | None = None
  m: int | None = None

  @property
  def job(self) -> tuple[Any, ...]:
    """What one compiled program fixes: everything but the radius and the epochs."""
    return (self.kind, self.sparsity, self.mask, self.m)


@dataclasses.dataclass(frozen=True)
class Request:
  """One row of a suite: an optimizer configuration at one noise rate.

  Attributes:
    suite: the suite's name.
    variant: the row's optimizer key (``sgd``, ``sgd_2x``, ``ssam_fisher``, ...).
    label: the optimizer's name in tables and plots.
    setting: its hyperparameters, as text.
    spec: the configuration trained.
    noise: the label-noise rate.
    line: the row of the suite's pivot table and the line of its plot.
    x: the column of the pivot table and the x position in the plot.
  """

  suite: str
  variant: str
  label: str
  setting: str
  spec: Spec
  noise: float
  line: str
  x: Any


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of one benchmark run (the command-line flags)."""

  suites: tuple[str, ...] = SUITES
  seeds: int = 3
  epochs: int = 80
  sgd_2x: bool = True
  lr: float = 0.05
  batch_size: int = 64
  grid: Grid = Grid()
  out: str = "samx-output/generalization"
  progress: bool = True
  quick: bool = False


# ---------------------------------------------------------------------------- suites


def _pct(noise: float) -> str:
  return f"{noise:.0%}"


def _rho_text(rho: float | None) -> str:
  return "" if rho is None else f"rho={rho:g}"


def _labelled(kind: str) -> str:
  return {
    "sgd": "SGD",
    "sam": "SAM",
    "asam": "ASAM",
    "msam": "mSAM",
    "fsam": "F-SAM",
    "vasso": "VaSSO",
    "sam_on": "SAM-ON",
    "ssam": "SSAM",
    "gsam": "GSAM",
    "wsam": "WSAM",
    "looksam": "LookSAM",
    "esam": "ESAM",
    "sam_on_random": "random mask",
    "no_norm": "no-norm",
  }[kind]


def _noise_suite(config: Config) -> list[Request]:
  e = config.epochs
  out = []
  for name in config.grid.noise_variants:
    if name == "sgd_2x" and not config.sgd_2x:
      continue
    if name in ("sgd", "sgd_2x"):
      spec = Spec("sgd", None, 2 * e if name == "sgd_2x" else e)
      label = "SGD (2x epochs)" if name == "sgd_2x" else "SGD"
      setting = f"epochs={spec.epochs}"
    elif name == "msam":
      spec = Spec("msam", RHO["msam"], e, m=NOISE_MSAM_M)
      label, setting = f"mSAM (m={NOISE_MSAM_M})", f"rho={spec.rho:g}, m={NOISE_MSAM_M}"
    elif name == "ssam":
      spec = Spec("ssam", RHO["ssam"], e, sparsity=0.5, mask="fisher")
      label, setting = "SSAM-F (s=0.5)", f"rho={spec.rho:g}, sparsity=0.5, fisher"
    else:
      spec = Spec(name, RHO[name], e)
      label, setting = _labelled(name), _rho_text(spec.rho)
    line = label if spec.rho is None else f"{label} {setting.split(',')[0]}"
    for noise in config.grid.noises:
      out.append(Request("noise", name, label, setting, spec, noise, line, noise))
  return out


def _sam_on_suite(config: Config) -> list[Request]:
  e = config.epochs
  rows = [
    ("sgd", "SGD", Spec("sgd", None, e)),
    ("sam", "SAM-all", Spec("sam", RHO["sam"], e)),
    ("sam_on", "SAM-ON", Spec("sam_on", RHO["sam_on"], e)),
    ("sam_on_random", "random mask (same count)", Spec("sam_on_random", RHO["sam_on"], e)),
    ("no_norm", "no-norm (all but norm)", Spec("no_norm", RHO["sam"], e)),
  ]
  out = []
  for variant, label, spec in rows:
    setting = _rho_text(spec.rho)
    line = label if spec.rho is None else f"{label} {setting}"
    for noise in config.grid.sam_on_noises:
      out.append(Request("sam_on", variant, label, setting, spec, noise, line, noise))
  return out


def _ssam_suite(config: Config) -> list[Request]:
  e, rho = config.epochs, RHO["ssam"]
  out = []
  for noise in config.grid.ssam_noises:
    tag = f", {_pct(noise)} noise"
    sam = Spec("sam", rho, e)
    out.append(
      Request("ssam", "sam", "SAM", f"rho={rho:g}", sam, noise, f"SAM (s=0){tag}", 0.0)
    )
    for mask in ("fisher", "dynamic"):
      label = "SSAM-F" if mask == "fisher" else "SSAM-D"
      for s in config.grid.sparsities:
        spec = Spec("ssam", rho, e, sparsity=s, mask=mask)
        setting = f"rho={rho:g}, sparsity={s:g}, {mask}"
        out.append(Request("ssam", f"ssam_{mask}", label, setting, spec, noise, label + tag, s))
    sgd = Spec("sgd", None, e)
    out.append(Request("ssam", "sgd", "SGD", "", sgd, noise, f"SGD (s=1){tag}", 1.0))
  return out


def _fsam_suite(config: Config) -> list[Request]:
  e = config.epochs
  out = []
  for rho in config.grid.fsam_rhos:
    for kind in ("sam", "fsam"):
      spec = Spec(kind, rho, e)
      label = _labelled(kind)
      for noise in config.grid.fsam_noises:
        out.append(
          Request(
            "fsam", kind, label, f"rho={rho:g}", spec, noise, f"{label} rho={rho:g}", noise
          )
        )
  return out


def _msam_suite(config: Config) -> list[Request]:
  e = config.epochs
  out = []
  for noise in config.grid.msam_noises:
    tag = f", {_pct(noise)} noise"
    for rho in config.grid.msam_rhos:
      for m in config.grid.msam_m:
        # m = the batch size is one shard: SAM itself.
        if m == config.batch_size:
          spec = Spec("sam", rho, e)
        else:
          spec = Spec("msam", rho, e, m=m)
        setting = f"rho={rho:g}, m={m}"
        line = f"mSAM rho={rho:g}{tag}"
        out.append(Request("msam", "msam", "mSAM", setting, spec, noise, line, m))
    sgd = Spec("sgd", None, e)
    out.append(Request("msam", "sgd", "SGD", "", sgd, noise, f"SGD{tag}", None))
  return out


def _rho_suite(config: Config) -> list[Request]:
  e = config.epochs
  out = []
  for noise in config.grid.rho_noises:
    tag = f", {_pct(noise)} noise"
    for kind, rhos in (("sam", config.grid.sam_rhos), ("asam", config.grid.asam_rhos)):
      label = _labelled(kind)
      for rho in rhos:
        spec = Spec(kind, rho, e)
        out.append(Request("rho", kind, label, f"rho={rho:g}", spec, noise, label + tag, rho))
    sgd = Spec("sgd", None, e)
    out.append(Request("rho", "sgd", "SGD", "", sgd, noise, f"SGD{tag}", None))
  return out


SUITE_BUILDERS = {
  "noise": _noise_suite,
  "sam_on": _sam_on_suite,
  "ssam": _ssam_suite,
  "fsam": _fsam_suite,
  "msam": _msam_suite,
  "rho": _rho_suite,
}
X_NAMES = {
  "noise": "label noise",
  "sam_on": "label noise",
  "ssam": "sparsity",
  "fsam": "label noise",
  "msam": "m (examples per perturbation)",
  "rho": "rho",
}
TITLES = {
  "noise": "Label noise: SGD vs every variant",
  "sam_on": "SAM-ON vs SAM-all vs the random-mask control vs no-norm",
  "ssam": "SSAM: sparsity sweep (Fisher and dynamic masks)",
  "fsam": "F-SAM vs SAM at the same radius",
  "msam": "mSAM: the m sweep",
  "rho": "Radius sweeps: SAM and ASAM",
}


# ---------------------------------------------------------------------------- training


def make_variant(spec: Spec, lr: float, batch_size: int) -> demo.Variant:
  """The optimizer of ``spec``: the demo's builders, plus SAM-ON's two ablations."""
  base = lambda: optax.sgd(lr, momentum=demo.MOMENTUM)
  if spec.kind == "sam_on_random":
    # As many random entries as the LayerNorms hold, drawn once (static under jit).
    mask = random_entries(norm_layers, seed=RANDOM_MASK_SEED)
    factory = lambda rho: sam_on(base(), rho=rho, mask=mask)
    return demo.Variant(
      "sam_on_random", "random mask", spec.rho, factory(spec.rho), "grad_fn", factory=factory
    )
  if spec.kind == "no_norm":
    factory = lambda rho: sam_on(base(), rho=rho, mask=norm_layers, complement=True)
    return demo.Variant(
      "no_norm", "no-norm", spec.rho, factory(spec.rho), "grad_fn", factory=factory
    )
  fields: dict[str, Any] = {"lr": lr, "batch_size": batch_size, "model": MODEL}
  fields["variants"] = (spec.kind,)
  if spec.rho is not None:
    field = {"sam": "rho_sam", "gsam": "rho_sam", "wsam": "rho_sam", "looksam": "rho_sam"}
    field |= {"esam": "rho_sam", "asam": "rho_asam", "msam": "rho_msam", "fsam": "rho_fsam"}
    field |= {"vasso": "rho_vasso", "sam_on": "rho_sam_on", "ssam": "rho_ssam"}
    fields[field[spec.kind]] = spec.rho
  if spec.kind == "msam":
    fields["msam_m"] = (spec.m,)
  if spec.kind == "ssam":
    fields["sparsity"] = spec.sparsity
    fields["ssam_kinds"] = (spec.mask,)
  (variant,) = demo.VARIANTS[spec.kind](demo.DemoConfig(**fields))
  return variant


def _job_name(job: tuple[Any, ...], runs) -> str:
  kind, sparsity, mask, m = job
  parts = [_labelled(kind)]
  if m is not None:
    parts.append(f"m={m}")
  if sparsity is not None:
    parts.append(f"s={sparsity:g} {mask}")
  rhos = sorted({rho for rho, _ in runs if rho is not None})
  if rhos:
    parts.append("rho=" + ",".join(f"{rho:g}" for rho in rhos))
  return " ".join(parts)


@dataclasses.dataclass
class Job:
  """One compiled program: a configuration without its radius, trained for every
  (radius, noise rate) pair its rows need, with ``config.seeds`` seeds each, for the
  most epochs any of its rows needs (a row with fewer epochs reads the first ones:
  the runs are the same, the learning rate is constant)."""

  spec: Spec
  runs: list[tuple[float | None, float]]
  epochs: int


def plan_jobs(requests: Sequence[Request]) -> dict[tuple[Any, ...], Job]:
  """Groups the rows' configurations into jobs (see :class:`Job`)."""
  jobs: dict[tuple[Any, ...], Job] = {}
  for r in requests:
    job = jobs.setdefault(r.spec.job, Job(r.spec, [], 0))
    if (r.spec.rho, r.noise) not in job.runs:
      job.runs.append((r.spec.rho, r.noise))
    job.epochs = max(job.epochs, r.spec.epochs)
  for job in jobs.values():
    job.runs.sort(key=lambda run: (run[0] or 0.0, run[1]))
  return jobs


def train_job(job: Job, config: Config, data, bar=None) -> dict[Any, Any]:
  """Trains every (radius, noise, seed) of ``job`` in one program, the runs one after
  another under ``jax.lax.map``; the radius is a hyperparameter of
  :func:`optax.inject_hyperparams`, set per run in the optimizer state.

  Returns:
    ``{(rho, noise): (seeds, epochs) clean test accuracies, "seconds": wall time}``.
  """
  start = time.perf_counter()
  variant = make_variant(job.spec, config.lr, config.batch_size)
  seeds = jnp.arange(config.seeds)
  y_train = jnp.asarray(data[1])
  parts = [demo.init_seeds(seeds, y_train, noise, MODEL) for _, noise in job.runs]
  init = jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
  opt_state = None
  if variant.factory is not None:
    factory = variant.factory
    tx = optax.inject_hyperparams(lambda rho: factory(rho))(rho=job.runs[0][0])
    variant = dataclasses.replace(variant, tx=tx)
    opt_state = jax.jit(jax.vmap(tx.init))(init[0])
    rho = opt_state.hyperparams["rho"]
    per_run = np.repeat([r for r, _ in job.runs], config.seeds).astype(rho.dtype)
    opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, "rho": per_run})

  def on_epoch(epoch: int, accuracy: jax.Array) -> None:
    if bar is not None:
      bar.set_postfix_str(f"test acc {float(accuracy.mean()):.3f}", refresh=False)
      bar.update(len(job.runs) * config.seeds)

  curves = demo.train(
    variant,
    job.epochs,
    config.batch_size,
    data,
    init,
    seed_axis="map",
    on_epoch=on_epoch,
    opt_state=opt_state,
  )
  acc = curves["test_accuracy"].reshape(len(job.runs), config.seeds, job.epochs)
  result: dict[Any, Any] = {run: acc[i] for i, run in enumerate(job.runs)}
  result["seconds"] = time.perf_counter() - start
  return result


def _row(request: Request, acc: np.ndarray, seconds: float) -> dict[str, Any]:
  acc = acc[:, : request.spec.epochs]
  final, best = acc[:, -1], acc.max(axis=1)
  return {
    "suite": request.suite,
    "variant": request.variant,
    "setting": request.setting,
    "noise": request.noise,
    "rho": request.spec.rho,
    "seeds": int(acc.shape[0]),
    "final_mean": float(final.mean()),
    "final_std": float(final.std()),
    "best_mean": float(best.mean()),
    "best_std": float(best.std()),
    "epochs": request.spec.epochs,
    "seconds": seconds,
    "label": request.label,
    "model": MODEL,
    "final_per_seed": [float(v) for v in final],
    "best_per_seed": [float(v) for v in best],
    "curve_mean": [round(float(v), 4) for v in acc.mean(axis=0)],
  }


def run(config: Config) -> dict[str, Any]:
  """Trains every job the chosen suites need and builds the report.

  Returns:
    The dictionary saved as ``results.json``: ``config``, ``environment``,
    ``rows`` (see the module docstring), ``jobs`` (what each compiled program
    trained, and its wall time), ``tables`` (Markdown per suite), ``files`` and
    ``seconds``.
  """
  unknown = [s for s in config.suites if s not in SUITES]
  if unknown or not config.suites:
    raise ValueError(f"unknown suites {unknown}; choose from {', '.join(SUITES)}")
  start = time.perf_counter()
  requests = [r for suite in config.suites for r in SUITE_BUILDERS[suite](config)]
  jobs = plan_jobs(requests)
  data = demo.load_digits_split()
  bar = None
  if config.progress:
    from tqdm.auto import tqdm

    # One unit: one epoch of one run (a seed at one radius and noise rate).
    total = sum(len(job.runs) * config.seeds * job.epochs for job in jobs.values())
    bar = tqdm(total=total, unit="run-epoch", unit_scale=True, dynamic_ncols=True)
  results: dict[tuple[Any, ...], dict[Any, Any]] = {}
  try:
    for key, job in jobs.items():
      if bar is not None:
        runs = len(job.runs) * config.seeds
        bar.set_description(f"{_job_name(key, job.runs)} ({runs} runs)")
      results[key] = train_job(job, config, data, bar)
  finally:
    if bar is not None:
      bar.close()

  rows = []
  for r in requests:
    trained, job = results[r.spec.job], jobs[r.spec.job]
    share = trained["seconds"] / len(job.runs)  # the job's time per (radius, noise) run
    rows.append(_row(r, trained[(r.spec.rho, r.noise)], share))
  out = Path(config.out)
  out.mkdir(parents=True, exist_ok=True)
  tables = {suite: suite_tables(suite, rows, requests, config) for suite in config.suites}
  files = {"json": str(out / "results.json"), "tables": str(out / "tables.md")}
  for suite in config.suites:
    path = out / f"generalization_{suite}.png"
    plot_suite(suite, rows, requests, config, path)
    files[suite] = str(path)
  report = {
    "benchmark": "generalization",
    "config": _config_dict(config),
    "environment": environment(),
    "rows": rows,
    "jobs": [
      {
        "name": _job_name(key, job.runs),
        "runs": [{"rho": rho, "noise": noise} for rho, noise in job.runs],
        "seeds": config.seeds,
        "epochs": job.epochs,
        "seconds": results[key]["seconds"],
      }
      for key, job in jobs.items()
    ],
    "tables": tables,
    "files": files,
  }
  (out / "tables.md").write_text("\n\n".join(tables.values()) + "\n")
  report["seconds"] = time.perf_counter() - start
  (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
  return report


def _config_dict(config: Config) -> dict[str, Any]:
  d = dataclasses.asdict(config)
  d |= {"model": MODEL, "rho": RHO, "momentum": demo.MOMENTUM, "asam_eta": demo.ASAM_ETA}
  d |= {"noise_msam_m": NOISE_MSAM_M, "random_mask_seed": RANDOM_MASK_SEED}
  d |= {"seed_axis": "map", "rho_as": "optax.inject_hyperparams"}
  return d


def environment() -> dict[str, Any]:
  """The machine and the library versions, for the record."""
  import flax
  import sklearn

  return {
    "cpu": cpu_model(),
    "cores": os.cpu_count(),
    "backend": jax.default_backend(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "flax": flax.__version__,
    "numpy": np.__version__,
    "scikit-learn": sklearn.__version__,
    "date": datetime.date.today().isoformat(),
  }


# ---------------------------------------------------------------------------- tables


def _x_text(suite: str, x: Any) -> str:
  if x is None:
    return "ref."
  if suite in ("noise", "sam_on", "fsam"):
    return _pct(x)
  return f"{x:g}"


def _suite_rows(suite, rows, requests):
  return [(req, row) for req, row in zip(requests, rows, strict=True) if req.suite == suite]


def _ordered(values):
  seen = []
  for v in values:
    if v not in seen:
      seen.append(v)
  return seen


def _columns(suite, pairs):
  xs = _ordered(req.x for req, _ in pairs)
  numeric = sorted(x for x in xs if x is not None)
  return numeric + ([None] if None in xs else [])


def suite_tables(suite: str, rows, requests, config: Config) -> str:
  """The suite's Markdown: a pivot of the final, then of the best, test accuracy."""
  pairs = _suite_rows(suite, rows, requests)
  lines_ = _ordered(req.line for req, _ in pairs)
  cols = _columns(suite, pairs)
  cells = {(req.line, req.x): row for req, row in pairs}
  epochs = {row["epochs"] for _, row in pairs}
  epochs_text = "/".join(str(e) for e in sorted(epochs)) + (
    " epoch" if epochs == {1} else " epochs"
  )
  seeds_text = f"{config.seeds} seed" + ("" if config.seeds == 1 else "s")
  out = [
    f"### {suite}: {TITLES[suite]}",
    "",
    f"Clean test accuracy, mean ± std over {seeds_text}, {epochs_text} "
    f"({MODEL}; columns: {X_NAMES[suite]}).",
  ]
  for key, title in (("final", "final"), ("best", "best over epochs")):
    header = [f"{title}"] + [_x_text(suite, x) for x in cols]
    out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for line in lines_:
      row = [line]
      for x in cols:
        cell = cells.get((line, x))
        row.append(
          "" if cell is None else f"{cell[key + '_mean']:.3f} ± {cell[key + '_std']:.3f}"
        )
      out.append("| " + " | ".join(row) + " |")
  return "\n".join(out)


# ---------------------------------------------------------------------------- plots


def plot_suite(suite: str, rows, requests, config: Config, path: Path) -> None:
  """Final and best accuracy against the suite's x (a categorical axis), one line per
  row of the pivot; a line with a single point (a reference such as SGD) is drawn as
  a dashed horizontal line. ``noise`` adds the mean accuracy curves at 40% noise."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  pairs = _suite_rows(suite, rows, requests)
  cols = [x for x in _columns(suite, pairs) if x is not None]  # references: dashed lines
  positions = {x: i for i, x in enumerate(cols)}
  curves = suite == "noise" and 0.4 in {req.noise for req, _ in pairs}
  panels = 3 if curves else 2
  fig = Figure(figsize=(5.2 * panels, 4.8), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, panels)
  colors = _colors(len(_ordered(req.line for req, _ in pairs)))
  for ax, key in zip(axes[:2], ("final", "best"), strict=True):
    for color, line in zip(colors, _ordered(req.line for req, _ in pairs), strict=False):
      points = [(req.x, row) for req, row in pairs if req.line == line]
      mean = np.array([row[f"{key}_mean"] for _, row in points])
      std = np.array([row[f"{key}_std"] for _, row in points])
      if len(points) == 1 and (points[0][0] is None or len(cols) > 1):
        ax.axhline(mean[0], color=color, ls="--", lw=1.2, label=line)
        ax.axhspan(mean[0] - std[0], mean[0] + std[0], color=color, alpha=0.1)
        continue
      xs = [positions[x] for x, _ in points]
      ax.errorbar(xs, mean, yerr=std, color=color, marker="o", ms=4, capsize=3, label=line)
    ax.set_xticks(range(len(cols)), [_x_text(suite, x) for x in cols])
    ax.set_xlabel(X_NAMES[suite])
    ax.set_ylabel(f"{'final' if key == 'final' else 'best'} clean test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.set_title(f"{key} (mean ± std, {config.seeds} seeds)", fontsize=10)
  if curves:
    ax = axes[2]
    for color, (req, row) in zip(
      colors, [(q, r) for q, r in pairs if q.noise == 0.4], strict=False
    ):
      curve = np.asarray(row["curve_mean"])
      ax.plot(np.arange(1, curve.size + 1), curve, color=color, lw=1.2, label=req.line)
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean test accuracy (mean over seeds)")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.set_title("40% noise: accuracy per epoch", fontsize=10)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside right center", fontsize=8)
  fig.suptitle(f"digits, {MODEL}: {TITLES[suite]}", fontsize=11)
  fig.savefig(path, dpi=110)


def _colors(n: int) -> list[Any]:
  from matplotlib import colormaps

  cmap = colormaps["tab20" if n > 10 else "tab10"]
  return [cmap(i % cmap.N) for i in range(n)]


# ---------------------------------------------------------------------------- CLI


def _float_list(text: str) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in text.split(",") if v.strip())
  except ValueError:
    values = ()
  if not values or any(not 0.0 <= v <= 1.0 for v in values):
    raise argparse.ArgumentTypeError(
      f"expected rates in [0, 1] separated by commas; got {text!r}"
    )
  return values


def _name_list(choices: Sequence[str], what: str):
  def parse(text: str) -> tuple[str, ...]:
    if text.strip() == "all":
      return tuple(choices)
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
      raise argparse.ArgumentTypeError(
        f"unknown {what} {unknown or text!r}; choose from {', '.join(choices)} or 'all'"
      )
    return names

  return parse


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
  """The benchmark's argument parser."""
  parser = argparse.ArgumentParser(
    prog=prog,
    description="Small-scale versions of the SAM papers' generalization claims on digits "
    "(label noise, SAM-ON, SSAM, F-SAM, mSAM, radius sweeps): Markdown tables on stdout, "
    "results.json, tables.md and one PNG per suite under --out.",
  )
  parser.add_argument(
    "--suites",
    type=_name_list(SUITES, "suite"),
    default=SUITES,
    help=f"comma-separated, of {','.join(SUITES)} (default: all)",
  )
  parser.add_argument(
    "--quick", action="store_true", help="a smoke run: 2 seeds, 2 epochs, small sweeps"
  )
  parser.add_argument("--seeds", type=_positive_int, default=None, help="(3; quick: 2)")
  parser.add_argument(
    "--epochs", type=_positive_int, default=None, help="epochs per run (80; quick: 2)"
  )
  parser.add_argument(
    "--noises", type=_float_list, default=None, help="the noise suite's rates (0,0.2,0.4,0.6)"
  )
  parser.add_argument(
    "--noise-variants",
    type=_name_list(NOISE_VARIANTS, "variant"),
    default=None,
    help=f"the noise suite's rows, of {','.join(NOISE_VARIANTS)} (default: all)",
  )
  parser.add_argument(
    "--sgd-2x",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="the noise suite's SGD row with twice the epochs, the SAM paper's "
    "compute-matched baseline (default: on)",
  )
  parser.add_argument("--out", default=Config().out, help="output folder (%(default)s)")
  parser.add_argument(
    "-q", "--quiet", dest="progress", action="store_false", help="no progress bar"
  )
  return parser


def config_from_args(args: argparse.Namespace) -> Config:
  """The :class:`Config` of parsed flags (``--quick`` sets the defaults it changes)."""
  grid = QUICK_GRID if args.quick else Grid()
  if args.noises is not None:
    grid = dataclasses.replace(grid, noises=args.noises)
  if args.noise_variants is not None:
    grid = dataclasses.replace(grid, noise_variants=args.noise_variants)
  return Config(
    suites=args.suites,
    seeds=args.seeds or (2 if args.quick else Config.seeds),
    epochs=args.epochs or (2 if args.quick else Config.epochs),
    sgd_2x=args.sgd_2x,
    grid=grid,
    out=args.out,
    progress=args.progress,
    quick=args.quick,
  )


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
  """Runs the benchmark; prints the Markdown tables. Returns the exit status."""
  args = build_parser(prog).parse_args(argv)
  config = config_from_args(args)
  report = run(config)
  env = report["environment"]
  print(
    f"# Generalization on digits ({env['cpu']}, {env['cores']} cores, jax {env['jax']}, "
    f"{report['seconds']:.0f} s)\n"
  )
  print("\n\n".join(report["tables"].values()))
  files = report["files"]
  print(f"\nsaved {files['json']}, {files['tables']} and {len(config.suites)} PNG(s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
