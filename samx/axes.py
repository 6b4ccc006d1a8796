"""Where ``eps`` lives across devices: axis means, varying casts and per-device gradients.

One semantics, whatever the parallelism
---------------------------------------
The ``g`` and ``g_s`` that reach the combination and the base optimizer are the
**mean over the data-parallel axis of the per-device gradients** of the loss on each
device's local batch (a plain mean over the local examples, no collective in the
loss). How samx gets there depends on how the step runs:

* ``jax.jit`` over sharded arrays (GSPMD, Auto or Explicit mesh, replicated or
  FSDP-sharded params): no axis name. The gradient of the global-batch mean already
  is that mean; samx's code is the single-device code.
* ``jax.pmap`` and ``jax.shard_map(..., check_vma=False)``: ``axis_name`` names the
  data axis. ``jax.grad`` returns each device's own gradient and samx averages it
  (:func:`axis_mean`).
* ``jax.shard_map`` with replication checking (``check_vma=True``, JAX's default):
  ``jax.grad`` with respect to **replicated** (invariant) params returns the gradient
  already **summed** over the devices (the transpose of the implicit broadcast is a
  ``psum``); with respect to params cast to **varying** it returns the device's own.
  samx therefore evaluates ``grad_fn`` (and the per-example contract) at params cast
  to varying (:func:`varying_along`), and it checks the clean gradient it is given
  (:func:`require_per_device`): an invariant clean gradient is either the sum or
  the mean over the devices, samx cannot tell which, so it raises and shows the
  call that gives the device's own gradient::

    grads = jax.grad(loss_fn)(jax.lax.pcast(params, "data", to="varying"), batch)

Params must be replicated along ``axis_name`` inside ``shard_map`` (FSDP-style
sharded params belong to ``jax.jit`` over sharded arrays, where no axis name is
needed); under replication checking sharded params raise.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "axis_mean",
  "bound_data_axes",
  "configuration_fingerprint",
  "replication_checked",
  "require_per_device",
  "varying_along",
  "varying_axes",
]

AxisName = str | tuple[str, ...] | None

LOCAL_GRAD_CALL = (
  "    grads = jax.grad(loss_fn)(jax.lax.pcast(params, {axis!r}, to='varying'), batch)\n"
  "    updates, opt_state = tx.update(grads, opt_state, params,\n"
  "                                   grad_fn=lambda p: jax.grad(loss_fn)(p, batch))\n"
  "with loss_fn the plain mean over the device's local batch (no pmean inside)"
)


def check_axis_name(axis_name: Any, *, who: str, argument: str = "axis_name") -> None:
  """Raises unless ``axis_name`` is None, a non-empty str, or a non-empty tuple of them.

  >>> check_axis_name(("hosts", "chips"), who="doc")
  >>> check_axis_name(3, who="doc")
  Traceback (most recent call last):
  ...
  TypeError: doc: axis_name must be None, a non-empty str ... got axis_name=3
  """
  if axis_name is None:
    return
  names = (axis_name,) if isinstance(axis_name, str) else axis_name
  if (
    not isinstance(names, tuple)
    or not names
    or not all(isinstance(n, str) and n for n in names)
  ):
    raise TypeError(
      f"{who}: {argument} must be None, a non-empty str (the name of the pmap / shard_map "
      f"data axis, e.g. {argument}='data') or a non-empty tuple of them (e.g. "
      f"('hosts', 'chips')); got {argument}={axis_name!r}"
    )
  if len(set(names)) != len(names):
    raise ValueError(f"{who}: {argument} names an axis twice; got {argument}={axis_name!r}")


def axis_names(axis_name: AxisName) -> tuple[str, ...]:
  """``axis_name`` as a tuple of names (``()`` for ``None``).

  >>> axis_names("data"), axis_names(("hosts", "chips")), axis_names(None)
  (('data',), ('hosts', 'chips'), ())
  """
  check_axis_name(axis_name, who="samx.axes")
  if axis_name is None:
    return ()
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _unbound(axis_name: Any, err: Exception) -> NameError:
  return NameError(
    f"axis_name={axis_name!r} is not bound here: run the training step under "
    f"jax.pmap(..., axis_name={axis_name!r}) or jax.shard_map over a mesh with that "
    "axis, or pass axis_name=None under plain jax.jit (sharded arrays need no axis "
    f"name). ({err})"
  )


def axis_mean(tree: Any, axis_name: AxisName) -> Any:
  """Averages ``tree`` over the named axis; the identity when ``axis_name`` is None.

  Raises a clear error when the axis is not bound (the step is not running under
  ``pmap`` / ``shard_map`` with that axis name). Under ``shard_map`` with
  replication checking a leaf that is already invariant along the axis is
  returned as it is (its mean is itself).

  Args:
    tree: the pytree to average.
    axis_name: the named axis (or a tuple of names), or ``None``.

  Returns:
    The average over the axis (the same on every device).

  >>> import jax, jax.numpy as jnp
  >>> jax.vmap(lambda x: axis_mean(x, "i"), axis_name="i")(jnp.array([1.0, 3.0]))
  Array([2., 2.], dtype=float32)
  """
  if axis_name is None:
    return tree
  try:
    return jax.lax.pmean(tree, axis_name)
  except NameError as err:
    raise _unbound(axis_name, err) from None


def varying_axes(x: Any) -> frozenset:
  """The manual mesh axes along which ``x`` is typed varying (empty outside ``shard_map``).

  Under ``jax.shard_map(..., check_vma=True)`` every value carries the set of axes
  it varies along; elsewhere (``pmap``, ``check_vma=False``, plain ``jit``) the set
  is empty.

  >>> varying_axes(jnp.ones(2))
  frozenset()
  """
  try:
    aval = jax.typeof(x)
  except TypeError:
    return frozenset()
  vma = getattr(aval, "vma", None)
  if vma is None:
    manual = getattr(aval, "manual_axis_type", None)
    vma = getattr(manual, "varying", frozenset())
  return frozenset(vma)


def replication_checked(axis_name: AxisName) -> bool:
  """Whether every axis of ``axis_name`` is a ``shard_map`` axis with replication checking.

  True under ``jax.shard_map(..., check_vma=True)`` (JAX's default), False under
  ``pmap``, ``check_vma=False`` and ``vmap``; raises when an axis is not bound.

  >>> jax.vmap(lambda x: jnp.float32(replication_checked("i")), axis_name="i")(jnp.ones(2))
  Array([0., 0.], dtype=float32)
  """
  names = axis_names(axis_name)
  if not names:
    return False
  try:
    index = jax.lax.axis_index(names)
  except NameError as err:
    raise _unbound(axis_name, err) from None
  return set(names) <= varying_axes(index)


def varying_along(tree: Any, axis_name: AxisName) -> Any:
  """Casts ``tree`` to varying along ``axis_name`` where it is not varying yet.

  Under :func:`jax.shard_map` with replication checking (``check_vma=True``),
  :func:`jax.grad` with respect to replicated parameters returns the gradient
  summed over the devices; with respect to varying ones, the device's own. Where
  there is nothing to cast (``pmap``, ``check_vma=False``, a ``vmap`` axis, values
  already varying) the tree is returned as it is; ``axis_name=None`` is the
  identity.

  Args:
    tree: the pytree to cast (the parameters).
    axis_name: a named axis, a tuple of them, or ``None``.

  Returns:
    ``tree``, varying along every axis of ``axis_name``.

  >>> import jax, jax.numpy as jnp
  >>> x = jnp.array([1.0, 2.0])
  >>> jax.vmap(lambda v: jax.grad(lambda w: w * v)(varying_along(1.0, "i")),
  ...          axis_name="i")(x)
  Array([1., 2.], dtype=float32, weak_type=True)
  """
  names = axis_names(axis_name)
  if not names or not replication_checked(axis_name):
    return tree

  def leaf(x):
    missing = tuple(n for n in names if n not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(leaf, tree)


def _float_leaf_paths(tree: Any, predicate: Any) -> list[str]:
  """The paths of the non-empty floating-point leaves of ``tree`` where ``predicate`` holds."""
  return [
    jax.tree_util.keystr(path) or "<root>"
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact) and jnp.size(x) > 0 and predicate(x)
  ]


def require_per_device(tree: Any, axis_name: AxisName, *, what: str, who: str) -> None:
  """Raises when a gradient is already reduced over ``axis_name`` under replication checking.

  Under ``jax.shard_map(..., check_vma=True)`` a per-device gradient is varying
  along the data axis; an invariant one was summed (``jax.grad`` with respect to
  replicated params) or averaged (a ``pmean`` in the loss or on the gradient), and
  samx cannot tell which, so it refuses to guess the scale. Elsewhere (``pmap``,
  ``check_vma=False``) types carry no such information and nothing is checked.

  Args:
    tree: the gradient.
    axis_name: the data-parallel axis (or axes), or ``None`` (nothing to check).
    what: what the gradient is, for the message.
    who: the name used in error messages.
  """
  names = axis_names(axis_name)
  if not names or not replication_checked(axis_name):
    return
  reduced = _float_leaf_paths(tree, lambda x: not set(names) <= varying_axes(x))
  if reduced:
    axis = names[0] if len(names) == 1 else names
    raise ValueError(
      f"{who}: {what} is not per device along axis_name={axis_name!r} (leaves "
      f"{reduced[:4]}{' ...' if len(reduced) > 4 else ''} are invariant along it). Under "
      "jax.shard_map with check_vma=True, jax.grad with respect to replicated params "
      "returns the gradient already summed over the devices (or averaged, if the loss "
      "calls pmean), and samx cannot tell which. Give samx each device's own gradient "
      "(samx averages it), differentiating with respect to params cast to varying:\n"
      + LOCAL_GRAD_CALL.format(axis=axis)
    )


def require_replicated(params: Any, axis_name: AxisName, *, who: str) -> None:
  """Raises when ``params`` are sharded along ``axis_name`` inside ``shard_map``.

  samx's norms and masks are over whole leaves: inside ``shard_map`` the params
  must be replicated along the data axis. FSDP-style sharded params are supported
  under ``jax.jit`` over sharded arrays (no axis name).
  """
  names = axis_names(axis_name)
  if not names or not replication_checked(axis_name):
    return
  sharded = _float_leaf_paths(params, lambda x: bool(set(names) & varying_axes(x)))
  if sharded:
    raise ValueError(
      f"{who}: params {sharded[:4]}{' ...' if len(sharded) > 4 else ''} vary along "
      f"axis_name={axis_name!r}: inside jax.shard_map samx needs the params replicated "
      "along the data axis (in_specs P() for params and optimizer state). For "
      "FSDP-style sharded params run the step under jax.jit over sharded arrays, with "
      "axis_name=None: samx then gives the single-device result."
    )


def bound_data_axes() -> tuple[str, ...]:
  """The ``pmap`` / ``shard_map`` axis names bound where this is traced (not ``vmap`` axes).

  Used to refuse collectives that a named axis would need but that were not asked
  for (e.g. :func:`samx.skip_nonfinite` without ``axis_name`` under ``pmap``).
  Reads JAX's axis environment; if that is not available, returns ``()``.

  >>> bound_data_axes()
  ()
  """
  try:
    from jax._src import core as jax_core

    names = tuple(jax_core.get_axis_env().axis_sizes)
  except Exception:  # the private axis environment moved: check nothing
    return ()
  data_axes = []
  for name in names:
    if not isinstance(name, str):
      continue
    try:
      jax.lax.pcast(jnp.zeros(()), name, to="varying")
    except ValueError as err:
      if "shard_map" in str(err):  # a vmap axis: not a device axis
        continue
    except Exception:
      continue
    data_axes.append(name)
  return tuple(data_axes)


def _explicitly_sharded(x: Any) -> bool:
  try:
    spec = jax.typeof(x).sharding.spec
  except (AttributeError, TypeError):
    return False
  return any(entry is not None for entry in spec)


def unsharded(tree: Any) -> Any:
  """``tree`` with every leaf that is sharded in its type (an Explicit mesh) all-gathered.

  On an Explicit mesh (``jax.make_mesh``'s default) sharding is part of an array's
  type, and operations such as a sort along a sharded dimension, or a gradient
  batched over a sharded axis with respect to sharded params, are refused. samx
  gathers those operands first (and reshards results back with
  :func:`sharded_like`). Elsewhere (Auto meshes, one device, ``shard_map``) it is
  the identity.

  >>> unsharded({"w": jnp.ones(2)})["w"]
  Array([1., 1.], dtype=float32)
  """
  from jax.sharding import PartitionSpec

  return jax.tree.map(
    lambda x: jax.sharding.reshard(x, PartitionSpec()) if _explicitly_sharded(x) else x, tree
  )


def sharded_like(tree: Any, like: Any) -> Any:
  """Reshards each leaf of ``tree`` to the typed sharding of the matching leaf of ``like``.

  The inverse of :func:`unsharded` on an Explicit mesh; the identity where ``like``
  carries no sharding in its type.

  >>> sharded_like({"w": jnp.ones(2)}, {"w": jnp.zeros(2)})["w"]
  Array([1., 1.], dtype=float32)
  """

  def leaf(x, ref):
    if not _explicitly_sharded(ref):
      return x
    return jax.sharding.reshard(x, jax.typeof(ref).sharding.spec)

  return jax.tree.map(leaf, tree, like)


def leading_axis_spec(tree: Any) -> Any:
  """The typed sharding of the leading dimension of the first leaf of ``tree`` (or None).

  On an Explicit mesh a batch sharded over the data axis has ``"data"`` here; on an
  Auto mesh, one device or inside ``shard_map`` the type carries no sharding (None).

  >>> leading_axis_spec({"x": jnp.ones((4, 2))}) is None
  True
  """
  for x in jax.tree.leaves(tree):
    if jnp.ndim(x):
      try:
        return jax.typeof(x).sharding.spec[0]
      except (AttributeError, TypeError, IndexError):
        return None
  return None


def shard_leading_axis(tree: Any, entry: Any) -> Any:
  """Reshards every leaf of ``tree`` so its leading dimension is sharded like ``entry``.

  The identity when ``entry`` is None (nothing is sharded in the types).
  """
  if entry is None:
    return tree
  from jax.sharding import PartitionSpec

  def leaf(x):
    if not jnp.ndim(x):
      return x
    return jax.sharding.reshard(x, PartitionSpec(entry, *([None] * (jnp.ndim(x) - 1))))

  return jax.tree.map(leaf, tree)


def configuration_fingerprint(*parts: Any) -> str:
  """A digest of the static configuration reachable from ``parts`` (functions, numbers, ...).

  Walks Python values: numbers, strings, ``None``, tuples, lists, dicts, NumPy and
  concrete JAX arrays (their dtype, shape and bytes, up to 65,536 entries), and
  functions (their qualified name and the values they close over, recursively:
  an alias's hyperparameters live in its closures, down to the base optimizer's
  learning rate). Other objects contribute their type's name only, never an address.

  >>> configuration_fingerprint(1, "a") == configuration_fingerprint(1, "a")
  True
  >>> configuration_fingerprint(lambda: 5) == configuration_fingerprint(lambda: 6)
  False
  """
  digest = hashlib.sha256()
  seen: set[int] = set()

  def add(value: Any, depth: int) -> None:
    if depth > 12:
      return
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
      digest.update(f"{type(value).__name__}:{value!r};".encode())
      return
    if id(value) in seen:
      digest.update(b"<seen>;")
      return
    seen.add(id(value))
    if isinstance(value, (tuple, list)):
      digest.update(f"{type(value).__name__}[{len(value)}](".encode())
      for item in value:
        add(item, depth + 1)
      digest.update(b");")
      return
    if isinstance(value, dict):
      digest.update(b"dict(")
      for key in sorted(value, key=repr):
        add(key, depth + 1)
        add(value[key], depth + 1)
      digest.update(b");")
      return
    if isinstance(value, (np.ndarray, np.generic)) or (
      isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)
    ):
      try:
        array = np.asarray(value)
      except Exception:  # a PRNG key array or an array spread over processes
        digest.update(f"array:{type(value).__name__};".encode())
        return
      digest.update(f"array:{array.dtype}:{array.shape};".encode())
      if array.size <= 65536 and array.dtype != object:
        digest.update(array.tobytes())
      return
    code = getattr(value, "__code__", None)
    if code is not None:
      digest.update(f"fn:{getattr(value, '__qualname__', '')};".encode())
      add_code(code, depth + 1)
      add(getattr(value, "__defaults__", None), depth + 1)
      add(getattr(value, "__kwdefaults__", None), depth + 1)
      for cell in getattr(value, "__closure__", None) or ():
        try:
          add(cell.cell_contents, depth + 1)
        except ValueError:  # an empty cell
          digest.update(b"<empty>;")
      return
    if hasattr(value, "_fields"):  # a NamedTuple (an optax transformation, a Combination)
      digest.update(f"{type(value).__qualname__}(".encode())
      for item in value:
        add(item, depth + 1)
      digest.update(b");")
      return
    if isinstance(value, functools.partial):
      add((value.func, value.args, value.keywords), depth + 1)
      return
    digest.update(f"obj:{type(value).__qualname__};".encode())

  def add_code(code: Any, depth: int) -> None:
    """The bytecode, names and constants (literals such as ``k=5`` inside an alias)."""
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode())
    for const in code.co_consts:
      if hasattr(const, "co_code"):
        if depth < 12:
          add_code(const, depth + 1)
      else:
        digest.update(f"{type(const).__name__}:{const!r};".encode())

  for part in parts:
    add(part, 0)
  return digest.hexdigest()


def check_same_configuration_across_processes(fingerprint: str, *, who: str) -> None:
  """Raises on every process when the processes of a multi-process run built different configs.

  ``jax.distributed`` runs one Python process per host; each builds its own
  optimizer. If their static hyperparameters differ (a LookSAM ``k`` read from a
  per-host flag, ...) the "replicated" params would drift apart silently. This
  gathers ``fingerprint`` (:func:`configuration_fingerprint`) from every process
  once and compares; with one process it does nothing.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  mine = np.frombuffer(bytes.fromhex(fingerprint)[:16], np.uint32)
  every = np.asarray(multihost_utils.process_allgather(mine))
  differ = [i for i in range(every.shape[0]) if not np.array_equal(every[i], every[0])]
  if differ:
    raise ValueError(
      f"{who}: the {jax.process_count()} processes of this jax.distributed run built "
      f"different optimizer configurations (processes {differ} differ from process 0): "
      "their static hyperparameters (e.g. LookSAM's k, rho, the base optimizer's "
      "learning rate, masks) must agree, or the replicated parameters drift apart "
      "silently. Build the optimizer from the same values on every host."
    )
