"""The error catalog: every public function, fed each documented misuse.

Each entry calls one public function the wrong way and checks that the error names the
argument and the expected form (the message regex). ``test_every_public_callable_is
_covered`` walks ``samx.__all__`` (and the ``__all__`` of the modules it exports, and of
``samx.nonfinite``): every public function or class is either in the catalog or listed in
``NO_USER_INPUT`` with the reason. tests/test_errors.py holds the first, narrower checks.

Misuses that samx does not report yet are marked ``xfail(strict=True)`` with the fix.
"""

from __future__ import annotations

import inspect
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import samx
from samx import diagnostics, evaluation, masks, numerics
from samx import nonfinite as nonfinite_module
from samx.nonfinite import skip_nonfinite

PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
GRADS = jax.tree.map(jnp.ones_like, PARAMS)
GRAD_FN = lambda p: jax.tree.map(jnp.ones_like, p)
BATCH = {"x": jnp.ones((4, 3))}
LOSSES = lambda p, b: b["x"] @ p["b"]  # (B,) per-example losses
LOSS = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)
SGD = optax.sgd(0.1)


def _update(tx, grads=GRADS, params=PARAMS, **extra):
  return tx.update(grads, tx.init(params), params, **extra)


def _traced_update(tx):
  """One update under jit (injected hyperparameters are traced there)."""
  step = lambda state: tx.update(GRADS, state, PARAMS, per_example_loss_fn=LOSSES, batch=BATCH)
  return jax.jit(step)(tx.init(PARAMS))


def _shard_map_call(fn):
  """``fn(x)`` inside shard_map over 2 devices (replication checking on, JAX's default)."""
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((2,), ("d",), devices=jax.devices()[:2])
  with jax.set_mesh(mesh):
    return jax.jit(jax.shard_map(fn, in_specs=P(), out_specs=P()))(jnp.ones(2))


def _shard_map_update(tx, *, cast):
  """One update inside shard_map, the clean gradient taken w.r.t. replicated params."""
  from jax.sharding import PartitionSpec as P

  def step(params):
    local = jax.lax.pcast(params, "d", to="varying") if cast else params
    grads = jax.grad(LOSS)(local)
    return tx.update(grads, tx.init(params), params, grad_fn=jax.grad(LOSS))[0]

  mesh = jax.make_mesh((2,), ("d",), devices=jax.devices()[:2])
  with jax.set_mesh(mesh):
    return jax.jit(jax.shard_map(step, in_specs=P(), out_specs=P()))(PARAMS)


class Misuse(NamedTuple):
  name: str  # the public name, "module.name" for the exported modules' functions
  misuse: str
  call: Any
  error: type
  match: str  # names the argument and the expected form
  fix: str | None = None  # set when samx does not report it yet (xfail, strict)


GRAD_FN_CALL = r"grad_fn\(params\) -> grads(.|\n)*tx\.update\(grads, opt_state, params"
PER_EXAMPLE_CALL = (
  r"per_example_loss_fn and batch(.|\n)*per_example_loss_fn=per_example_loss_fn"
)
NONNEGATIVE = r"must be a non-negative number, schedule or pytree of them; got"

CATALOG = [
  # ---------------------------------------------------------------- the aliases
  Misuse(
    "sam",
    "negative rho",
    lambda: samx.sam(SGD, rho=-0.1),
    ValueError,
    rf"rho {NONNEGATIVE} rho=-0.1",
  ),
  Misuse(
    "sam",
    "rho not a number",
    lambda: samx.sam(SGD, rho="0.05"),
    TypeError,
    r"rho must be a non-negative number.*got '0.05'",
  ),
  Misuse(
    "sam",
    "eps <= 0",
    lambda: samx.sam(SGD, eps=0.0),
    ValueError,
    r"eps must be a positive number; got eps=0.0",
  ),
  Misuse(
    "sam",
    "unknown ball",
    lambda: samx.sam(SGD, ball="l1"),
    ValueError,
    r"ball must be one of \('l2', 'linf'\); got ball='l1'",
  ),
  Misuse(
    "sam",
    "no grad_fn",
    lambda: _update(samx.sam(SGD)),
    TypeError,
    rf"samx\.sam needs the keyword argument {GRAD_FN_CALL}",
  ),
  Misuse(
    "sam",
    "grad_fn not callable",
    lambda: _update(samx.sam(SGD), grad_fn=GRADS),
    TypeError,
    r"grad_fn must be a callable grad_fn\(params\) -> grads; got dict",
  ),
  Misuse(
    "sam",
    "params=None",
    lambda: samx.sam(SGD).update(GRADS, samx.sam(SGD).init(PARAMS), None, grad_fn=GRAD_FN),
    ValueError,
    r"needs the current parameters(.|\n)*not params=None",
  ),
  Misuse(
    "sam",
    "grads not like params",
    lambda: _update(samx.sam(SGD), grads={"w": GRADS["w"]}, grad_fn=GRAD_FN),
    ValueError,
    r"grads and params must have the same tree structure",
  ),
  Misuse(
    "sam",
    "grad_fn returns another tree",
    lambda: _update(samx.sam(SGD), grad_fn=lambda p: {"w": p["w"]}),
    ValueError,
    r"grad_fn\(params\) output and params must have the same tree structure",
  ),
  Misuse(
    "sam",
    "rho tree not like params",
    lambda: _update(samx.sam(SGD, rho={"kernel": 0.1}), grad_fn=GRAD_FN),
    ValueError,
    r"rho given as a pytree must have the structure of the parameters \(or a prefix of it\)",
  ),
  Misuse(
    "sam",
    "unbound axis_name",
    lambda: _update(samx.sam(SGD, axis_name="batch"), grad_fn=GRAD_FN),
    NameError,
    r"axis_name='batch' is not bound here: "
    r"run the training step under jax\.pmap\(\.\.\., axis_name='batch'\)",
  ),
  Misuse(
    "asam",
    "negative eta",
    lambda: samx.asam(SGD, eta=-0.01),
    ValueError,
    rf"eta {NONNEGATIVE} eta=-0.01",
  ),
  Misuse(
    "asam",
    "mask not like params",
    lambda: _update(samx.asam(SGD, mask={"kernel": True}), grad_fn=GRAD_FN),
    ValueError,
    r"mask must be a pytree of booleans with the structure of params \(or a prefix of it\)",
  ),
  Misuse(
    "asam",
    "mask of numbers",
    lambda: _update(samx.asam(SGD, mask={"w": 1, "b": 0}), grad_fn=GRAD_FN),
    TypeError,
    r"mask leaves must be Python booleans",
  ),
  Misuse(
    "msam",
    "micro_shards = 0",
    lambda: samx.msam(SGD, micro_shards=0),
    ValueError,
    r"micro_shards must be an integer >= 1; got micro_shards=0",
  ),
  Misuse(
    "msam",
    "micro_shards not an int",
    lambda: samx.msam(SGD, micro_shards=2.0),
    TypeError,
    r"micro_shards must be an integer >= 1 or None",
  ),
  Misuse(
    "msam",
    "micro-shards without the batch",
    lambda: _update(samx.msam(SGD, micro_shards=2), grad_fn=GRAD_FN),
    TypeError,
    rf"samx\.msam needs the keyword arguments {PER_EXAMPLE_CALL}",
  ),
  Misuse(
    "msam",
    "batch not divisible",
    lambda: _update(samx.msam(SGD, micro_shards=3), per_example_loss_fn=LOSSES, batch=BATCH),
    ValueError,
    r"batch size 4 must be divisible by micro_shards=3",
  ),
  Misuse(
    "msam",
    "micro-shards with one global eps",
    lambda: samx.msam(SGD, axis_name="d", sync_ascent=True, micro_shards=2),
    ValueError,
    r"sync_ascent must be False; got sync_ascent=True",
  ),
  Misuse(
    "fsam",
    "negative sigma",
    lambda: samx.fsam(SGD, sigma=-1.0),
    ValueError,
    r"sigma must be a non-negative number; got sigma=-1.0",
  ),
  Misuse(
    "fsam",
    "decay above 1",
    lambda: samx.fsam(SGD, decay=2.0),
    ValueError,
    r"decay must be a number in \[0, 1\]; got decay=2.0",
  ),
  Misuse(
    "vasso",
    "theta = 0",
    lambda: samx.vasso(SGD, theta=0.0),
    ValueError,
    r"theta must be a number in \(0, 1\]; got theta=0.0",
  ),
  Misuse(
    "random_sam",
    "float key",
    lambda: samx.random_sam(SGD, key=1.5),
    TypeError,
    r"key must be an int seed, a key from jax\.random\.key\(seed\), or a raw key",
  ),
  Misuse(
    "sam_on",
    "mask selecting nothing",
    lambda: samx.sam_on(SGD, mask={"w": False, "b": False}).init(PARAMS),
    ValueError,
    r"mask selects no parameter entry; the parameter leaves are:\n    b \(3,\)",
  ),
  Misuse(
    "sam_on",
    "no normalization layer",
    lambda: samx.sam_on(SGD).init(PARAMS),
    ValueError,
    r"norm_layers found no normalization layer(.|\n)*samx\.masks\.by_path",
  ),
  Misuse(
    "sam_on",
    "complement of everything",
    lambda: samx.sam_on(SGD, mask={"w": True, "b": True}, complement=True).init(PARAMS),
    ValueError,
    r"mask selects no parameter entry",
  ),
  Misuse(
    "sam_on",
    "per-entry mask of another shape",
    lambda: samx.sam_on(SGD, mask={"w": np.ones((3, 2), bool), "b": True}).init(PARAMS),
    ValueError,
    r"mask at 'w' is a boolean array of shape \(3, 2\); "
    r"the parameter leaf there has shape \(2, 3\)",
  ),
  Misuse(
    "sam_on",
    "unknown ascent",
    lambda: samx.sam_on(SGD, ascent="fsam"),
    ValueError,
    r"ascent must be one of \('sam', 'asam'\); got ascent='fsam'(.|\n)*masked_ascent",
  ),
  Misuse(
    "sam_on",
    "ASAM options with ascent='sam'",
    lambda: samx.sam_on(SGD, layerwise=True),
    ValueError,
    r"layerwise and adaptive_mask configure ASAM's T_w and need ascent='asam'",
  ),
  Misuse(
    "ssam",
    "sparsity = 1",
    lambda: samx.ssam(SGD, sparsity=1.0),
    ValueError,
    r"sparsity must be in \[0, 1\); got sparsity=1.0",
  ),
  Misuse(
    "ssam",
    "unknown mask_type",
    lambda: samx.ssam(SGD, mask_type="random"),
    ValueError,
    r"mask_type must be one of \('fisher', 'dynamic'\); got mask_type='random'",
  ),
  Misuse(
    "ssam",
    "unknown pattern",
    lambda: samx.ssam(SGD, pattern="blocks"),
    ValueError,
    r"pattern must be 'unstructured', 'structured' or 'N:M'(.|\n)*got pattern='blocks'",
  ),
  Misuse(
    "ssam",
    "N > M",
    lambda: samx.ssam(SGD, pattern="3:2"),
    ValueError,
    r"needs 1 <= N <= M; got pattern='3:2'",
  ),
  Misuse(
    "ssam",
    "sparsity with N:M",
    lambda: samx.ssam(SGD, sparsity=0.5, pattern="2:4"),
    ValueError,
    r"leave sparsity=None, got sparsity=0.5",
  ),
  Misuse(
    "ssam",
    "M not dividing the kernels",
    lambda: samx.ssam(SGD, pattern="2:4").init(PARAMS),
    ValueError,
    r"pattern='2:4' groups M=4(.|\n)*not a multiple of 4",
  ),
  Misuse(
    "ssam",
    "num_samples = 0",
    lambda: samx.ssam(SGD, num_samples=0),
    ValueError,
    r"num_samples must be a positive integer or None; got num_samples=0",
  ),
  Misuse(
    "ssam",
    "refresh_every = 0",
    lambda: samx.ssam(SGD, refresh_every=0),
    ValueError,
    r"refresh_every must be an integer >= 1; got refresh_every=0",
  ),
  Misuse(
    "ssam",
    "pattern with dynamic masks",
    lambda: samx.ssam(SGD, mask_type="dynamic", pattern="structured"),
    ValueError,
    r"dynamic masks are unstructured(.|\n)*pattern='structured'",
  ),
  Misuse(
    "ssam",
    "Fisher mask without the batch",
    lambda: _update(samx.ssam(SGD), grad_fn=GRAD_FN),
    TypeError,
    PER_EXAMPLE_CALL,
  ),
  Misuse(
    "gsam",
    "negative alpha",
    lambda: samx.gsam(SGD, alpha=-1.0),
    ValueError,
    rf"alpha {NONNEGATIVE} alpha=-1.0",
  ),
  Misuse(
    "wsam",
    "gamma = 1",
    lambda: samx.wsam(SGD, gamma=1.0),
    ValueError,
    r"gamma must be a number in \[0, 1\); got gamma=1.0",
  ),
  Misuse(
    "wsam",
    "learning_rate when coupled",
    lambda: samx.wsam(SGD, decouple=False, learning_rate=0.1),
    ValueError,
    r"coupled WSAM \(decouple=False\) takes none\. Got learning_rate=0.1",
  ),
  Misuse(
    "wsam",
    "decoupled without a learning rate",
    lambda: samx.wsam(SGD).init(PARAMS),
    ValueError,
    r"Pass learning_rate= (.|\n)*optax\.inject_hyperparams\(optax\.sgd\)",
  ),
  Misuse(
    "looksam",
    "k = 0",
    lambda: samx.looksam(SGD, k=0),
    ValueError,
    r"k must be a positive integer \(steps between evaluations\); got k=0",
  ),
  Misuse(
    "looksam",
    "fractional k",
    lambda: samx.looksam(SGD, k=1.5),
    ValueError,
    r"k must be a positive integer(.|\n)*k=1.5",
  ),
  Misuse(
    "esam",
    "beta = 0",
    lambda: samx.esam(SGD, beta=0.0),
    ValueError,
    r"beta must be a number in \(0, 1\]; got beta=0.0",
  ),
  Misuse(
    "esam",
    "gamma above 1",
    lambda: samx.esam(SGD, gamma=2.0),
    ValueError,
    r"gamma must be a number in \(0, 1\]; got gamma=2.0",
  ),
  Misuse(
    "esam",
    "unknown norm_scope",
    lambda: samx.esam(SGD, norm_scope="some"),
    ValueError,
    r"norm_scope must be one of \('all', 'selected'\); got norm_scope='some'",
  ),
  Misuse(
    "esam",
    "without the batch",
    lambda: _update(samx.esam(SGD), grad_fn=GRAD_FN),
    TypeError,
    rf"samx\.esam needs the keyword arguments {PER_EXAMPLE_CALL}",
  ),
  Misuse(
    "esam",
    "losses of another size",
    lambda: _update(
      samx.esam(SGD), per_example_loss_fn=LOSSES, batch=BATCH, losses=jnp.ones(3)
    ),
    ValueError,
    r"losses must be the \(4,\) per-example losses(.|\n)*got shape \(3,\)",
  ),
  Misuse(
    "esam",
    "gamma traced by inject_hyperparams",
    lambda: _traced_update(optax.inject_hyperparams(samx.esam)(SGD)),
    TypeError,
    r"gamma sets the static size(.|\n)*static_args=\('gamma',\)",
  ),
  # ---------------------------------------------------------------- the pipeline and its stages
  Misuse(
    "sharpness_aware",
    "sync_ascent outside axis_name",
    lambda: samx.sharpness_aware(SGD, samx.scale_by_sam(), axis_name="a", sync_ascent="b"),
    ValueError,
    r"sync_ascent must be True, False, or axis names contained in axis_name; "
    r"got sync_ascent='b'",
  ),
  Misuse(
    "sharpness_aware",
    "no grad_fn",
    lambda: _update(samx.sharpness_aware(SGD, samx.scale_by_sam())),
    TypeError,
    GRAD_FN_CALL,
  ),
  Misuse(
    "scale_by_sam",
    "negative rho",
    lambda: samx.scale_by_sam(rho=-1.0),
    ValueError,
    rf"rho {NONNEGATIVE} rho=-1.0",
  ),
  Misuse(
    "scale_by_asam",
    "negative eta",
    lambda: samx.scale_by_asam(eta=-1.0),
    ValueError,
    rf"eta {NONNEGATIVE} eta=-1.0",
  ),
  Misuse(
    "scale_by_weight_magnitude",
    "no params",
    lambda: samx.scale_by_weight_magnitude().update(GRADS, optax.EmptyState()),
    ValueError,
    r"scale_by_weight_magnitude needs the current parameters",
  ),
  Misuse(
    "radius_per_leaf",
    "rho tree not like the updates",
    lambda: samx.radius_per_leaf({"x": 0.1}, jnp.zeros([], jnp.int32), PARAMS),
    ValueError,
    r"rho given as a pytree must have the structure of the parameters(.|\n)*rho: +PyTreeDef",
  ),
  Misuse(
    "fsam_direction",
    "sigma as a schedule",
    lambda: samx.fsam_direction(sigma=optax.constant_schedule(1.0)),
    TypeError,
    r"sigma must be a non-negative number \(a single number\)",
  ),
  Misuse(
    "vasso_direction",
    "theta above 1",
    lambda: samx.vasso_direction(theta=1.5),
    ValueError,
    r"theta must be a number in \(0, 1\]; got theta=1.5",
  ),
  Misuse(
    "random_direction",
    "bool key",
    lambda: samx.random_direction(key=True),
    TypeError,
    r"key must be an int seed(.|\n)*got key=True",
  ),
  Misuse(
    "mask_perturbation",
    "mask not like params",
    lambda: samx.mask_perturbation({"kernel": True}).init(PARAMS),
    ValueError,
    r"mask must be a pytree of booleans(.|\n)*"
    r"mask entries that are not params paths:\n    kernel",
  ),
  Misuse(
    "masked_ascent",
    "unknown norm_scope",
    lambda: samx.masked_ascent(samx.scale_by_sam(), {"w": True}, norm_scope="x"),
    ValueError,
    r"norm_scope must be one of \('selected', 'all'\); got norm_scope='x'",
  ),
  Misuse(
    "scale_by_bernoulli_mask",
    "beta = 0",
    lambda: samx.scale_by_bernoulli_mask(beta=0.0),
    ValueError,
    r"beta must be a number in \(0, 1\]; got beta=0.0",
  ),
  Misuse(
    "scale_by_bernoulli_mask",
    "string key",
    lambda: samx.scale_by_bernoulli_mask(key="a"),
    TypeError,
    r"key must be an integer seed or a jax\.random key; got key='a'",
  ),
  Misuse(
    "scale_by_swp",
    "unknown norm_scope",
    lambda: samx.scale_by_swp(norm_scope="x"),
    ValueError,
    r"norm_scope must be one of \('all', 'selected'\)",
  ),
  Misuse(
    "gradient_on_sharpest_examples",
    "gamma = 0",
    lambda: samx.gradient_on_sharpest_examples(gamma=0.0),
    ValueError,
    r"gamma must be a number in \(0, 1\]; got gamma=0.0",
  ),
  Misuse(
    "gradient_on_sharpest_examples",
    "without the batch",
    lambda: samx.gradient_on_sharpest_examples()(PARAMS, GRADS),
    TypeError,
    PER_EXAMPLE_CALL,
  ),
  Misuse(
    "surrogate_gap_guided",
    "negative alpha",
    lambda: samx.surrogate_gap_guided(alpha=-1.0),
    ValueError,
    rf"alpha {NONNEGATIVE} alpha=-1.0",
  ),
  Misuse(
    "gsam_rho_schedule",
    "lr_min above lr_max",
    lambda: samx.gsam_rho_schedule(0.1, 0.1, 0.0, lr_max=0.1, lr_min=1.0),
    ValueError,
    r"lr_min must be <= lr_max; got lr_min=1.0, lr_max=0.1",
  ),
  Misuse(
    "gsam_rho_schedule",
    "negative rho_max",
    lambda: samx.gsam_rho_schedule(0.1, -0.1, 0.0, lr_max=1.0, lr_min=0.1),
    ValueError,
    rf"rho_max {NONNEGATIVE} rho_max=-0.1",
  ),
  Misuse(
    "weighted_sharpness",
    "negative gamma",
    lambda: samx.weighted_sharpness(gamma=-0.1),
    ValueError,
    r"gamma must be a number in \[0, 1\); got gamma=-0.1",
  ),
  Misuse(
    "add_sharpness_step",
    "a plain gradient",
    lambda: _update(samx.add_sharpness_step(SGD, 0.1)),
    TypeError,
    r"add_sharpness_step expects the SharpnessDirection made by "
    r"weighted_sharpness\(decouple=True\); got dict",
  ),
  Misuse(
    "add_sharpness_step",
    "no learning rate to find",
    lambda: samx.add_sharpness_step(SGD).init(PARAMS),
    ValueError,
    r"Pass learning_rate=",
  ),
  Misuse(
    "reuse_orthogonal_component",
    "k = 0",
    lambda: samx.reuse_orthogonal_component(k=0),
    ValueError,
    r"k must be a positive integer",
  ),
  Misuse(
    "defer_ascent",
    "evaluation without its ascent",
    lambda: samx.defer_ascent(samx.scale_by_sam())[1](PARAMS, GRADS, grad_fn=GRAD_FN),
    TypeError,
    r"the evaluation of defer_ascent needs the perturbation of its ascent; got dict",
  ),
  # ---------------------------------------------------------------- the two contracts
  Misuse(
    "per_example_losses",
    "no batch",
    lambda: samx.per_example_losses(LOSSES, PARAMS, None),
    TypeError,
    r"per_example_loss_fn and batch \(missing: batch\)",
  ),
  Misuse(
    "per_example_losses",
    "loss_fn not callable",
    lambda: samx.per_example_losses(3, PARAMS, BATCH),
    TypeError,
    r"per_example_loss_fn must be callable; got int",
  ),
  Misuse(
    "per_example_losses",
    "a mean instead of (B,) losses",
    lambda: samx.per_example_losses(lambda p, b: jnp.sum(LOSSES(p, b)), PARAMS, BATCH),
    ValueError,
    r"must return one loss per example, shape \(4,\); got shape \(\)",
  ),
  Misuse(
    "perturbed_gradient",
    "no grad_fn",
    lambda: samx.perturbed_gradient(None, PARAMS, GRADS),
    TypeError,
    GRAD_FN_CALL,
  ),
  Misuse(
    "gradient_at_perturbed",
    "no grad_fn",
    lambda: samx.gradient_at_perturbed(PARAMS, GRADS),
    TypeError,
    GRAD_FN_CALL,
  ),
  Misuse(
    "axis_mean",
    "unbound axis",
    lambda: samx.axis_mean(PARAMS, "i"),
    NameError,
    r"axis_name='i' is not bound here(.|\n)*axis_name=None under plain jax\.jit",
  ),
  Misuse(
    "evaluation.batch_size",
    "leaves without a shared leading axis",
    lambda: evaluation.batch_size({"x": np.ones(3), "y": np.ones(4)}),
    ValueError,
    r"batch must be a pytree whose leaves share a leading example axis; got leaf shapes",
  ),
  Misuse(
    "evaluation.require_per_example_contract",
    "no per_example_loss_fn",
    lambda: evaluation.require_per_example_contract(None, BATCH, who="doc"),
    TypeError,
    PER_EXAMPLE_CALL,
  ),
  Misuse(
    "evaluation.split_into_micro_shards",
    "indivisible batch",
    lambda: evaluation.split_into_micro_shards({"x": np.arange(6)}, 4),
    ValueError,
    r"batch size 6 must be divisible by micro_shards=4",
  ),
  Misuse(
    "evaluation.varying_along",
    "unbound axis under jit",
    lambda: jax.jit(lambda x: evaluation.varying_along(x, "i"))(jnp.ones(2)),
    NameError,
    r"axis_name='i' is not bound",
  ),
  # ---------------------------------------------------------------- sparse masks
  Misuse(
    "fisher_information",
    "more samples than examples",
    lambda: samx.fisher_information(LOSSES, PARAMS, BATCH, num_samples=5),
    ValueError,
    r"num_samples=5 per-example gradients need at least 5 examples; the batch has 4",
  ),
  Misuse(
    "fisher_information",
    "chunk_size not dividing",
    lambda: samx.fisher_information(LOSSES, PARAMS, BATCH, chunk_size=3),
    ValueError,
    r"chunk_size=3 must divide num_samples=4",
  ),
  Misuse(
    "fisher_information",
    "no loss function",
    lambda: samx.fisher_information(None, PARAMS, BATCH),
    TypeError,
    PER_EXAMPLE_CALL,
  ),
  Misuse(
    "fisher_mask",
    "sparsity below 0",
    lambda: samx.fisher_mask(sparsity=-0.1),
    ValueError,
    r"sparsity must be in \[0, 1\); got sparsity=-0.1",
  ),
  Misuse(
    "fisher_mask",
    "without the batch",
    lambda: _update(samx.fisher_mask(0.5)),
    TypeError,
    PER_EXAMPLE_CALL,
  ),
  Misuse(
    "dynamic_mask",
    "float seed",
    lambda: samx.dynamic_mask(seed=0.5),
    TypeError,
    r"seed must be an integer; got seed=0.5",
  ),
  Misuse(
    "dynamic_mask",
    "drop_fraction above 1",
    lambda: samx.dynamic_mask(drop_fraction=1.5),
    ValueError,
    r"drop_fraction must be in \[0, 1\]; got drop_fraction=1.5",
  ),
  Misuse(
    "n_m_mask",
    "M not dividing the input axis",
    lambda: samx.n_m_mask({"k": jnp.ones((3, 2))}, 2, 4),
    ValueError,
    r"N:M groups of m=4 need an input dimension divisible by 4; got a leaf of shape \(3, 2\)",
  ),
  Misuse(
    "top_k_mask",
    "k above the number of entries",
    lambda: samx.top_k_mask({"k": jnp.ones(3)}, 5),
    ValueError,
    r"k must be .*0 <= k <= 3.*k=5",
  ),
  Misuse(
    "structured_mask",
    "negative k",
    lambda: samx.structured_mask({"k": jnp.ones(3)}, -1),
    ValueError,
    r"k must be .*0 <= k <= 3.*k=-1",
  ),
  # ---------------------------------------------------------------- masks
  Misuse(
    "norm_layers",
    "no normalization layer",
    lambda: samx.norm_layers(PARAMS),
    ValueError,
    r"norm_layers found no normalization layer in params by structure(.|\n)*"
    r"The parameter leaves are",
  ),
  Misuse(
    "norm_layers",
    "neither scale nor bias",
    lambda: samx.norm_layers(PARAMS, scale=False, bias=False),
    ValueError,
    r"got scale=False and bias=False, which selects nothing",
  ),
  Misuse(
    "random_entries",
    "count = 0",
    lambda: samx.random_entries(0),
    ValueError,
    r"count must be an integer >= 1 or a mask whose selection size is used; got count=0",
  ),
  Misuse(
    "random_entries",
    "more entries than there are",
    lambda: samx.random_entries(100)(PARAMS),
    ValueError,
    r"count must be between 1 and the 9 entries available; got count=100",
  ),
  Misuse(
    "random_entries",
    "float seed",
    lambda: samx.random_entries(3, seed=1.5),
    TypeError,
    r"seed must be an integer; got seed=1.5",
  ),
  Misuse(
    "masks.by_path",
    "neither a regex nor a predicate",
    lambda: masks.by_path(3),
    TypeError,
    r"pattern must be a regular expression or a predicate path -> bool; got 3",
  ),
  Misuse(
    "masks.by_path",
    "matching nothing",
    lambda: masks.by_path("zzz")(PARAMS),
    ValueError,
    r"by_path\('zzz'\) matched no parameter leaf\. The parameter leaves are",
  ),
  Misuse(
    "masks.union",
    "no mask",
    lambda: masks.union(),
    ValueError,
    r"union needs at least one mask",
  ),
  Misuse(
    "masks.intersection",
    "no mask",
    lambda: masks.intersection(),
    ValueError,
    r"intersection needs at least one mask",
  ),
  Misuse(
    "masks.complement",
    "mask not like params",
    lambda: masks.complement({"x": True})(PARAMS),
    ValueError,
    r"complement\(mask\) must be a pytree of booleans",
  ),
  Misuse(
    "masks.count_selected",
    "mask not like params",
    lambda: masks.count_selected({"x": True}, PARAMS),
    ValueError,
    r"mask must be a pytree of booleans(.|\n)*params leaves without a mask entry",
  ),
  Misuse(
    "masks.selected_paths",
    "mask not like params",
    lambda: masks.selected_paths({"x": True}, PARAMS),
    ValueError,
    r"mask must be a pytree of booleans(.|\n)*params leaves without a mask entry",
  ),
  Misuse(
    "masks.resolve_mask",
    "mask not like params",
    lambda: masks.resolve_mask({"x": True}, PARAMS, default=samx.weight_leaves),
    ValueError,
    r"mask must be a pytree of booleans with the structure of params",
  ),
  Misuse(
    "masks.resolve_selection",
    "no mask and no default",
    lambda: masks.resolve_selection(None, PARAMS),
    ValueError,
    r"mask is required: a pytree of booleans or a callable params -> mask",
  ),
  # ---------------------------------------------------------------- Flax
  Misuse(
    "nnx_grad_fn",
    "another filter than the optimizer's",
    lambda: samx.nnx_grad_fn(
      nnx.Linear(2, 2, rngs=nnx.Rngs(0)), lambda m: jnp.sum(m.kernel[...])
    )({"kernel": jnp.ones((2, 2))}),
    ValueError,
    r"nnx_grad_fn: grad_fn\(params\) got parameters that are not the model state "
    r"selected by wrt=(.|\n)*Call it as",
  ),
  Misuse(
    "linen_grad_fn",
    "apply_fn not callable",
    lambda: samx.linen_grad_fn(None, lambda o, t: 0.0, 1.0, 1.0),
    TypeError,
    r"apply_fn must be callable",
  ),
  Misuse(
    "apply_gradients",
    "no grad_fn",
    lambda: samx.apply_gradients(None, grads=GRADS),
    TypeError,
    r"missing 1 required keyword-only argument: 'grad_fn'",
  ),
  # ---------------------------------------------------------------- numerics
  Misuse(
    "numerics.cast_tree_like",
    "trees of different structure",
    lambda: numerics.cast_tree_like({"a": jnp.ones(2)}, {"b": jnp.ones(2)}),
    ValueError,
    r"tree and reference must have the same tree structure",
  ),
  # ---------------------------------------------------------------- non-finite values
  Misuse(
    "nonfinite.skip_nonfinite",
    "negative max_consecutive_errors",
    lambda: skip_nonfinite(SGD, max_consecutive_errors=-1),
    ValueError,
    r"max_consecutive_errors must be None \(skip every non-finite step\) or an integer >= 0",
  ),
  Misuse(
    "nonfinite.skip_nonfinite",
    "unbound axis_name",
    lambda: _update(skip_nonfinite(SGD, axis_name="d")),
    NameError,
    r"skip_nonfinite: axis_name='d' is not bound",
  ),
  Misuse(
    "nonfinite.skip_nonfinite",
    "axis_name=None under a pmap axis",
    lambda: jax.pmap(
      lambda g: skip_nonfinite(SGD).update(g, skip_nonfinite(SGD).init(g))[0], axis_name="d"
    )(jnp.ones((2, 3))),
    ValueError,
    r"skip_nonfinite: the step runs under the named device axes \('d',\)(.|\n)*"
    r"samx\.skip_nonfinite\(tx, axis_name='d'\)",
  ),
  # ---------------------------------------------------------------- data parallelism
  Misuse(
    "sam",
    "axis_name not a str or tuple of str",
    lambda: samx.sam(SGD, axis_name=3),
    TypeError,
    r"samx\.sam: axis_name must be None, a non-empty str \(the name of the pmap / shard_map "
    r"data axis, e\.g\. axis_name='data'\) or a non-empty tuple of them(.|\n)*got axis_name=3",
  ),
  Misuse(
    "sam",
    "sync_ascent a number",
    lambda: samx.sam(SGD, axis_name="d", sync_ascent=1),
    ValueError,
    r"sync_ascent must be True, False, or axis names contained in axis_name; got sync_ascent=1",
  ),
  Misuse(
    "sharpness_aware",
    "axis_name naming an axis twice",
    lambda: samx.sharpness_aware(SGD, samx.scale_by_sam(), axis_name=("d", "d")),
    ValueError,
    r"axis_name names an axis twice; got axis_name=\('d', 'd'\)",
  ),
  Misuse(
    "nonfinite.skip_nonfinite",
    "axis_name a bool",
    lambda: skip_nonfinite(SGD, axis_name=True),
    TypeError,
    r"skip_nonfinite: axis_name must be None, a non-empty str(.|\n)*got axis_name=True",
  ),
  Misuse(
    "sam",
    "an already-summed clean gradient under shard_map with check_vma=True",
    lambda: _shard_map_update(samx.sam(SGD, axis_name="d"), cast=False),
    ValueError,
    r"the clean gradient \(updates\) is not per device along axis_name='d'(.|\n)*"
    r"jax\.lax\.pcast\(params, 'd', to='varying'\)",
  ),
  Misuse(
    "axes.require_per_device",
    "an invariant gradient under shard_map with check_vma=True",
    lambda: _shard_map_call(
      lambda g: samx.axes.require_per_device(g, "d", what="g", who="doc") or g
    ),
    ValueError,
    r"doc: g is not per device along axis_name='d'",
  ),
  Misuse(
    "axes.replication_checked",
    "an unbound axis",
    lambda: jax.jit(lambda x: samx.axes.replication_checked("i") or x)(jnp.ones(2)),
    NameError,
    r"axis_name='i' is not bound here",
  ),
  # ---------------------------------------------------------------- diagnostics
  Misuse(
    "diagnostics.hessian_eigenvalues",
    "k = 0",
    lambda: diagnostics.hessian_eigenvalues(LOSS, PARAMS, k=0),
    ValueError,
    r"k must be an integer >= 1; got k=0",
  ),
  Misuse(
    "diagnostics.hessian_eigenvalues",
    "more eigenpairs than parameters",
    lambda: diagnostics.hessian_eigenvalues(LOSS, PARAMS, k=10),
    ValueError,
    r"k must be at most the number of parameters \(9\); got k=10",
  ),
  Misuse(
    "diagnostics.hessian_eigenvalues",
    "unknown method",
    lambda: diagnostics.hessian_eigenvalues(LOSS, PARAMS, method="qr"),
    ValueError,
    r"method must be 'lanczos' or 'power'; got method='qr'",
  ),
  Misuse(
    "diagnostics.hessian_eigenvalues",
    "a non-scalar loss",
    lambda: diagnostics.hessian_eigenvalues(lambda p: p["w"], PARAMS),
    ValueError,
    r"loss_fn must return a scalar loss \(shape \(\)\); got \(2, 3\)",
  ),
  Misuse(
    "diagnostics.hessian_trace",
    "num_samples = 0",
    lambda: diagnostics.hessian_trace(LOSS, PARAMS, num_samples=0),
    ValueError,
    r"num_samples must be an integer >= 1; got num_samples=0",
  ),
  Misuse(
    "diagnostics.sam_edge",
    "learning_rate = 0",
    lambda: diagnostics.sam_edge(0.0, 0.1, 1.0),
    ValueError,
    r"learning_rate must be a positive number; got learning_rate=0.0",
  ),
  Misuse(
    "diagnostics.m_sharpness",
    "m not dividing the batch",
    lambda: diagnostics.m_sharpness(LOSSES, PARAMS, BATCH, m=3),
    ValueError,
    r"m must divide the batch size 4 and be at most it; got m=3",
  ),
  Misuse(
    "diagnostics.m_sharpness",
    "unknown ball",
    lambda: diagnostics.m_sharpness(LOSSES, PARAMS, BATCH, m=2, ball="linf"),
    ValueError,
    r"ball must be 'l2' or 'adaptive'; got ball='linf'",
  ),
  Misuse(
    "diagnostics.interpolation_direction",
    "trees of different structure",
    lambda: diagnostics.interpolation_direction(PARAMS, {"w": 1.0}),
    ValueError,
    r"params_from and params_to must have the same tree structure",
  ),
  Misuse(
    "diagnostics.loss_slice_1d",
    "direction not like params",
    lambda: diagnostics.loss_slice_1d(LOSS, PARAMS, {"w": 1.0}, jnp.zeros(2)),
    ValueError,
    r"direction and params must have the same tree structure",
  ),
  Misuse(
    "diagnostics.loss_slice_2d",
    "second direction not like params",
    lambda: diagnostics.loss_slice_2d(
      LOSS, PARAMS, (PARAMS, {"w": 1.0}), jnp.zeros(2), jnp.zeros(2)
    ),
    ValueError,
    r"directions\[1\] and params must have the same tree structure",
  ),
  Misuse(
    "diagnostics.hvp",
    "vector not like params",
    lambda: diagnostics.hvp(LOSS, PARAMS, {"w": jnp.ones((2, 3))}),
    ValueError,
    r"vector and params must have the same tree structure",
  ),
  Misuse(
    "diagnostics.gradient_alignment",
    "eigenvector not like params",
    lambda: diagnostics.gradient_alignment(LOSS, PARAMS, {"w": jnp.ones((2, 3))}),
    ValueError,
    r"eigenvector and params must have the same tree structure",
  ),
  Misuse(
    "diagnostics.filter_normalized_direction",
    "an int instead of a key",
    lambda: diagnostics.filter_normalized_direction(PARAMS, 0),
    TypeError,
    r"key must be a (PRNG|jax\.random) key",
  ),
  Misuse(
    "diagnostics.nnx_loss",
    "linen params instead of an NNX model",
    lambda: diagnostics.nnx_loss({"params": PARAMS}, lambda m: 0.0),
    TypeError,
    r"model must be (a Flax )?(NNX|nnx)",
  ),
  Misuse(
    "diagnostics.plot_loss_slice",
    "betas with a 1-D slice",
    lambda: diagnostics.plot_loss_slice(jnp.zeros(3), jnp.zeros(3), jnp.zeros(2)),
    ValueError,
    r"values must have shape \(3, 2\)",
  ),
]

# Public callables without a documented misuse: what they accept is any value of their
# type, and samx builds or returns them rather than taking configuration through them.
NO_USER_INPUT = {
  "BernoulliMaskState": "optimizer state (a NamedTuple samx builds)",
  "DeferredPerturbation": "the value defer_ascent's ascent hands to its evaluation",
  "DynamicMaskState": "optimizer state",
  "FSAMDirectionState": "optimizer state",
  "FisherMaskState": "optimizer state",
  "LookSAMState": "optimizer state",
  "RandomDirectionState": "optimizer state",
  "ScaleBySAMState": "optimizer state",
  "SharpnessAwareState": "optimizer state",
  "SharpnessDirection": "the direction weighted_sharpness hands to add_sharpness_step",
  "SharpnessStepState": "optimizer state",
  "VaSSODirectionState": "optimizer state",
  "Combination": "a NamedTuple of the two functions of a combine stage",
  "use_perturbed_gradient": "takes no argument",
  "weight_leaves": "any params pytree is valid input",
  "diagnostics.HessianEigen": "a result (NamedTuple) samx returns",
  "evaluation.mean_over_micro_shards": "any pytree of arrays with a leading axis (samx's own)",
  "masks.all_leaves": "any params pytree is valid input",
  "masks.leaf_paths": "any params pytree is valid input",
  "numerics.accumulation_dtype": "any dtype is valid input",
  "numerics.global_norm": "any pytree of arrays is valid input",
  "numerics.safe_inverse": "any array is valid input",
  "nonfinite.SkipNonfiniteState": "optimizer state",
  "nonfinite.all_finite": "any pytree of arrays is valid input",
  "axes.bound_data_axes": "takes no argument",
  "axes.configuration_fingerprint": "any Python values are valid input",
  "axes.varying_axes": "any value is valid input (non-arrays have no axes)",
}


def _resolve(name: str):
  if "." not in name:
    return getattr(samx, name)
  module, attr = name.split(".")
  return getattr(nonfinite_module if module == "nonfinite" else getattr(samx, module), attr)


def public_callables() -> dict[int, str]:
  """Every public function or class, by identity: samx.__all__, the ``__all__`` of the
  modules it exports, and samx.nonfinite's (first name wins)."""
  found: dict[int, str] = {}

  def add(obj, name):
    if (inspect.isfunction(obj) or inspect.isclass(obj)) and id(obj) not in found:
      found[id(obj)] = name

  modules = {}
  for name in samx.__all__:
    obj = getattr(samx, name)
    if isinstance(obj, types.ModuleType):
      modules[name] = obj
    else:
      add(obj, name)
  modules["nonfinite"] = nonfinite_module
  for module_name, module in modules.items():
    for name in module.__all__:
      add(getattr(module, name), f"{module_name}.{name}")
  return found


def test_every_public_callable_is_covered():
  covered = {id(_resolve(case.name)) for case in CATALOG}
  listed = {id(_resolve(name)) for name in NO_USER_INPUT}
  missing = [name for key, name in public_callables().items() if key not in covered | listed]
  assert not missing, (
    f"public callables with no entry in the error catalog: {missing}. Add their documented "
    "misuses to CATALOG, or list them in NO_USER_INPUT with the reason."
  )
  assert not covered & listed, "a name is both in CATALOG and in NO_USER_INPUT"


def _params(case: Misuse):
  marks = [pytest.mark.xfail(strict=True, reason=case.fix)] if case.fix else []
  return pytest.param(case, id=f"{case.name}: {case.misuse}", marks=marks)


@pytest.mark.parametrize("case", [_params(case) for case in CATALOG])
def test_misuse_is_reported(case):
  with pytest.raises(case.error, match=case.match):
    case.call()
