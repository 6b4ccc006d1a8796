"""samx.flax_integration: SAM driven from NNX ``nnx.Optimizer`` and linen ``TrainState``.

Every Flax path is checked against the plain-JAX path on the same parameters: either
``samx`` on a pure parameter dict with a hand-written ``grad_fn``, or SAM + momentum
written out in ``jnp``. BatchNorm statistics must come from the clean pass only.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import samx

LR, MOMENTUM, RHO = 0.1, 0.9, 0.05
BN_EPSILON, BN_MOMENTUM = 1e-5, 0.9
N_IN, N_HIDDEN, N_CLASSES, BATCH = 4, 8, 3, 16


def batches(n, seed=0):
  """``n`` random classification batches ``(x, y)``."""
  keys = jax.random.split(jax.random.key(seed), 2 * n)
  return [
    (
      jax.random.normal(keys[2 * i], (BATCH, N_IN)),
      jax.random.randint(keys[2 * i + 1], (BATCH,), 0, N_CLASSES),
    )
    for i in range(n)
  ]


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def dense(p, x):
  return x @ p["kernel"] + p["bias"][None, :]


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(a, e, rtol=rtol, atol=atol), actual, expected
  )


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


# Batch statistics computed by two jitted programs agree to float32 rounding (XLA may fuse
# the mean differently); a perturbed pass that wrote them would move them by ~1e-3.
STATS_RTOL, STATS_ATOL = 1e-6, 1e-8


def assert_stats_equal(actual, expected):
  assert_trees_close(actual, expected, rtol=STATS_RTOL, atol=STATS_ATOL)


def trees_close(a, b, rtol=1e-5, atol=1e-6):
  return all(jax.tree.leaves(jax.tree.map(lambda u, v: np.allclose(u, v, rtol, atol), a, b)))


def pure_params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# ---------------------------------------------------------------------------------------
# NNX


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(N_IN, N_HIDDEN, rngs=rngs)
    self.out = nnx.Linear(N_HIDDEN, N_CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def mlp_apply(p, x):
  """The forward of :class:`MLP`, written out on a pure parameter dict."""
  return dense(p["out"], jnp.tanh(dense(p["hidden"], x)))


class BatchNormMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(N_IN, N_HIDDEN, rngs=rngs)
    self.norm = nnx.BatchNorm(
      N_HIDDEN,
      use_running_average=False,
      momentum=BN_MOMENTUM,
      epsilon=BN_EPSILON,
      rngs=rngs,
    )
    self.out = nnx.Linear(N_HIDDEN, N_CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.norm(self.hidden(x))))


def batch_norm_mlp_apply(p, stats, x, *, batch_statistics):
  """The forward of :class:`BatchNormMLP` on pure dicts, with batch or running statistics."""
  h = dense(p["hidden"], x)
  if batch_statistics:
    mean = h.mean(axis=0)
    var = jnp.maximum(0.0, (h * h).mean(axis=0) - mean * mean)
  else:
    mean, var = stats["norm"]["mean"], stats["norm"]["var"]
  h = (h - mean[None, :]) * jax.lax.rsqrt(var[None, :] + BN_EPSILON)
  h = h * p["norm"]["scale"][None, :] + p["norm"]["bias"][None, :]
  return dense(p["out"], jnp.tanh(h))


def nnx_loss(model, x, y):
  return cross_entropy(model(x), y)


def make_nnx_train_step(traces=None):
  """The NNX training step a user writes: clean pass, then one ``optimizer.update``."""

  @nnx.jit
  def train_step(model, optimizer, x, y):
    if traces is not None:
      traces.append(1)
    loss, grads = nnx.value_and_grad(nnx_loss)(model, x, y)
    optimizer.update(model, grads, grad_fn=samx.nnx_grad_fn(model, nnx_loss, x, y))
    return loss

  return train_step


# rho as a schedule: samx keeps a step counter, checked to advance once per step.
def sam_tx():
  return samx.sam(optax.sgd(LR, momentum=MOMENTUM), rho=optax.constant_schedule(RHO))


def asam_tx():
  return samx.asam(optax.sgd(LR, momentum=MOMENTUM), rho=optax.constant_schedule(0.5), eta=0.01)


@pytest.mark.parametrize("make_tx", [sam_tx, asam_tx], ids=["sam", "asam"])
def test_nnx_optimizer_matches_plain_jax(make_tx):
  model = MLP(nnx.Rngs(0))
  params = pure_params(model)
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  traces = []
  train_step = make_nnx_train_step(traces)

  tx = make_tx()
  opt_state = tx.init(params)

  @jax.jit
  def reference_step(params, opt_state, x, y):
    grad_fn = jax.grad(lambda p: cross_entropy(mlp_apply(p, x), y))
    updates, opt_state = tx.update(grad_fn(params), opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state

  for x, y in batches(3):
    train_step(model, optimizer, x, y)
    params, opt_state = reference_step(params, opt_state, x, y)
    assert_trees_close(pure_params(model), params)

  assert len(traces) == 1, f"the nnx.jit step was traced {len(traces)} times"
  # One update call per step: the optimizer's and samx's counters advance once per step.
  assert int(optimizer.step[...]) == 3
  nnx_opt_state = nnx.as_pure(optimizer.opt_state)
  assert_trees_close(jax.tree.leaves(nnx_opt_state), jax.tree.leaves(opt_state))
  is_sam_state = lambda node: isinstance(node, samx.ScaleBySAMState)
  (ascent,) = [
    node
    for node in jax.tree.leaves(nnx_opt_state.ascent_state, is_leaf=is_sam_state)
    if is_sam_state(node)
  ]
  assert int(ascent.count) == 3


def test_nnx_batch_norm_statistics_come_from_the_clean_pass_only():
  model = BatchNormMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, sam_tx(), wrt=nnx.Param)
  train_step = make_nnx_train_step()
  (x, y), (x2, y2) = batches(2, seed=1)
  forward = nnx.jit(lambda m, x: m(x))

  initial_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  clean_only = nnx.clone(model)
  forward(clean_only, x)
  expected_stats = nnx.to_pure_dict(nnx.state(clean_only, nnx.BatchStat))
  # The check has power: one more forward pass in train mode would change the stats.
  twice = nnx.clone(clean_only)
  forward(twice, x)
  twice_stats = nnx.to_pure_dict(nnx.state(twice, nnx.BatchStat))
  assert not trees_close(twice_stats, expected_stats, STATS_RTOL, STATS_ATOL)
  assert not trees_close(initial_stats, expected_stats, STATS_RTOL, STATS_ATOL)

  params_before = pure_params(model)
  train_step(model, optimizer, x, y)
  assert_stats_equal(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), expected_stats)
  # The step did move the parameters, through a SAM step in training mode.
  grad_train = jax.grad(
    lambda p: cross_entropy(batch_norm_mlp_apply(p, None, x, batch_statistics=True), y)
  )
  tx = sam_tx()
  reference_step = jax.jit(
    lambda p: optax.apply_updates(
      p, tx.update(grad_train(p), tx.init(p), p, grad_fn=grad_train)[0]
    )
  )
  assert_trees_close(pure_params(model), reference_step(params_before))

  # A second step: the stats again take exactly one clean update, at the new parameters.
  clean_only = nnx.clone(model)
  forward(clean_only, x2)
  train_step(model, optimizer, x2, y2)
  assert_stats_equal(
    nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
    nnx.to_pure_dict(nnx.state(clean_only, nnx.BatchStat)),
  )


def test_nnx_grad_fn_perturbed_pass_uses_batch_statistics_and_writes_nothing():
  model = BatchNormMLP(nnx.Rngs(0))
  (x, y), (x_stats, _) = batches(2, seed=2)
  nnx.jit(lambda m, x: m(x))(model, x_stats)  # running averages != batch statistics
  state_before = nnx.to_pure_dict(nnx.state(model))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  perturbed = jax.tree.map(lambda p: p + 0.1, params)

  grads = samx.nnx_grad_fn(model, nnx_loss, x, y)(perturbed)

  assert_trees_equal(nnx.to_pure_dict(nnx.state(model)), state_before)
  p = nnx.to_pure_dict(perturbed)
  stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  def reference(batch_statistics):
    return jax.grad(
      lambda q: cross_entropy(
        batch_norm_mlp_apply(q, stats, x, batch_statistics=batch_statistics), y
      )
    )(p)

  assert_trees_close(nnx.to_pure_dict(grads), reference(batch_statistics=True))
  assert not trees_close(nnx.to_pure_dict(grads), reference(batch_statistics=False))


def test_nnx_grad_fn_has_aux_drops_aux():
  model = MLP(nnx.Rngs(0))
  ((x, y),) = batches(1)

  def loss_with_aux(model, x, y):
    logits = model(x)
    return cross_entropy(logits, y), {"logits": logits}

  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = samx.nnx_grad_fn(model, loss_with_aux, x, y, has_aux=True)(params)
  assert_trees_close(
    nnx.to_pure_dict(grads),
    jax.grad(lambda p: cross_entropy(mlp_apply(p, x), y))(pure_params(model)),
  )

  optimizer = nnx.Optimizer(model, sam_tx(), wrt=nnx.Param)
  reference = nnx.clone(model)
  reference_optimizer = nnx.Optimizer(reference, sam_tx(), wrt=nnx.Param)
  g = nnx.grad(nnx_loss)(model, x, y)
  optimizer.update(model, g, grad_fn=samx.nnx_grad_fn(model, loss_with_aux, x, y, has_aux=True))
  reference_optimizer.update(reference, g, grad_fn=samx.nnx_grad_fn(reference, nnx_loss, x, y))
  assert_trees_close(pure_params(model), pure_params(reference))


def test_nnx_grad_fn_with_wrong_structure_names_grad_fn():
  model = MLP(nnx.Rngs(0))
  ((x, y),) = batches(1)
  optimizer = nnx.Optimizer(model, sam_tx(), wrt=nnx.Param)
  grads = nnx.grad(nnx_loss)(model, x, y)
  only_hidden = lambda params: {"hidden": nnx.to_pure_dict(params)["hidden"]}
  with pytest.raises(ValueError, match="grad_fn"):
    optimizer.update(model, grads, grad_fn=only_hidden)


@pytest.mark.parametrize(
  "wrt",
  [nnx.All(nnx.Param, nnx.PathContains("kernel")), nnx.Any(nnx.Param, nnx.BatchStat)],
  ids=["subset", "superset"],
)
def test_nnx_grad_fn_with_wrong_wrt_names_grad_fn(wrt):
  model = BatchNormMLP(nnx.Rngs(0))
  ((x, y),) = batches(1)
  optimizer = nnx.Optimizer(model, sam_tx(), wrt=nnx.Param)
  grads = nnx.grad(nnx_loss)(model, x, y)
  with pytest.raises(ValueError, match="grad_fn"):
    optimizer.update(model, grads, grad_fn=samx.nnx_grad_fn(model, nnx_loss, x, y, wrt=wrt))


# ---------------------------------------------------------------------------------------
# linen


class LinenBatchNormMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(N_HIDDEN)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON)(x)
    return nn.Dense(N_CLASSES)(jnp.tanh(x))


class BatchNormTrainState(train_state.TrainState):
  batch_stats: Any


def linen_state():
  model = LinenBatchNormMLP()
  variables = model.init(jax.random.key(0), jnp.ones((1, N_IN)), train=False)
  return BatchNormTrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    tx=sam_tx(),
    batch_stats=variables["batch_stats"],
  )


def linen_clean_pass(apply_fn, params, batch_stats, x, y):
  """The loss and the batch statistics written by the clean pass, in training mode."""
  logits, mutated = apply_fn(
    {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
  )
  return cross_entropy(logits, y), mutated["batch_stats"]


def linen_grad_fn_for(state, x, y):
  return samx.linen_grad_fn(
    state.apply_fn,
    cross_entropy,
    x,
    y,
    collections={"batch_stats": state.batch_stats},
    train=True,
  )


@jax.jit
def linen_train_step(state, x, y):
  """The linen training step a user writes, with ``samx.apply_gradients``."""
  (loss, batch_stats), grads = jax.value_and_grad(linen_clean_pass, argnums=1, has_aux=True)(
    state.apply_fn, state.params, state.batch_stats, x, y
  )
  state = samx.apply_gradients(
    state, grads=grads, grad_fn=linen_grad_fn_for(state, x, y), batch_stats=batch_stats
  )
  return state, loss


@jax.jit
def linen_train_step_by_hand(state, x, y):
  """The same step with ``tx.update`` and ``replace`` written out."""
  (loss, batch_stats), grads = jax.value_and_grad(linen_clean_pass, argnums=1, has_aux=True)(
    state.apply_fn, state.params, state.batch_stats, x, y
  )
  updates, opt_state = state.tx.update(
    grads, state.opt_state, state.params, grad_fn=linen_grad_fn_for(state, x, y)
  )
  return state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    opt_state=opt_state,
    batch_stats=batch_stats,
  ), loss


def test_linen_train_state_apply_gradients_does_not_forward_grad_fn():
  # flax 0.12.8: TrainState.apply_gradients(grads=..., **kwargs) gives kwargs to .replace,
  # not to tx.update; tx.update then runs without grad_fn and samx names the argument.
  state = linen_state()
  ((x, y),) = batches(1)
  _, grads = jax.value_and_grad(linen_clean_pass, argnums=1, has_aux=True)(
    state.apply_fn, state.params, state.batch_stats, x, y
  )
  with pytest.raises(TypeError, match="needs the keyword argument grad_fn"):
    state.apply_gradients(grads=grads, grad_fn=linen_grad_fn_for(state, x, y))


def hand_written_sam_step(apply_fn, params, batch_stats, trace, x, y):
  """One SAM + SGD-momentum step on a linen model, written out in jnp."""
  loss = lambda p: linen_clean_pass(apply_fn, p, batch_stats, x, y)
  (_, new_batch_stats), g = jax.value_and_grad(loss, has_aux=True)(params)
  norm = jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(g)))
  perturbed = jax.tree.map(lambda w, gi: w + RHO * gi / norm, params, g)
  g_s = jax.grad(lambda p: loss(p)[0])(perturbed)  # training mode: batch statistics
  trace = jax.tree.map(lambda t, gi: gi + MOMENTUM * t, trace, g_s)
  params = jax.tree.map(lambda w, t: w - LR * t, params, trace)
  return params, new_batch_stats, trace


def test_linen_train_state_matches_hand_written_sam():
  state = by_hand = linen_state()
  params, batch_stats = state.params, state.batch_stats
  trace = jax.tree.map(jnp.zeros_like, params)

  for x, y in batches(2, seed=3):
    state, _ = linen_train_step(state, x, y)
    by_hand, _ = linen_train_step_by_hand(by_hand, x, y)
    params, batch_stats, trace = hand_written_sam_step(
      state.apply_fn, params, batch_stats, trace, x, y
    )
    assert_stats_equal(state.batch_stats, batch_stats)
    assert_trees_close(state.params, params)
    assert_trees_equal(state.params, by_hand.params)
    assert_trees_equal(state.batch_stats, by_hand.batch_stats)
    assert_trees_equal(state.opt_state, by_hand.opt_state)
  assert int(state.step) == 2


class DropoutMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 16, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(jax.nn.relu(self.hidden(x))))


def test_nnx_grad_fn_built_before_the_clean_pass_reuses_its_dropout_masks():
  x = jax.random.normal(jax.random.key(1), (8, 4))
  y = jax.random.normal(jax.random.key(2), (8, 2))
  loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
  model = DropoutMLP(nnx.Rngs(0))

  grad_fn = samx.nnx_grad_fn(model, loss_fn, x, y)  # snapshot: RNG state before the pass
  clean = nnx.grad(loss_fn)(model, x, y)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  same_masks = grad_fn(params)
  for a, b in zip(
    jax.tree.leaves(same_masks), jax.tree.leaves(nnx.as_pure(clean)), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  after = samx.nnx_grad_fn(model, loss_fn, x, y)(params)  # keys of the next clean pass
  assert any(
    not np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(same_masks), strict=True)
  )
