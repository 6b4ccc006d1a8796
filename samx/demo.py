"""The main job: SGD vs SAM vs ASAM (and more) on scikit-learn's digits with noisy labels.

``python -m samx`` trains an MLP (64-256-256-10, ReLU, He-normal kernels, zero
biases) on the digits data set that ships with scikit-learn (no download) and compares
plain SGD with :func:`samx.sam` and :func:`samx.asam` (and, on request, an m sweep of
:func:`samx.msam`):

- **Data.** The 1,797 8x8 images are split once, by a fixed permutation that does
  not depend on the seed, into 1,000 training and 797 test examples; pixels are
  divided by 16 into [0, 1].
- **Label noise.** Symmetric noise at rate ``noise`` (default 0.4): exactly
  ``round(noise * 1000)`` training examples, chosen uniformly without replacement,
  get a label drawn uniformly from the nine *other* classes, never their own, so the
  realised noise rate is exactly the requested one (see :func:`symmetric_label_noise`).
  The test labels stay clean.
- **Training.** Mean softmax cross-entropy on the noisy labels;
  ``optax.sgd(lr, momentum=0.9)`` for SGD, and the same SGD wrapped by
  ``samx.sam(..., rho)`` / ``samx.asam(..., rho, eta=0.01)``, one
  ``tx.update(grads, state, params, grad_fn=...)`` per step. Batch 64; each epoch
  reshuffles the training set and drops the last incomplete batch (1000 // 64 = 15
  steps per epoch).
- **mSAM (opt-in).** ``--variants ...,msam --msam-m 64,16,4,1`` adds one row per
  shard size ``m``: ``samx.msam(sgd, rho_msam, micro_shards=batch_size // m)``, one
  perturbation per micro-shard of ``m`` examples (``m`` must divide the batch size).
  With ``micro_shards > 1`` the step uses samx's per-example contract
  (``per_example_loss_fn`` = the per-example cross-entropy, ``batch`` = the
  minibatch) and passes zero gradients, which micro-shard mSAM does not use, so a step
  costs the gradient FLOPs of SAM (plus one forward pass for the logged loss);
  ``m = batch_size`` is one shard, i.e. SAM, through the ``grad_fn`` contract.
- **More variants (opt-in).** ``fsam`` (:func:`samx.fsam`, ``--rho-fsam``),
  ``vasso`` (:func:`samx.vasso`, ``--rho-vasso``), ``ssam`` (:func:`samx.ssam`,
  SSAM-F: an unstructured Fisher mask over 16 examples of the batch, refreshed
  every 100 steps, ``--sparsity`` (default 0.5) of the entries not perturbed,
  ``--rho-ssam``; the per-example contract with the clean batch gradient as
  ``grads``) and ``sam_on`` (:func:`samx.sam_on`, only the LayerNorm scales and
  biases perturbed, found by :func:`samx.masks.norm_layers`; ``--rho-sam-on``;
  needs ``--model ln-mlp``).
- **Model.** ``--model mlp`` (default) or ``ln-mlp``: the same MLP with a LayerNorm
  (``{"scale", "bias"}`` per hidden layer, epsilon 1e-6) between each hidden Dense
  and its ReLU.
- **Seeds.** Seed ``s`` (``0 .. seeds - 1``) fixes the initialisation, the noise
  draw and the batch order, and every optimizer gets the same ones (paired runs).
  All seeds train at once under :func:`jax.vmap` (SSAM and LookSAM: one after the
  other under :func:`jax.lax.map`, so that the ``lax.cond`` of the mask refresh /
  the skipped second pass stays a branch; see :func:`make_epoch`); one epoch is one
  jitted :func:`jax.lax.scan` over its minibatches followed by one evaluation of the
  clean test accuracy. (Batching changes floating-point rounding, so a given seed can
  end a few test examples apart when run with a different ``--seeds``.)
- **Output.** A table of the final and the best (over epochs) clean test accuracy,
  mean ± std over seeds (population std, ``ddof=0``); ``accuracy.png`` (clean test
  accuracy per epoch, mean with a ±std band) and ``results.json`` in ``--out``.
  "Best" picks the epoch on the test set itself: read it as how much a method loses
  by memorising the noise, not as a held-out result.

Calibration (defaults: 150 epochs, 3 seeds, lr 0.05, 40% noise; clean test
accuracy, mean ± std over seeds; about 10-20 s per row on 2 CPU cores)::

  optimizer       final           best
  SGD             0.682 ± 0.015   0.912 ± 0.004
  SAM  rho=0.5    0.730 ± 0.011   0.949 ± 0.004
  SAM  rho=1      0.921 ± 0.005   0.945 ± 0.013   <- default
  ASAM rho=1      0.685 ± 0.016   0.934 ± 0.005
  ASAM rho=2      0.724 ± 0.023   0.947 ± 0.004
  ASAM rho=2.5    0.778 ± 0.022   0.948 ± 0.003
  ASAM rho=3      0.826 ± 0.022   0.949 ± 0.006   <- default
  ASAM rho=3.5    0.900 ± 0.014   0.948 ± 0.006
  ASAM rho=4      0.691 ± 0.140   0.819 ± 0.077   (unstable: one seed ends at 0.53)
  ASAM rho=5      0.302 ± 0.154   0.568 ± 0.065
  ASAM rho=8      0.138 ± 0.045   0.217 ± 0.017   (stuck near chance)

All methods peak near 0.91-0.95 and then memorise the noisy labels; a large radius
slows the memorisation, so the final accuracy rises with rho until training breaks
down. SAM at rho=1 sits near chance for the first 20-30 epochs and the seeds leave
it at different times (the wide band in the plot between epochs 40 and 100) before
it settles at its final accuracy. ASAM's ``eta=0.01`` rescaling makes its perturbation
about ``|w|`` times SAM's (``|w|`` ~ 0.1 here), hence the larger radius. The
default ASAM radius, 3, is the largest value tried that is stable over six seeds
with a margin below the breakdown at 4 (3.5 ends higher, 0.897 ± 0.016 over six
seeds, but sits next to it).

mSAM (``--variants msam --msam-m 64,16,4,1``, final / best, same settings)::

  rho    m=64 (= SAM)    m=16            m=4             m=1
  1      0.921 / 0.945   0.152 / 0.220   0.096 / 0.147   0.094 / 0.123
  0.3    0.703 / 0.938   0.721 / 0.946   0.479 / 0.543   0.104 / 0.178
  0.1    0.691 / 0.923   0.693 / 0.928   0.704 / 0.941   0.727 / 0.946

A perturbation per micro-shard is a stronger perturbation than one per batch: at a
fixed rho, smaller m regularises more, and the radius where training breaks down
falls with m: SAM's rho = 1 trains only at m = 64, so ``--rho-msam`` defaults to 0.1.
Small m is slow on CPU (k perturbed copies of the weights; see
``benchmarks/SCALING.md``).

The other variants were calibrated on ``--model ln-mlp`` (80 epochs, 2 seeds, final /
best, same settings otherwise; SAM itself on ln-mlp: rho=1 0.420 / 0.567 (one seed
still near chance at epoch 80), rho=0.5 0.904 / 0.953)::

  SAM-ON rho=0.5 0.673 / 0.896    VaSSO rho=1    0.146 / 0.228 (near chance)
  SAM-ON rho=1   0.693 / 0.920    VaSSO rho=0.5  0.905 / 0.952   <- default
  SAM-ON rho=2   0.726 / 0.940    F-SAM rho=0.3  0.882 / 0.947 (40 epochs)
    <- default                    F-SAM rho=1    0.922 / 0.928 (40 epochs) <- default
  SAM-ON rho=3   0.587 / 0.662    SSAM-F rho=1   0.917 / 0.919 (40 epochs) <- default
    (one seed stuck)
  SAM-ON rho=10  0.095 / 0.112 (40 epochs, chance)

``--model ln-mlp --variants sgd,sam,sam_on,ssam,fsam,vasso`` at the defaults (150
epochs, 3 seeds; about 10 s per row on 2 CPU cores, SSAM-F about 30 s)::

  optimizer              final           best
  SGD                    0.683 ± 0.018   0.882 ± 0.015
  SAM (rho=1)            0.919 ± 0.023   0.922 ± 0.024
  SAM-ON (rho=2)         0.678 ± 0.010   0.940 ± 0.002
  SSAM-F (rho=1, s=0.5)  0.934 ± 0.004   0.957 ± 0.004
  F-SAM (rho=1)          0.938 ± 0.008   0.953 ± 0.004
  VaSSO (rho=0.5)        0.733 ± 0.028   0.949 ± 0.004

SAM-ON's radius covers only the 1,024 LayerNorm entries (about 1% of the 85k
parameters), so it takes a larger radius than SAM's 0.5 on this model, though not the
10x of the paper's ResNets: rho = 10 and 30 never leave chance. F-SAM removes the
gradient's EMA from the ascent direction, which shortens it a lot and makes
rho = 1 train at once. VaSSO's averaged direction behaves like SAM's (rho = 1 stalls).
SSAM-F's seeds run one after another (``lax.map``): under the seeds' ``vmap`` the
refresh's ``lax.cond`` became a ``select``, the 16 per-example gradients of the Fisher
sum ran at every step, and the row took about 270 s (0.933 ± 0.004 / 0.956 ± 0.005,
the same runs up to rounding).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samx.aliases import (
  asam,
  esam,
  fsam,
  gsam,
  looksam,
  msam,
  sam,
  sam_on,
  ssam,
  vasso,
  wsam,
)
from samx.masks import norm_layers

__all__ = [
  "DEFAULT_MSAM_M",
  "DEFAULT_RHO_ASAM",
  "DEFAULT_RHO_FSAM",
  "DEFAULT_RHO_MSAM",
  "DEFAULT_RHO_SAM",
  "DEFAULT_RHO_SAM_ON",
  "DEFAULT_RHO_SSAM",
  "DEFAULT_RHO_VASSO",
  "DEFAULT_SPARSITY",
  "MODELS",
  "VARIANTS",
  "DemoConfig",
  "Variant",
  "add_demo_arguments",
  "check_config",
  "check_demo_arguments",
  "config_from_args",
  "format_table",
  "init_mlp",
  "init_seeds",
  "load_digits_split",
  "make_epoch",
  "mlp_apply",
  "run_command",
  "run_demo",
  "symmetric_label_noise",
  "train",
]

NUM_CLASSES = 10
NUM_TRAIN = 1000
LAYER_SIZES = (64, 256, 256, NUM_CLASSES)
MOMENTUM = 0.9
DEFAULT_RHO_SAM = 1.0
DEFAULT_RHO_ASAM = 3.0
DEFAULT_RHO_MSAM = 0.1  # the only radius of the sweep that trains at every m
DEFAULT_MSAM_M = (64, 16, 4, 1)  # shard sizes of the mSAM sweep (batch 64: 1 to 64 shards)
DEFAULT_RHO_FSAM = 1.0  # SAM's radius; trains (see the calibration in the module doc)
DEFAULT_RHO_VASSO = 0.5  # rho = 1 sits near chance like SAM's on ln-mlp
DEFAULT_RHO_SAM_ON = 2.0  # the largest stable radius tried (3 breaks one seed of two)
DEFAULT_RHO_SSAM = 1.0
DEFAULT_SPARSITY = 0.5
SSAM_NUM_SAMPLES = 16  # examples of the batch in the Fisher sum (samx.ssam's default)
SSAM_REFRESH_EVERY = 100  # steps between Fisher-mask refreshes (samx.ssam's default)
MODELS = ("mlp", "ln-mlp")
"""``mlp``: the ReLU MLP; ``ln-mlp``: the same with a LayerNorm after each hidden Dense."""
ASAM_ETA = 0.01
SPLIT_SEED = 0  # the train/test split is fixed, independent of --seeds


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Settings of one demo run; the CLI flags map one to one onto these fields.

  Attributes:
    variants: the optimizers to compare, names from :data:`VARIANTS`.
    rho_sam: SAM's radius.
    rho_asam: ASAM's radius (with ``eta = 0.01``).
    rho_msam: mSAM's radius (the same for every ``m``).
    rho_fsam: F-SAM's radius (``sigma=1``, ``decay=0.9``).
    rho_vasso: VaSSO's radius (``theta=0.9``).
    rho_sam_on: SAM-ON's radius (the norm-layer parameters only; ``model="ln-mlp"``).
    rho_ssam: SSAM-F's radius.
    sparsity: SSAM-F's sparsity, the fraction of the entries not perturbed.
    ssam_kinds: the SSAM rows: ``fisher`` (unstructured Fisher), ``structured``
      (whole leaves by mean Fisher), ``2:4`` (N:M along the input dimension; sets its
      own density), ``dynamic`` (dynamic sparse mask).
    model: ``"mlp"`` or ``"ln-mlp"`` (see :data:`MODELS`).
    msam_m: the shard sizes ``m`` of the ``msam`` variant, one row each; every ``m``
      must divide ``batch_size`` (``micro_shards = batch_size // m``).
    noise: the fraction of training labels replaced by a different class.
    epochs: passes over the 1,000 training examples.
    seeds: how many seeds (``0 .. seeds - 1``), trained together under ``vmap``.
    lr: SGD's learning rate (momentum 0.9 for every optimizer).
    batch_size: minibatch size; the last incomplete batch of an epoch is dropped.
    out: the folder for ``accuracy.png`` and ``results.json``.
    progress: show a tqdm progress bar over epochs.
  """

  variants: tuple[str, ...] = ("sgd", "sam", "asam")
  rho_sam: float = DEFAULT_RHO_SAM
  rho_asam: float = DEFAULT_RHO_ASAM
  rho_msam: float = DEFAULT_RHO_MSAM
  msam_m: tuple[int, ...] = DEFAULT_MSAM_M
  rho_fsam: float = DEFAULT_RHO_FSAM
  rho_vasso: float = DEFAULT_RHO_VASSO
  rho_sam_on: float = DEFAULT_RHO_SAM_ON
  rho_ssam: float = DEFAULT_RHO_SSAM
  sparsity: float = DEFAULT_SPARSITY
  ssam_kinds: tuple[str, ...] = ("fisher",)
  model: str = "mlp"
  noise: float = 0.4
  epochs: int = 150
  seeds: int = 3
  lr: float = 0.05
  batch_size: int = 64
  out: str = "samx-output"
  progress: bool = True


@dataclasses.dataclass(frozen=True)
class Variant:
  """One optimizer of the comparison: one row of the table.

  Attributes:
    key: the row's key in ``results.json`` (``"sgd"``, ``"sam"``, ``"msam_m16"``, ...).
    label: the name shown in the table and the plot.
    rho: the radius, ``None`` for plain SGD.
    tx: the optax transformation.
    contract: how ``update`` is called: ``None`` (plain optax), ``"grad_fn"`` (the
      samx contract), ``"per_example"`` (``per_example_loss_fn`` and ``batch``, zero
      grads: micro-shard mSAM) or ``"per_example_grads"`` (the same with the clean
      batch gradient as ``grads``: SSAM-F, whose ascent uses it).
    m: mSAM's shard size, ``None`` for the other optimizers.
    seed_axis: how the seeds are batched (see :func:`make_epoch`): ``"vmap"``, or
      ``"map"`` for the optimizers whose step holds a ``lax.cond`` that must stay a
      branch (SSAM's mask refresh, LookSAM's skipped second pass).
    factory: ``rho -> tx``, the same optimizer at another radius (``tx`` is
      ``factory(rho)``); the radius may be a traced array, e.g. a hyperparameter
      of :func:`optax.inject_hyperparams` (``rho`` is its only argument: the
      wrapper would turn numeric defaults into hyperparameters too). ``None`` for
      plain SGD.
  """

  key: str
  label: str
  rho: float | None
  tx: optax.GradientTransformation
  contract: str | None
  m: int | None = None
  seed_axis: str = "vmap"
  factory: Callable[[Any], optax.GradientTransformation] | None = None


def _base(config: DemoConfig) -> optax.GradientTransformation:
  return optax.sgd(config.lr, momentum=MOMENTUM)


def _variant(key, label, rho, factory, contract, **fields) -> Variant:
  """A :class:`Variant` whose ``tx`` is ``factory(rho)``."""
  return Variant(key, label, rho, factory(rho), contract, factory=factory, **fields)


def _sgd(config: DemoConfig) -> tuple[Variant, ...]:
  return (Variant("sgd", "SGD", None, _base(config), None),)


def _sam(config: DemoConfig) -> tuple[Variant, ...]:
  factory = lambda rho: sam(_base(config), rho=rho)
  label = f"SAM (rho={config.rho_sam:g})"
  return (_variant("sam", label, config.rho_sam, factory, "grad_fn"),)


def _asam(config: DemoConfig) -> tuple[Variant, ...]:
  factory = lambda rho: asam(_base(config), rho=rho, eta=ASAM_ETA)
  label = f"ASAM (rho={config.rho_asam:g})"
  return (_variant("asam", label, config.rho_asam, factory, "grad_fn"),)


def _msam(config: DemoConfig) -> tuple[Variant, ...]:
  _check_msam_m(config.msam_m, config.batch_size)
  rows = []
  for m in config.msam_m:
    shards = config.batch_size // m
    factory = _msam_factory(config, shards)
    contract = "grad_fn" if shards == 1 else "per_example"
    label = f"mSAM (m={m})"
    rows.append(_variant(f"msam_m{m}", label, config.rho_msam, factory, contract, m=m))
  return tuple(rows)


def _msam_factory(config: DemoConfig, shards: int) -> Callable[[Any], Any]:
  return lambda rho: msam(_base(config), rho=rho, micro_shards=shards)


def _fsam(config: DemoConfig) -> tuple[Variant, ...]:
  factory = lambda rho: fsam(_base(config), rho=rho)
  label = f"F-SAM (rho={config.rho_fsam:g})"
  return (_variant("fsam", label, config.rho_fsam, factory, "grad_fn"),)


def _gsam(config: DemoConfig) -> tuple[Variant, ...]:
  factory = lambda rho: gsam(_base(config), rho=rho, alpha=0.4)
  label = f"GSAM (rho={config.rho_sam:g}, alpha=0.4)"
  return (_variant("gsam", label, config.rho_sam, factory, "grad_fn"),)


def _wsam(config: DemoConfig) -> tuple[Variant, ...]:
  factory = lambda rho: wsam(_base(config), rho=rho, gamma=0.9, learning_rate=config.lr)
  label = f"WSAM (rho={config.rho_sam:g}, gamma=0.9, decoupled)"
  return (_variant("wsam", label, config.rho_sam, factory, "grad_fn"),)


def _looksam(config: DemoConfig) -> tuple[Variant, ...]:
  factory = lambda rho: looksam(_base(config), rho=rho, k=5, alpha=0.7)
  label = f"LookSAM (rho={config.rho_sam:g}, k=5)"
  return (_variant("looksam", label, config.rho_sam, factory, "grad_fn", seed_axis="map"),)


def _esam(config: DemoConfig) -> tuple[Variant, ...]:
  factory = lambda rho: esam(_base(config), rho=rho, beta=0.5, gamma=0.5)
  label = f"ESAM (rho={config.rho_sam:g}, beta=gamma=0.5)"
  return (_variant("esam", label, config.rho_sam, factory, "per_example_grads"),)


def _vasso(config: DemoConfig) -> tuple[Variant, ...]:
  factory = lambda rho: vasso(_base(config), rho=rho)
  label = f"VaSSO (rho={config.rho_vasso:g})"
  return (_variant("vasso", label, config.rho_vasso, factory, "grad_fn"),)


def _sam_on(config: DemoConfig) -> tuple[Variant, ...]:
  _check_sam_on_model(config.variants, config.model)
  # The mask is the callable, applied to each seed's params inside the vmapped
  # init/update (the batched leaves would be 2-D and not look like a norm layer).
  factory = lambda rho: sam_on(_base(config), rho=rho, mask=norm_layers)
  label = f"SAM-ON (rho={config.rho_sam_on:g})"
  return (_variant("sam_on", label, config.rho_sam_on, factory, "grad_fn"),)


def _ssam_factory(config: DemoConfig, mask_type: str, pattern: str, n_m: bool):
  return lambda rho: ssam(
    _base(config),
    rho=rho,
    sparsity=None if n_m else config.sparsity,
    mask_type=mask_type,
    pattern=pattern,
    num_samples=SSAM_NUM_SAMPLES,
    refresh_every=SSAM_REFRESH_EVERY,
  )


def _ssam(config: DemoConfig) -> tuple[Variant, ...]:
  rows = []
  for kind in config.ssam_kinds:
    mask_type, pattern = _SSAM_KINDS[kind]
    n_m = ":" in pattern
    factory = _ssam_factory(config, mask_type, pattern, n_m)
    tag = "F" if mask_type == "fisher" else "D"
    detail = pattern if n_m else f"{pattern}, s={config.sparsity:g}"
    label = f"SSAM-{tag} (rho={config.rho_ssam:g}, {detail})"
    key = "ssam" if kind == "fisher" else f"ssam_{kind.replace(':', '_')}"
    contract = "per_example_grads"
    rows.append(_variant(key, label, config.rho_ssam, factory, contract, seed_axis="map"))
  return tuple(rows)


# --ssam-kinds names: (mask_type, pattern). "fisher" is unstructured Fisher (SSAM-F).
_SSAM_KINDS = {
  "fisher": ("fisher", "unstructured"),
  "structured": ("fisher", "structured"),
  "2:4": ("fisher", "2:4"),
  "dynamic": ("dynamic", "unstructured"),
}


VARIANTS: dict[str, Callable[[DemoConfig], tuple[Variant, ...]]] = {
  "sgd": _sgd,
  "sam": _sam,
  "asam": _asam,
  "msam": _msam,
  "fsam": _fsam,
  "vasso": _vasso,
  "gsam": _gsam,
  "wsam": _wsam,
  "looksam": _looksam,
  "esam": _esam,
  "sam_on": _sam_on,
  "ssam": _ssam,
}
"""The optimizers the demo knows, by ``--variants`` name; each gives one or more rows."""


def _check_msam_m(msam_m: Sequence[int], batch_size: int) -> None:
  bad = [m for m in msam_m if not isinstance(m, int) or m < 1 or batch_size % m]
  if bad or not msam_m or len(set(msam_m)) != len(msam_m):
    raise ValueError(
      f"msam_m (--msam-m) must be distinct shard sizes m >= 1 that divide the batch size "
      f"{batch_size}; got {tuple(msam_m)}"
    )


def _check_sam_on_model(variants: Sequence[str], model: str) -> None:
  if "sam_on" in variants and model != "ln-mlp":
    raise ValueError(
      "the sam_on variant perturbs only the normalization layers and needs a model "
      f"that has some: use --model ln-mlp (got --model {model})"
    )


def check_config(config: DemoConfig) -> None:
  """Raises ``ValueError`` for settings that are invalid together (flags that argparse
  cannot check one at a time): mSAM shard sizes, SAM-ON without LayerNorm, sparsity."""
  if config.model not in MODELS:
    raise ValueError(f"model must be one of {MODELS}; got {config.model!r}")
  if "msam" in config.variants:
    _check_msam_m(config.msam_m, config.batch_size)
  _check_sam_on_model(config.variants, config.model)
  if not 0.0 <= config.sparsity < 1.0:
    raise ValueError(f"sparsity (--sparsity) must be in [0, 1); got {config.sparsity}")


# ---------------------------------------------------------------------------- data


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Loads digits with the fixed 1,000 / 797 train / test split, pixels scaled by 1/16.

  Returns:
    ``(x_train, y_train, x_test, y_test)``: float32 inputs of shape ``(n, 64)`` in
    [0, 1] and int32 labels in ``0 .. 9``; the labels are clean.
  """
  try:
    from sklearn.datasets import load_digits
  except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("the samx demo needs scikit-learn: pip install 'samx[examples]'") from err
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
  train, test = order[:NUM_TRAIN], order[NUM_TRAIN:]
  return x[train], y[train], x[test], y[test]


def symmetric_label_noise(
  key: jax.Array, labels: jax.Array, noise: float, num_classes: int = NUM_CLASSES
) -> jax.Array:
  """Replaces exactly ``round(noise * n)`` labels by a uniformly random other class.

  The flipped examples are drawn uniformly without replacement; each gets a label
  drawn uniformly from the ``num_classes - 1`` classes other than its own, so the
  realised noise rate is exactly ``round(noise * n) / n``. Works under ``vmap``
  over ``key``.

  Args:
    key: a PRNG key.
    labels: int labels of shape ``(n,)``.
    noise: the flip rate, in [0, 1].
    num_classes: the number of classes, >= 2.

  Returns:
    The noisy labels, same shape and dtype as ``labels``.

  >>> y = jnp.zeros(10, jnp.int32)
  >>> noisy = symmetric_label_noise(jax.random.key(0), y, 0.3)
  >>> int((noisy != y).sum())
  3
  """
  if not 0.0 <= noise <= 1.0:
    raise ValueError(f"noise must be in [0, 1], got {noise}")
  n = labels.shape[0]
  num_flipped = round(noise * n)
  key_which, key_offset = jax.random.split(key)
  flipped = jax.random.permutation(key_which, n)[:num_flipped]
  offsets = jax.random.randint(key_offset, (num_flipped,), 1, num_classes)
  new = (labels[flipped] + offsets.astype(labels.dtype)) % num_classes
  return labels.at[flipped].set(new)


# ---------------------------------------------------------------------------- model


def init_mlp(
  key: jax.Array, sizes: Sequence[int] = LAYER_SIZES, *, layer_norm: bool = False
) -> list[dict[str, Any]]:
  """He-normal kernels and zero biases for an MLP with the given layer sizes.

  Args:
    key: a PRNG key.
    sizes: the layer widths, input first.
    layer_norm: add a LayerNorm after each hidden Dense (the ``ln-mlp`` model).

  Returns:
    A list of ``{"w": (fan_in, fan_out), "b": (fan_out,)}`` dicts, one per layer;
    with ``layer_norm`` the hidden layers also hold ``"norm": {"scale": ones,
    "bias": zeros}`` of shape ``(fan_out,)``, the structure that
    :func:`samx.masks.norm_layers` recognises.

  >>> params = init_mlp(jax.random.key(0), (4, 3, 2), layer_norm=True)
  >>> from samx.masks import selected_paths
  >>> selected_paths(norm_layers, params)
  ['0/norm/bias', '0/norm/scale']
  """
  keys = jax.random.split(key, len(sizes) - 1)
  init = jax.nn.initializers.he_normal()
  layers: list[dict[str, Any]] = [
    {"w": init(k, (m, n), jnp.float32), "b": jnp.zeros((n,), jnp.float32)}
    for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
  ]
  if layer_norm:
    for layer in layers[:-1]:
      b = layer["b"]
      layer["norm"] = {"scale": jnp.ones_like(b), "bias": jnp.zeros_like(b)}
  return layers


def _dense(layer: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  return x @ layer["w"] + jnp.expand_dims(layer["b"], range(x.ndim - 1))


def _layer_norm(norm: dict[str, jax.Array], x: jax.Array, eps: float = 1e-6) -> jax.Array:
  mean = x.mean(axis=-1, keepdims=True)
  var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
  scale, bias = (jnp.expand_dims(norm[k], range(x.ndim - 1)) for k in ("scale", "bias"))
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def mlp_apply(params: list[dict[str, Any]], x: jax.Array) -> jax.Array:
  """The logits of the ReLU MLP for inputs ``x`` of shape ``(..., 64)``.

  A hidden layer with a ``"norm"`` entry (``init_mlp(..., layer_norm=True)``) applies
  a LayerNorm (epsilon 1e-6, as ``flax.linen.LayerNorm``) between its Dense and the ReLU.
  """
  for layer in params[:-1]:
    h = _dense(layer, x)
    if "norm" in layer:
      h = _layer_norm(layer["norm"], h)
    x = jax.nn.relu(h)
  return _dense(params[-1], x)


def _per_example_loss(params, batch):
  """The ``(B,)`` cross-entropies of ``batch = (x, y)``: samx's per-example contract."""
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(params, x), y)


def _loss(params, x, y):
  return _per_example_loss(params, (x, y)).mean()


def _accuracy(params, x, y):
  return (jnp.argmax(mlp_apply(params, x), axis=-1) == y).mean()


# ---------------------------------------------------------------------------- training


def init_seeds(seeds: jax.Array, y_train: jax.Array, noise: float, model: str = "mlp"):
  """Per seed: the MLP's parameters, the noisy training labels and the shuffle key.

  Seed ``s`` splits ``jax.random.key(s)`` into the initialisation, the noise draw and
  the shuffle key, so two calls with the same seed and different ``noise`` start from
  the same weights and batch order, and the examples flipped at a lower rate are a
  subset of those flipped at a higher one (the first ``round(noise * n)`` of one
  permutation).

  Args:
    seeds: int seeds of shape ``(n,)``.
    y_train: the clean training labels.
    noise: the label-noise rate (see :func:`symmetric_label_noise`).
    model: ``"mlp"`` or ``"ln-mlp"``.

  Returns:
    ``(params, y_noisy, key_shuffle)``, each with a leading axis of length ``n``.
  """
  params, key_shuffle = _init_params(seeds, model=model)
  return params, _noisy_labels(seeds, y_train, noise=noise), key_shuffle


def _seed_keys(seed: jax.Array) -> jax.Array:
  """``(key_init, key_noise, key_shuffle)`` of a seed."""
  return jax.random.split(jax.random.key(seed), 3)


@functools.partial(jax.jit, static_argnames=("model",))
def _init_params(seeds: jax.Array, *, model: str):
  # Compiled once per model (and shapes), apart from the labels: the initialiser takes
  # seconds to compile and does not depend on the noise rate.
  def one(seed):
    key_init, _, key_shuffle = _seed_keys(seed)
    return init_mlp(key_init, layer_norm=model == "ln-mlp"), key_shuffle

  return jax.vmap(one)(seeds)


@functools.partial(jax.jit, static_argnames=("noise",))
def _noisy_labels(seeds: jax.Array, y_train: jax.Array, *, noise: float) -> jax.Array:
  def one(seed):
    return symmetric_label_noise(_seed_keys(seed)[1], y_train, noise)

  return jax.vmap(one)(seeds)


def make_epoch(variant: Variant, batch_size: int, data, *, seed_axis: str | None = None):
  """Returns ``epoch(params, opt_state, y_noisy, key_shuffle, epoch)``, jitted and
  batched over seeds: one scan over the epoch's minibatches, then the clean test
  accuracy.

  Args:
    variant: the optimizer (its ``tx`` and call contract).
    batch_size: the minibatch size; the last incomplete batch is dropped.
    data: ``(x_train, y_train, x_test, y_test)`` from :func:`load_digits_split`.
    seed_axis: how the seeds (the leading axis of every argument but ``epoch``)
      are batched: ``"vmap"`` trains them together under :func:`jax.vmap`;
      ``"map"`` one after the other under :func:`jax.lax.map`, which keeps a
      ``lax.cond`` in the step a real branch (under ``vmap`` it becomes a
      ``select`` that runs both sides: SSAM's mask refresh, LookSAM's skipped
      second pass). ``None``: :attr:`Variant.seed_axis`.

  Returns:
    The jitted epoch function; it returns ``(params, opt_state, mean train loss,
    clean test accuracy)``, each per seed.
  """
  x_train, _, x_test, y_test = (jnp.asarray(a) for a in data)
  tx = variant.tx
  n = x_train.shape[0]
  steps = n // batch_size
  if steps == 0:
    raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples")

  def step(carry, idx):
    params, opt_state, y_noisy = carry
    x, y = x_train[idx], y_noisy[idx]
    if variant.contract == "per_example":
      # Micro-shard mSAM computes each shard's clean gradient itself and ignores the
      # grads given to update: pass zeros, and log the loss of a forward pass.
      loss = _loss(params, x, y)
      zeros = jax.tree.map(jnp.zeros_like, params)
      updates, opt_state = tx.update(
        zeros, opt_state, params, per_example_loss_fn=_per_example_loss, batch=(x, y)
      )
    elif variant.contract == "per_example_grads":
      # SSAM-F: the Fisher mask needs the examples, the ascent the clean gradient.
      loss, grads = jax.value_and_grad(_loss)(params, x, y)
      updates, opt_state = tx.update(
        grads, opt_state, params, per_example_loss_fn=_per_example_loss, batch=(x, y)
      )
    elif variant.contract == "grad_fn":
      loss, grads = jax.value_and_grad(_loss)(params, x, y)
      grad_fn = lambda p: jax.grad(_loss)(p, x, y)
      updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    else:
      loss, grads = jax.value_and_grad(_loss)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state, y_noisy), loss

  def epoch_one(params, opt_state, y_noisy, key_shuffle, epoch):
    order = jax.random.permutation(jax.random.fold_in(key_shuffle, epoch), n)
    batches = order[: steps * batch_size].reshape(steps, batch_size)
    (params, opt_state, _), losses = jax.lax.scan(step, (params, opt_state, y_noisy), batches)
    return params, opt_state, losses.mean(), _accuracy(params, x_test, y_test)

  seed_axis = variant.seed_axis if seed_axis is None else seed_axis
  if seed_axis == "vmap":
    return jax.jit(jax.vmap(epoch_one, in_axes=(0, 0, 0, 0, None)))
  if seed_axis != "map":
    raise ValueError(f"seed_axis must be 'vmap' or 'map'; got {seed_axis!r}")

  def epoch_seeds(params, opt_state, y_noisy, key_shuffle, epoch):
    one = lambda args: epoch_one(*args, epoch)
    return jax.lax.map(one, (params, opt_state, y_noisy, key_shuffle))

  return jax.jit(epoch_seeds)


def train(
  variant: Variant,
  epochs: int,
  batch_size: int,
  data,
  init,
  *,
  seed_axis: str | None = None,
  on_epoch: Callable[[int, jax.Array], None] | None = None,
  opt_state: Any = None,
) -> dict[str, np.ndarray]:
  """Trains ``variant`` from :func:`init_seeds`' ``init`` for ``epochs`` epochs.

  Args:
    variant: the optimizer.
    epochs: passes over the training set.
    batch_size: the minibatch size.
    data: ``(x_train, y_train, x_test, y_test)`` from :func:`load_digits_split`.
    init: ``(params, y_noisy, key_shuffle)`` with a leading seed axis.
    seed_axis: ``"vmap"`` or ``"map"`` (see :func:`make_epoch`).
    on_epoch: called after each epoch with its index and the per-seed accuracies.
    opt_state: the initial optimizer state, with the leading seed axis (default:
      ``variant.tx.init`` of each seed's parameters).

  Returns:
    ``{"test_accuracy": ..., "train_loss": ...}``, NumPy arrays of shape
    ``(seeds, epochs)``: the clean test accuracy after each epoch and the mean
    training loss (on the noisy labels) over each epoch's steps.
  """
  params, y_noisy, key_shuffle = init
  if opt_state is None:
    opt_state = jax.jit(jax.vmap(variant.tx.init))(params)
  epoch = make_epoch(variant, batch_size, data, seed_axis=seed_axis)
  accuracies, losses = [], []
  for e in range(epochs):
    params, opt_state, loss, acc = epoch(params, opt_state, y_noisy, key_shuffle, e)
    accuracies.append(acc)
    losses.append(loss)
    if on_epoch is not None:
      on_epoch(e, acc)
  return {
    "test_accuracy": np.asarray(jnp.stack(accuracies, axis=1)),  # (seeds, epochs)
    "train_loss": np.asarray(jnp.stack(losses, axis=1)),
  }


def _bar_update(bar) -> Callable[[int, jax.Array], None] | None:
  """An ``on_epoch`` callback that advances the tqdm ``bar`` (``None``: no callback)."""
  if bar is None:
    return None

  def update(epoch: int, accuracy: jax.Array) -> None:
    bar.set_postfix_str(f"test acc {float(accuracy.mean()):.3f}")
    bar.update()

  return update


def _summary(values: np.ndarray) -> dict[str, Any]:
  return {
    "per_seed": [float(v) for v in values],
    "mean": float(values.mean()),
    "std": float(values.std()),
  }


def run_demo(config: DemoConfig) -> dict[str, Any]:
  """Trains every variant over every seed and writes the plot and the JSON file.

  Args:
    config: the settings.

  Returns:
    The dictionary saved as ``results.json``: ``"config"``, ``"data"``,
    ``"results"`` (per row, keyed by :attr:`Variant.key`: ``"label"``, ``"rho"``,
    ``"m"`` (mSAM rows only), ``"test_accuracy"`` and
    ``"train_loss"`` as ``seeds x epochs`` lists, ``"final"`` and ``"best"``
    summaries with ``"per_seed"``, ``"mean"``, ``"std"``, and ``"seconds"``),
    ``"files"`` and ``"seconds"``.
  """
  unknown = [v for v in config.variants if v not in VARIANTS]
  if unknown or not config.variants:
    raise ValueError(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
  if config.epochs < 1 or config.seeds < 1:
    raise ValueError("epochs and seeds must be >= 1")
  check_config(config)
  start = time.perf_counter()
  rows = [v for name in config.variants for v in VARIANTS[name](config)]
  data = load_digits_split()
  init = init_seeds(jnp.arange(config.seeds), jnp.asarray(data[1]), config.noise, config.model)
  bar = None
  if config.progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=config.epochs * len(rows), unit="epoch", dynamic_ncols=True)
  results = {}
  try:
    for variant in rows:
      if bar is not None:
        bar.set_description(variant.label)
      t0 = time.perf_counter()
      curves = train(
        variant, config.epochs, config.batch_size, data, init, on_epoch=_bar_update(bar)
      )
      acc = curves["test_accuracy"]
      results[variant.key] = {
        "label": variant.label,
        "rho": variant.rho,
        **({} if variant.m is None else {"m": variant.m}),
        "test_accuracy": acc.tolist(),
        "train_loss": curves["train_loss"].tolist(),
        "final": _summary(acc[:, -1]),
        "best": _summary(acc.max(axis=1)),
        "seconds": time.perf_counter() - t0,
      }
  finally:
    if bar is not None:
      bar.close()

  out = Path(config.out)
  out.mkdir(parents=True, exist_ok=True)
  plot_path, json_path = out / "accuracy.png", out / "results.json"
  report = {
    "config": dataclasses.asdict(config) | {"asam_eta": ASAM_ETA, "momentum": MOMENTUM},
    "data": {
      "num_train": int(data[0].shape[0]),
      "num_test": int(data[2].shape[0]),
      "num_flipped": round(config.noise * data[0].shape[0]),
      "layer_sizes": list(LAYER_SIZES),
      "layer_norm": config.model == "ln-mlp",
      "steps_per_epoch": data[0].shape[0] // config.batch_size,
    },
    "results": results,
    "files": {"plot": str(plot_path), "json": str(json_path)},
  }
  _plot(results, config, plot_path)
  report["seconds"] = time.perf_counter() - start
  json_path.write_text(json.dumps(report, indent=2) + "\n")
  return report


def _plot(results: dict[str, Any], config: DemoConfig, path: Path) -> None:
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("the samx demo needs matplotlib: pip install 'samx[examples]'") from err
  fig = Figure(figsize=(7, 4.5), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for entry in results.values():
    acc = np.asarray(entry["test_accuracy"])
    epochs = np.arange(1, acc.shape[1] + 1)
    mean, std = acc.mean(axis=0), acc.std(axis=0)
    (line,) = ax.plot(epochs, mean, label=entry["label"])
    ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.25)
  ax.set_xlabel("epoch")
  ax.set_ylabel("clean test accuracy")
  model = "MLP 64-256-256-10" + (" + LayerNorm" if config.model == "ln-mlp" else "")
  ax.set_title(
    f"digits, {model}, {config.noise:.0%} symmetric label noise "
    f"(mean ± std, {config.seeds} seed{'s' if config.seeds > 1 else ''})",
    fontsize=10,
  )
  ax.set_ylim(0.0, 1.0)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  fig.savefig(path, dpi=120)


def format_table(report: dict[str, Any]) -> str:
  """The table of final and best clean test accuracy, mean ± std over seeds."""
  rows = [(e["label"], e["final"], e["best"]) for e in report["results"].values()]
  width = max(len("optimizer"), *(len(label) for label, _, _ in rows))
  seeds = report["config"]["seeds"]
  cell = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"
  lines = [
    f"clean test accuracy, mean ± std over {seeds} seed{'s' if seeds > 1 else ''}",
    f"{'optimizer':<{width}}  {'final':>13}  {'best':>13}",
    f"{'-' * width}  {'-' * 13}  {'-' * 13}",
  ]
  lines += [f"{label:<{width}}  {cell(f):>13}  {cell(b):>13}" for label, f, b in rows]
  return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def _nonnegative_float(text: str) -> float:
  value = float(text)
  if not value >= 0.0 or not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
  return value


def _fraction(text: str) -> float:
  value = _nonnegative_float(text)
  if value > 1.0:
    raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
  return value


def _shard_sizes(text: str) -> tuple[int, ...]:
  try:
    sizes = tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    sizes = ()
  if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
    raise argparse.ArgumentTypeError(
      f"must be distinct integers >= 1 separated by commas, e.g. 64,16,4,1; got {text!r}"
    )
  return sizes


def _variant_list(text: str) -> tuple[str, ...]:
  names = tuple(v.strip().lower() for v in text.split(",") if v.strip())
  unknown = [v for v in names if v not in VARIANTS]
  if unknown or not names:
    raise argparse.ArgumentTypeError(
      f"unknown variant(s) {', '.join(unknown) or '(none given)'}; "
      f"choose from {', '.join(VARIANTS)}"
    )
  return names


def _ssam_kind_list(text: str) -> tuple[str, ...]:
  kinds = tuple(k.strip() for k in text.split(",") if k.strip())
  unknown = [k for k in kinds if k not in _SSAM_KINDS]
  if not kinds or unknown:
    raise argparse.ArgumentTypeError(
      f"--ssam-kinds: unknown {unknown or text!r}; choose from {', '.join(_SSAM_KINDS)}"
    )
  return kinds


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the demo's flags (one per :class:`DemoConfig` field) to ``parser``."""
  d = DemoConfig()
  parser.add_argument(
    "--variants",
    type=_variant_list,
    default=d.variants,
    help=f"comma-separated optimizers from {','.join(VARIANTS)} ({','.join(d.variants)})",
  )
  parser.add_argument(
    "--rho-sam", type=_nonnegative_float, default=d.rho_sam, help="SAM radius (%(default)s)"
  )
  parser.add_argument(
    "--rho-asam",
    type=_nonnegative_float,
    default=d.rho_asam,
    help=f"ASAM radius, eta={ASAM_ETA} (%(default)s)",
  )
  parser.add_argument(
    "--rho-msam",
    type=_nonnegative_float,
    default=d.rho_msam,
    help="mSAM radius, the same for every m (%(default)s)",
  )
  parser.add_argument(
    "--msam-m",
    type=_shard_sizes,
    default=d.msam_m,
    metavar="M[,M...]",
    help="mSAM shard sizes, one row each; each must divide --batch-size, "
    f"micro_shards = batch_size // m ({','.join(map(str, d.msam_m))})",
  )
  parser.add_argument(
    "--model",
    choices=MODELS,
    default=d.model,
    help="mlp, or ln-mlp: a LayerNorm after each hidden Dense (needed by sam_on) (%(default)s)",
  )
  parser.add_argument(
    "--rho-fsam",
    type=_nonnegative_float,
    default=d.rho_fsam,
    help="F-SAM radius, sigma=1, decay=0.9 (%(default)s)",
  )
  parser.add_argument(
    "--rho-vasso",
    type=_nonnegative_float,
    default=d.rho_vasso,
    help="VaSSO radius, theta=0.9 (%(default)s)",
  )
  parser.add_argument(
    "--rho-sam-on",
    type=_nonnegative_float,
    default=d.rho_sam_on,
    help="SAM-ON radius, LayerNorm scales and biases only; needs --model ln-mlp (%(default)s)",
  )
  parser.add_argument(
    "--rho-ssam",
    type=_nonnegative_float,
    default=d.rho_ssam,
    help="SSAM-F radius (%(default)s)",
  )
  parser.add_argument(
    "--sparsity",
    type=_fraction,
    default=d.sparsity,
    help="SSAM-F: fraction of the entries not perturbed, unstructured Fisher mask, "
    "in [0, 1) (%(default)s)",
  )
  parser.add_argument(
    "--ssam-kinds",
    type=_ssam_kind_list,
    default=d.ssam_kinds,
    help="comma-separated SSAM rows from fisher,structured,2:4,dynamic (%(default)s)",
  )
  parser.add_argument(
    "--noise",
    type=_fraction,
    default=d.noise,
    help="fraction of training labels flipped to another class (%(default)s)",
  )
  parser.add_argument("--epochs", type=_positive_int, default=d.epochs, help="(%(default)s)")
  parser.add_argument(
    "--seeds", type=_positive_int, default=d.seeds, help="seeds 0..N-1 (%(default)s)"
  )
  parser.add_argument("--lr", type=_nonnegative_float, default=d.lr, help="(%(default)s)")
  parser.add_argument(
    "--batch-size", type=_positive_int, default=d.batch_size, help="(%(default)s)"
  )
  parser.add_argument("--out", default=d.out, help="output folder (%(default)s)")
  parser.add_argument(
    "-q",
    "--quiet",
    "--no-progress",
    dest="progress",
    action="store_false",
    help="no progress bar (the table is still printed)",
  )


def check_demo_arguments(args: argparse.Namespace) -> None:
  """Raises ``ValueError`` for flags that are invalid together, for ``parser.error``:
  ``--variants ...,sam_on`` without ``--model ln-mlp``, ``--sparsity 1``. (mSAM's
  ``--msam-m`` is checked by :func:`run_command`, exit status 2.)"""
  variants = getattr(args, "variants", ())
  _check_sam_on_model(variants, getattr(args, "model", "mlp"))
  if "ssam" in variants and getattr(args, "sparsity", 0.0) >= 1.0:
    raise ValueError(f"--sparsity must be < 1 (got {args.sparsity})")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
  """The :class:`DemoConfig` of parsed demo flags."""
  fields = {f.name for f in dataclasses.fields(DemoConfig)}
  return DemoConfig(**{k: v for k, v in vars(args).items() if k in fields})


def run_command(args: argparse.Namespace) -> int:
  """Runs the demo for parsed flags and prints the table; returns the exit status."""
  config = config_from_args(args)
  if "msam" in config.variants:
    try:
      _check_msam_m(config.msam_m, config.batch_size)
    except ValueError as err:
      print(f"samx demo: error: {err}", file=sys.stderr)
      return 2
  report = run_demo(config)
  print(format_table(report))
  files = report["files"]
  print(f"saved {files['plot']} and {files['json']} ({report['seconds']:.0f} s)")
  return 0
