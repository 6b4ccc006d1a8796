"""Flax NNX models for the speed benchmark: MLP, ResNet with BatchNorm, ViT with LayerNorm.

Each model is turned into pure functions over ``(params, rest)``, where ``params`` is
``nnx.state(model, nnx.Param)`` and ``rest`` everything else (BatchNorm's running
statistics). :func:`build` returns a :class:`Model` with the parameters, the rest,
a per-example loss and a synthetic batch. Models run in training mode: BatchNorm
normalises with the batch statistics and returns updated running averages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class MLP(nnx.Module):
  def __init__(self, sizes: tuple[int, ...], *, rngs: nnx.Rngs):
    self.layers = nnx.List(
      [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.reshape(x.shape[0], -1)
    for layer in self.layers[:-1]:
      h = nnx.relu(layer(h))
    return self.layers[-1](h)


class BasicBlock(nnx.Module):
  """ResNet's basic block: two 3x3 convolutions with BatchNorm, a projection when needed."""

  def __init__(self, c_in: int, c_out: int, stride: int, *, rngs: nnx.Rngs):
    conv = lambda a, b, k, s: nnx.Conv(
      a, b, (k, k), strides=(s, s), padding="SAME", use_bias=False, rngs=rngs
    )
    bn = lambda c: nnx.BatchNorm(c, use_running_average=False, momentum=0.9, rngs=rngs)
    self.conv1, self.bn1 = conv(c_in, c_out, 3, stride), bn(c_out)
    self.conv2, self.bn2 = conv(c_out, c_out, 3, 1), bn(c_out)
    self.project = stride != 1 or c_in != c_out
    if self.project:
      self.proj_conv, self.proj_bn = conv(c_in, c_out, 1, stride), bn(c_out)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = self.proj_bn(self.proj_conv(x)) if self.project else x
    return nnx.relu(y + shortcut)


class ResNet(nnx.Module):
  """A CIFAR-style ResNet (3x3 stem, no max-pool); ResNet-18: widths 64..512, blocks 2,2,2,2."""

  def __init__(
    self,
    widths: tuple[int, ...],
    blocks: tuple[int, ...],
    channels: int = 3,
    classes: int = 10,
    *,
    rngs: nnx.Rngs,
  ):
    self.stem = nnx.Conv(channels, widths[0], (3, 3), padding="SAME", use_bias=False, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(widths[0], use_running_average=False, momentum=0.9, rngs=rngs)
    layers, c_in = [], widths[0]
    for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
      for j in range(n):
        layers.append(BasicBlock(c_in, width, 2 if (j == 0 and i > 0) else 1, rngs=rngs))
        c_in = width
    self.blocks = nnx.List(layers)
    self.head = nnx.Linear(c_in, classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = nnx.relu(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      h = block(h)
    return self.head(h.mean(axis=(1, 2)))


class EncoderBlock(nnx.Module):
  def __init__(self, dim: int, heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class ViT(nnx.Module):
  """A Vision Transformer with pre-LayerNorm blocks and mean pooling (ViT-S: 384, 12, 6)."""

  def __init__(
    self,
    image: int,
    patch: int,
    dim: int,
    depth: int,
    heads: int,
    mlp_dim: int,
    channels: int = 3,
    classes: int = 10,
    *,
    rngs: nnx.Rngs,
  ):
    self.patch = nnx.Conv(channels, dim, (patch, patch), strides=(patch, patch), rngs=rngs)
    tokens = (image // patch) ** 2
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, dim)))
    self.blocks = nnx.List([EncoderBlock(dim, heads, mlp_dim, rngs=rngs) for _ in range(depth)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.patch(x)
    h = h.reshape(h.shape[0], -1, h.shape[-1]) + self.pos[...]
    for block in self.blocks:
      h = block(h)
    return self.head(self.ln(h).mean(axis=1))


# name -> (constructor, input shape (H, W, C), one-line description)
SPECS: dict[str, tuple[Callable[[nnx.Rngs], nnx.Module], tuple[int, int, int], str]] = {
  "tiny-mlp": (lambda r: MLP((784, 8, 10), rngs=r), (28, 28, 1), "MLP 784-8-10"),
  "mlp": (lambda r: MLP((784, 512, 512, 10), rngs=r), (28, 28, 1), "MLP 784-512-512-10"),
  "resnet-tiny": (
    lambda r: ResNet((8, 16), (1, 1), rngs=r),
    (16, 16, 3),
    "ResNet widths 8,16 blocks 1,1 (BatchNorm), 16x16x3",
  ),
  "resnet-small": (
    lambda r: ResNet((16, 32, 64), (1, 1, 1), rngs=r),
    (32, 32, 3),
    "ResNet widths 16,32,64 blocks 1,1,1 (BatchNorm), 32x32x3",
  ),
  "resnet18": (
    lambda r: ResNet((64, 128, 256, 512), (2, 2, 2, 2), rngs=r),
    (32, 32, 3),
    "ResNet-18 (CIFAR stem, BatchNorm), 32x32x3",
  ),
  "vit-tiny": (
    lambda r: ViT(16, 4, 32, 1, 2, 64, rngs=r),
    (16, 16, 3),
    "ViT patch 4, dim 32, depth 1, 2 heads (LayerNorm), 16x16x3",
  ),
  "vit-mini": (
    lambda r: ViT(32, 4, 128, 4, 4, 256, rngs=r),
    (32, 32, 3),
    "ViT patch 4, dim 128, depth 4, 4 heads (LayerNorm), 32x32x3",
  ),
  "vit-s": (
    lambda r: ViT(32, 4, 384, 12, 6, 1536, rngs=r),
    (32, 32, 3),
    "ViT-S/4 (dim 384, depth 12, 6 heads, LayerNorm), 32x32x3",
  ),
}


@dataclasses.dataclass
class Model:
  name: str
  description: str
  module: nnx.Module
  params: Any
  rest: Any
  # (params, rest, batch) -> (per-example losses (B,), updated rest)
  per_example: Callable[[Any, Any, Any], tuple[jax.Array, Any]]
  batch: tuple[jax.Array, jax.Array]

  @property
  def n_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.params))

  @property
  def param_bytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))


def build(name: str, batch_size: int, seed: int = 0) -> Model:
  """The model ``name`` of :data:`SPECS` and a synthetic batch of ``batch_size`` examples."""
  make, shape, description = SPECS[name]
  module = make(nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  pure = getattr(nnx, "as_pure", None) or nnx.pure  # flax >= 0.12.1 names it as_pure
  # Plain arrays as leaves, as nnx.Optimizer hands them to optax (and as the masks are).
  params, rest = pure(params), pure(rest)

  def per_example(params, rest, batch):
    x, y = batch
    model = nnx.merge(graphdef, params, rest, copy=True)
    logits = model(x)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return losses, pure(nnx.state(model, nnx.Not(nnx.Param)))

  kx, ky = jax.random.split(jax.random.key(seed + 1))
  batch = (
    jax.random.normal(kx, (batch_size, *shape), jnp.float32),
    jax.random.randint(ky, (batch_size,), 0, 10),
  )
  return Model(name, description, module, params, rest, per_example, batch)
