"""A drop-in ``conv_general_dilated`` for feature maps no larger than the kernel's reach.

Why: VGG's last blocks convolve 2×2 maps with 3×3 SAME kernels. XLA's algebraic simplifier
then swaps the convolution's operands (the 2×2 activations become the "kernel"), and XLA:CPU
has no library lowering for the swapped convolution: it runs in XLA's generic loop emitter,
30-40× slower than this module's matrix product, in the forward pass and again in the input
gradient (about three quarters of a full-width VGG11 training step; ``benchmarks/README.md``).

What: on such a map every output position sees every input position, so the convolution *is*
one matrix product,

    y[n, i, o] = Σ_{p, c} x[n, p, c] · w[p − i + lo, c, o]      (p, i: spatial positions)
               = (x.reshape(N, P·C) @ K(w))[n, (i, o)],          K(w) a (P·C) × (P·O) matrix

where ``K(w)`` stacks, for each output position ``i``, the window of ``w`` that meets the map
(no zeros: the map fits inside the kernel's reach, so no tap falls outside). The function is a
``jax.custom_jvp``:

* the **primal** is the convolution itself, padded explicitly behind an optimization barrier
  (so XLA cannot fold the padding back and swap the operands) and then VALID; this is what
  evaluation runs and what ``optax_bm.annotate`` reads (a convolution whose kernel is the
  parameter, measured on the unpadded input);
* the **JVP** is the matrix-product form; reverse mode transposes it into matrix products
  too, so the training step never meets a swapped convolution. Forward mode and higher
  derivatives (``jax.linearize``, ``jax.hessian``, the local Hessian tools) work as well.

Every other convolution (larger maps, strides, dilations, groups, other layouts or padding) is
passed to ``jax.lax.conv_general_dilated`` unchanged. Written by hand: neither XLA nor Flax
handles this case, and no library provides the rewrite.

Usage: ``nnx.Conv(..., conv_general_dilated=small_map_conv.conv_general_dilated)``;
``train.models.vgg`` does this on the CPU backend (``small_map_conv=None``).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax


def _same_pads(kernel_shape: Sequence[int]) -> tuple:
  """The padding ``lax`` uses for "SAME" at stride 1: total k − 1, the smaller half first."""
  return tuple(((k - 1) // 2, (k - 1) - (k - 1) // 2) for k in kernel_shape)


def fits_kernel_reach(map_shape: Sequence[int], pads: Sequence[tuple]) -> bool:
  """Whether every output position of a stride-1 convolution sees every input position.

  With padding ``(lo, hi)`` output ``i`` reads inputs ``i − lo .. i + hi``; all of ``0..n−1``
  for every ``i`` iff ``n ≤ lo + 1`` and ``n ≤ hi + 1``.
  """
  return all(n <= lo + 1 and n <= hi + 1 for n, (lo, hi) in zip(map_shape, pads))


def kernel_matrix(w: jax.Array, map_shape: Sequence[int], lows: Sequence[int]) -> jax.Array:
  """``K(w)``: the (P·C_in) × (P·C_out) matrix of the convolution on a map that fits its reach.

  Row ``(p, c)`` and column ``(i, o)`` (``p``, ``i`` spatial positions in row-major order)
  hold ``w[p − i + lo, c, o]``.
  """
  c_in, c_out = w.shape[-2:]
  windows = []
  for out_pos in itertools.product(*(range(n) for n in map_shape)):
    window = tuple(slice(lo - i, lo - i + n) for i, lo, n in zip(out_pos, lows, map_shape))
    windows.append(w[window])  # (*map_shape, C_in, C_out), indexed by input position p
  stacked = jnp.stack(windows, axis=-2)  # (*map_shape, C_in, P, C_out)
  positions = math.prod(map_shape)
  return stacked.reshape(positions * c_in, positions * c_out)


def _as_matmul(x, w, precision, preferred_element_type):
  map_shape = x.shape[1:-1]
  lows = [lo for lo, _ in _same_pads(w.shape[:-2])]
  y = lax.dot_general(x.reshape(x.shape[0], -1), kernel_matrix(w, map_shape, lows),
                      (((1,), (0,)), ((), ())), precision=precision,
                      preferred_element_type=preferred_element_type)
  return y.reshape(*x.shape[:-1], w.shape[-1])


def _channels_last_numbers(ndim: int) -> lax.ConvDimensionNumbers:
  spatial = tuple(range(1, ndim - 1))
  return lax.ConvDimensionNumbers(lhs_spec=(0, ndim - 1) + spatial,
                                  rhs_spec=(ndim - 1, ndim - 2) + tuple(range(ndim - 2)),
                                  out_spec=(0, ndim - 1) + spatial)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def small_map_conv(x: jax.Array, w: jax.Array, precision: Any = None,
                   preferred_element_type: Any = None) -> jax.Array:
  """Stride-1 SAME convolution (channels last) of a map that fits inside the kernel's reach.

  Equals ``lax.conv_general_dilated(x, w, (1,)*d, "SAME", dimension_numbers=(NHWC, HWIO,
  NHWC))``; see the module docstring for how it is computed and differentiated.
  """
  pads = ((0, 0),) + _same_pads(w.shape[:-2]) + ((0, 0),)
  padded = lax.optimization_barrier(jnp.pad(x, pads))
  ndim = x.ndim
  return lax.conv_general_dilated(padded, w, (1,) * (ndim - 2), "VALID",
                                  dimension_numbers=_channels_last_numbers(ndim),
                                  precision=precision,
                                  preferred_element_type=preferred_element_type)


@small_map_conv.defjvp
def _small_map_conv_jvp(precision, preferred_element_type, primals, tangents):
  x, w = primals
  dx, dw = tangents
  y = _as_matmul(x, w, precision, preferred_element_type)
  dy = (_as_matmul(dx, w, precision, preferred_element_type)
        + _as_matmul(x, dw, precision, preferred_element_type))
  return y, dy


def _is_small_map_case(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                       dimension_numbers, feature_group_count, batch_group_count,
                       out_sharding) -> bool:
  nd = lhs.ndim
  if nd < 3 or rhs.ndim != nd or out_sharding is not None:
    return False
  if feature_group_count != 1 or batch_group_count != 1:
    return False
  ones = (1,) * (nd - 2)
  if tuple(window_strides) != ones:
    return False
  if any(d is not None and tuple(d) != ones for d in (lhs_dilation, rhs_dilation)):
    return False
  try:
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  except (TypeError, ValueError):
    return False
  if numbers != _channels_last_numbers(nd):
    return False
  kernel_shape = rhs.shape[:-2]
  pads = _same_pads(kernel_shape)
  if isinstance(padding, str):
    if padding.upper() != "SAME":
      return False
  elif tuple(tuple(p) for p in padding) != pads:
    return False
  map_shape = lhs.shape[1:-1]
  # Only maps smaller than the kernel are swapped by XLA; larger ones stay convolutions.
  return (fits_kernel_reach(map_shape, pads)
          and any(n < k for n, k in zip(map_shape, kernel_shape)))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Optional[Sequence[int]] = None,
                         rhs_dilation: Optional[Sequence[int]] = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None, out_sharding: Any = None
                         ) -> jax.Array:
  """``jax.lax.conv_general_dilated``, with small maps computed as one matrix product.

  Takes the same arguments. A stride-1, undilated, ungrouped SAME convolution in Flax's layout
  (NHWC input, HWIO kernel) on a map smaller than the kernel and within its reach (a 1×1 or
  2×2 map under a 3×3 kernel) goes through :func:`small_map_conv`; everything else goes to
  ``lax.conv_general_dilated`` unchanged.

  Example:
    >>> conv = nnx.Conv(512, 512, (3, 3), conv_general_dilated=conv_general_dilated,
    ...                 rngs=nnx.Rngs(0))  # doctest: +SKIP
  """
  if _is_small_map_case(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, batch_group_count,
                        out_sharding):
    return small_map_conv(lhs, rhs, precision, preferred_element_type)
  kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type, **kwargs)
