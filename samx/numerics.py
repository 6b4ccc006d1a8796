"""Tree numerics shared by every stage: float32-accumulated norms, safe scaling."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["accumulation_dtype", "global_norm", "safe_inverse", "cast_tree_like"]


def accumulation_dtype(dtype) -> jnp.dtype:
  """The dtype norms accumulate in: float32, or wider when the leaf is wider.

  >>> accumulation_dtype(jnp.bfloat16)
  dtype('float32')
  """
  return jnp.promote_types(dtype, jnp.float32)


def global_norm(tree) -> jax.Array:
  r"""The L2 norm over every entry of every leaf, accumulated in float32 or wider.

  .. math::
    \|u\| = \sqrt{\textstyle\sum_{\ell} \sum_i u_{\ell,i}^2}

  Low-precision leaves (bfloat16, float16) are upcast before squaring, so the
  sum neither overflows nor loses small entries. An empty tree has norm 0.

  >>> global_norm({"a": jnp.array([3.0]), "b": jnp.array([[4.0]], jnp.bfloat16)})
  Array(5., dtype=float32)
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  dtype = accumulation_dtype(jnp.result_type(*leaves))
  total = sum(jnp.sum(jnp.square(jnp.asarray(x, dtype))) for x in leaves)
  return jnp.sqrt(total)


def safe_inverse(denominator: jax.Array) -> jax.Array:
  """``1 / denominator`` where it is positive, 0 elsewhere (never inf or NaN).

  Used as ``scale = rho * safe_inverse(norm + eps)`` so that a zero gradient gives
  a zero perturbation even when ``eps`` underflowed to 0 in a low-precision dtype.

  >>> safe_inverse(jnp.array([2.0, 0.0]))
  Array([0.5, 0. ], dtype=float32)
  """
  positive = denominator > 0
  return jnp.where(positive, 1.0 / jnp.where(positive, denominator, 1.0), 0.0)


def cast_tree_like(tree, reference):
  """Casts every leaf of ``tree`` to the dtype of the matching ``reference`` leaf.

  The two trees must have the same structure (a ``ValueError`` shows both).

  >>> cast_tree_like([jnp.ones(2)], [jnp.zeros(2, jnp.bfloat16)])[0].dtype
  dtype(bfloat16)
  """
  structure, reference_structure = jax.tree.structure(tree), jax.tree.structure(reference)
  if structure != reference_structure:
    raise ValueError(
      "tree and reference must have the same tree structure.\n"
      f"  tree:      {structure}\n  reference: {reference_structure}"
    )
  return jax.tree.map(lambda x, r: jnp.asarray(x, jnp.result_type(r)), tree, reference)
