"""LSALR (Singh et al. 2015), the layer-specific adaptive learning rate baseline of Table 1.

LARS, the other layer-wise baseline, is optax's own :func:`optax.lars`; the paper's setting is
``optax.lars(2.0, weight_decay=1e-3, trust_coefficient=1e-3, momentum=0.9, nesterov=True)``
(global lr 2, layer lr ``η · 1e-3 · ‖W_l‖ / ‖δW_l‖``, weight decay inside ``δW_l``).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_bm import transform


def scale_by_lsalr(mask: Optional[Union[Any, Any]] = None) -> optax.GradientTransformation:
  r"""Scales each leaf's update ``u`` by ``1 + log(1 + 1 / ‖u‖₂)``.

  .. math::

    u_l \leftarrow \left(1 + \log\left(1 + \frac{1}{\|u_l\|_2}\right)\right) u_l

  with ``‖·‖₂`` the Euclidean norm of the whole leaf (a layer's kernel or bias). Layers with
  small gradients get larger steps, logarithmically. A leaf whose update is exactly zero is
  left at zero (factor 1).

  Args:
    mask: optional optax mask (pytree of bools or callable on params) of the leaves to scale;
      others pass through unchanged.

  Returns:
    A stateless :class:`optax.GradientTransformation`.

  Example:
    >>> tx = optax.chain(optax_bm.scale_by_lsalr(), optax.sgd(0.1))  # doctest: +SKIP

  References:
    Singh, De, Zhang, Goldstein & Taylor, *Layer-Specific Adaptive Learning Rates for Deep
    Networks*, ICMLA 2015; used as a baseline in Zhang, Chen & Liu, NeurIPS 2018, supplement §D.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params

    def scale(u):
      norm = jnp.sqrt(jnp.sum(jnp.square(u.astype(jnp.promote_types(u.dtype, jnp.float32)))))
      safe = jnp.where(norm > 0, norm, 1.0)
      factor = jnp.where(norm > 0, 1.0 + jnp.log1p(1.0 / safe), 1.0)
      return (u * factor).astype(u.dtype)

    return jax.tree.map(scale, updates), state

  tx = optax.GradientTransformation(init_fn, update_fn)
  return optax.masked(tx, mask) if mask is not None else tx


def lsalr(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: Union[float, jax.Array] = 1e-3,
    weight_decay_mask: Optional[Union[Any, Any]] = None,
    lsalr_mask: Optional[Union[Any, Any]] = None,
    momentum: Optional[float] = 0.9,
    nesterov: bool = True,
) -> optax.GradientTransformation:
  r"""LSALR with weight decay and (Nesterov) momentum, as in the paper's Table 1.

  .. math::

    d_l = \left(1 + \log\left(1 + \frac{1}{\|g_l + λθ_l\|_2}\right)\right)(g_l + λθ_l),
    \qquad v \leftarrow μ v + d, \qquad θ \leftarrow θ - η\,(d + μ v)

  Args:
    learning_rate: global learning rate ``η`` or schedule (paper: 0.1).
    weight_decay: ``λ`` (paper: 1e-3).
    weight_decay_mask: optional optax mask of the leaves to decay.
    lsalr_mask: optional optax mask of the leaves to rescale.
    momentum: ``μ``, or ``None`` for none (paper: 0.9).
    nesterov: Nesterov momentum (paper: True).

  Returns:
    An :class:`optax.GradientTransformation`.

  Example:
    >>> tx = optax_bm.lsalr(0.1)  # doctest: +SKIP

  References:
    Singh et al., ICMLA 2015; Zhang, Chen & Liu, NeurIPS 2018, supplement §D.
  """
  return transform.layerwise_sgd(scale_by_lsalr(lsalr_mask), learning_rate, weight_decay,
                                 weight_decay_mask, momentum, nesterov)
