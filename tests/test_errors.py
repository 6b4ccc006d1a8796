"""Bad input gets a clear error naming the argument and the expected form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import samx

PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
GRADS = jax.tree.map(jnp.ones_like, PARAMS)
GRAD_FN = lambda p: jax.tree.map(jnp.ones_like, p)


@pytest.mark.parametrize(
  "make, pattern",
  [
    (lambda: samx.sam(optax.sgd(0.1), rho=-0.1), r"rho must be a non-negative.*rho=-0.1"),
    (lambda: samx.sam(optax.sgd(0.1), rho={"w": 0.1, "b": -1.0}), r"rho must be"),
    (lambda: samx.sam(optax.sgd(0.1), eps=0.0), r"eps must be a positive number.*eps=0.0"),
    (lambda: samx.sam(optax.sgd(0.1), eps=-1e-12), r"eps must be a positive"),
    (lambda: samx.asam(optax.sgd(0.1), eta=-0.01), r"eta must be.*eta=-0.01"),
    (lambda: samx.asam(optax.sgd(0.1), rho=-0.5), r"rho must be a non-negative"),
    (lambda: samx.asam(optax.sgd(0.1), eps=0), r"eps must be a positive"),
    (
      lambda: samx.sam(optax.sgd(0.1), ball="l1"),
      r"ball must be one of \('l2', 'linf'\)",
    ),
    (lambda: samx.scale_by_sam(rho=-1.0), r"rho must be"),
  ],
)
def test_bad_hyperparameters_raise_value_error(make, pattern):
  with pytest.raises(ValueError, match=pattern):
    make()


def test_non_numeric_rho_raises_type_error():
  with pytest.raises(TypeError, match="rho must be"):
    samx.sam(optax.sgd(0.1), rho="0.05")


@pytest.mark.parametrize("alias", [samx.sam, samx.asam])
def test_missing_grad_fn_names_it_and_shows_the_call(alias):
  tx = alias(optax.sgd(0.1))
  with pytest.raises(TypeError, match=r"grad_fn\(params\) -> grads(.|\n)*tx.update\(grads"):
    tx.update(GRADS, tx.init(PARAMS), PARAMS)


def test_grad_fn_not_callable():
  tx = samx.sam(optax.sgd(0.1))
  with pytest.raises(TypeError, match="grad_fn must be a callable"):
    tx.update(GRADS, tx.init(PARAMS), PARAMS, grad_fn=GRADS)


def test_grad_fn_with_wrong_structure_names_both():
  tx = samx.sam(optax.sgd(0.1))
  bad = lambda p: {"w": jnp.ones((2, 3))}
  with pytest.raises(
    ValueError,
    match=r"grad_fn\(params\) output and params(.|\n)*"
    r"grad_fn\(params\) output:(.|\n)*params:",
  ):
    tx.update(GRADS, tx.init(PARAMS), PARAMS, grad_fn=bad)


def test_grad_fn_with_wrong_shapes():
  tx = samx.sam(optax.sgd(0.1))
  bad = lambda p: {"w": jnp.ones((3, 2)), "b": jnp.zeros(3)}
  with pytest.raises(ValueError, match=r"differ in shape at \['w'\]: \(3, 2\) vs \(2, 3\)"):
    tx.update(GRADS, tx.init(PARAMS), PARAMS, grad_fn=bad)


def test_grads_not_matching_params():
  tx = samx.sam(optax.sgd(0.1))
  with pytest.raises(ValueError, match="grads and params must have the same tree structure"):
    tx.update({"w": GRADS["w"]}, tx.init(PARAMS), PARAMS, grad_fn=GRAD_FN)


@pytest.mark.parametrize("alias", [samx.sam, samx.asam])
def test_params_none_says_sam_needs_params(alias):
  tx = alias(optax.sgd(0.1))
  with pytest.raises(ValueError, match="needs the current parameters"):
    tx.update(GRADS, tx.init(PARAMS), None, grad_fn=GRAD_FN)


def test_rho_tree_not_matching_params():
  tx = samx.sam(optax.sgd(0.1), rho={"kernel": 0.1})
  with pytest.raises(ValueError, match="rho given as a pytree must have the structure"):
    tx.update(GRADS, tx.init(PARAMS), PARAMS, grad_fn=GRAD_FN)


def test_mask_not_matching_params():
  tx = samx.asam(optax.sgd(0.1), mask={"kernel": True})
  with pytest.raises(ValueError, match="mask must be a pytree of booleans"):
    tx.update(GRADS, tx.init(PARAMS), PARAMS, grad_fn=GRAD_FN)


def test_mask_with_non_boolean_leaves():
  tx = samx.asam(optax.sgd(0.1), mask={"w": 1, "b": 0})
  with pytest.raises(TypeError, match="mask leaves must be Python booleans"):
    tx.update(GRADS, tx.init(PARAMS), PARAMS, grad_fn=GRAD_FN)


def test_per_example_contract_errors():
  losses = lambda p, b: (b["x"] * p) ** 2
  params = jnp.array(2.0)
  with pytest.raises(TypeError, match=r"per_example_loss_fn and batch \(missing: batch\)"):
    samx.per_example_losses(losses, params, None)
  with pytest.raises(TypeError, match="missing: per_example_loss_fn"):
    samx.per_example_losses(None, params, {"x": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"share a leading example axis"):
    samx.per_example_losses(losses, params, {"x": jnp.ones(3), "y": jnp.ones(4)})
  with pytest.raises(ValueError, match=r"one loss per example, shape \(3,\); got shape \(\)"):
    samx.per_example_losses(lambda p, b: jnp.sum(losses(p, b)), params, {"x": jnp.ones(3)})


def test_contract_args_do_not_reach_the_base_optimizer():
  seen = {}

  def update(updates, state, params=None, **extra):
    seen.update(extra)
    return updates, state

  base = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  tx = samx.sam(base)
  tx.update(GRADS, tx.init(PARAMS), PARAMS, grad_fn=GRAD_FN, value=1.0)
  assert seen == {"value": 1.0}
