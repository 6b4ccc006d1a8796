"""samx: Sharpness-Aware Minimization variants as composable optax transformations.

One ``update`` call is one training step::

  tx = samx.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
  updates, opt_state = tx.update(grads, opt_state, params,
                                 grad_fn=lambda p: jax.grad(loss_fn)(p, batch))
"""

from samx import axes, diagnostics, evaluation, masks, numerics, selective, sparse
from samx.aliases import (
  asam,
  esam,
  fsam,
  gsam,
  looksam,
  msam,
  random_sam,
  sam,
  sam_on,
  ssam,
  vasso,
  wsam,
)
from samx.ascent import (
  ScaleBySAMState,
  radius_per_leaf,
  scale_by_asam,
  scale_by_sam,
  scale_by_weight_magnitude,
)
from samx.combination import Combination, use_perturbed_gradient
from samx.combine_variants import (
  DeferredPerturbation,
  LookSAMState,
  SharpnessDirection,
  SharpnessStepState,
  add_sharpness_step,
  defer_ascent,
  gsam_rho_schedule,
  reuse_orthogonal_component,
  surrogate_gap_guided,
  weighted_sharpness,
)
from samx.directions import (
  FSAMDirectionState,
  RandomDirectionState,
  VaSSODirectionState,
  fsam_direction,
  random_direction,
  vasso_direction,
)
from samx.efficient import (
  BernoulliMaskState,
  gradient_on_sharpest_examples,
  scale_by_bernoulli_mask,
  scale_by_swp,
)
from samx.evaluation import (
  axis_mean,
  gradient_at_perturbed,
  per_example_losses,
  perturbed_gradient,
)
from samx.flax_integration import apply_gradients, linen_grad_fn, nnx_grad_fn
from samx.masks import norm_layers, random_entries, weight_leaves
from samx.nonfinite import SkipNonfiniteState, skip_nonfinite
from samx.pipeline import SharpnessAwareState, sharpness_aware
from samx.selective import mask_perturbation, masked_ascent
from samx.sparse import (
  DynamicMaskState,
  FisherMaskState,
  dynamic_mask,
  fisher_information,
  fisher_mask,
  n_m_mask,
  structured_mask,
  top_k_mask,
)

__version__ = "0.1.0"

__all__ = [
  "BernoulliMaskState",
  "Combination",
  "DeferredPerturbation",
  "DynamicMaskState",
  "FSAMDirectionState",
  "FisherMaskState",
  "LookSAMState",
  "RandomDirectionState",
  "ScaleBySAMState",
  "SharpnessAwareState",
  "SharpnessDirection",
  "SharpnessStepState",
  "SkipNonfiniteState",
  "VaSSODirectionState",
  "add_sharpness_step",
  "apply_gradients",
  "asam",
  "axes",
  "axis_mean",
  "defer_ascent",
  "diagnostics",
  "dynamic_mask",
  "esam",
  "evaluation",
  "fisher_information",
  "fisher_mask",
  "fsam",
  "fsam_direction",
  "gradient_at_perturbed",
  "gradient_on_sharpest_examples",
  "gsam",
  "gsam_rho_schedule",
  "linen_grad_fn",
  "looksam",
  "mask_perturbation",
  "masked_ascent",
  "masks",
  "msam",
  "n_m_mask",
  "nnx_grad_fn",
  "norm_layers",
  "numerics",
  "per_example_losses",
  "perturbed_gradient",
  "radius_per_leaf",
  "random_direction",
  "random_entries",
  "random_sam",
  "reuse_orthogonal_component",
  "sam",
  "sam_on",
  "scale_by_asam",
  "scale_by_bernoulli_mask",
  "scale_by_sam",
  "scale_by_swp",
  "scale_by_weight_magnitude",
  "selective",
  "sharpness_aware",
  "skip_nonfinite",
  "sparse",
  "ssam",
  "structured_mask",
  "surrogate_gap_guided",
  "top_k_mask",
  "use_perturbed_gradient",
  "vasso",
  "vasso_direction",
  "weight_leaves",
  "weighted_sharpness",
  "wsam",
]
