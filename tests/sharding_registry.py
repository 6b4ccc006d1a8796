"""One registry of every samx variant for the sharding conformance suite.

Each entry builds the optimizer for one of three places:

* ``"single"``: one device, the reference;
* ``"axis"``: under ``pmap`` / ``shard_map`` with the data axis named ``AXIS``;
* ``"jit"``: under ``jax.jit`` over a sharded batch (and possibly sharded params),
  with no axis name.

``per_device_eps`` entries keep one ``eps`` per device (m-sharpness): their
single-device reference and their ``jit`` form use ``micro_shards=DEVICES`` (one
micro-shard per device's slice of the batch, in order), their ``axis`` form
``sync_ascent=False`` with the axis name.

``contract`` is ``"grad_fn"`` or ``"per_example"`` (``per_example_loss_fn`` and
``batch``). The problem is a small tanh MLP whose leaves have a leading dimension
divisible by the device count, so FSDP can shard every large leaf on dim 0.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import samx

DEVICES = 8
PER_DEVICE = 4
BATCH = DEVICES * PER_DEVICE
AXIS = "data"
IN, HIDDEN, OUT = 8, 16, 8


def make_problem(seed: int = 0, steps: int = 3):
  rng = np.random.default_rng(seed)
  params = {
    "W1": rng.normal(size=(IN, HIDDEN)) / np.sqrt(IN),
    "b1": rng.normal(size=(HIDDEN,)) * 0.1,
    "W2": rng.normal(size=(HIDDEN, OUT)) / np.sqrt(HIDDEN),
  }
  batches = [
    (rng.normal(size=(BATCH, IN)), rng.normal(size=(BATCH, OUT))) for _ in range(steps)
  ]
  to32 = lambda t: {k: jnp.asarray(v, jnp.float32) for k, v in t.items()}
  return to32(params), [tuple(jnp.asarray(a, jnp.float32) for a in b) for b in batches]


def gathered(params):
  """FSDP as users write it on an Explicit mesh: all-gather each sharded weight before use.

  (On an Auto mesh, and for replicated params, this is the identity: the compiler
  inserts the gathers.) Its transpose reduce-scatters the gradient.
  """

  def leaf(w):
    sharding = jax.typeof(w).sharding
    explicit = getattr(sharding.mesh, "are_all_axes_explicit", False)
    if explicit and any(s is not None for s in sharding.spec):
      return jax.sharding.reshard(w, P())
    return w

  return jax.tree.map(leaf, params)


def per_example_loss(params, batch):
  params = gathered(params)
  x, y = batch
  h = jnp.tanh(x @ params["W1"] + params["b1"][None, :])
  return 0.5 * jnp.sum((h @ params["W2"] - y) ** 2, axis=-1)


def loss(params, batch):
  """The way users write it: a plain mean over the (local) batch, no collective."""
  return jnp.mean(per_example_loss(params, batch))


@dataclasses.dataclass(frozen=True)
class Variant:
  build: Callable[..., Any]  # build(**kwargs) -> tx; kwargs: axis_name, micro_shards
  contract: str = "grad_fn"
  per_device_eps: bool = False
  micro_shards_per_device: int = 1
  rtol: float = 5e-5

  def make(self, where: str):
    k = self.micro_shards_per_device
    if self.per_device_eps:
      if where == "axis":
        return self.build(axis_name=AXIS, sync_ascent=False, micro_shards=k if k > 1 else None)
      return self.build(micro_shards=DEVICES * k)
    return self.build(axis_name=AXIS) if where == "axis" else self.build()


def _sgdm():
  return optax.sgd(0.1, momentum=0.9)


def _fisher_ssam(sparsity=None, pattern="unstructured", **kw):
  """SSAM-F; the Fisher of the global batch: every example once, summed over devices."""
  num_samples = PER_DEVICE if kw.get("axis_name") else BATCH
  return samx.ssam(
    _sgdm(),
    rho=0.05,
    sparsity=sparsity,
    pattern=pattern,
    num_samples=num_samples,
    refresh_every=2,
    **kw,
  )


_NORM_MASK = {"W1": False, "b1": True, "W2": False}


def _composition(**kw):
  """The README's "F-ASAM-ON" composition (a boolean mask for the norm-like leaves)."""
  return samx.sharpness_aware(
    optax.adamw(1e-2, weight_decay=0.05),
    ascent=samx.masked_ascent(
      optax.chain(
        samx.fsam_direction(sigma=1.0, decay=0.9),
        samx.scale_by_weight_magnitude(eta=0.01, mask=_NORM_MASK),
        samx.scale_by_sam(rho=1.0),
        samx.scale_by_weight_magnitude(eta=0.01, mask=_NORM_MASK),
      ),
      mask=_NORM_MASK,
    ),
    **kw,
  )


VARIANTS: dict[str, Variant] = {
  "sam": Variant(lambda **kw: samx.sam(_sgdm(), rho=0.05, **kw)),
  "sam_linf": Variant(lambda **kw: samx.sam(optax.sgd(0.1), rho=0.01, ball="linf", **kw)),
  "asam": Variant(lambda **kw: samx.asam(_sgdm(), rho=0.5, eta=0.01, **kw)),
  "asam_layerwise": Variant(lambda **kw: samx.asam(_sgdm(), rho=0.5, layerwise=True, **kw)),
  "msam": Variant(lambda **kw: samx.msam(_sgdm(), rho=0.05, **kw), per_device_eps=True),
  "sam_on": Variant(lambda **kw: samx.sam_on(_sgdm(), rho=0.5, mask=_NORM_MASK, **kw)),
  "ssam_fisher": Variant(functools.partial(_fisher_ssam, sparsity=0.5), contract="per_example"),
  "ssam_2:4": Variant(functools.partial(_fisher_ssam, pattern="2:4"), contract="per_example"),
  "ssam_structured": Variant(
    functools.partial(_fisher_ssam, sparsity=0.5, pattern="structured"), contract="per_example"
  ),
  "ssam_dynamic": Variant(
    lambda **kw: samx.ssam(
      _sgdm(),
      rho=0.05,
      sparsity=0.5,
      mask_type="dynamic",
      refresh_every=2,
      total_steps=10,
      **kw,
    ),
  ),
  "fsam": Variant(lambda **kw: samx.fsam(_sgdm(), rho=0.1, sigma=1.0, decay=0.9, **kw)),
  "vasso": Variant(lambda **kw: samx.vasso(_sgdm(), rho=0.05, theta=0.9, **kw)),
  "random_sam": Variant(lambda **kw: samx.random_sam(optax.sgd(0.1), rho=0.05, key=3, **kw)),
  "gsam": Variant(lambda **kw: samx.gsam(_sgdm(), rho=0.05, alpha=0.4, **kw)),
  "gsam_f": Variant(
    lambda **kw: samx.gsam(_sgdm(), rho=0.05, alpha=0.4, minimize_fp=False, **kw)
  ),
  "wsam": Variant(
    lambda **kw: samx.wsam(_sgdm(), rho=0.05, gamma=0.9, learning_rate=0.1, **kw)
  ),
  "wsam_coupled": Variant(
    lambda **kw: samx.wsam(_sgdm(), rho=0.05, gamma=0.7, decouple=False, **kw)
  ),
  "looksam": Variant(lambda **kw: samx.looksam(_sgdm(), rho=0.05, k=2, alpha=0.7, **kw)),
  "esam_swp": Variant(
    lambda **kw: samx.esam(_sgdm(), rho=0.05, beta=0.5, gamma=1.0, key=1, **kw),
    contract="per_example",
  ),
  "esam_sds": Variant(
    lambda **kw: samx.esam(_sgdm(), rho=0.05, beta=0.6, gamma=0.5, key=1, **kw),
    contract="per_example",
    per_device_eps=True,
  ),
  "composition": Variant(_composition),
  # Micro-shards inside each device, on top of the devices.
  "fsam_per_device_eps": Variant(
    lambda **kw: samx.fsam(_sgdm(), rho=0.1, **kw), contract="per_example", per_device_eps=True
  ),
  "sam_micro_shards": Variant(
    lambda **kw: samx.sam(_sgdm(), rho=0.05, **kw),
    contract="per_example",
    per_device_eps=True,
    micro_shards_per_device=2,
  ),
  "fsam_micro_shards": Variant(
    lambda **kw: samx.fsam(_sgdm(), rho=0.1, **kw),
    contract="per_example",
    per_device_eps=True,
    micro_shards_per_device=2,
  ),
  "gsam_per_device_eps": Variant(
    lambda **kw: samx.gsam(_sgdm(), rho=0.05, alpha=0.4, **kw),
    contract="per_example",
    per_device_eps=True,
  ),
  # A user's composition with one eps per device: the combination takes no axis
  # name; the pipeline averages g before it, so the replicas cannot drift apart.
  "gsam_composed_per_device_eps": Variant(
    lambda **kw: samx.sharpness_aware(
      _sgdm(), samx.scale_by_sam(0.05), combination=samx.surrogate_gap_guided(0.4), **kw
    ),
    contract="per_example",
    per_device_eps=True,
  ),
  "looksam_per_device_eps": Variant(
    lambda **kw: samx.looksam(_sgdm(), rho=0.05, k=2, **kw),
    contract="per_example",
    per_device_eps=True,
  ),
  "skip_nonfinite_sam": Variant(
    lambda **kw: samx.skip_nonfinite(
      samx.sam(_sgdm(), rho=0.05, **kw),
      axis_name=kw.get("axis_name"),
    ),
  ),
}
