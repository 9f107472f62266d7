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

Residual networks are chains of units ``z_u = σ_u(S_u(z_{u-1}) + F_u(z_{u-1}))``
(:class:`ResidualUnit`). Units are the outer blocks: a unit's input moves by one step on
``ℓ_u = ½‖z_u^{k+1/2} − U_u(θ_u, z_{u-1})‖²`` (preconditioned by ``m_{u,z} = m_z(S_u) +
m_z(F_u)`` in ``"scalar"``), and its θ-problem is solved by back-matching inside each branch:
the target reaches both branches through the sum (the other branch held at its current
value), and each branch is a chain handled as above. Since the sum's Jacobian is
``J_S + J_F``, ``"gradient"`` is still gradient descent on ``J``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jax.scipy.sparse.linalg import cg

from optax_bm import scaling
from optax_bm import specs as specs_lib
from optax_bm.hessian.local import gauss_newton_matvec

BlockFn = Callable[[Any, Any], Any]  # F_b(params_b, z_{b-1}) -> z_b


class ResidualUnit(NamedTuple):
  """A residual unit ``z_u = σ(S(z_{u-1}) + F(z_{u-1}))`` for :func:`back_matching_step`.

  Its parameters (and, for ``"scalar"``, its spec trees) are ``{"main": [one per block of
  F], "shortcut": [one per block of S]}`` (an empty list for a parameter-free shortcut).

  Attributes:
    main: the block functions of the branch ``F``, input side first.
    shortcut: ``"identity"``; a parameter-free function ``z -> S(z)`` (e.g. option A's
      subsampling with zero-padded channels); or a sequence of block functions (a
      projection, option B).
    activation: ``σ`` after the sum, or ``None``.
  """

  main: Sequence[BlockFn]
  shortcut: Any = "identity"
  activation: Optional[Callable[[Any], Any]] = None

  @property
  def shortcut_blocks(self) -> Sequence[BlockFn]:
    if isinstance(self.shortcut, str) or callable(self.shortcut):
      return ()
    return tuple(self.shortcut)

  def shortcut_apply(self, params_s, z):
    if isinstance(self.shortcut, str):
      if self.shortcut != "identity":
        raise ValueError(f"ResidualUnit: shortcut {self.shortcut!r}: expected 'identity', a "
                         "function or a sequence of block functions.")
      return z
    if callable(self.shortcut):
      return self.shortcut(z)
    for fn, p in zip(self.shortcut, params_s):
      z = fn(p, z)
    return z

  def apply(self, params_u, z):
    f = z
    for fn, p in zip(self.main, params_u["main"]):
      f = fn(p, f)
    y = jax.tree.map(jnp.add, self.shortcut_apply(params_u["shortcut"], z), f)
    return y if self.activation is None else self.activation(y)

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
    input_scale: str = "unit",
) -> BackMatchingResult:
  r"""One iteration of back-matching propagation over an explicit chain of blocks.

  Args:
    blocks: the block functions ``F_b(params_b, z_{b-1}) -> z_b``, input side first; an
      element may be a :class:`ResidualUnit` instead (solvers ``"gradient"`` and ``"scalar"``).
    params: the blocks' parameters ``θ_b^k`` (one pytree per block; for a residual unit
      ``{"main": [...], "shortcut": [...]}``).
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
    specs: for ``"scalar"``: one spec tree per block with the structure of its params (a
      residual unit's blocks carry :class:`optax_bm.Residual`, which gives its shortcut kind).
    damping: ``λ`` of ``"gauss_newton"``.
    cg_maxiter: conjugate-gradient iterations of ``"gauss_newton"``.
    inner_steps: inner iterations of ``"steps"``.
    scale_others: for ``"scalar"``: ``True``: ``P_{b,a} = m_{b,a} I`` for bias/BatchNorm
      (SPEC v1); the default ``False``: ``P_{b,a} = A_b I`` (``A_b`` the product of
      ``1/m_{j,z}`` above block ``b``), the preconditioner that leaves them at plain gradient
      steps on ``J``, as :func:`optax_bm.scale_by_back_matching` does by default.
    gamma_aware: for ``"scalar"``: multiply ``m_{b,W}`` and ``m_{b,z}`` of normalized blocks
      by ``E[γ²]`` of their BatchNorm scale (:func:`optax_bm.local_hessian_scalars`).
    input_scale: for ``"scalar"`` on residual units: the second moment ``v`` of a residual
      unit's input by which the ``m_z`` of a normalized block reading it is divided,
      ``"unit"`` (default) or ``"propagated"`` (:func:`optax_bm.block_scales`).

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

  is_unit = [isinstance(fn, ResidualUnit) for fn in blocks]
  if any(is_unit) and solver not in ("gradient", "scalar"):
    raise ValueError(f"back_matching_step: solver={solver!r} is not implemented for residual "
                     "units yet; use 'gradient' or 'scalar'.")
  zs = [x]
  for fn, th in zip(blocks, params):
    zs.append(fn.apply(th, zs[-1]) if isinstance(fn, ResidualUnit) else fn(th, zs[-1]))
  n = jax.tree.leaves(x)[0].shape[0]
  # The scalar solver's m_z of a normalized block reading a residual unit's input or output
  # is divided by that input's second moment v (scaling.block_scales, `input_scale`).
  v_in = ({} if solver != "scalar" or not any(is_unit)
          else _unit_input_moments(blocks, params, specs, input_scale))

  num_blocks = len(blocks)
  new_params: list = [None] * num_blocks
  targets: list = [None] * num_blocks
  target = None  # z_b^{k+1/2} from the block above; None: the top block's training loss
  a_prod = 1.0  # A_b = prod_{j>b} 1/m_{j,z} (scalar solver)
  for b in reversed(range(num_blocks)):
    fn, th, z = blocks[b], params[b], zs[b]
    if is_unit[b]:
      th_new, z_new, a_prod = _unit_step(
          fn, th, z, loss_fn, target, n, learning_rate, solver,
          None if solver != "scalar" else specs[b], a_prod, v_in.get(b), b,
          scale_others=scale_others, gamma_aware=gamma_aware)
      new_params[b] = th_new
      targets[b] = z_new if b > 0 else None
      target = z_new
      continue
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
        if b in v_in and _kernel_spec(specs[b], f"block {b}").normalized:
          m_z = m_z / v_in[b]  # a normalized plain block reading a residual unit's output
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


def _kernel_spec(spec_tree, where):
  kernels = [s for s in jax.tree.leaves(spec_tree, is_leaf=specs_lib.is_spec_leaf)
             if isinstance(s, specs_lib.LayerSpec) and s.is_kernel]
  if len(kernels) != 1:
    raise ValueError(f"back_matching_step: {where} needs exactly one kernel spec, found "
                     f"{len(kernels)}.")
  return kernels[0]


def _unit_input_moments(blocks, params, specs, input_scale) -> dict:
  """``{unit: v}`` for the units whose normalized readers divide ``m_z`` by ``v``.

  ``v`` is the second moment of the unit's input under ``input_scale``, computed by the same
  recursion as :func:`optax_bm.block_scales` over all blocks' specs and parameters.
  """
  if input_scale not in scaling.INPUT_SCALES:
    raise ValueError(f"back_matching_step: input_scale={input_scale!r}; choose from "
                     f"{scaling.INPUT_SCALES}.")
  if input_scale == "unit":
    return {}
  spec_leaves, param_leaves, paths = [], [], []

  def add(spec_tree, params_b, prefix):
    sl, pl, _, ps = specs_lib.flatten_specs_like(spec_tree, params_b)
    spec_leaves.extend(sl)
    param_leaves.extend(pl)
    paths.extend(f"{prefix}/{p}" for p in ps)

  for u, (fn, th, sp) in enumerate(zip(blocks, params, specs)):
    if isinstance(fn, ResidualUnit):
      for br in ("main", "shortcut"):
        for j, (p, st) in enumerate(zip(th[br], sp[br])):
          add(st, p, f"{u}/{br}/{j}")
    else:
      add(sp, th, str(u))
  plan = scaling.plan_blocks(spec_leaves, paths)
  units = scaling.plan_units(plan, paths)
  if len(units) != len(blocks):
    raise ValueError(f"back_matching_step: the specs describe {len(units)} units, the blocks "
                     f"{len(blocks)}.")
  # pylint: disable=protected-access
  dtype = scaling._compute_dtype(jnp.result_type(*[p.dtype for p in param_leaves]))
  moments = scaling._Moments(units, plan, param_leaves, paths, dtype)
  # pylint: enable=protected-access
  out = {}
  for u, unit in enumerate(units):
    if unit.residual or (u > 0 and units[u - 1].residual):
      out[u] = moments.output(u - 1)[1]
  return out


def _unit_step(unit, th, z, loss_fn, target, n, learning_rate, solver, spec_u, a_prod, v, u,
               *, scale_others, gamma_aware):
  """Back-matching of one residual unit: its z-step, then its branches (each a chain)."""
  if target is None:  # the top unit: the training loss itself
    out_sum = lambda y: n * loss_fn(y)  # noqa: E731
  else:
    out_sum = lambda y: _sq_residual(target, y)  # noqa: E731
  act = unit.activation or (lambda y: y)
  short_fns = unit.shortcut_blocks

  # Scalars: m_z of every block; m_{u,z} = m_z(S) + m_z(F), a chain's m_z the product.
  mz = {"main": [1.0] * len(unit.main), "shortcut": [1.0] * len(short_fns)}
  m_uz = 1.0
  if solver == "scalar":
    for br in ("main", "shortcut"):
      for j in range(len(mz[br])):
        mz[br][j] = _block_scalars(spec_u[br][j], th[br][j], f"unit {u} {br} {j}",
                                   gamma_aware)[1]
      if mz[br] and v is not None and _kernel_spec(spec_u[br][0], f"unit {u}").normalized:
        mz[br][0] = mz[br][0] / v  # it reads z_{u-1}, of second moment v
    prod = lambda xs: functools.reduce(lambda a, b: a * b, xs[1:], xs[0])  # noqa: E731
    residual = _kernel_spec(spec_u["main"][0], f"unit {u}").residual
    if residual is None:
      raise ValueError(f"back_matching_step: unit {u} is a ResidualUnit but its specs carry "
                       "no optax_bm.Residual.")
    if short_fns:
      m_s = prod(mz["shortcut"])
    elif residual.shortcut == specs_lib.IDENTITY:
      m_s = 1.0  # J_S = I
    else:
      m_s = 1.0 / residual.shortcut_c  # J_S keeps one of every c positions
    m_uz = prod(mz["main"]) + m_s

  # z-step of the unit (through both branches and the sum).
  z_new = None
  if u > 0:
    g_z = jax.grad(lambda zz: out_sum(unit.apply(th, zz)))(z)
    z_new = jax.tree.map(lambda p, d: p - d / m_uz, z, g_z)

  # θ: back-matching inside each branch; the other branch is held at its current value.
  f_acts = [z]
  for fn, p in zip(unit.main, th["main"]):
    f_acts.append(fn(p, f_acts[-1]))
  s_acts = [z]
  for fn, p in zip(short_fns, th["shortcut"]):
    s_acts.append(fn(p, s_acts[-1]))
  s_val = unit.shortcut_apply(th["shortcut"], z)
  f_val = f_acts[-1]
  new = {"main": [], "shortcut": []}
  heads = {"main": lambda f: act(jax.tree.map(jnp.add, s_val, f)),
           "shortcut": lambda s: act(jax.tree.map(jnp.add, s, f_val))}
  for br, fns, acts in (("main", unit.main, f_acts), ("shortcut", short_fns, s_acts)):
    new[br] = _branch_step(fns, th[br], acts, heads[br], out_sum, n, learning_rate, solver,
                           spec_u[br] if solver == "scalar" else None, a_prod, mz[br], u, br,
                           scale_others=scale_others, gamma_aware=gamma_aware)
  return new, z_new, a_prod / m_uz


def _branch_step(fns, ths, acts, head, out_sum, n, learning_rate, solver, specs_br, a_unit,
                 mz, u, br, *, scale_others, gamma_aware):
  """θ-steps along one branch of a residual unit, top block first.

  The top block's local loss is the unit's: its output goes through ``head`` (the sum with the
  other branch, then σ). Below it, each block matches the target its successor sends down.
  """
  new = [None] * len(fns)
  target = None
  a = a_unit  # Π_{v>u} 1/m_{v,z} · Π_{j after this block in the branch} 1/m_{j,z}
  for j in reversed(range(len(fns))):
    fn, th, z = fns[j], ths[j], acts[j]
    if target is None:
      z_loss = lambda p, zz, fn=fn: out_sum(head(fn(p, zz)))  # noqa: E731
      theta_loss = lambda p, zz, fn=fn: out_sum(head(fn(p, zz))) / n  # noqa: E731
    else:
      theta_loss, z_loss = _local_losses(fn, None, target, n)
    g = jax.grad(theta_loss)(th, z)
    if solver == "scalar":
      m_leaf, _ = _block_scalars(specs_br[j], th, f"unit {u} {br} {j}", gamma_aware,
                                 None if scale_others else a)
      g = jax.tree.map(lambda d, m: d / m, g, m_leaf)
    new[j] = jax.tree.map(lambda p, d: p - learning_rate * d, th, g)
    if j > 0:
      g_z = jax.grad(z_loss, 1)(th, z)
      target = jax.tree.map(lambda p, d: p - d / mz[j], z, g_z)
      a = a / mz[j]
  return new


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
