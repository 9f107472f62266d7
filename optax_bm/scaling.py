"""Scalar local Hessians and the per-leaf factors ``A_b / m_{b,.}`` of scale-amended SGD.

The mathematics: docs/method.md#3-scalar-local-hessians (scalars) and
docs/method.md#scale-amended-sgd-the-unrolled-factors (factors).

This module is pure arithmetic on a spec tree and the current parameters; the optax
transformation in :mod:`optax_bm.transform` only multiplies updates by what it returns.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from optax_bm import specs as specs_lib
from optax_bm.specs import CONV, DENSE, LayerSpec


class LocalHessianScalars(NamedTuple):
  """The scalar local Hessians of one block (docs/method.md#3-scalar-local-hessians)."""

  m_w: jax.Array  # kernel: P_{b,W} = m_w I
  m_a: jax.Array  # bias, BatchNorm scale/offset: P_{b,a} = m_a I
  m_z: jax.Array  # block input: P_{b,z} = m_z I


def kernel_fan(spec: LayerSpec, shape: Sequence[int], path: str = "kernel"):
  """``(m_in, n_out)`` of a kernel as Flax stores it: dense ``(m_in, n_out)``, conv ``(*window, m_in, n_out)``."""
  shape = tuple(shape)
  if spec.kind == DENSE and len(shape) != 2:
    raise ValueError(f"optax_bm: {path!r} is annotated as a dense kernel but has shape {shape}; "
                     "dense kernels are (m_in, n_out).")
  if spec.kind == CONV and len(shape) < 3:
    raise ValueError(f"optax_bm: {path!r} is annotated as a conv kernel but has shape {shape}; "
                     "conv kernels are (*window, m_in, n_out).")
  return int(shape[-2]), int(shape[-1])


def _compute_dtype(dtype):
  # bf16/f16 kernels: norms in f32; f64 stays f64.
  return jnp.promote_types(dtype, jnp.float32)


def _safe(m):
  # An all-zero kernel makes a scalar 0 or inf; fall back to the identity preconditioner
  # (factor 1) rather than produce inf/NaN updates.
  return jnp.where(jnp.isfinite(m) & (m > 0), m, jnp.ones_like(m))


def local_hessian_scalars(spec: LayerSpec, kernel: jax.Array, path: str = "kernel",
                          gamma2: Optional[jax.Array] = None) -> LocalHessianScalars:
  r"""Scalar approximations of a block's local Hessians (supplement §C.1;
  docs/method.md#3-scalar-local-hessians).

  With ``r = ||W||_F^2 / n_out`` (mean squared row norm of ``W_row``) and
  ``q = ||W||_F^2 / m_in`` (mean squared row norm of ``W_col``):

  .. math::

    \text{with BatchNorm:}\quad m_W = s / r, \qquad m_z = q / (r c) = n_{out} / (m_{in} c)

    \text{without BatchNorm:}\quad m_W = s, \qquad m_z = q / c

  and ``m_a = s`` for the block's other parameters. A scalar that is 0 or not finite (an
  all-zero kernel) is replaced by 1.

  With ``gamma2`` (the mean squared BatchNorm scale ``E[γ²]`` of a normalized block), the
  block's output is ``γ`` times the normalized one, so its Jacobians with respect to the kernel
  and the input carry ``γ``: ``m_W`` and ``m_z`` are multiplied by ``E[γ²]`` ("γ²-aware"
  scalars; docs/method.md#64-batchnorms-scale-ignored). ``m_a`` is unchanged (the offset's
  Jacobian does not carry γ).

  Args:
    spec: the kernel's :class:`LayerSpec` (any leaf of the block carries the same description).
    kernel: the block's current kernel.
    path: the kernel's path, for error messages.
    gamma2: optional ``E[γ²]`` of the block's BatchNorm scale (ignored without BatchNorm).

  Returns:
    A :class:`LocalHessianScalars` of scalars in the kernel's compute dtype (at least f32).

  References:
    Zhang, Chen & Liu, *On the Local Hessian in Back-propagation*, NeurIPS 2018, supplement §C.1.
  """
  m_in, n_out = kernel_fan(spec, kernel.shape, path)
  dtype = _compute_dtype(kernel.dtype)
  sq = jnp.sum(jnp.square(kernel.astype(dtype)))
  s = jnp.asarray(spec.s, dtype)
  c = jnp.asarray(spec.c, dtype)
  if spec.normalized:
    r = sq / n_out
    m_w = s / r
    m_z = jnp.asarray(n_out / (m_in * spec.c), dtype)
    if gamma2 is not None:
      g2 = jnp.asarray(gamma2, dtype)
      m_w, m_z = m_w * g2, m_z * g2
  else:
    m_w = s
    m_z = sq / m_in / c
  return LocalHessianScalars(_safe(m_w), s, _safe(m_z))


# The leaf name Flax gives BatchNorm's scale γ (nnx.BatchNorm and linen.BatchNorm alike).
BATCHNORM_SCALE_NAME = "scale"


class _BlockPlan(NamedTuple):
  """Static layout of a spec tree: which leaf is each block's kernel (and BatchNorm scale)."""

  num_blocks: int
  kernel_index: dict  # block -> leaf index of its kernel
  kernel_spec: dict  # block -> LayerSpec
  scale_index: dict  # block -> leaf index of its BatchNorm scale γ (normalized blocks)


def _is_batchnorm_scale(spec: LayerSpec, path: str) -> bool:
  return (spec.normalized and not spec.is_kernel
          and path.rsplit("/", 1)[-1] == BATCHNORM_SCALE_NAME)


def plan_blocks(spec_leaves: Sequence[Any], paths: Sequence[str]) -> _BlockPlan:
  """Checks a flat list of specs describes a chain ``0..B-1`` with one kernel per block."""
  kernel_index, kernel_spec, first_path, signature, scale_index = {}, {}, {}, {}, {}
  for i, (s, path) in enumerate(zip(spec_leaves, paths)):
    if not isinstance(s, LayerSpec):
      continue
    b = s.block
    if b in signature and signature[b] != s.block_signature():
      raise ValueError(
          f"optax_bm: leaves of block {b} disagree on (kind, s, c, normalized): {path!r} has "
          f"{s.block_signature()}, {first_path[b]!r} has {signature[b]}.")
    signature.setdefault(b, s.block_signature())
    first_path.setdefault(b, path)
    if s.is_kernel:
      if b in kernel_index:
        raise ValueError(f"optax_bm: block {b} has two kernels: {paths[kernel_index[b]]!r} and "
                         f"{path!r}.")
      kernel_index[b] = i
      kernel_spec[b] = s
    elif _is_batchnorm_scale(s, path):
      scale_index.setdefault(b, i)
  if not signature:
    return _BlockPlan(0, {}, {}, {})
  num_blocks = max(signature) + 1
  missing = [b for b in range(num_blocks) if b not in signature]
  if missing:
    raise ValueError(f"optax_bm: blocks must be numbered 0..{num_blocks - 1} without gaps; no "
                     f"parameter is annotated with block(s) {missing}.")
  no_kernel = [b for b in range(num_blocks) if b not in kernel_index]
  if no_kernel:
    b = no_kernel[0]
    raise ValueError(f"optax_bm: block {b} has no kernel (role='kernel') leaf; its parameters "
                     f"include {first_path[b]!r}.")
  return _BlockPlan(num_blocks, kernel_index, kernel_spec, scale_index)


def leaf_factors(spec_leaves, param_leaves, paths, *, scale_others: bool = False,
                 gamma_aware: bool = False) -> list:
  """``A_b / m_{b,.}`` for every leaf (``None`` for UNSCALED or masked leaves).

  ``param_leaves`` may hold ``optax.MaskedNode`` where ``optax.masked`` hid a parameter; a
  masked kernel is an error only if some unmasked leaf needs its block's scalars. With
  ``scale_others=False`` the non-kernel leaves get ``None`` (factor 1); with ``gamma_aware``
  the scalars of normalized blocks use ``E[γ²]`` of the block's BatchNorm scale (the leaf
  named ``scale``; see :func:`local_hessian_scalars`).
  """
  plan = plan_blocks(spec_leaves, paths)
  live = [isinstance(s, LayerSpec) and not isinstance(p, optax.MaskedNode)
          for s, p in zip(spec_leaves, param_leaves)]
  if not any(live):
    return [None] * len(spec_leaves)
  lowest = min(s.block for s, ok in zip(spec_leaves, live) if ok)

  scalars = {}
  for b in range(lowest, plan.num_blocks):
    k = plan.kernel_index[b]
    if isinstance(param_leaves[k], optax.MaskedNode):
      raise ValueError(
          f"optax_bm: the kernel {paths[k]!r} of block {b} is masked out, but parameters of "
          f"block {lowest} need its scalar local Hessian; mask whole chains from the top, or "
          "use optax_bm.UNSCALED in the spec tree instead.")
    gamma2 = None
    if gamma_aware and b in plan.scale_index:
      g = param_leaves[plan.scale_index[b]]
      if isinstance(g, optax.MaskedNode):
        raise ValueError(
            f"optax_bm: gamma_aware scalars of block {b} need its BatchNorm scale "
            f"{paths[plan.scale_index[b]]!r}, which is masked out.")
      g = g.astype(_compute_dtype(g.dtype))
      gamma2 = jax.lax.stop_gradient(jnp.mean(jnp.square(g)))
    scalars[b] = local_hessian_scalars(plan.kernel_spec[b], param_leaves[k], paths[k], gamma2)

  # A_b = prod_{j>b} 1 / m_{j,z}, accumulated from the top block down.
  prefix = {}
  acc = None
  for b in reversed(range(lowest, plan.num_blocks)):
    prefix[b] = acc
    inv = 1.0 / scalars[b].m_z
    acc = inv if acc is None else acc * inv

  out = []
  for s, ok in zip(spec_leaves, live):
    if not ok or (not scale_others and not s.is_kernel):
      out.append(None)
      continue
    sc = scalars[s.block]
    m = sc.m_w if s.is_kernel else sc.m_a
    a = prefix[s.block]
    out.append(1.0 / m if a is None else a / m)
  return out


def block_scales(specs: specs_lib.SpecsOrFn, params: Any, *, scale_others: bool = False,
                 gamma_aware: bool = False) -> Any:
  r"""The factor that scale-amended SGD applies to every parameter's gradient.

  For a leaf of block ``b`` (docs/method.md#scale-amended-sgd-the-unrolled-factors):

  .. math::

    \frac{A_b}{m_{b,W}} \text{ (kernel)}, \qquad \frac{A_b}{m_{b,a}} \text{ (other)},
    \qquad A_b = \prod_{j=b+1}^{B} \frac{1}{m_{j,z}},

  with the scalars of :func:`local_hessian_scalars`. :data:`optax_bm.UNSCALED` leaves get 1.

  Args:
    specs: a spec tree with the structure of ``params`` (as made by :func:`optax_bm.annotate`),
      or a callable returning one from ``params``.
    params: the current parameters.
    scale_others: scale bias and BatchNorm leaves by ``A_b / m_{b,a}`` too (SPEC v1); the
      default ``False`` leaves them at factor 1 (see :func:`optax_bm.scale_by_back_matching`).
    gamma_aware: multiply ``m_{b,W}`` and ``m_{b,z}`` of normalized blocks by ``E[γ²]``.

  Returns:
    A pytree with the structure of ``params`` holding one scalar per leaf (dtype at least f32),
    handy for logging.

  Example:
    >>> scales = optax_bm.block_scales(specs, params)  # doctest: +SKIP

  References:
    Zhang, Chen & Liu, *On the Local Hessian in Back-propagation*, NeurIPS 2018, §4 and
    supplement §C.1.
  """
  spec_tree = specs_lib.resolve(specs, params)
  spec_leaves, param_leaves, treedef, paths = specs_lib.flatten_specs_like(spec_tree, params)
  factors = leaf_factors(spec_leaves, param_leaves, paths, scale_others=scale_others,
                         gamma_aware=gamma_aware)
  out = [jnp.ones((), _compute_dtype(p.dtype)) if f is None else f
         for f, p in zip(factors, param_leaves)]
  return jax.tree.unflatten(treedef, out)
