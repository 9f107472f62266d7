r"""Reference back-matching propagation, block by block.

The mathematics: docs/method.md#2-back-matching-propagation.

This is the algorithm the optimizer is derived from, written the slow, literal way: one
forward pass, then for ``b = B, ..., 1`` two local problems per block, each solved
approximately with its own ``jax.grad`` of the local loss ``ℓ_b`` (never the chained
gradient of ``J``):

.. math::

  z_{b-1}^{k+1/2} = z_{b-1}^k - P_{b,z}^{-1} ∇_z ℓ_b(θ_b^k, z_{b-1}^k), \qquad
  θ_b^{k+1} = θ_b^k - η P_{b,θ}^{-1} ∇_θ ℓ_b(θ_b^k, z_{b-1}^k),

  ℓ_B = E_x\, ℓ(y, F_B(θ_B, z_{B-1})), \qquad
  ℓ_b = E_x\, ½ \| z_b^{k+1/2} - F_b(θ_b, z_{b-1}) \|^2 \quad (b < B).

θ-problems are over the batch mean; z-problems over the sum (each example has its own
target; BatchNorm couples them). It exists to test and study the optimizer: with
``solver="gradient"`` it is gradient descent on ``J`` (Proposition 1); with ``"scalar"`` it is
what :func:`optax_bm.scale_by_back_matching` computes in closed form; ``"gauss_newton"`` and
``"steps"`` solve the local problems more exactly and have no closed form.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jax.scipy.sparse.linalg import cg

from optax_bm import scaling
from optax_bm import specs as specs_lib
from optax_bm.hessian.local import gauss_newton_matvec

BlockFn = Callable[[Any, Any], Any]  # F_b(params_b, z_{b-1}) -> z_b

SOLVERS = ("gradient", "scalar", "gauss_newton", "steps")


class BackMatchingResult(NamedTuple):
  params: list  # θ^{k+1}, one pytree per block
  targets: list  # z_b^{k+1/2} for b = 0..B-1 (targets[0] is None: the input is not moved)
  activations: list  # z_b^k for b = 0..B (activations[0] is the input)


def _sq_residual(target, out):
  return 0.5 * sum(jnp.sum(jnp.square(t - o)) for t, o in
                   zip(jax.tree.leaves(target), jax.tree.leaves(out)))


def _local_losses(fn, loss_fn, target, n):
  """(θ-loss, z-loss) of one block: mean over the batch for θ, sum for z."""
  if target is None:  # top block: the training loss itself (loss_fn is a batch mean)
    return (lambda th, z: loss_fn(fn(th, z)), lambda th, z: n * loss_fn(fn(th, z)))
  return (lambda th, z: _sq_residual(target, fn(th, z)) / n,
          lambda th, z: _sq_residual(target, fn(th, z)))


def _gauss_newton_solve(fn, loss_fn, target, n, theta, z, grad, wrt, damping, maxiter):
  """Solves (G + λI) d = grad with CG; G the Gauss-Newton matrix of the local loss.

  ``G = scale · J^T C J`` (:func:`optax_bm.hessian.gauss_newton_matvec`): ``C`` is the
  training loss's Hessian for the top block, ``I`` for ``½‖t - F‖²`` below it.
  """
  flat_grad, unravel = ravel_pytree(grad)

  def out_of(v):
    return fn(v, z) if wrt == "params" else fn(theta, v)

  point = theta if wrt == "params" else z
  scale = (1.0 / n if wrt == "params" else 1.0) if target is not None else (
      1.0 if wrt == "params" else float(n))
  curvature = None
  if target is None:  # J^T ∇²ℓ J for the training loss
    curvature = lambda out, u: jax.jvp(jax.grad(loss_fn), (out,), (u,))[1]  # noqa: E731
  gn = gauss_newton_matvec(out_of, point, curvature=curvature, scale=scale)

  def matvec(flat_v):
    return ravel_pytree(gn(unravel(flat_v)))[0] + damping * flat_v

  sol, _ = cg(matvec, flat_grad, maxiter=maxiter, tol=1e-10)
  return unravel(sol)


def back_matching_step(
    blocks: Sequence[BlockFn],
    params: Sequence[Any],
    x: Any,
    loss_fn: Callable[[Any], jax.Array],
    learning_rate: float,
    solver: str = "gradient",
    specs: Optional[Sequence[Any]] = None,
    damping: float = 1e-3,
    cg_maxiter: int = 100,
    inner_steps: int = 5,
    *,
    scale_others: bool = False,
    gamma_aware: bool = False,
) -> BackMatchingResult:
  r"""One iteration of back-matching propagation over an explicit chain of blocks.

  Args:
    blocks: the block functions ``F_b(params_b, z_{b-1}) -> z_b``, input side first.
    params: the blocks' parameters ``θ_b^k`` (one pytree per block).
    x: the network input ``z_0`` (batch axis first).
    loss_fn: ``z_B -> J``, the mean training loss over the batch (labels closed over).
    learning_rate: ``η`` of the θ-steps (the z-steps have step 1, as in Proposition 1).
    solver: how each local problem is solved approximately:
      ``"gradient"``: one step with ``P = I`` (Proposition 1: gradient descent on ``J``);
      ``"scalar"``: one step with the scalar local Hessians (needs ``specs``);
      ``"gauss_newton"``: one damped Gauss-Newton step ``(H + λI)^{-1} ∇ℓ_b`` with the true
      local Hessian (Gauss-Newton matrix of ``ℓ_b``; the loss Hessian for the top block),
      solved matrix-free by conjugate gradients;
      ``"steps"``: ``inner_steps`` gradient steps on each local problem.
    specs: for ``"scalar"``: one spec tree per block with the structure of its params.
    damping: ``λ`` of ``"gauss_newton"``.
    cg_maxiter: conjugate-gradient iterations of ``"gauss_newton"``.
    inner_steps: inner iterations of ``"steps"``.
    scale_others: for ``"scalar"``: ``True``: ``P_{b,a} = m_{b,a} I`` for bias/BatchNorm
      (SPEC v1); the default ``False``: ``P_{b,a} = A_b I`` (``A_b`` the product of
      ``1/m_{j,z}`` above block ``b``), the preconditioner that leaves them at plain gradient
      steps on ``J``, as :func:`optax_bm.scale_by_back_matching` does by default.
    gamma_aware: for ``"scalar"``: multiply ``m_{b,W}`` and ``m_{b,z}`` of normalized blocks
      by ``E[γ²]`` of their BatchNorm scale (:func:`optax_bm.local_hessian_scalars`).

  Returns:
    A :class:`BackMatchingResult` with the new parameters, the targets ``z_b^{k+1/2}`` and the
    forward activations.

  Example:
    >>> fns, params = optax_bm.backmatching.nnx_blocks(model.blocks)  # doctest: +SKIP
    >>> res = back_matching_step(fns, params, x, loss, 0.1)  # doctest: +SKIP

  References:
    Zhang, Chen & Liu, *On the Local Hessian in Back-propagation*, NeurIPS 2018, §3 (Algorithm
    1) and supplement §A (Proposition 1).
  """
  if solver not in SOLVERS:
    raise ValueError(f"back_matching_step: solver must be one of {SOLVERS}, got {solver!r}.")
  if len(blocks) != len(params):
    raise ValueError(f"back_matching_step: {len(blocks)} blocks but {len(params)} parameter "
                     "trees.")
  if solver == "scalar" and (specs is None or len(specs) != len(blocks)):
    raise ValueError("back_matching_step: solver='scalar' needs one spec tree per block.")

  zs = [x]
  for fn, th in zip(blocks, params):
    zs.append(fn(th, zs[-1]))
  n = jax.tree.leaves(x)[0].shape[0]

  num_blocks = len(blocks)
  new_params: list = [None] * num_blocks
  targets: list = [None] * num_blocks
  target = None  # z_b^{k+1/2} from the block above; None: the top block's training loss
  a_prod = 1.0  # A_b = prod_{j>b} 1/m_{j,z} (scalar solver)
  for b in reversed(range(num_blocks)):
    fn, th, z = blocks[b], params[b], zs[b]
    theta_loss, z_loss = _local_losses(fn, loss_fn, target, n)

    if solver == "steps":
      th_new = th
      for _ in range(inner_steps):
        g = jax.grad(theta_loss)(th_new, z)
        th_new = jax.tree.map(lambda p, d: p - learning_rate * d, th_new, g)
      z_new = z
      if b > 0:
        for _ in range(inner_steps):
          z_new = jax.tree.map(lambda p, d: p - d, z_new, jax.grad(z_loss, 1)(th, z_new))
    else:
      g_th = jax.grad(theta_loss)(th, z)
      g_z = jax.grad(z_loss, 1)(th, z) if b > 0 else None
      if solver == "gradient":
        d_th, d_z = g_th, g_z
      elif solver == "scalar":
        m_leaf, m_z = _block_scalars(specs[b], th, b, gamma_aware,
                                     None if scale_others else a_prod)
        a_prod = a_prod / m_z
        d_th = jax.tree.map(lambda g, m: g / m, g_th, m_leaf)
        d_z = None if g_z is None else jax.tree.map(lambda g: g / m_z, g_z)
      else:  # gauss_newton
        d_th = _gauss_newton_solve(fn, loss_fn, target, n, th, z, g_th, "params", damping,
                                   cg_maxiter)
        d_z = None if g_z is None else _gauss_newton_solve(
            fn, loss_fn, target, n, th, z, g_z, "input", damping, cg_maxiter)
      th_new = jax.tree.map(lambda p, d: p - learning_rate * d, th, d_th)
      z_new = None if d_z is None else jax.tree.map(lambda p, d: p - d, z, d_z)

    new_params[b] = th_new
    targets[b] = z_new if b > 0 else None
    target = z_new
  return BackMatchingResult(new_params, targets, zs)


def _block_scalars(spec_tree, params_b, b, gamma_aware=False, m_other=None):
  """Per-leaf ``m`` (kernel: m_W, others: m_a or ``m_other``) and ``m_z`` of one block."""
  spec_leaves, leaves, treedef, paths = specs_lib.flatten_specs_like(spec_tree, params_b)
  kernels = [(s, p, path) for s, p, path in zip(spec_leaves, leaves, paths)
             if isinstance(s, specs_lib.LayerSpec) and s.is_kernel]
  if len(kernels) != 1:
    raise ValueError(f"back_matching_step: block {b} needs exactly one kernel spec, found "
                     f"{len(kernels)}.")
  gamma2 = None
  if gamma_aware:  # this block's BatchNorm scale γ, found as scaling.leaf_factors finds it
    is_scale = scaling._is_batchnorm_scale  # pylint: disable=protected-access
    gammas = [p for s, p, path in zip(spec_leaves, leaves, paths)
              if isinstance(s, specs_lib.LayerSpec) and is_scale(s, path)]
    gamma2 = jnp.mean(jnp.square(gammas[0])) if gammas else None
  sc = scaling.local_hessian_scalars(*kernels[0], gamma2=gamma2)
  m_a = sc.m_a if m_other is None else m_other
  m_leaf = [jnp.ones((), p.dtype) if not isinstance(s, specs_lib.LayerSpec)
            else (sc.m_w if s.is_kernel else m_a) for s, p in zip(spec_leaves, leaves)]
  return jax.tree.unflatten(treedef, m_leaf), sc.m_z


def nnx_blocks(modules: Sequence[Any], train: bool = True):
  """Turns a sequence of Flax NNX modules into pure block functions for the reference loop.

  Args:
    modules: one ``nnx.Module`` per block, input side first.
    train: call the blocks in training mode (BatchNorm on batch statistics).

  Returns:
    ``(fns, params)``: ``fns[b](params_b, z)`` runs block ``b`` with parameters ``params_b``
    (its ``nnx.Param`` state); other state (batch statistics) is read, never written.
  """
  from flax import nnx

  fns, params = [], []
  for module in modules:
    graphdef, p, rest = nnx.split(module, nnx.Param, ...)

    def fn(p_b, z, graphdef=graphdef, rest=rest):
      m = nnx.merge(graphdef, p_b, rest, copy=True)
      if train:
        m.train()
      else:
        m.eval()
      return m(z)

    fns.append(fn)
    params.append(p)
  return fns, params
