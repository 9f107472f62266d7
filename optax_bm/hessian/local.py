r"""Local Hessians of one block: Gauss–Newton products, matrix-free operators, dense matrices.

For a block ``F(θ, z)`` on a batch of ``N`` examples
(docs/method.md#5-local-hessians-measured), the local Hessians are the Gauss–Newton matrices
of the back-matching loss at the current point, normalized like the sub-problems of
back-matching (docs/method.md#2-back-matching-propagation):

.. math::

  H_θ = \frac{1}{N} J_θ^\top J_θ, \qquad H_z = J_z^\top J_z,

with ``J_θ``, ``J_z`` the Jacobians of the block's output over the whole batch (flattened).

:func:`gauss_newton_matvec` is the one Gauss–Newton product of the package: it also serves
:func:`optax_bm.backmatching.back_matching_step`'s ``"gauss_newton"`` solver, whose top block
puts the training loss's Hessian between ``J^T`` and ``J`` (the ``curvature`` argument).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

BlockFn = Callable[[Any, Any], Any]  # F(params, z) -> output (batch axis first)
Matvec = Callable[[jax.Array], jax.Array]
Curvature = Callable[[Any, Any], Any]  # (output, u) -> C u, C the output-space curvature
WRT = ("params", "input")


def gauss_newton_matvec(f: Callable[[Any], Any], point: Any, *,
                        curvature: Optional[Curvature] = None,
                        scale: float = 1.0) -> Callable[[Any], Any]:
  r"""``v ↦ scale · J^T C J v`` for a function ``f`` at ``point``, matrix-free.

  ``J`` is the Jacobian of ``f`` at ``point`` and ``C`` the curvature of the loss in the output
  space: the identity by default (the Gauss–Newton matrix of ``½‖t − f‖²``, a local Hessian of
  docs/method.md#5-local-hessians-measured), or ``curvature(out, u) = C u`` with
  ``out = f(point)`` (the loss Hessian
  ``∇²ℓ(out)`` for the top block of back-matching). ``f`` is linearized once
  (``jax.linearize``); each product is then one pass forward and one backward through the
  *linearized* function (the transpose from ``jax.linear_transpose``), without recomputing
  ``f`` and without forming ``J``.

  Build it inside the function you ``jax.jit`` so the linearization's residuals are traced
  values, not baked-in constants.

  Args:
    f: ``point -> output`` (pytrees).
    point: where ``J`` is taken (a pytree; ``v`` has its structure).
    curvature: ``(out, u) -> C u`` on output-shaped pytrees; ``None`` for ``C = I``.
    scale: a factor on the product (``1/N`` for ``H_θ``).

  Returns:
    The product function ``v -> scale · J^T C J v`` (same structure as ``point``).

  Example:
    >>> mv = gauss_newton_matvec(lambda th: block(th, z), params, scale=1 / n)  # doctest: +SKIP
    >>> h_v = mv(v)  # H_θ v  # doctest: +SKIP
  """
  out, jvp_fn = jax.linearize(f, point)
  vjp_fn = jax.linear_transpose(jvp_fn, point)

  def matvec(v):
    v = jax.tree.map(lambda x, p: jnp.asarray(x, jnp.result_type(p)), v, point)
    u = jvp_fn(v)
    if curvature is not None:
      u = curvature(out, u)
    (jtu,) = vjp_fn(u)
    return jax.tree.map(lambda x: scale * x, jtu)

  return matvec


def _batch_size(z) -> int:
  leaves = jax.tree.leaves(z)
  if not leaves or not hasattr(leaves[0], "shape") or len(leaves[0].shape) == 0:
    raise ValueError("optax_bm.hessian: the block input z needs a leading batch axis.")
  return int(leaves[0].shape[0])


def _flat_block(fn: BlockFn, params, z, wrt: str):
  """``(g, x0, unravel, scale)``: ``g`` maps the flat point to the flat block output."""
  if wrt not in WRT:
    raise ValueError(f"optax_bm.hessian: wrt must be one of {WRT}, got {wrt!r}.")
  point = params if wrt == "params" else z
  x0, unravel = ravel_pytree(point)

  def g(flat):
    p = unravel(flat)
    out = fn(p, z) if wrt == "params" else fn(params, p)
    return ravel_pytree(out)[0]

  scale = 1.0 / _batch_size(z) if wrt == "params" else 1.0
  return g, x0, unravel, scale


class GaussNewtonOperator(NamedTuple):
  """A block's local Hessian as a matrix-free operator on flat vectors.

  Attributes:
    matvec: ``v -> H v`` for ``v`` of shape ``(dim,)`` (``H = J^T J / N`` or ``J^T J``).
    dim: the dimension of the flattened parameters or input.
    unravel: maps a flat vector back to the pytree of the parameters or input.
    point: the flattened point (parameters or input) the Hessian is taken at.
  """

  matvec: Matvec
  dim: int
  unravel: Callable[[jax.Array], Any]
  point: jax.Array


def gauss_newton_operator(fn: BlockFn, params: Any, z: Any,
                          wrt: str = "params") -> GaussNewtonOperator:
  r"""The local Hessian of a block as a matrix-free operator.

  See docs/method.md#5-local-hessians-measured.

  The block is linearized once (:func:`gauss_newton_matvec`); every product then costs one
  forward-mode and one reverse-mode pass through the *linearized* block (the transpose comes
  from ``jax.linear_transpose``), without recomputing the forward pass and without forming
  ``J``:

  .. math::

    H_θ v = \frac{1}{N} J_θ^\top (J_θ v), \qquad H_z v = J_z^\top (J_z v).

  Build the operator inside the function you ``jax.jit`` (with ``params`` and ``z`` as its
  arguments) so the linearization's residuals are traced values, not baked-in constants.

  On XLA:CPU the transpose of ``lax.conv_general_dilated`` with respect to the kernel (the
  ``J_W^T`` half of an ``H_W`` product) is very slow (about 30× a forward convolution for a
  64-channel 3×3 layer on 32×32 maps, see ``benchmarks/hessian_realsize.py``); a block written
  with :func:`conv_im2col` (the same function, supplement eq. 14) turns it into a matrix
  product.

  Args:
    fn: the block, ``fn(params, z) -> output`` (batch axis first; BatchNorm in training mode
      if the block has one).
    params: the block's parameters (any pytree).
    z: the block's input (batch axis first; any pytree).
    wrt: ``"params"`` for ``H_θ`` or ``"input"`` for ``H_z``.

  Returns:
    A :class:`GaussNewtonOperator`.

  Example:
    >>> op = gauss_newton_operator(block, params, z, wrt="input")  # doctest: +SKIP
    >>> res = lanczos(op.matvec, op.dim, 50, jax.random.key(0))  # doctest: +SKIP

  References:
    Zhang, Chen & Liu, NeurIPS 2018, §3 (local Hessians) and supplement §C.
  """
  g, x0, unravel, scale = _flat_block(fn, params, z, wrt)
  return GaussNewtonOperator(gauss_newton_matvec(g, x0, scale=scale), int(x0.size), unravel, x0)


def hvp(fn: BlockFn, params: Any, z: Any, v: Any, wrt: str = "params") -> Any:
  r"""One Gauss–Newton-vector product of a block's local Hessian, matrix-free.

  Computes ``H v`` with :func:`gauss_newton_matvec` (``u = J v`` through the linearized block,
  then ``J^T u`` through its transpose); ``J`` is never formed. ``H`` is ``J_θ^T J_θ / N``
  (``wrt="params"``) or ``J_z^T J_z`` (``wrt="input"``; docs/method.md#5-local-hessians-measured).
  For many products on the
  same point use :func:`gauss_newton_operator`, which linearizes once.

  Args:
    fn: the block, ``fn(params, z) -> output``.
    params: the block's parameters.
    z: the block's input (batch axis first).
    v: the vector: a pytree like the parameters (or the input), or a flat array of their total
      size.
    wrt: ``"params"`` or ``"input"``.

  Returns:
    ``H v``, with the structure of ``v`` (pytree or flat).

  Example:
    >>> hv = hvp(block, params, z, jax.tree.map(jnp.ones_like, params))  # doctest: +SKIP
  """
  if wrt not in WRT:
    raise ValueError(f"optax_bm.hessian: wrt must be one of {WRT}, got {wrt!r}.")
  point = params if wrt == "params" else z
  flat_in = not (jax.tree.structure(v) == jax.tree.structure(point) and all(
      jnp.shape(a) == jnp.shape(b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(point))))
  size = sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(point))
  if flat_in and jnp.shape(v) != (size,):
    raise ValueError(f"optax_bm.hessian.hvp: v has shape {jnp.shape(v)}, the {wrt} have {size} "
                     "entries (pass a flat vector or a pytree like them).")

  @jax.jit  # one compiled program instead of op-by-op dispatch through the block
  def product(params, z, v):
    g, x0, unravel, scale = _flat_block(fn, params, z, wrt)
    vf = jnp.asarray(v, x0.dtype) if flat_in else ravel_pytree(v)[0].astype(x0.dtype)
    out = gauss_newton_matvec(g, x0, scale=scale)(vf)
    return out if flat_in else unravel(out)

  return product(params, z, v)


def local_hessian(fn: BlockFn, params: Any, z: Any, wrt: str = "params") -> jax.Array:
  r"""The dense local Hessian of a small block (docs/method.md#5-local-hessians-measured).

  .. math::

    H_θ = \frac{1}{N} J_θ^\top J_θ \quad(\texttt{wrt="params"}), \qquad
    H_z = J_z^\top J_z \quad(\texttt{wrt="input"}),

  over the parameters (or the input) flattened with ``jax.flatten_util.ravel_pytree`` and the
  whole batch's output. ``J`` is formed (``jax.jacfwd``): small blocks only.

  Args:
    fn: the block, ``fn(params, z) -> output`` (batch axis first).
    params: the block's parameters.
    z: the block's input (batch axis first).
    wrt: ``"params"`` or ``"input"``.

  Returns:
    A ``(dim, dim)`` symmetric positive semi-definite matrix; ``dim`` the flattened size.

  Example:
    >>> H = local_hessian(block, params, z, wrt="params")  # doctest: +SKIP
    >>> H.trace() / H.shape[0]  # the mean eigenvalue the scalar m_w approximates  # doctest: +SKIP

  References:
    Zhang, Chen & Liu, NeurIPS 2018, §3 and supplement §B–C.
  """
  if wrt not in WRT:
    raise ValueError(f"optax_bm.hessian: wrt must be one of {WRT}, got {wrt!r}.")

  @jax.jit  # one compiled program instead of op-by-op dispatch through the block
  def dense(params, z):
    g, x0, _, scale = _flat_block(fn, params, z, wrt)
    jac = jax.jacfwd(g)(x0)
    return scale * (jac.T @ jac)

  return dense(params, z)

