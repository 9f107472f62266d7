r"""A block's measured mean local-Hessian eigenvalues beside its scalar local Hessians
(docs/method.md#3-scalar-local-hessians).

:func:`compare_with_scalars` estimates ``tr(H_W)/dim W``, ``tr(H_z)/dim z`` and the mean
eigenvalue of every other parameter's diagonal block matrix-free, and returns them with
:func:`optax_bm.local_hessian_scalars` ``(m_W, m_a, m_z)`` of the same kernel.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_bm import scaling
from optax_bm import specs as specs_lib
from optax_bm.hessian.estimators import _dtype, mean_eigenvalue
from optax_bm.hessian.local import BlockFn, gauss_newton_operator


class ScalarComparison(NamedTuple):
  """A block's measured local-Hessian mean eigenvalues beside its scalar local Hessians.

  Attributes:
    mean_w: measured ``tr(H_W) / dim(W)``, ``H_W`` the kernel's block of ``H_θ``.
    mean_w_stderr: its standard error.
    m_w: the scalar ``m_{b,W}``.
    mean_z: measured ``tr(H_z) / dim(z)`` over the whole batch's input.
    mean_z_stderr: its standard error.
    m_z: the scalar ``m_{b,z}``.
    mean_a: measured mean eigenvalue of each other parameter's diagonal block of ``H_θ``
      (bias, BatchNorm scale, offset), a dict path -> value (exact: computed from ``dim``
      products when that is at most ``exact_other_dim``, else Hutchinson).
    m_a: the scalar ``m_{b,a}``.
    dim_w: kernel size.
    dim_z: input size (whole batch).
  """

  mean_w: jax.Array
  mean_w_stderr: jax.Array
  m_w: jax.Array
  mean_z: jax.Array
  mean_z_stderr: jax.Array
  m_z: jax.Array
  mean_a: dict
  m_a: jax.Array
  dim_w: int
  dim_z: int


def _with_leaf(treedef, leaves, i, value):
  leaves = list(leaves)
  leaves[i] = value
  return jax.tree.unflatten(treedef, leaves)


def _exact_trace(matvec, dim, dtype):
  eye = jnp.eye(dim, dtype=dtype)
  return jnp.sum(jax.lax.map(lambda e: jnp.vdot(e, matvec(e).astype(dtype)), eye))


def compare_with_scalars(fn: BlockFn, params: Any, z: Any, specs: Any, key: jax.Array, *,
                         num_samples: int = 64, method: str = "hutchinson",
                         exact_other_dim: int = 4096,
                         dtype: Any = None) -> ScalarComparison:
  r"""Measures a block's mean local-Hessian eigenvalues and puts them beside its scalars.

  For the block's kernel ``W`` (the leaf whose spec has ``role="kernel"``), its input ``z`` and
  its other parameters, estimates the mean eigenvalues

  .. math::

    \bar λ(H_W) = \frac{\operatorname{tr}(J_W^\top J_W)}{N \dim W}, \qquad
    \bar λ(H_z) = \frac{\operatorname{tr}(J_z^\top J_z)}{\dim z}

  matrix-free (:func:`mean_eigenvalue`) and returns them with
  :func:`optax_bm.local_hessian_scalars` ``(m_W, m_a, m_z)`` computed from the same kernel.

  Args:
    fn: the block, ``fn(params, z) -> output``.
    params: the block's parameters.
    z: its input (batch axis first).
    specs: the block's spec tree, with the structure of ``params`` (e.g. the block's sub-tree
      of :func:`optax_bm.annotate`'s output); exactly one leaf must be the kernel.
    key: PRNG key.
    num_samples: products per trace estimate.
    method: ``"hutchinson"`` or ``"hutch++"``.
    exact_other_dim: other parameters up to this size get their trace exactly.
    dtype: working dtype.

  Returns:
    A :class:`ScalarComparison`.

  Example:
    >>> specs = optax_bm.annotate(model, x)  # doctest: +SKIP
    >>> fns, params = optax_bm.backmatching.nnx_blocks(model.blocks)  # doctest: +SKIP
    >>> cmp = compare_with_scalars(fns[0], params[0], x, specs["blocks"][0], key)  # doctest: +SKIP
    >>> cmp.mean_w / cmp.m_w  # 1 if the scalar were exact  # doctest: +SKIP

  References:
    Zhang, Chen & Liu, NeurIPS 2018, supplement §C.1; docs/method.md#3-scalar-local-hessians
    and docs/method.md#5-local-hessians-measured.
  """
  spec_leaves, leaves, _, paths = specs_lib.flatten_specs_like(specs, params)
  kernels = [i for i, s in enumerate(spec_leaves)
             if isinstance(s, specs_lib.LayerSpec) and s.is_kernel]
  if len(kernels) != 1:
    raise ValueError(f"optax_bm.hessian.compare_with_scalars: the block needs exactly one "
                     f"kernel spec, found {len(kernels)}.")
  ki = kernels[0]
  others = [i for i, s in enumerate(spec_leaves)
            if i != ki and isinstance(s, specs_lib.LayerSpec)]
  wdtype = _dtype(dtype)

  @jax.jit
  def measure(params, z, key):
    leaves, treedef = jax.tree.flatten(params)
    k_w, k_z, k_a = jax.random.split(key, 3)

    def leaf_op(i):
      fn_i = lambda leaf, x: fn(_with_leaf(treedef, leaves, i, leaf), x)
      return gauss_newton_operator(fn_i, leaves[i], z, "params")

    op_w = leaf_op(ki)
    mw = mean_eigenvalue(op_w.matvec, op_w.dim, num_samples, k_w, method=method, dtype=dtype)
    op_z = gauss_newton_operator(fn, params, z, "input")
    mz = mean_eigenvalue(op_z.matvec, op_z.dim, num_samples, k_z, method=method, dtype=dtype)
    mean_a = {}
    for i in others:
      op = leaf_op(i)
      if op.dim <= exact_other_dim:
        mean_a[paths[i]] = _exact_trace(op.matvec, op.dim, wdtype) / op.dim
      else:
        mean_a[paths[i]] = mean_eigenvalue(op.matvec, op.dim, num_samples,
                                           jax.random.fold_in(k_a, i), method=method,
                                           dtype=dtype).value
    scal = scaling.local_hessian_scalars(spec_leaves[ki], leaves[ki], paths[ki])
    return mw, mz, mean_a, scal

  mw, mz, mean_a, scal = measure(params, z, key)
  dim_w = int(np.prod(jnp.shape(leaves[ki])))
  dim_z = sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(z))
  return ScalarComparison(mw.value, mw.stderr, scal.m_w, mz.value, mz.stderr, scal.m_z, mean_a,
                          scal.m_a, dim_w, dim_z)

