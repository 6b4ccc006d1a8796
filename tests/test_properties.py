"""Property-based tests (hypothesis) over random pytrees, for every samx alias.

For each variant, on pytrees with nesting (dicts, lists, tuples), scalar and empty leaves
and float32 / bfloat16 / float16 / float64 leaves, two consecutive updates must satisfy:

* the perturbation has the radius of the variant's norm scope: ``||eps|| = rho * ||u|| /
  (||u|| + eps)`` for SAM's sphere (so ``||eps|| = rho`` unless ``u`` is tiny, and
  ``eps = 0`` for ``u = 0``), ``||eps|| = rho`` over the selected entries for SAM-ON,
  ``||eps|| <= rho`` with the norm of the unmasked gradient for SSAM, ``rho * sign(g)`` for
  the l-inf ball, ``||T^-1 eps||`` for ASAM, ``rho / beta`` on a random subset for ESAM;
* masked entries are exactly zero (SAM-ON's static mask, SSAM's mask in the state);
* updates are finite and keep the parameters' dtype (norms accumulate in float32, so
  float16 entries whose squares overflow float16 are fine);
* the state keeps its structure, shapes and dtypes.

The perturbation is read exactly: the updates run at ``w = 0``, where ``w + eps = eps``,
and ``grad_fn`` (or the per-example losses) records its argument with
``jax.debug.callback``. The loss ``<G, w> + |w|^2 / 2`` has gradient ``g = G`` at ``w = 0``
and ``g_s = G + eps``, so GSAM's and LookSAM's decompositions see two different vectors.

Compilation dominates the cost, so each variant compiles once for a fixed tree (``ZOO``,
every structural feature and three dtypes) on which hypothesis draws the values, and a
few times for random trees.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Any, NamedTuple

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, Phase, example, given, seed, settings
from hypothesis import strategies as st

import samx

RHO = 0.05
STABILISER = 1e-12  # samx's default eps
BETA = 0.5  # ESAM's fraction of perturbed weights
ETA = 0.1  # ASAM's offset: T = ETA on the kernels at w = 0
BATCH = 2  # examples for the per-example contract

# dtype name -> (largest magnitude drawn, relative tolerance of a norm in that dtype).
# float16 entries go to 1e4: their squares overflow float16 (max 65504) but not the
# float32 accumulation, and a few of them summed by the base optimizer's momentum or by
# GSAM's combination still fit in float16.
DTYPES = {
  "float32": (1e15, 1e-5),
  "bfloat16": (1e15, 1e-2),
  "float16": (1e4, 3e-3),
  "float64": (1e100, 1e-9),
}

# Failures are reported without shrinking: every shrink step of a random tree compiles.
SETTINGS = settings(
  deadline=None,
  derandomize=True,
  database=None,
  phases=(Phase.explicit, Phase.reuse, Phase.generate),
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ZOO_EXAMPLES = 12
RANDOM_EXAMPLES = 2

VARIANTS = (
  "sam",
  "sam_linf",
  "asam",
  "asam_layerwise",
  "msam_micro_shards",
  "fsam",
  "vasso",
  "random_sam",
  "sam_on",
  "ssam_fisher",
  "ssam_dynamic",
  "gsam",
  "wsam",
  "looksam",
  "esam",
)
MASKED = ("sam_on", "ssam_fisher", "ssam_dynamic")  # need at least one entry


def _base():
  return optax.sgd(0.1, momentum=0.9)


def build(name: str, mask: Any = None) -> optax.GradientTransformation:
  """The variant ``name`` on SGD with momentum (``mask``: SAM-ON's selection)."""
  return {
    "sam": lambda: samx.sam(_base(), RHO),
    "sam_linf": lambda: samx.sam(_base(), RHO, ball="linf"),
    "asam": lambda: samx.asam(_base(), RHO, ETA),
    "asam_layerwise": lambda: samx.asam(_base(), RHO, ETA, layerwise=True),
    "msam_micro_shards": lambda: samx.msam(_base(), RHO, micro_shards=BATCH),
    "fsam": lambda: samx.fsam(_base(), RHO, sigma=0.5, decay=0.6),
    "vasso": lambda: samx.vasso(_base(), RHO, theta=0.4),
    "random_sam": lambda: samx.random_sam(_base(), RHO, key=1),
    "sam_on": lambda: samx.sam_on(_base(), RHO, mask),
    "ssam_fisher": lambda: samx.ssam(_base(), RHO, 0.5, num_samples=None, refresh_every=1),
    "ssam_dynamic": lambda: samx.ssam(_base(), RHO, 0.5, mask_type="dynamic", refresh_every=1),
    "gsam": lambda: samx.gsam(_base(), RHO, alpha=0.3),
    "wsam": lambda: samx.wsam(_base(), RHO, gamma=0.8, learning_rate=0.1),
    "looksam": lambda: samx.looksam(_base(), RHO, k=2, alpha=0.7),
    "esam": lambda: samx.esam(_base(), RHO, beta=BETA, gamma=0.5, key=2),
  }[name]()


# Where the perturbed parameters are seen: ESAM and micro-shards evaluate g_s through the
# per-example losses, every other variant through grad_fn.
PER_EXAMPLE_RECORD = ("esam", "msam_micro_shards")


# ---------------------------------------------------------------------------------------
# Trees: a pytree of jax.ShapeDtypeStruct describes the parameters.


def _dtype_name(leaf) -> str:
  return jnp.dtype(leaf.dtype).name


def _size(spec) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(spec))


def _x64(spec):
  """A context with float64 enabled when the tree holds a float64 leaf."""
  wide = any(_dtype_name(leaf) == "float64" for leaf in jax.tree.leaves(spec))
  return jax.enable_x64(True) if wide else contextlib.nullcontext()


def S(shape, dtype):
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))


ZOO = {
  "dense": {"kernel": S((3, 4), "float32"), "bias": S((4,), "float16")},
  "norms": [{"scale": S((4,), "bfloat16")}, {"scale": S((0,), "float32")}],
  "scalar": S((), "float16"),
  "empty": S((2, 0), "bfloat16"),
  "deep": ({"x": S((1, 1, 2), "float32")}, S((2, 3), "bfloat16")),
}
ZOO_ZEROS = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ZOO)
# SAM-ON on the zoo: norm-like 1-D leaves, a per-entry selection, unselected kernels.
ZOO_MASK = {
  "dense": {"kernel": False, "bias": True},
  "norms": [{"scale": True}, {"scale": True}],
  "scalar": False,
  "empty": False,
  "deep": ({"x": np.array([[[True, False]]])}, False),
}

_shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple)


@st.composite
def random_spec(draw):
  """A random tree of ShapeDtypeStruct: one dtype for the tree, or mixed leaves.

  float64 comes first, so the simplest example (hypothesis starts there) is float64.
  """
  mode = draw(st.sampled_from(["float64", "mixed", "float32", "bfloat16", "float16"]))
  leaf_dtype = st.sampled_from(["float32", "bfloat16", "float16"]) if mode == "mixed" else None

  def leaf(shape):
    return S(shape, draw(leaf_dtype) if leaf_dtype is not None else mode)

  keys = st.sampled_from(["a", "b", "c", "kernel", "scale"])
  structure = draw(
    st.recursive(
      _shapes.map(lambda shape: ("leaf", shape)),
      lambda children: st.one_of(
        st.dictionaries(keys, children, min_size=1, max_size=3).map(lambda d: ("dict", d)),
        st.lists(children, min_size=1, max_size=3).map(lambda v: ("list", v)),
        st.lists(children, min_size=1, max_size=2).map(lambda v: ("tuple", v)),
      ),
      max_leaves=5,
    )
  )

  def realise(node):
    kind, value = node
    if kind == "leaf":
      return leaf(value)
    if kind == "dict":
      return {k: realise(v) for k, v in value.items()}
    children = [realise(v) for v in value]
    return children if kind == "list" else tuple(children)

  return realise(structure)


@st.composite
def values_like(draw, spec):
  """Finite values in each leaf's dtype: random magnitudes, zeros, one repeated value."""

  def leaf(s):
    bound, _ = DTYPES[_dtype_name(s)]
    finite = st.floats(-bound, bound, allow_nan=False, allow_infinity=False)
    array = draw(
      st.one_of(
        hnp.arrays(np.float64, s.shape, elements=finite),
        st.just(np.zeros(s.shape)),
        finite.map(lambda v: np.full(s.shape, v)),
      )
    )
    return jnp.asarray(array, s.dtype)

  return jax.tree.map(leaf, spec)


@st.composite
def mask_like(draw, spec):
  """SAM-ON's selection: per-leaf booleans or per-entry arrays, selecting something."""
  leaves, treedef = jax.tree.flatten(spec)

  def one(s):
    if s.shape and draw(st.booleans()):
      return np.asarray(draw(hnp.arrays(np.bool_, s.shape)))
    return draw(st.booleans())

  selection = [one(s) for s in leaves]
  if not any(np.any(m) and np.prod(s.shape) for m, s in zip(selection, leaves, strict=True)):
    first = next(i for i, s in enumerate(leaves) if np.prod(s.shape))
    selection[first] = True
  return jax.tree.unflatten(treedef, selection)


# ---------------------------------------------------------------------------------------
# Two updates at w = 0, recording the perturbed parameters.


class Steps(NamedTuple):
  run: Any  # (G1, G2, state) -> (u1, s1, u2, s2)
  records: list  # (step, perturbed params as NumPy) appended by the callbacks


def _accumulate(x):
  return jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))


def make_steps(tx, name: str) -> Steps:
  records: list = []
  record_in_grad_fn = name not in PER_EXAMPLE_RECORD

  def record(step, p):
    jax.debug.callback(lambda q: records.append((step, jax.tree.map(np.asarray, q))), p)

  def update(grads, state, step):
    params = jax.tree.map(jnp.zeros_like, grads)

    def value(p):  # <G, p> + |p|^2 / 2, accumulated wide
      return sum(
        jnp.sum(_accumulate(g) * _accumulate(x) + 0.5 * jnp.square(_accumulate(x)))
        for g, x in zip(jax.tree.leaves(grads), jax.tree.leaves(p), strict=True)
      )

    def losses(p, batch):
      return jnp.zeros(batch["i"].shape, jnp.float32) + value(p)

    def recorded_losses(p, batch):
      record(step, p)
      return losses(p, batch)

    def grad_fn(p):
      if record_in_grad_fn:
        record(step, p)
      return jax.tree.map(lambda g, x: (g + x).astype(x.dtype), grads, p)

    batch = {"i": jnp.arange(BATCH)}
    return tx.update(
      grads,
      state,
      params,
      grad_fn=grad_fn,
      per_example_loss_fn=losses if record_in_grad_fn else recorded_losses,
      batch=batch,
      losses=losses(params, batch),
    )

  @jax.jit
  def run(g1, g2, state):
    u1, s1 = update(g1, state, 1)
    u2, s2 = update(g2, s1, 2)
    return u1, s1, u2, s2

  return Steps(run, records)


# ---------------------------------------------------------------------------------------
# The checks.


def _f64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _norm(leaves) -> float:
  return float(np.sqrt(sum(np.sum(np.square(x)) for x in leaves)))


def _tolerance(spec, scale=1.0) -> float:
  """Rounding of a norm in the loosest dtype of ``spec``, relative to ``scale``."""
  rtol = max([DTYPES[_dtype_name(s)][1] for s in jax.tree.leaves(spec)], default=0.0)
  return rtol * scale + 1e-6 * scale


def _sphere(u_leaves) -> float:
  """The radius SAM's normalisation gives for the direction ``u``."""
  n = _norm(u_leaves)
  return RHO * n / (n + STABILISER)


def _assert_radius(actual, expected, spec, what, scale=RHO):
  assert abs(actual - expected) <= _tolerance(spec, scale), (
    f"{what}: ||eps|| = {actual!r}, expected {expected!r}"
  )


def _selection(mask, spec) -> list[np.ndarray]:
  """A boolean array per leaf from a SAM-ON mask (per-leaf booleans or per-entry)."""
  resolved = samx.masks.resolve_selection(mask, spec, allow_empty=True)
  return [
    np.broadcast_to(np.asarray(m, bool), s.shape)
    for m, s in zip(jax.tree.leaves(resolved), jax.tree.leaves(spec), strict=True)
  ]


def check_perturbation(name, eps_tree, g_tree, step, state, spec, mask):
  eps, g = _f64(eps_tree), _f64(g_tree)
  what = f"{name} step {step}"
  uses_g = name != "random_sam" and not (name in ("fsam", "vasso") and step == 2)
  if uses_g and not _norm(g):
    assert not _norm(eps), f"{what}: a zero gradient must give eps = 0 exactly"
  if name == "sam_linf":
    for e, gl, s in zip(eps, g, jax.tree.leaves(spec), strict=True):
      # rho * sign(g) in the leaf's accumulation dtype, rounded to the leaf's dtype.
      rho = np.asarray(RHO, np.float64 if _dtype_name(s) == "float64" else np.float32)
      expected = np.asarray(
        jnp.asarray(rho * np.sign(gl).astype(rho.dtype), s.dtype), np.float64
      )
      np.testing.assert_array_equal(e, expected, err_msg=what)
  elif name in ("asam", "asam_layerwise"):
    # w = 0: T = ETA on the kernels (ndim >= 2), 1 elsewhere; ||eps / T|| = sphere(T g).
    scales = [ETA if len(s.shape) >= 2 else 1.0 for s in jax.tree.leaves(spec)]
    expected = _sphere([t * x for t, x in zip(scales, g, strict=True)])
    actual = _norm([e / t for t, e in zip(scales, eps, strict=True)])
    _assert_radius(actual, expected, spec, what)
  elif name == "sam_on":
    selected = _selection(mask, spec)
    for e, m in zip(eps, selected, strict=True):
      assert np.all(e[~m] == 0), f"{what}: unselected entries must be exactly zero"
    expected = _sphere([x[m] for x, m in zip(g, selected, strict=True)])
    _assert_radius(_norm(eps), expected, spec, what)
  elif name.startswith("ssam"):
    mask_leaves = [np.asarray(m) for m in jax.tree.leaves(state.ascent_state[1].mask)]
    for e, m in zip(eps, mask_leaves, strict=True):
      assert np.all(e[~m] == 0), f"{what}: entries outside the mask must be exactly zero"
    # The norm of the unmasked gradient: ||eps|| = rho ||g M|| / (||g|| + eps) <= rho.
    n = _norm(g)
    expected = (
      RHO * _norm([x * m for x, m in zip(g, mask_leaves, strict=True)]) / (n + STABILISER)
    )
    _assert_radius(_norm(eps), expected, spec, what)
    assert _norm(eps) <= RHO + _tolerance(spec, RHO)
  elif name == "esam":
    # Each entry is 0 or SAM's entry divided by beta.
    n = _norm(g)
    for e, x in zip(eps, g, strict=True):
      full = RHO / BETA * x / (n + STABILISER)
      kept = e != 0
      tol = _tolerance(spec, RHO / BETA)
      assert np.all(np.abs(e[kept] - full[kept]) <= tol + 1e-2 * np.abs(full[kept])), what
    assert _norm(eps) <= RHO / BETA + _tolerance(spec, RHO / BETA)
  elif name == "random_sam":
    expected = RHO if _size(spec) else 0.0
    _assert_radius(_norm(eps), expected, spec, what)
  elif name in ("fsam", "vasso") and step == 2:
    assert _norm(eps) <= RHO + _tolerance(spec), what  # along an average of g_1, g_2
  else:  # SAM's sphere along g: sam, fsam / vasso at step 1, gsam, wsam, looksam, msam
    _assert_radius(_norm(eps), _sphere(g), spec, what)


def check_two_steps(name, steps, spec, g1, g2, state0, mask):
  del steps.records[:]
  u1, s1, u2, s2 = steps.run(g1, g2, state0)
  jax.effects_barrier()
  # Updates: finite, in the parameters' dtypes.
  for u in (u1, u2):
    assert jax.tree.structure(u) == jax.tree.structure(spec)
    for leaf, s in zip(jax.tree.leaves(u), jax.tree.leaves(spec), strict=True):
      assert leaf.dtype == s.dtype and leaf.shape == s.shape
      assert bool(jnp.all(jnp.isfinite(leaf))), f"{name}: non-finite update"
  # The state: same structure, shapes and dtypes at every step.
  layout = lambda tree: (
    jax.tree.structure(tree),
    [(np.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)],
  )
  assert layout(s1) == layout(state0) and layout(s2) == layout(state0)
  # The perturbation of each evaluation.
  by_step = {1: [], 2: []}
  for step, perturbed in steps.records:
    by_step[step].append(perturbed)
  if name == "looksam":
    assert len(by_step[1]) == 1 and not by_step[2], "LookSAM (k=2) evaluates g_s at step 1 only"
  else:
    assert by_step[1] and by_step[2], f"{name}: g_s was not evaluated"
  for step, g, state in ((1, g1, s1), (2, g2, s2)):
    for perturbed in by_step[step]:
      if name == "msam_micro_shards" and not _norm(_f64(perturbed)):
        continue  # the contract check and the shards' clean gradients run at w = 0
      check_perturbation(name, perturbed, g, step, state, spec, mask)


def _setup(name, spec, mask):
  tx = build(name, mask)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)
  return tx, make_steps(tx, name), tx.init(zeros)


@pytest.mark.parametrize("name", VARIANTS)
def test_zoo(name):
  # One compilation; hypothesis draws the gradients of two steps.
  mask = ZOO_MASK if name == "sam_on" else None
  tx, steps, state0 = _setup(name, ZOO, mask)

  @settings(SETTINGS, max_examples=ZOO_EXAMPLES)
  @given(g1=values_like(ZOO), g2=values_like(ZOO))
  @example(g1=ZOO_ZEROS, g2=ZOO_ZEROS)
  def check(g1, g2):
    check_two_steps(name, steps, ZOO, g1, g2, state0, mask)

  check()


@pytest.mark.parametrize("name", VARIANTS)
def test_random_pytrees(name):
  # One seed per variant (the inner test is the same function for all of them).
  @settings(SETTINGS, max_examples=RANDOM_EXAMPLES, derandomize=False)
  @seed(zlib.crc32(name.encode()))
  @given(data=st.data())
  def check(data):
    spec = data.draw(random_spec())
    if name in MASKED and not _size(spec):
      spec = [spec, S((2,), "float32")]  # a mask must select something
    with _x64(spec):
      mask = data.draw(mask_like(spec)) if name == "sam_on" else None
      g1, g2 = data.draw(values_like(spec)), data.draw(values_like(spec))
      tx, steps, state0 = _setup(name, spec, mask)
      check_two_steps(name, steps, spec, g1, g2, state0, mask)

  check()
