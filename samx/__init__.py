"""samx: Sharpness-Aware Minimization variants as composable optax transformations.

One ``update`` call is one training step::

  tx = samx.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
  updates, opt_state = tx.update(grads, opt_state, params,
                                 grad_fn=lambda p: jax.grad(loss_fn)(p, batch))
"""

from samx import diagnostics, evaluation, masks, numerics
from samx.aliases import asam, fsam, msam, random_sam, sam, vasso
from samx.ascent import (
  ScaleBySAMState,
  radius_per_leaf,
  scale_by_asam,
  scale_by_sam,
  scale_by_weight_magnitude,
)
from samx.combination import Combination, use_perturbed_gradient
from samx.directions import (
  FSAMDirectionState,
  RandomDirectionState,
  VaSSODirectionState,
  fsam_direction,
  random_direction,
  vasso_direction,
)
from samx.evaluation import (
  axis_mean,
  gradient_at_perturbed,
  per_example_losses,
  perturbed_gradient,
)
from samx.flax_integration import apply_gradients, linen_grad_fn, nnx_grad_fn
from samx.masks import weight_leaves
from samx.pipeline import SharpnessAwareState, sharpness_aware

__version__ = "0.1.0"

__all__ = [
  "Combination",
  "FSAMDirectionState",
  "RandomDirectionState",
  "ScaleBySAMState",
  "SharpnessAwareState",
  "VaSSODirectionState",
  "apply_gradients",
  "asam",
  "axis_mean",
  "diagnostics",
  "evaluation",
  "fsam",
  "fsam_direction",
  "gradient_at_perturbed",
  "linen_grad_fn",
  "masks",
  "msam",
  "nnx_grad_fn",
  "numerics",
  "per_example_losses",
  "perturbed_gradient",
  "radius_per_leaf",
  "random_direction",
  "random_sam",
  "sam",
  "scale_by_asam",
  "scale_by_sam",
  "scale_by_weight_magnitude",
  "sharpness_aware",
  "use_perturbed_gradient",
  "vasso",
  "vasso_direction",
  "weight_leaves",
]
