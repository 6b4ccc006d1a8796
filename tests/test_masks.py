"""samx.masks: mask builders on NNX and linen models with custom module names."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from samx import masks, selective

# ---------------------------------------------------------------------------------------
# Models: normalization layers under names that say nothing about them.


class MyNorm(nnx.LayerNorm):
  """A user's LayerNorm subclass."""


class Standardize(nnx.Module):
  """A user's normalization module that subclasses no Flax norm (found via types=)."""

  def __init__(self, features, rngs):
    self.scale = nnx.Param(jnp.ones(features))
    self.bias = nnx.Param(jnp.zeros(features))

  def __call__(self, x):
    x = (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-5)
    return x * self.scale + self.bias


class NotANorm(nnx.Module):
  """Named like a norm, holds a 1-D 'scale' next to a kernel: never selected."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(jnp.ones((4, 4)))
    self.scale = nnx.Param(jnp.ones(4))


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.q = nnx.BatchNorm(8, rngs=rngs)  # BatchNorm under an unhelpful name
    self.layers = nnx.List(
      [
        nnx.Linear(8, 8, rngs=rngs),
        MyNorm(8, rngs=rngs),
        nnx.GroupNorm(8, num_groups=2, rngs=rngs),
        nnx.RMSNorm(8, rngs=rngs),
      ]
    )
    self.custom = Standardize(8, rngs)
    self.norm = NotANorm(rngs)
    self.head = nnx.Linear(8, 2, rngs=rngs)


NNX_NORM_LEAVES = {
  "q/scale",
  "q/bias",
  "layers/1/scale",
  "layers/1/bias",
  "layers/2/scale",
  "layers/2/bias",
  "layers/3/scale",
}


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name="norm")(x)  # a Dense named "norm": not a normalization layer
    x = nn.LayerNorm(name="zz")(x)
    scale = self.param("scale", nn.initializers.ones, (8,))  # next to a submodule
    return x * scale[None, :]


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), name="c")(x)
    x = nn.BatchNorm(use_running_average=not train, name="stats_are_here")(x)
    x = nn.GroupNorm(num_groups=2, name="g")(x)
    x = nn.RMSNorm(name="r")(x)
    x = nn.BatchNorm(use_running_average=not train, use_bias=False)(x)
    x = LinenBlock(name="bn")(x.mean((1, 2)))
    return nn.Dense(2, name="layer_norm")(x)


LINEN_NORM_LEAVES = {
  "stats_are_here/scale",
  "stats_are_here/bias",
  "g/scale",
  "g/bias",
  "r/scale",
  "BatchNorm_0/scale",
  "bn/zz/scale",
  "bn/zz/bias",
}


@functools.cache
def nnx_net():
  return NnxNet(nnx.Rngs(0))  # not mutated by the tests: built once


@functools.cache
def linen_params():
  return LinenNet().init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))["params"]


def selected(mask, params):
  return set(masks.selected_paths(mask, params))


# ---------------------------------------------------------------------------------------
# norm_layers


def test_nnx_norm_layers_by_module_type():
  model = nnx_net()
  state = nnx.state(model, nnx.Param)
  mask = masks.norm_layers(model)
  assert isinstance(mask, nnx.State)
  assert jax.tree.structure(mask) == jax.tree.structure(nnx.as_pure(state))
  assert selected(mask, state) == NNX_NORM_LEAVES
  with_custom = masks.norm_layers(model, types=(*masks.NORM_LAYER_TYPES, Standardize))
  assert selected(with_custom, state) == NNX_NORM_LEAVES | {"custom/scale", "custom/bias"}


@pytest.mark.parametrize(("scale", "bias"), [(True, False), (False, True)])
def test_scale_and_bias_selectable(scale, bias):
  model = nnx_net()
  keep = {name for name, on in (("scale", scale), ("bias", bias)) if on}
  expected_nnx = {p for p in NNX_NORM_LEAVES if p.rsplit("/", 1)[1] in keep}
  got = selected(masks.norm_layers(model, scale=scale, bias=bias), nnx.state(model, nnx.Param))
  assert got == expected_nnx
  params = linen_params()
  expected_linen = {p for p in LINEN_NORM_LEAVES if p.rsplit("/", 1)[1] in keep}
  assert selected(masks.norm_layers(params, scale=scale, bias=bias), params) == expected_linen


def test_nnx_mask_same_answer_for_variables_and_pure_arrays():
  # tx.init sees nnx.Param Variables; nnx.Optimizer.update passes nnx.as_pure arrays.
  model = nnx_net()
  variables = nnx.state(model, nnx.Param)
  pure = nnx.as_pure(variables)
  builders = [
    masks.norm_layers(model),
    masks.norm_layers,
    masks.by_path(r"layers/\d/scale$"),
    masks.complement(masks.norm_layers(model)),
    masks.union(masks.norm_layers(model), masks.by_path("^head/")),
    masks.intersection(masks.norm_layers, masks.by_path("scale$")),
    masks.random_entries(masks.norm_layers(model), seed=3),
  ]
  for mask in builders:
    at_init = masks.resolve_selection(mask, variables)
    at_update = masks.resolve_selection(mask, pure)
    assert jax.tree.structure(at_init) == jax.tree.structure(at_update)
    for a, b in zip(jax.tree.leaves(at_init), jax.tree.leaves(at_update), strict=True):
      np.testing.assert_array_equal(a, b)


def test_nnx_mask_matches_a_pure_dict_of_the_same_keys():
  model = nnx_net()
  pure_dict = nnx.to_pure_dict(masks.norm_layers(model))
  state = nnx.as_pure(nnx.state(model, nnx.Param))
  assert selected(pure_dict, state) == NNX_NORM_LEAVES


def test_linen_norm_layers_by_structure():
  params = linen_params()
  mask = masks.norm_layers(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  assert selected(mask, params) == LINEN_NORM_LEAVES
  # Used as a callable mask it gives the same answer.
  assert selected(masks.norm_layers, params) == LINEN_NORM_LEAVES


@pytest.mark.parametrize(
  "make_layer",
  [
    lambda name: nn.BatchNorm(use_running_average=True, name=name),
    lambda name: nn.LayerNorm(name=name),
    lambda name: nn.GroupNorm(num_groups=2, name=name),
    lambda name: nn.RMSNorm(name=name),
    lambda name: nn.InstanceNorm(name=name),
  ],
  ids=["BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm", "InstanceNorm"],
)
def test_linen_norm_layers_under_any_name(make_layer):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(4, name="x9")(x)
      return make_layer("weights_of_the_model")(x)

  params = Net().init(jax.random.key(0), jnp.ones((2, 3)))["params"]
  expected = {f"weights_of_the_model/{k}" for k in params["weights_of_the_model"]}
  assert expected
  assert selected(masks.norm_layers, params) == expected


def test_structure_rule_requires_one_dimensional_leaves_of_equal_length():
  params = {
    "a": {"scale": np.ones(3), "bias": np.ones(4)},  # unequal lengths
    "b": {"scale": np.ones((2, 2))},  # not 1-D
    "c": {"scale": np.ones(3), "shift": np.ones(3)},  # other names
    "d": {"bias": np.ones(3)},  # bias only
    "e": {"scale": np.ones(5)},
  }
  assert selected(masks.norm_layers, params) == {"e/scale"}


def test_empty_normalization_selection_lists_the_paths():
  model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
  with pytest.raises(
    ValueError, match=r"norm_layers found no normalization(.|\n)*layers/0/kernel"
  ):
    masks.norm_layers(model)
  params = {"dense": {"kernel": np.ones((2, 2)), "bias": np.ones(2)}}
  with pytest.raises(
    ValueError,
    match=r"norm_layers found no normalization layer in params(.|\n)*dense/bias \(2,\)",
  ):
    masks.norm_layers(params)


def test_norm_layers_bad_arguments():
  with pytest.raises(ValueError, match="scale=False and bias=False"):
    masks.norm_layers({"n": {"scale": np.ones(2)}}, scale=False, bias=False)
  with pytest.raises(ValueError, match="types selects NNX module types"):
    masks.norm_layers({"n": {"scale": np.ones(2)}}, types=(nnx.LayerNorm,))


# ---------------------------------------------------------------------------------------
# by_path and set algebra


def test_by_path_regex_and_predicate():
  params = linen_params()
  assert selected(masks.by_path(r"^g/"), params) == {"g/scale", "g/bias"}
  assert selected(masks.by_path(re.compile(r"kernel$")), params) == {
    "c/kernel",
    "bn/norm/kernel",
    "layer_norm/kernel",
  }
  assert selected(masks.by_path(lambda path: path.startswith("bn/")), params) == {
    "bn/norm/kernel",
    "bn/norm/bias",
    "bn/zz/scale",
    "bn/zz/bias",
    "bn/scale",
  }
  model = nnx_net()
  assert selected(masks.by_path("^custom/"), nnx.state(model, nnx.Param)) == {
    "custom/scale",
    "custom/bias",
  }


def test_by_path_that_matches_nothing_lists_the_paths():
  with pytest.raises(ValueError, match=r"matched no parameter leaf(.|\n)*w \(2,\)"):
    masks.by_path("nothing")({"w": np.ones(2)})
  with pytest.raises(TypeError, match="pattern must be"):
    masks.by_path(3)


def test_complement_union_intersection():
  params = linen_params()
  everything = set(masks.leaf_paths(params))
  norm = masks.norm_layers
  kernels = masks.by_path("kernel$")
  assert selected(masks.complement(norm), params) == everything - LINEN_NORM_LEAVES
  assert selected(masks.union(norm, kernels), params) == LINEN_NORM_LEAVES | selected(
    kernels, params
  )
  assert selected(masks.intersection(norm, masks.by_path("^g/")), params) == {
    "g/scale",
    "g/bias",
  }
  # Per-entry masks combine entry by entry.
  leaves = {"w": np.ones((2, 2)), "b": np.ones(2)}
  entries = {"w": np.array([[True, False], [False, True]]), "b": False}
  inverse = masks.complement(entries)(leaves)
  np.testing.assert_array_equal(inverse["w"], [[False, True], [True, False]])
  assert inverse["b"] is True
  both = masks.union(entries, {"w": False, "b": True})(leaves)
  np.testing.assert_array_equal(both["w"], entries["w"])
  assert both["b"] is True
  assert masks.count_selected(masks.intersection(entries, {"w": True, "b": True}), leaves) == 2


# ---------------------------------------------------------------------------------------
# random_entries


def test_random_entries_exact_count_of_norm_selection():
  model = nnx_net()
  state = nnx.state(model, nnx.Param)
  norm = masks.norm_layers(model)
  n_norm = masks.count_selected(norm, state)
  assert n_norm == 6 * 8 + 8  # six 8-vectors and RMSNorm's scale
  control = masks.random_entries(norm, seed=0)
  chosen = masks.resolve_selection(control, state)
  assert all(isinstance(x, np.ndarray) and x.dtype == np.bool_ for x in jax.tree.leaves(chosen))
  assert sum(int(x.sum()) for x in jax.tree.leaves(chosen)) == n_norm
  # Element-wise: the entries are spread over the kernels too, not whole leaves.
  assert len(masks.selected_paths(control, state)) > len(NNX_NORM_LEAVES)
  # Deterministic for a seed, different across seeds.
  again = masks.resolve_selection(control, nnx.as_pure(state))
  for a, b in zip(jax.tree.leaves(chosen), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(a, b)
  other = masks.resolve_selection(masks.random_entries(norm, seed=1), state)
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(chosen), jax.tree.leaves(other), strict=True)
  )


def test_random_entries_within_and_bounds():
  params = {"w": np.ones((3, 4)), "b": np.ones(4)}
  inside = masks.random_entries(3, within={"w": False, "b": True})(params)
  assert not inside["w"].any() and int(inside["b"].sum()) == 3
  assert masks.count_selected(masks.random_entries(16)(params), params) == 16
  with pytest.raises(ValueError, match=r"count must be between 1 and the 4 entries.*count=5"):
    masks.random_entries(5, within={"w": False, "b": True})(params)
  with pytest.raises(ValueError, match="count must be an integer >= 1"):
    masks.random_entries(0)
  with pytest.raises(TypeError, match="seed must be an integer"):
    masks.random_entries(2, seed=0.5)


def test_random_entries_are_static_under_jit():
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
  control = masks.random_entries(5, seed=2)
  expected = control(params)
  tx = selective.mask_perturbation(control)

  @jax.jit
  def apply(u):
    return tx.update(u, tx.init(params), params)[0]

  out = apply(jax.tree.map(jnp.ones_like, params))
  for a, e in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(a) != 0, e)


# ---------------------------------------------------------------------------------------
# Resolution errors


def test_mask_tree_mismatch_names_the_argument_and_both_sides():
  params = {"w": np.ones((2, 2)), "b": np.ones(2)}
  with pytest.raises(
    ValueError,
    match=r"mask must be a pytree of booleans(.|\n)*without a mask entry:\n    b(.|\n)*"
    r"not params paths:\n    kernel",
  ):
    masks.resolve_selection({"w": True, "kernel": True}, params)


def test_per_entry_mask_of_the_wrong_shape():
  with pytest.raises(ValueError, match=r"mask at 'w' is a boolean array of shape \(3,\)"):
    masks.resolve_selection({"w": np.ones(3, bool)}, {"w": np.ones(2)})


def test_mask_leaves_must_be_static_booleans():
  with pytest.raises(TypeError, match="mask leaves must be Python booleans or NumPy"):
    masks.resolve_selection({"w": 1}, {"w": np.ones(2)})

  @jax.jit
  def traced(m):
    return masks.resolve_selection({"w": m}, {"w": np.ones(2)})

  with pytest.raises(TypeError, match="traced array; masks are static"):
    traced(jnp.ones(2, bool))


def test_empty_selection_lists_the_paths():
  with pytest.raises(ValueError, match=r"selects no parameter entry(.|\n)*w \(2, 2\)"):
    masks.resolve_selection({"w": np.zeros((2, 2), bool)}, {"w": np.ones((2, 2))})
  assert masks.resolve_selection(False, {"w": 1.0}, allow_empty=True) == {"w": False}
