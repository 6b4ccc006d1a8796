"""Masks: which parameters (leaves, or entries of leaves) a stage acts on.

A mask is given as ``None`` (the stage's default), a pytree of booleans with the
structure of the parameters (or a prefix of it), or a callable
``mask(params) -> pytree of booleans``. Masks are static: they are resolved from
leaf paths, shapes and tree structure, never from values, so they do not change
under ``jax.jit``.

Two kinds of selection exist:

* per leaf: a Python boolean per parameter leaf (every stage accepts this);
* per entry: a NumPy boolean array with the leaf's shape (:func:`random_entries`,
  the masked ascent of :mod:`samx.selective`). A ``False`` leaf costs nothing: the
  masked ascent replaces it by zeros, so XLA can drop the work that produced it.

Builders
--------
* :func:`norm_layers`: the affine parameters (scale, bias) of normalization layers,
  by module type for an NNX model, by structure for any other params pytree
  (linen): see the rule there. Names never decide.
* :func:`by_path`: leaves whose path matches a regular expression or a predicate.
* :func:`complement`, :func:`union`, :func:`intersection`: set algebra on masks.
* :func:`random_entries`: exactly ``count`` entries chosen at random, the control
  experiment of SAM-ON (as many entries as the normalization layers hold).
* :func:`all_leaves`, :func:`weight_leaves`.

Every mask gives the same answer at ``tx.init`` and at ``tx.update`` for NNX: the
optimizer's ``init`` sees ``nnx.Param`` Variables, ``update`` sees plain arrays
(``nnx.as_pure``); masks are matched to the parameters by leaf path with the
Variables unwrapped, so an NNX ``State`` mask, a nested dict with the same keys, or a
prefix of either all work. A selection that selects nothing raises an error that
lists the leaf paths it saw.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

__all__ = [
  "Mask",
  "NORM_LAYER_TYPES",
  "all_leaves",
  "by_path",
  "complement",
  "count_selected",
  "intersection",
  "leaf_paths",
  "norm_layers",
  "random_entries",
  "resolve_mask",
  "resolve_selection",
  "selected_paths",
  "union",
  "weight_leaves",
]

Mask = Any | Callable[[Any], Any] | None

NORM_LAYER_TYPES: tuple[type, ...] = (
  nnx.BatchNorm,
  nnx.LayerNorm,
  nnx.GroupNorm,
  nnx.RMSNorm,
  nnx.InstanceNorm,
)
"""The NNX normalization modules :func:`norm_layers` finds (subclasses included)."""

_NORM_PARAM_NAMES = ("scale", "bias")
_MAX_LISTED = 60


def weight_leaves(params: Any) -> Any:
  """Marks the leaves with two or more dimensions (kernels, embeddings) as True.

  This is ASAM's default selection of "weight" leaves: biases and normalization
  scales (one-dimensional) are left out.

  >>> weight_leaves({"kernel": np.ones((3, 2)), "bias": np.ones(2)})
  {'bias': False, 'kernel': True}
  """
  return jax.tree.map(lambda p: np.ndim(p) >= 2, params)


def resolve_mask(mask: Mask, params: Any, *, default: Callable[[Any], Any], name: str = "mask"):
  """Turns a per-leaf mask argument into a pytree of Python booleans, one per params leaf.

  Args:
    mask: ``None`` (use ``default``), a pytree of booleans matching ``params``
      (or a prefix of it), or a callable ``mask(params) -> pytree of booleans``.
    params: the parameters the mask refers to.
    default: the callable used when ``mask`` is ``None``.
    name: the argument name used in error messages.

  Returns:
    A pytree with the structure of ``params`` whose leaves are Python booleans.

  >>> resolve_mask(None, {"w": np.ones((2, 2)), "b": np.ones(2)}, default=weight_leaves)
  {'b': False, 'w': True}
  >>> resolve_mask({"w": True, "b": False}, {"w": np.ones(2), "b": np.ones(2)},
  ...              default=weight_leaves)
  {'b': False, 'w': True}
  """
  if mask is None:
    mask = default
  selection = mask(params) if callable(mask) else mask
  try:
    return jax.tree.map(
      lambda m, sub: jax.tree.map(lambda _: _as_bool(m, name), sub), selection, params
    )
  except ValueError as err:
    raise ValueError(
      f"{name} must be a pytree of booleans with the structure of params (or a prefix "
      f"of it), or a callable params -> such a pytree.\n"
      f"  {name}:   {jax.tree.structure(selection)}\n"
      f"  params: {jax.tree.structure(params)}\n({err})"
    ) from None


def _as_bool(value: Any, name: str) -> bool:
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  raise TypeError(f"{name} leaves must be Python booleans (static under jit); got {value!r}")


# ---------------------------------------------------------------------------------------
# Paths: NNX Variables unwrapped, so init (Variables) and update (arrays) agree.


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _key_name(key: Any) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def _flatten(tree: Any) -> tuple[list[tuple[Any, ...]], list[Any], Any]:
  """(paths, leaves, treedef) of ``tree`` with NNX Variables as (unwrapped) leaves."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)
  paths = [tuple(_key_name(k) for k in path) for path, _ in with_path]
  leaves = [leaf.get_value() if _is_variable(leaf) else leaf for _, leaf in with_path]
  return paths, leaves, treedef


def _path_str(path: tuple[Any, ...]) -> str:
  return "/".join(str(k) for k in path)


def _listing(paths: Sequence[tuple[Any, ...]], leaves: Sequence[Any] | None = None) -> str:
  lines = []
  for i, path in enumerate(paths[:_MAX_LISTED]):
    shape = f" {tuple(np.shape(leaves[i]))}" if leaves is not None else ""
    lines.append(f"    {_path_str(path) or '<root>'}{shape}")
  if len(paths) > _MAX_LISTED:
    lines.append(f"    ... and {len(paths) - _MAX_LISTED} more")
  return "\n".join(lines) if lines else "    (no leaves)"


def leaf_paths(params: Any) -> list[str]:
  """The path of every leaf of ``params`` as ``"a/b/c"``, NNX Variables unwrapped.

  These are the strings :func:`by_path` matches against.

  >>> leaf_paths({"block": [{"scale": np.ones(2)}], "out": {"kernel": np.ones((2, 2))}})
  ['block/0/scale', 'out/kernel']
  """
  return [_path_str(path) for path in _flatten(params)[0]]


# ---------------------------------------------------------------------------------------
# Resolution of per-entry selections.


def _as_selection(value: Any, leaf: Any, path: tuple[Any, ...], name: str) -> Any:
  """A Python bool, or a NumPy bool array with the shape of ``leaf``."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
      f"{name} at {_path_str(path)!r} is a traced array; masks are static (Python "
      "booleans or NumPy boolean arrays), resolved from shapes and paths, never from "
      "values under jit"
    )
  if isinstance(value, (np.ndarray, jax.Array)) and np.dtype(value.dtype) == np.bool_:
    if np.shape(value) != np.shape(leaf):
      raise ValueError(
        f"{name} at {_path_str(path)!r} is a boolean array of shape {np.shape(value)}; "
        f"the parameter leaf there has shape {np.shape(leaf)} (a per-entry mask must "
        "have the leaf's shape)"
      )
    array = np.asarray(value)
    return bool(array) if array.ndim == 0 else array
  raise TypeError(
    f"{name} leaves must be Python booleans or NumPy boolean arrays of the leaf's shape "
    f"(static under jit); got {value!r} at {_path_str(path)!r}"
  )


def _match(selection: Any, params: Any, name: str) -> tuple[list[Any], list[Any], Any, list]:
  """Matches a mask (a prefix of ``params``) to the params leaves by path."""
  paths, leaves, treedef = _flatten(params)
  mask_paths, mask_leaves, _ = _flatten(selection)
  index = {path: i for i, path in enumerate(mask_paths)}
  matched, missing, used = [], [], set()
  for path, leaf in zip(paths, leaves, strict=True):
    hit = next(
      (index[path[:cut]] for cut in range(len(path), -1, -1) if path[:cut] in index), None
    )
    if hit is None:
      missing.append(path)
      continue
    used.add(hit)
    matched.append(_as_selection(mask_leaves[hit], leaf, path, name))
  unused = [mask_paths[i] for i in range(len(mask_paths)) if i not in used]
  if missing or unused:
    raise ValueError(
      f"{name} must be a pytree of booleans with the structure of params (or a prefix "
      f"of it), or a callable params -> such a pytree; it does not match params.\n"
      f"  params leaves without a {name} entry:\n{_listing(missing)}\n"
      f"  {name} entries that are not params paths:\n{_listing(unused)}\n"
      f"  params leaves:\n{_listing(paths, leaves)}"
    )
  return matched, leaves, treedef, paths


def _count(selection: Any, leaf: Any) -> int:
  if isinstance(selection, bool):
    return int(np.size(leaf)) if selection else 0
  return int(np.count_nonzero(selection))


def resolve_selection(
  mask: Mask,
  params: Any,
  *,
  default: Callable[[Any], Any] | None = None,
  name: str = "mask",
  allow_empty: bool = False,
) -> Any:
  """Turns a mask argument into one static selection per params leaf.

  Masks are matched to ``params`` by leaf path (NNX Variables unwrapped), so the
  answer is the same for NNX ``Param`` Variables (``tx.init``) and for the plain
  arrays ``nnx.Optimizer.update`` passes.

  Args:
    mask: ``None`` (use ``default``), a pytree of booleans / NumPy boolean arrays
      with the structure of ``params`` (or a prefix of it), or a callable
      ``mask(params) -> such a pytree``.
    params: the parameters the mask refers to.
    default: the callable used when ``mask`` is ``None``.
    name: the argument name used in error messages.
    allow_empty: whether a selection of no entry is allowed (else ``ValueError``).

  Returns:
    A pytree with the structure of ``params`` (Variables unwrapped) whose leaves
    are Python booleans or NumPy boolean arrays of the leaf's shape.

  >>> resolve_selection({"w": True}, {"w": {"kernel": np.ones(2), "bias": np.ones(1)}})
  {'w': {'bias': True, 'kernel': True}}
  >>> resolve_selection({"w": False}, {"w": np.ones(2)})
  Traceback (most recent call last):
  ...
  ValueError: mask selects no parameter entry; the parameter leaves are:
      w (2,)
  """
  if mask is None:
    if default is None:
      raise ValueError(f"{name} is required: a pytree of booleans or a callable params -> mask")
    mask = default
  selection = mask(params) if callable(mask) else mask
  matched, leaves, treedef, paths = _match(selection, params, name)
  if not allow_empty and not any(
    _count(m, leaf) for m, leaf in zip(matched, leaves, strict=True)
  ):
    raise ValueError(
      f"{name} selects no parameter entry; the parameter leaves are:\n{_listing(paths, leaves)}"
    )
  return jax.tree.unflatten(treedef, matched)


def count_selected(mask: Mask, params: Any) -> int:
  """The number of parameter entries ``mask`` selects.

  Args:
    mask: a pytree of booleans / NumPy boolean arrays, or a callable mask.
    params: the parameters the mask refers to.

  Returns:
    The number of selected entries (an ``int``).

  >>> count_selected({"w": True, "b": False}, {"w": np.ones((2, 3)), "b": np.ones(3)})
  6
  """
  matched, leaves, _, _ = _match(mask(params) if callable(mask) else mask, params, "mask")
  return sum(_count(m, leaf) for m, leaf in zip(matched, leaves, strict=True))


def selected_paths(mask: Mask, params: Any) -> list[str]:
  """The paths of the leaves in which ``mask`` selects at least one entry.

  Useful to check what a SAM-ON mask perturbs.

  Args:
    mask: a pytree of booleans / NumPy boolean arrays, or a callable mask.
    params: the parameters the mask refers to.

  Returns:
    The selected leaf paths as ``"a/b/c"`` strings, in leaf order.

  >>> selected_paths(norm_layers, {"ln": {"scale": np.ones(2), "bias": np.ones(2)},
  ...                              "out": {"kernel": np.ones((2, 2))}})
  ['ln/bias', 'ln/scale']
  """
  matched, leaves, _, paths = _match(mask(params) if callable(mask) else mask, params, "mask")
  return [
    _path_str(path)
    for path, m, leaf in zip(paths, matched, leaves, strict=True)
    if _count(m, leaf)
  ]


# ---------------------------------------------------------------------------------------
# Builders.


def all_leaves(params: Any) -> Any:
  """Selects every leaf.

  >>> all_leaves({"w": np.ones(2), "b": np.ones(1)})
  {'b': True, 'w': True}
  """
  paths, _, treedef = _flatten(params)
  return jax.tree.unflatten(treedef, [True] * len(paths))


def _norm_names(scale: bool, bias: bool) -> tuple[str, ...]:
  if not (scale or bias):
    raise ValueError(
      "norm_layers selects the scale and/or the bias of normalization layers; got "
      "scale=False and bias=False, which selects nothing"
    )
  return tuple(n for n, on in zip(_NORM_PARAM_NAMES, (scale, bias), strict=True) if on)


def norm_layers(
  target: Any,
  *,
  scale: bool = True,
  bias: bool = True,
  types: Sequence[type] | None = None,
  wrt: Any = nnx.Param,
) -> Any:
  """Selects the affine parameters of the normalization layers (SAM-ON's mask).

  **NNX model** (``target`` is an :class:`flax.nnx.Module`): by module type. Every
  submodule that is an instance of one of ``types`` (default
  :data:`NORM_LAYER_TYPES`: ``nnx.BatchNorm``, ``LayerNorm``, ``GroupNorm``,
  ``RMSNorm``, ``InstanceNorm``, and their subclasses, whatever the attribute
  names) contributes its ``scale`` and/or ``bias``. The result is an
  ``nnx.State`` of booleans with the structure of ``nnx.state(model, wrt)``; pass
  the same ``wrt`` as to ``nnx.Optimizer``.

  **Any other params pytree** (linen ``params``, a dict, a pure NNX state): by
  structure. A node is a normalization layer when its children are exactly
  ``{"scale", "bias"}`` or ``{"scale"}``, all of them leaves (no submodule) and
  one-dimensional arrays of the same length. This is what linen's ``BatchNorm``,
  ``LayerNorm``, ``GroupNorm``, ``RMSNorm`` and ``InstanceNorm`` create with their
  default feature axes, under any module name. Not recognised: layers without a
  scale (``use_scale=False``: indistinguishable from a bias-only layer) and
  multi-axis scales; a custom module with exactly one 1-D ``scale`` (and
  optionally a ``bias`` of the same length) is taken for a normalization layer.
  Use :func:`by_path` or :func:`union` for other cases. Passed itself as a mask
  (``mask=samx.masks.norm_layers``) it is applied to the params at ``init`` and
  ``update``.

  Args:
    target: an ``nnx.Module``, or a params pytree.
    scale: select the scales.
    bias: select the biases.
    types: the NNX normalization module types (NNX only); default
      :data:`NORM_LAYER_TYPES`.
    wrt: the NNX filter of the optimized state (NNX only), as given to
      ``nnx.Optimizer``.

  Returns:
    A pytree of Python booleans with the structure of the params.

  Raises:
    ValueError: when no normalization layer is found; the message lists the
      parameter leaves that were seen.

  >>> params = {"conv": {"kernel": np.ones((3, 3, 1, 4)), "bias": np.ones(4)},
  ...           "my_bn": {"scale": np.ones(4), "bias": np.ones(4)}}
  >>> norm_layers(params, bias=False)
  {'conv': {'bias': False, 'kernel': False}, 'my_bn': {'bias': False, 'scale': True}}

  References:
    Mueller et al., `Normalization Layers Are All That Sharpness-Aware Minimization
    Needs <https://arxiv.org/abs/2306.04226>`_, 2023
  """
  names = _norm_names(scale, bias)
  if isinstance(target, nnx.Module):
    return _norm_layers_by_type(target, names, tuple(types or NORM_LAYER_TYPES), wrt)
  if types is not None:
    raise ValueError(
      "types selects NNX module types and needs an nnx.Module as target; got "
      f"{type(target).__name__} params (selected by structure)"
    )
  return _norm_layers_by_structure(target, names)


def _norm_layers_by_type(model: nnx.Module, names, types, wrt) -> Any:
  for t in types:
    if not isinstance(t, type):
      raise TypeError(f"types must hold module classes; got types={types!r}")
  norm_paths = {
    tuple(path) for path, module in nnx.iter_modules(model) if isinstance(module, types)
  }
  state = nnx.state(model, wrt)
  mask = nnx.map_state(lambda path, _: path[:-1] in norm_paths and path[-1] in names, state)
  if not any(jax.tree.leaves(mask)):
    paths, leaves, _ = _flatten(state)
    found = sorted(_path_str(p) or "<root>" for p in norm_paths)
    raise ValueError(
      "norm_layers found no normalization parameter in the model: no "
      f"{' / '.join(names)} of a module of types {[t.__name__ for t in types]} "
      f"(subclasses included) under wrt={wrt!r}. Normalization modules found: "
      f"{found or 'none'}. Pass types=(MyNorm, ...) for normalization modules that "
      f"do not subclass these. The parameter leaves are:\n{_listing(paths, leaves)}"
    )
  return mask


def _norm_layers_by_structure(params: Any, names) -> Any:
  paths, leaves, treedef = _flatten(params)
  children: dict[tuple[Any, ...], dict[Any, Any]] = {}
  has_submodule = set()
  for path, leaf in zip(paths, leaves, strict=True):
    if not path:
      continue
    children.setdefault(path[:-1], {})[path[-1]] = leaf
    for cut in range(len(path) - 1):
      has_submodule.add(path[:cut])
  norm_parents = set()
  for parent, kids in children.items():
    if (
      parent in has_submodule or "scale" not in kids or not set(kids) <= set(_NORM_PARAM_NAMES)
    ):
      continue
    shapes = {tuple(np.shape(v)) for v in kids.values()}
    if len(shapes) == 1 and len(next(iter(shapes))) == 1:
      norm_parents.add(parent)
  selection = [bool(path) and path[:-1] in norm_parents and path[-1] in names for path in paths]
  if not any(selection):
    raise ValueError(
      "norm_layers found no normalization layer in params by structure: no node whose "
      "children are exactly {'scale', 'bias'} or {'scale'}, one-dimensional leaves of "
      f"equal length (selecting {' / '.join(names)}). For an NNX model pass the module "
      "itself (selection by type); otherwise build the mask with samx.masks.by_path. "
      f"The parameter leaves are:\n{_listing(paths, leaves)}"
    )
  return jax.tree.unflatten(treedef, selection)


def by_path(pattern: str | re.Pattern | Callable[[str], bool]) -> Callable[[Any], Any]:
  r"""Selects the leaves whose path matches ``pattern``.

  A leaf's path is its keys joined by ``/`` (``"encoder/layers/0/norm/scale"``, see
  :func:`leaf_paths`), NNX Variables unwrapped.

  Args:
    pattern: a regular expression, matched with :func:`re.search` anywhere in the
      path, or a predicate ``path -> bool``.

  Returns:
    A callable mask ``params -> pytree of booleans``; it raises ``ValueError``
    listing the paths when nothing matches.

  >>> params = {"enc": {"kernel": np.ones((2, 2)), "bias": np.ones(2)}, "head": np.ones(2)}
  >>> by_path(r"(^|/)bias$")(params)
  {'enc': {'bias': True, 'kernel': False}, 'head': False}
  >>> by_path(lambda path: path.startswith("head"))(params)
  {'enc': {'bias': False, 'kernel': False}, 'head': True}
  """
  if isinstance(pattern, str):
    regex = re.compile(pattern)
  elif isinstance(pattern, re.Pattern):
    regex = pattern
  elif callable(pattern):
    regex = None
  else:
    raise TypeError(
      f"pattern must be a regular expression or a predicate path -> bool; got {pattern!r}"
    )

  def matches(path: str) -> bool:
    return regex.search(path) is not None if regex is not None else bool(pattern(path))

  def path_mask(params: Any) -> Any:
    paths, leaves, treedef = _flatten(params)
    selection = [matches(_path_str(path)) for path in paths]
    if not any(selection):
      raise ValueError(
        f"by_path({pattern!r}) matched no parameter leaf. The parameter leaves are:\n"
        f"{_listing(paths, leaves)}"
      )
    return jax.tree.unflatten(treedef, selection)

  return path_mask


def _combine(op: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
  if isinstance(a, bool) and isinstance(b, bool):
    return bool(op(a, b))
  return np.asarray(op(np.asarray(a), np.asarray(b)))


def complement(mask: Mask) -> Callable[[Any], Any]:
  """Selects what ``mask`` does not (SAM-ON's "no-norm" ablation).

  >>> complement({"w": True, "b": np.array([True, False])})(
  ...     {"w": np.ones(2), "b": np.ones(2)})
  {'b': array([False,  True]), 'w': False}
  """

  def complement_mask(params: Any) -> Any:
    selection = resolve_selection(mask, params, name="complement(mask)", allow_empty=True)
    return jax.tree.map(lambda m: (not m) if isinstance(m, bool) else ~m, selection)

  return complement_mask


def _reduce(masks: tuple[Mask, ...], op, who: str) -> Callable[[Any], Any]:
  if not masks:
    raise ValueError(f"{who} needs at least one mask")

  def reduced(params: Any) -> Any:
    selections = [
      resolve_selection(m, params, name=f"{who} argument {i}", allow_empty=True)
      for i, m in enumerate(masks)
    ]
    result = selections[0]
    for other in selections[1:]:
      result = jax.tree.map(lambda a, b: _combine(op, a, b), result, other)
    return result

  return reduced


def union(*masks: Mask) -> Callable[[Any], Any]:
  """Selects what any of ``masks`` selects.

  >>> union({"a": True, "b": False}, {"a": False, "b": True})({"a": 1.0, "b": 2.0})
  {'a': True, 'b': True}
  """
  return _reduce(masks, lambda a, b: a | b, "union")


def intersection(*masks: Mask) -> Callable[[Any], Any]:
  """Selects what every one of ``masks`` selects.

  >>> intersection({"a": True, "b": True}, {"a": False, "b": True})({"a": 1.0, "b": 2.0})
  {'a': False, 'b': True}
  """
  return _reduce(masks, lambda a, b: a & b, "intersection")


def random_entries(
  count: int | Mask,
  *,
  seed: int = 0,
  within: Mask = None,
) -> Callable[[Any], Any]:
  """Exactly ``count`` parameter entries, chosen uniformly at random (a control mask).

  SAM-ON's control experiment perturbs as many randomly chosen entries as the
  normalization layers hold: ``random_entries(norm_layers(model))`` (or
  ``random_entries(samx.masks.norm_layers)`` for linen params).

  The choice depends only on ``seed`` and on the leaf shapes and order, so it is
  the same at ``init`` and every ``update`` and static under ``jit`` (a NumPy
  boolean array per leaf, embedded in the compiled step as a constant).

  Args:
    count: the number of entries, an ``int >= 1``; or a mask, whose number of
      selected entries (:func:`count_selected`) is used.
    seed: the seed of the NumPy generator.
    within: choose among the entries this mask selects (default: all).

  Returns:
    A callable mask ``params -> pytree of NumPy boolean arrays``.

  >>> params = {"w": np.ones((3, 4)), "b": np.ones(4)}
  >>> chosen = random_entries(5, seed=1)(params)
  >>> int(chosen["w"].sum() + chosen["b"].sum())
  5
  >>> count_selected(random_entries({"b": True, "w": False})(params), params)
  4
  """
  if isinstance(count, bool) or (isinstance(count, (int, np.integer)) and count < 1):
    raise ValueError(
      "count must be an integer >= 1 or a mask whose selection size is used; got "
      f"count={count!r}"
    )
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
    raise TypeError(f"seed must be an integer; got seed={seed!r}")

  def random_mask(params: Any) -> Any:
    n = int(count) if isinstance(count, (int, np.integer)) else count_selected(count, params)
    pool = resolve_selection(within, params, default=all_leaves, name="within")
    paths, leaves, treedef = _flatten(params)
    pool_leaves = jax.tree.leaves(pool)
    flat_pool = np.concatenate(
      [
        np.broadcast_to(np.asarray(p, bool), np.shape(leaf)).ravel()
        for p, leaf in zip(pool_leaves, leaves, strict=True)
      ]
      or [np.zeros(0, bool)]
    )
    candidates = np.flatnonzero(flat_pool)
    if n < 1 or n > candidates.size:
      raise ValueError(
        f"count must be between 1 and the {candidates.size} entries available; got count={n}"
      )
    chosen = np.zeros(flat_pool.size, bool)
    chosen[np.random.default_rng(seed).choice(candidates, size=n, replace=False)] = True
    out, start = [], 0
    for leaf in leaves:
      size = int(np.size(leaf))
      part = chosen[start : start + size].reshape(np.shape(leaf))
      out.append(bool(part) if part.ndim == 0 else part)
      start += size
    return jax.tree.unflatten(treedef, out)

  return random_mask
