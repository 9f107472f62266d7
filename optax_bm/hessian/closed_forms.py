r"""The supplement's closed forms as checked code (float64 tests against autodiff).

* Supplement §B: back-propagation of the back-matching loss through a dense layer with
  BatchNorm (eqs. 7–10, :func:`bn_dense_backmatching_grads`).
* Supplement §C: the im2col forms of a convolution and its local Hessians (eqs. 14–19:
  :func:`im2col`, :func:`conv_im2col`, :func:`conv_kernel_hessian`, :func:`conv_as_matrix`,
  :func:`conv_input_hessian`), in Flax's layouts (kernel ``(h, w, m_in, n_out)``, NHWC).

References:
  Zhang, Chen & Liu, *On the Local Hessian in Back-propagation*, NeurIPS 2018, supplement
  §B–C; Ioffe & Szegedy, ICML 2015; Chellapilla, Puri & Simard (2006).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------------------------
# Supplement §B: back-propagation through BatchNorm for the back-matching loss (eqs. 7–10)
# ----------------------------------------------------------------------------------------------


class BNBackMatchingGrads(NamedTuple):
  """Gradients of ``ℓ = ½ Σ_n ‖t_n − z_n‖²`` through dense + BatchNorm (supplement eqs. 7–10).

  Attributes:
    z: the block output ``z_b = γ (z̃ − E[z̃]) / sqrt(Var[z̃] + ε) + β``, ``(m, n_out)``.
    z_tilde: the pre-normalization output ``z̃ = z_{b-1} W``.
    dl_dz: eq. 7, ``z_b − t``.
    dl_dvar: ``∂ℓ/∂Var[z̃]``, ``(n_out,)``.
    dl_dmean: ``∂ℓ/∂E[z̃]``, ``(n_out,)``.
    dl_dz_tilde: eq. 8.
    dl_dz_prev: eq. 9, ``(m, m_in)``.
    dl_dkernel: eq. 10, ``(m_in, n_out)`` (Flax layout).
  """

  z: jax.Array
  z_tilde: jax.Array
  dl_dz: jax.Array
  dl_dvar: jax.Array
  dl_dmean: jax.Array
  dl_dz_tilde: jax.Array
  dl_dz_prev: jax.Array
  dl_dkernel: jax.Array


@functools.partial(jax.jit, static_argnames=("epsilon",))
def bn_dense_backmatching_grads(kernel: jax.Array, z_prev: jax.Array, target: jax.Array,
                                scale: Optional[jax.Array] = None,
                                offset: Optional[jax.Array] = None,
                                epsilon: float = 1e-5) -> BNBackMatchingGrads:
  r"""Back-propagation of the back-matching loss through a dense layer with BatchNorm.

  The block is ``z̃ = z_{b-1} W`` (Flax layout ``W: (m_in, n_out)``, batch of ``m`` rows),
  ``z_b = γ (z̃ − E[z̃]) / sqrt(Var[z̃] + ε) + β`` with batch statistics (biased variance, as
  Flax), and the loss ``ℓ = ½ Σ_n ‖t_n − z_{b,n}‖²`` (the z-sub-problem's sum of
  docs/method.md#2-back-matching-propagation; the θ-sub-problem's mean is this divided by
  ``m``). Written out as in supplement §B, with
  ``σ² = Var[z̃] + ε``:

  .. math::

    \frac{∂ℓ}{∂z_b} = z_b − t \quad (7)

    \frac{∂ℓ}{∂\tilde z} = \frac{∂ℓ}{∂z_b}\frac{γ}{σ}
      + \frac{∂ℓ}{∂\mathrm{Var}}\frac{2(\tilde z − E\tilde z)}{m}
      + \frac{1}{m}\frac{∂ℓ}{∂E\tilde z} \quad (8)

    \frac{∂ℓ}{∂\mathrm{Var}} = −\frac{1}{2σ^3}\sum_n \frac{∂ℓ}{∂z_{b,n}} γ (\tilde z_n − E\tilde z),
    \qquad \frac{∂ℓ}{∂E\tilde z} = −\frac{1}{σ}\sum_n \frac{∂ℓ}{∂z_{b,n}} γ
    \;(+\ \tfrac{∂ℓ}{∂\mathrm{Var}}\cdot(−\tfrac{2}{m})\textstyle\sum_n(\tilde z_n − E\tilde z) = 0)

    \frac{∂ℓ}{∂z_{b-1}} = \frac{∂ℓ}{∂\tilde z} W^\top \quad (9), \qquad
    \frac{∂ℓ}{∂W} = z_{b-1}^\top \frac{∂ℓ}{∂\tilde z} \quad (10).

  (The supplement writes ``W`` as ``n_out × m_in`` and column vectors, hence its transposes.)
  A bias added before BatchNorm gets gradient ``Σ_n ∂ℓ/∂z̃_n = 0``.

  Args:
    kernel: ``W``, ``(m_in, n_out)``.
    z_prev: ``z_{b-1}``, ``(m, m_in)``.
    target: ``t = z_b^{k+1/2}``, ``(m, n_out)``.
    scale: BatchNorm ``γ`` (default 1).
    offset: BatchNorm ``β`` (default 0).
    epsilon: BatchNorm ``ε`` (Flax's default 1e-5).

  Returns:
    A :class:`BNBackMatchingGrads`.

  Example:
    >>> g = bn_dense_backmatching_grads(W, z_prev, target)  # doctest: +SKIP
    >>> z_half = z_prev - g.dl_dz_prev  # one unit step on the z-sub-problem  # doctest: +SKIP

  References:
    Zhang, Chen & Liu, NeurIPS 2018, supplement §B, eqs. 7–10; Ioffe & Szegedy, ICML 2015.
  """
  m = z_prev.shape[0]
  n_out = kernel.shape[-1]
  gamma = jnp.ones((n_out,), kernel.dtype) if scale is None else scale
  beta = jnp.zeros((n_out,), kernel.dtype) if offset is None else offset
  z_tilde = z_prev @ kernel
  mean = jnp.mean(z_tilde, axis=0)
  centered = z_tilde - mean
  var = jnp.mean(jnp.square(centered), axis=0)
  inv_sigma = jax.lax.rsqrt(var + epsilon)
  z = gamma * centered * inv_sigma + beta
  dl_dz = z - target  # (7)
  dl_dxhat = dl_dz * gamma
  dl_dvar = jnp.sum(dl_dxhat * centered, axis=0) * (-0.5) * inv_sigma ** 3
  dl_dmean = (-inv_sigma * jnp.sum(dl_dxhat, axis=0)
              + dl_dvar * (-2.0 / m) * jnp.sum(centered, axis=0))
  dl_dz_tilde = dl_dxhat * inv_sigma + dl_dvar * 2.0 * centered / m + dl_dmean / m  # (8)
  dl_dz_prev = dl_dz_tilde @ kernel.T  # (9)
  dl_dkernel = z_prev.T @ dl_dz_tilde  # (10)
  return BNBackMatchingGrads(z, z_tilde, dl_dz, dl_dvar, dl_dmean, dl_dz_tilde, dl_dz_prev,
                             dl_dkernel)



# ----------------------------------------------------------------------------------------------
# Supplement §C: convolution as im2col, its local Hessians (eqs. 14–19)
# ----------------------------------------------------------------------------------------------


Padding = Union[str, int, Sequence[tuple[int, int]]]


def _pairs(v, n, what):
  if isinstance(v, int):
    return (v,) * n
  v = tuple(int(x) for x in v)
  if len(v) != n:
    raise ValueError(f"optax_bm.hessian: {what} needs {n} entries, got {v}.")
  return v


def conv_pads(input_hw: Sequence[int], window: Sequence[int], stride: Union[int, Sequence[int]],
              padding: Padding) -> tuple[tuple[int, int], ...]:
  """Explicit ``(low, high)`` padding per spatial axis, as ``lax.conv_general_dilated`` uses."""
  n = len(window)
  strides = _pairs(stride, n, "stride")
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"optax_bm.hessian: padding {padding!r} not supported (SAME, VALID, "
                       "int or (low, high) pairs).")
    pads = jax.lax.padtype_to_pads(tuple(input_hw), tuple(window), strides, padding.upper())
  elif isinstance(padding, int):
    pads = [(padding, padding)] * n
  else:
    pads = [tuple(p) for p in padding]
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if len(pads) != n or any(lo < 0 or hi < 0 for lo, hi in pads):
    raise ValueError(f"optax_bm.hessian: bad padding {padding!r} for a {n}-d window.")
  return pads


def _out_hw(input_hw, window, strides, pads):
  return tuple((p + lo + hi - h) // s + 1
               for p, h, s, (lo, hi) in zip(input_hw, window, strides, pads))


def im2col(x: jax.Array, window: Sequence[int], stride: Union[int, Sequence[int]] = 1,
           padding: Padding = "SAME") -> jax.Array:
  r"""The im2col matrices ``a_i2c`` of a batch of NHWC images (supplement §C, eq. 14).

  Column ``u = u_1 q_2 + u_2`` of example ``x``'s matrix holds the input values that the kernel
  meets at output position ``(u_1, u_2)``, in the order of a Flax kernel ``(h, w, m_in, n_out)``
  reshaped to ``(h·w·m_in, n_out)``: row ``(i·w + j)·m_in + c`` is input channel ``c`` at
  window offset ``(i, j)`` (zero where the window hangs over the padding).

  Args:
    x: ``(N, p_1, p_2, m_in)``.
    window: ``(h, w)``.
    stride: int or ``(s_1, s_2)``.
    padding: ``"SAME"``, ``"VALID"``, an int, or ``((lo, hi), (lo, hi))``, as Flax/lax.

  Returns:
    ``(N, h·w·m_in, q_1·q_2)``.

  Example:
    >>> a = im2col(x, (3, 3), 1, "SAME")  # doctest: +SKIP
    >>> b_col = kernel_row(kernel) @ a  # eq. 14: (N, n_out, q1*q2)  # doctest: +SKIP

  References:
    Zhang, Chen & Liu, NeurIPS 2018, supplement §C, eq. 14; Chellapilla, Puri & Simard (2006).
  """
  window = tuple(int(w) for w in window)
  strides = _pairs(stride, 2, "stride")
  pads = conv_pads(x.shape[1:3], window, strides, padding)
  return _im2col(x, window, strides, pads)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _im2col(x, window, strides, pads):
  n, p1, p2, c = x.shape
  q1, q2 = _out_hw((p1, p2), window, strides, pads)
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  cols = []
  for i in range(window[0]):
    for j in range(window[1]):
      cols.append(xp[:, i:i + strides[0] * (q1 - 1) + 1:strides[0],
                     j:j + strides[1] * (q2 - 1) + 1:strides[1], :])
  a = jnp.stack(cols, axis=3)  # (N, q1, q2, h*w, m_in)
  return a.reshape(n, q1 * q2, window[0] * window[1] * c).transpose(0, 2, 1)


def kernel_row(kernel: jax.Array) -> jax.Array:
  """``W_row``, ``(n_out, h·w·m_in)``: one row per output feature (supplement §C)."""
  return kernel.reshape(-1, kernel.shape[-1]).T


def kernel_col(kernel: jax.Array) -> jax.Array:
  """``W_col``, ``(m_in, h·w·n_out)``: one row per input feature (supplement §C)."""
  return jnp.moveaxis(kernel, -2, 0).reshape(kernel.shape[-2], -1)


def conv_im2col(kernel: jax.Array, x: jax.Array, stride: Union[int, Sequence[int]] = 1,
                padding: Padding = "SAME") -> jax.Array:
  r"""A convolution as one matrix product per example (supplement eq. 14).

  .. math::

    b_{col}(x) = W_{row}\, a_{i2c}(x),

  returned in NHWC. Equals ``lax.conv_general_dilated(x, kernel, stride, padding,
  dimension_numbers=("NHWC", "HWIO", "NHWC"))`` (Flax's ``nnx.Conv`` without bias).

  Args:
    kernel: ``(h, w, m_in, n_out)``.
    x: ``(N, p_1, p_2, m_in)``.
    stride: int or pair.
    padding: as :func:`im2col`.

  Returns:
    ``(N, q_1, q_2, n_out)``.

  References:
    Zhang, Chen & Liu, NeurIPS 2018, supplement §C, eq. 14.
  """
  strides = _pairs(stride, 2, "stride")
  pads = conv_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  q1, q2 = _out_hw(x.shape[1:3], kernel.shape[:2], strides, pads)
  return _conv_im2col(kernel, x, strides, pads, (q1, q2))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _conv_im2col(kernel, x, strides, pads, out_hw):
  b_col = kernel_row(kernel) @ _im2col(x, kernel.shape[:2], strides, pads)  # (N, n, q1 q2)
  return b_col.transpose(0, 2, 1).reshape(x.shape[0], *out_hw, kernel.shape[-1])


def conv_kernel_hessian(x: jax.Array, window: Sequence[int], n_out: int,
                        stride: Union[int, Sequence[int]] = 1, padding: Padding = "SAME", *,
                        block_only: bool = False) -> jax.Array:
  r"""The local Hessian of a convolution's kernel, ``H_W = E_x a_{i2c} a_{i2c}^T`` (eq. 17).

  For the θ-sub-problem ``ℓ = (1/2N) Σ_n ‖t_n − W_{row} a_{i2c}(x_n)‖²``
  (docs/method.md#5-local-hessians-measured), the
  Hessian with respect to each row of ``W_row`` (one output feature) is the same matrix

  .. math::

    H_{W_n} = \frac{1}{N}\sum_{n=1}^{N} a_{i2c}(x_n)\, a_{i2c}(x_n)^\top
    = \frac{1}{N}\sum_n \sum_{u} a_{·u}(x_n) a_{·u}(x_n)^\top ,

  an expectation over the batch of a sum over the ``q_1 q_2`` output positions. Over the whole
  kernel, flattened in Flax's order ``(h, w, m_in, n_out)`` (output feature fastest), the
  Hessian is block diagonal over output features with identical blocks:
  ``H_W = H_{W_n} ⊗ I_{n_out}``.

  Args:
    x: the convolution's input, ``(N, p_1, p_2, m_in)``.
    window: ``(h, w)``.
    n_out: output features.
    stride: int or pair.
    padding: as :func:`im2col`.
    block_only: return the ``(h·w·m_in)²`` block ``H_{W_n}`` instead of the full matrix.

  Returns:
    ``(h·w·m_in·n_out, h·w·m_in·n_out)`` (or the block).

  References:
    Zhang, Chen & Liu, NeurIPS 2018, supplement §C, eq. 17.
  """
  window = tuple(int(w) for w in window)
  strides = _pairs(stride, 2, "stride")
  pads = conv_pads(x.shape[1:3], window, strides, padding)
  return _conv_kernel_hessian(x, window, int(n_out), strides, pads, bool(block_only))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _conv_kernel_hessian(x, window, n_out, strides, pads, block_only):
  a = _im2col(x, window, strides, pads)
  block = jnp.einsum("npu,nru->pr", a, a) / x.shape[0]
  if block_only:
    return block
  return jnp.kron(block, jnp.eye(n_out, dtype=block.dtype))


def conv_as_matrix(kernel: jax.Array, input_hw: Sequence[int],
                   stride: Union[int, Sequence[int]] = 1,
                   padding: Padding = "SAME") -> jax.Array:
  r"""``W_a``: one example's convolution as an explicit (sparse, stored dense) matrix (eq. 19).

  Row ``(u_1 q_2 + u_2)·n_out + k`` (output ``k`` at ``(u_1, u_2)``, NHWC order), column
  ``(v_1 p_2 + v_2)·m_in + j`` (input ``j`` at ``(v_1, v_2)``, NHWC order); column
  ``(j, v_1, v_2)`` is the supplement's ``w_{j v_1 v_2 →}``: the weights that meet input
  location ``(j, v_1, v_2)``, scattered over ``n_out`` blocks. Built by placing kernel entries,
  not by differentiation. Small inputs only (``q_1 q_2 n_out × p_1 p_2 m_in`` entries).

  Args:
    kernel: ``(h, w, m_in, n_out)``.
    input_hw: ``(p_1, p_2)``.
    stride: int or pair.
    padding: as :func:`im2col`.

  Returns:
    ``(q_1 q_2 n_out, p_1 p_2 m_in)``.

  References:
    Zhang, Chen & Liu, NeurIPS 2018, supplement §C, eqs. 15, 18–19.
  """
  h, w, m_in, n_out = kernel.shape
  p1, p2 = (int(v) for v in input_hw)
  strides = _pairs(stride, 2, "stride")
  pads = conv_pads((p1, p2), (h, w), strides, padding)
  q1, q2 = _out_hw((p1, p2), (h, w), strides, pads)
  rows, cols, taps = [], [], []
  k_idx = np.arange(n_out)
  j_idx = np.arange(m_in)
  for u1 in range(q1):
    for u2 in range(q2):
      for i in range(h):
        for jj in range(w):
          v1 = u1 * strides[0] + i - pads[0][0]
          v2 = u2 * strides[1] + jj - pads[1][0]
          if 0 <= v1 < p1 and 0 <= v2 < p2:
            r = (u1 * q2 + u2) * n_out + k_idx[:, None]
            c = (v1 * p2 + v2) * m_in + j_idx[None, :]
            rows.append(np.broadcast_to(r, (n_out, m_in)).ravel())
            cols.append(np.broadcast_to(c, (n_out, m_in)).ravel())
            taps.append(np.full(n_out * m_in, i * w + jj))
  rows, cols, taps = (np.concatenate(v) for v in (rows, cols, taps))
  return _scatter(kernel, rows, cols, taps, (q1 * q2 * n_out, p1 * p2 * m_in))


@functools.partial(jax.jit, static_argnums=(4,))
def _scatter(kernel, rows, cols, taps, shape):
  h, w, m_in, n_out = kernel.shape
  # kernel[i, jj, j, k] for the (k, j) pairs of each tap, in (k major, j minor) order.
  flat = kernel.reshape(h * w, m_in, n_out).transpose(0, 2, 1).reshape(h * w, -1)
  vals = flat[taps, jnp.tile(jnp.arange(n_out * m_in), taps.shape[0] // (n_out * m_in))]
  return jnp.zeros(shape, kernel.dtype).at[rows, cols].add(vals)


def conv_input_hessian(kernel: jax.Array, input_hw: Sequence[int],
                       stride: Union[int, Sequence[int]] = 1,
                       padding: Padding = "SAME") -> jax.Array:
  r"""The local Hessian of a convolution's input, ``H_a = W_a^T W_a`` (eqs. 18–19).

  Entry ``((j, u_1, u_2), (k, v_1, v_2))`` is ``w_{j u_1 u_2 →}^T w_{k v_1 v_2 →}`` (eq. 18),
  for the z-sub-problem ``½‖t − W_a a‖²`` of one example; a batch's ``H_z`` for a block that is
  just the convolution is ``I_N ⊗ H_a``. Rows and columns are in NHWC order.

  Args:
    kernel: ``(h, w, m_in, n_out)``.
    input_hw: ``(p_1, p_2)``.
    stride: int or pair.
    padding: as :func:`im2col`.

  Returns:
    ``(p_1 p_2 m_in, p_1 p_2 m_in)``.

  References:
    Zhang, Chen & Liu, NeurIPS 2018, supplement §C, eqs. 18–19.
  """
  wa = conv_as_matrix(kernel, input_hw, stride, padding)
  return jnp.matmul(wa.T, wa)
