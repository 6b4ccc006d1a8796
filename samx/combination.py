"""Stage 3, the combination: how ``g`` and ``g_s`` make the descent direction.

A combination is a pair of pure functions, ``init(params) -> state`` and
``update(grads, evaluate, state, params) -> (direction, state)``. SAM uses
the perturbed gradient as it is (:func:`use_perturbed_gradient`); GSAM, WSAM and
LookSAM are other combinations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optax

__all__ = ["Combination", "use_perturbed_gradient"]


class Combination(NamedTuple):
  """The combine stage of a sharpness-aware step.

  Attributes:
    init: ``init(params) -> state``.
    update: ``update(grads, evaluate, state, params) -> (direction, state)``, where
      ``grads`` is :math:`g = \\nabla L(w)` and ``evaluate()`` returns
      :math:`g_s = \\nabla L(w+\\epsilon)`, both averaged over the data-parallel
      axis by :func:`samx.sharpness_aware` (whatever ``sync_ascent`` is), so a
      combination never takes ``axis_name``. A combination that reuses stored information may
      skip the call (inside :func:`jax.lax.cond`, so the pass is really skipped).
  """

  init: Callable[[Any], Any]
  update: Callable[[Any, Any, Any, Any], tuple[Any, Any]]


def use_perturbed_gradient() -> Combination:
  r"""SAM's combination: the descent direction is :math:`d = g_s`.

  >>> c = use_perturbed_gradient()
  >>> c.update({"w": 1.0}, lambda: {"w": 2.0}, c.init({"w": 0.0}), {"w": 0.0})
  ({'w': 2.0}, EmptyState())
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(grads, evaluate, state, params):
    del grads, params
    return evaluate(), state

  return Combination(init, update)
