"""Scalar local Hessians and the per-leaf factors ``A_b / m_{b,.}`` of scale-amended SGD.

The mathematics: docs/method.md#3-scalar-local-hessians (scalars) and
docs/method.md#scale-amended-sgd-the-unrolled-factors (factors).

This module is pure arithmetic on a spec tree and the current parameters; the optax
transformation in :mod:`optax_bm.transform` only multiplies updates by what it returns.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from optax_bm import specs as specs_lib
from optax_bm.specs import (CONV, DENSE, IDENTITY, MAIN, PROJECTION, SUBSAMPLE, LayerSpec)


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

# The leaf names Flax gives BatchNorm's scale γ and offset β (nnx.BatchNorm and linen alike).
BATCHNORM_SCALE_NAME = "scale"
BATCHNORM_OFFSET_NAME = "bias"

# How the scalars read the second moment of a residual unit's input (see `block_scales`).
INPUT_SCALES = ("propagated", "unit")


class _BlockPlan(NamedTuple):
  """Static layout of a spec tree: which leaf is each block's kernel (and BatchNorm scale)."""

  num_blocks: int
  kernel_index: dict  # block -> leaf index of its kernel
  kernel_spec: dict  # block -> LayerSpec
  scale_index: dict  # block -> leaf index of its BatchNorm scale γ (normalized blocks)
  offset_index: dict  # block -> leaf index of that BatchNorm's offset β, when it has one


class _Unit(NamedTuple):
  """One unit of the network: a plain block, or a residual unit σ(S(z) + F(z))."""

  index: int
  main: tuple  # blocks of F_u in order (a plain unit: its one block)
  shortcut: tuple  # blocks of a projection shortcut S_u in order; () otherwise
  kind: Optional[str]  # None for a plain block, else the shortcut kind
  shortcut_c: float
  post_activation: bool

  @property
  def residual(self) -> bool:
    return self.kind is not None

  @property
  def blocks(self) -> tuple:
    return self.main + self.shortcut


def _is_batchnorm_scale(spec: LayerSpec, path: str) -> bool:
  return (spec.normalized and not spec.is_kernel
          and path.rsplit("/", 1)[-1] == BATCHNORM_SCALE_NAME)


def plan_blocks(spec_leaves: Sequence[Any], paths: Sequence[str]) -> _BlockPlan:
  """Checks a flat list of specs describes blocks ``0..B-1`` with one kernel per block."""
  kernel_index, kernel_spec, first_path, signature, scale_index = {}, {}, {}, {}, {}
  for i, (s, path) in enumerate(zip(spec_leaves, paths)):
    if not isinstance(s, LayerSpec):
      continue
    b = s.block
    if b in signature and signature[b] != s.block_signature():
      raise ValueError(
          f"optax_bm: leaves of block {b} disagree on (kind, s, c, normalized, residual): "
          f"{path!r} has {s.block_signature()}, {first_path[b]!r} has {signature[b]}.")
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
    return _BlockPlan(0, {}, {}, {}, {})
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
  # β is the leaf beside γ (".../bn/scale" -> ".../bn/bias") in the same block.
  index_of = {p: i for i, p in enumerate(paths)}
  offset_index = {}
  for b, i in scale_index.items():
    j = index_of.get(paths[i].rsplit("/", 1)[0] + "/" + BATCHNORM_OFFSET_NAME)
    if j is not None and isinstance(spec_leaves[j], LayerSpec) and spec_leaves[j].block == b:
      offset_index[b] = j
  return _BlockPlan(num_blocks, kernel_index, kernel_spec, scale_index, offset_index)


def plan_units(plan: _BlockPlan, paths: Sequence[str]) -> list:
  """Groups the blocks into units, checking the :class:`optax_bm.Residual` annotations.

  Units are numbered along the network with every block without a ``Residual`` counting as a
  unit of its own; the blocks of one unit are consecutive; in each branch the positions are
  ``0, 1, ...`` in block order; a projection shortcut has blocks, the others none.
  """
  units: list = []  # dicts while building
  for b in range(plan.num_blocks):
    spec = plan.kernel_spec[b]
    path = paths[plan.kernel_index[b]]
    r = spec.residual
    if r is None:
      units.append(dict(main=[b], shortcut=[], kind=None, sig=None, c=1.0, act=False,
                        first=path))
      continue
    last = units[-1] if units else None
    if last is not None and last["kind"] is not None and r.unit == len(units) - 1:
      if r.unit_signature() != last["sig"]:
        raise ValueError(
            f"optax_bm: blocks of unit {r.unit} disagree on (shortcut, shortcut_c, "
            f"post_activation): {path!r} has {r.unit_signature()}, {last['first']!r} has "
            f"{last['sig']}.")
    elif r.unit == len(units):
      units.append(dict(main=[], shortcut=[], kind=r.shortcut, sig=r.unit_signature(),
                        c=r.shortcut_c, act=r.post_activation, first=path))
    else:
      raise ValueError(
          f"optax_bm: kernel {path!r} (block {b}) is annotated with unit {r.unit}, but the "
          f"blocks before it make {len(units)} unit(s) (a block without a Residual is a unit "
          "of its own, and the blocks of one unit must be numbered consecutively).")
    branch = units[-1]["main" if r.branch == MAIN else "shortcut"]
    if r.position != len(branch):
      raise ValueError(
          f"optax_bm: kernel {path!r} (block {b}) is at position {r.position} of the "
          f"{r.branch} branch of unit {r.unit}, expected {len(branch)} (positions count "
          "0, 1, ... in block order from the block reading the unit's input).")
    branch.append(b)
  out = []
  for u, d in enumerate(units):
    if d["kind"] is not None and not d["main"]:
      raise ValueError(f"optax_bm: unit {u} ({d['first']!r}) has no main-branch block.")
    if d["kind"] == PROJECTION and not d["shortcut"]:
      raise ValueError(f"optax_bm: unit {u} has a 'projection' shortcut but no block is "
                       f"annotated branch='shortcut' ({d['first']!r}).")
    out.append(_Unit(u, tuple(d["main"]), tuple(d["shortcut"]), d["kind"], d["c"], d["act"]))
  return out


def _relu_moments(mean, var):
  """``(E[relu X], E[relu(X)²])`` for ``X ~ N(mean, var)``, elementwise."""
  std = jnp.sqrt(jnp.maximum(var, jnp.finfo(jnp.asarray(var).dtype).tiny))
  t = mean / std
  cdf = jax.scipy.special.ndtr(t)
  pdf = jnp.exp(-0.5 * t * t) / jnp.sqrt(2 * jnp.pi).astype(t.dtype)
  return mean * cdf + std * pdf, (mean * mean + var) * cdf + mean * std * pdf


class _Moments:
  """Reading ``"propagated"``: the mean and second moment of every unit's output.

  A signal-propagation recursion over the parameters (at initialization and later alike),
  computed lazily: only the units whose output some normalized block reads are needed.
  """

  def __init__(self, units, plan, param_leaves, paths, dtype):
    self.units, self.plan, self.leaves, self.paths = units, plan, param_leaves, paths
    self.dtype = dtype
    self.memo = {}

  def _leaf(self, i, why):
    x = self.leaves[i]
    if isinstance(x, optax.MaskedNode):
      raise ValueError(f"optax_bm: input_scale='propagated' needs {self.paths[i]!r} ({why}), "
                       "which is masked out; use input_scale='unit' or leave it unmasked.")
    return jax.lax.stop_gradient(jnp.asarray(x, self.dtype))

  def _batchnorm(self, b, u, what):
    """γ_c and β_c of block b's BatchNorm (γ = 1, β = 0 where the leaf does not exist)."""
    spec = self.plan.kernel_spec[b]
    k = self.plan.kernel_index[b]
    if not spec.normalized:
      raise ValueError(
          f"optax_bm: input_scale='propagated' needs the output scale of unit {u}'s {what}, "
          f"whose last block (kernel {self.paths[k]!r}) has no BatchNorm; use "
          "input_scale='unit' for this network.")
    n_out = kernel_fan(spec, self._shape(k), self.paths[k])[1]
    why = f"BatchNorm of block {b}"
    gamma = (self._leaf(self.plan.scale_index[b], why) if b in self.plan.scale_index
             else jnp.ones((n_out,), self.dtype))
    beta = (self._leaf(self.plan.offset_index[b], why) if b in self.plan.offset_index
            else jnp.zeros((n_out,), self.dtype))
    return gamma.reshape(-1), beta.reshape(-1)

  def _shape(self, i):
    x = self.leaves[i]
    if isinstance(x, optax.MaskedNode):
      raise ValueError(f"optax_bm: input_scale='propagated' needs the shape of "
                       f"{self.paths[i]!r}, which is masked out.")
    return x.shape

  def output(self, u):
    """``(mean, second moment)`` of unit ``u``'s output (``u = -1``: the network input)."""
    if u in self.memo:
      return self.memo[u]
    one = jnp.ones((), self.dtype)
    if u < 0:  # the network input: standardized, as the scalars assume of every input
      out = (0 * one, one)
    elif not self.units[u].residual:
      (b,) = self.units[u].main
      if self.plan.kernel_spec[b].normalized:  # conv-BN-ReLU (a stem): ReLU(γ x̂ + β)
        g, be = self._batchnorm(b, u, "block")
        m, v = _relu_moments(be, g * g)
        out = (jnp.mean(m), jnp.mean(v))
      else:  # no BatchNorm: the scalars' assumption of a standardized block output
        out = (0 * one, one)
    else:
      unit = self.units[u]
      m_in, v_in = self.output(u - 1)
      g, be = self._batchnorm(unit.main[-1], u, "main branch")
      if unit.kind == PROJECTION:
        gs, bs = self._batchnorm(unit.shortcut[-1], u, "projection shortcut")
        parts = [(1.0, bs + be, gs * gs + g * g)]
      else:
        # S carries z_{u-1} into the first C_in of C_out channels (all of them for the
        # identity; option A zero-pads the rest), uncorrelated with F.
        k_first = self.plan.kernel_index[unit.main[0]]
        k_last = self.plan.kernel_index[unit.main[-1]]
        c_in = kernel_fan(self.plan.kernel_spec[unit.main[0]], self._shape(k_first))[0]
        c_out = kernel_fan(self.plan.kernel_spec[unit.main[-1]], self._shape(k_last))[1]
        kept = min(1.0, c_in / c_out) if unit.kind == SUBSAMPLE else 1.0
        parts = [(kept, m_in + be, (v_in - m_in * m_in) + g * g)]
        if kept < 1.0:
          parts.append((1.0 - kept, be, g * g))
      m, v = 0 * one, 0 * one
      for w, mu, var in parts:
        if unit.post_activation:  # ReLU of a Gaussian, channel by channel
          mm, vv = _relu_moments(mu, jnp.maximum(var, 0))
        else:
          mm, vv = mu, var + mu * mu
        m, v = m + w * jnp.mean(mm), v + w * jnp.mean(vv)
      out = (m, v)
    self.memo[u] = out
    return out


def _unit_m_z(unit, m_z):
  """``m_{u,z} = m_z(S_u) + m_z(F_u)``; a chain multiplies (``m_z = 1`` for the identity,
  ``1/c`` for a subsampling shortcut)."""
  prod = lambda bs: functools.reduce(lambda a, b: a * m_z[b], bs[1:], m_z[bs[0]])  # noqa: E731
  if not unit.residual:
    return m_z[unit.main[0]]
  shortcut = {IDENTITY: 1.0, SUBSAMPLE: 1.0 / unit.shortcut_c}.get(unit.kind)
  return prod(unit.main) + (prod(unit.shortcut) if shortcut is None else shortcut)


def _block_and_input_scalars(plan, units, lowest, lowest_block, param_leaves, paths,
                             gamma_aware, input_scale):
  """Scalars of every block of units ``lowest..``, their ``m_z`` with the input scale, and
  ``{unit: v}`` for the units whose normalized readers divide ``m_z`` by ``v``."""
  scalars = {}
  for unit in units[lowest:]:
    for b in unit.blocks:
      k = plan.kernel_index[b]
      if isinstance(param_leaves[k], optax.MaskedNode):
        raise ValueError(
            f"optax_bm: the kernel {paths[k]!r} of block {b} is masked out, but parameters of "
            f"block {lowest_block} need its scalar local Hessian; mask whole chains from the "
            "top, or use optax_bm.UNSCALED in the spec tree instead.")
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
  m_z = {b: sc.m_z for b, sc in scalars.items()}
  v_in = {}

  if input_scale == "propagated" and any(u.residual for u in units):
    # A normalized block reading the input or the output of a residual unit: m_z / v.
    dtype = jnp.result_type(*[m_z[b] for b in m_z])
    moments = _Moments(units, plan, param_leaves, paths, dtype)
    for unit in units[lowest:]:
      if not (unit.residual or (unit.index > 0 and units[unit.index - 1].residual)):
        continue
      readers = [bs[0] for bs in (unit.main, unit.shortcut)
                 if bs and plan.kernel_spec[bs[0]].normalized]
      if readers:
        v = moments.output(unit.index - 1)[1]
        v = jnp.where(jnp.isfinite(v) & (v > 0), v, jnp.ones_like(v))
        v_in[unit.index] = v
        for b in readers:
          m_z[b] = m_z[b] / v

  return scalars, m_z, v_in


def leaf_factors(spec_leaves, param_leaves, paths, *, scale_others: bool = False,
                 gamma_aware: bool = False, input_scale: str = "unit") -> list:
  """The factor of every leaf (``None`` for UNSCALED or masked leaves).

  ``param_leaves`` may hold ``optax.MaskedNode`` where ``optax.masked`` hid a parameter; a
  masked kernel is an error only if some unmasked leaf needs its block's scalars. With
  ``scale_others=False`` the non-kernel leaves get ``None`` (factor 1); with ``gamma_aware``
  the scalars of normalized blocks use ``E[γ²]`` of the block's BatchNorm scale (the leaf
  named ``scale``; see :func:`local_hessian_scalars`). See :func:`block_scales` for the
  factors of residual units and ``input_scale``.
  """
  if input_scale not in INPUT_SCALES:
    raise ValueError(f"optax_bm: input_scale={input_scale!r}; choose from "
                     f"{', '.join(map(repr, INPUT_SCALES))}.")
  plan = plan_blocks(spec_leaves, paths)
  live = [isinstance(s, LayerSpec) and not isinstance(p, optax.MaskedNode)
          for s, p in zip(spec_leaves, param_leaves)]
  if not any(live):
    return [None] * len(spec_leaves)
  units = plan_units(plan, paths)
  unit_of = {b: u.index for u in units for b in u.blocks}
  lowest = min(unit_of[s.block] for s, ok in zip(spec_leaves, live) if ok)
  lowest_block = min(s.block for s, ok in zip(spec_leaves, live) if ok)

  scalars, m_z, _ = _block_and_input_scalars(plan, units, lowest, lowest_block, param_leaves,
                                             paths, gamma_aware, input_scale)

  # Π_{v>u} 1/m_{v,z} over units, from the top down, and Π_{j after b} 1/m_{j,z} in a branch.
  after = {}
  acc = None
  for unit in reversed(units[lowest:]):
    for branch in (unit.main, unit.shortcut):
      inner = acc
      for b in reversed(branch):
        after[b] = inner
        inv = 1.0 / m_z[b]
        inner = inv if inner is None else inner * inv
    inv = 1.0 / _unit_m_z(unit, m_z)
    acc = inv if acc is None else acc * inv

  out = []
  for s, ok in zip(spec_leaves, live):
    if not ok or (not scale_others and not s.is_kernel):
      out.append(None)
      continue
    sc = scalars[s.block]
    m = sc.m_w if s.is_kernel else sc.m_a
    a = after[s.block]
    out.append(1.0 / m if a is None else a / m)
  return out


class UnitScalars(NamedTuple):
  """The scalars of one unit (see :func:`unit_scalars`)."""

  blocks: tuple  # the unit's blocks (main branch, then shortcut)
  residual: bool  # a residual unit (False: a plain block)
  m_z: jax.Array  # m_{u,z}: m_z(S) + m_z(F) for a residual unit, the block's m_z otherwise
  v_in: Optional[jax.Array]  # the input second moment its normalized readers divide by


def unit_scalars(specs: specs_lib.SpecsOrFn, params: Any, *, gamma_aware: bool = False,
                 input_scale: str = "unit") -> list:
  """Per unit, its input scalar ``m_{u,z}`` and input scale ``v`` (for logging and study).

  Args:
    specs: a spec tree (or callable on ``params``), as for :func:`block_scales`.
    params: the current parameters.
    gamma_aware: as for :func:`block_scales`.
    input_scale: ``"unit"`` (default) or ``"propagated"`` (see :func:`block_scales`).

  Returns:
    A list of :class:`UnitScalars`, unit 0 (nearest the input) first.
  """
  if input_scale not in INPUT_SCALES:
    raise ValueError(f"optax_bm: input_scale={input_scale!r}; choose from "
                     f"{', '.join(map(repr, INPUT_SCALES))}.")
  spec_tree = specs_lib.resolve(specs, params)
  spec_leaves, param_leaves, _, paths = specs_lib.flatten_specs_like(spec_tree, params)
  plan = plan_blocks(spec_leaves, paths)
  units = plan_units(plan, paths)
  _, m_z, v_in = _block_and_input_scalars(plan, units, 0, 0, param_leaves, paths, gamma_aware,
                                          input_scale)
  return [UnitScalars(u.blocks, u.residual, _unit_m_z(u, m_z), v_in.get(u.index))
          for u in units]


def block_scales(specs: specs_lib.SpecsOrFn, params: Any, *, scale_others: bool = False,
                 gamma_aware: bool = False, input_scale: str = "unit") -> Any:
  r"""The factor that scale-amended SGD applies to every parameter's gradient.

  For a leaf of block ``b`` in a chain (docs/method.md#scale-amended-sgd-the-unrolled-factors):

  .. math::

    \frac{A_b}{m_{b,W}} \text{ (kernel)}, \qquad \frac{A_b}{m_{b,a}} \text{ (other)},
    \qquad A_b = \prod_{j=b+1}^{B} \frac{1}{m_{j,z}},

  with the scalars of :func:`local_hessian_scalars`. :data:`optax_bm.UNSCALED` leaves get 1.

  **Residual networks.** A network of units ``z_u = σ_u(S_u(z_{u-1}) + F_u(z_{u-1}))``
  (blocks annotated with :class:`optax_bm.Residual`; a block without one is a unit of its
  own) is back-matched unit by unit, and inside a unit branch by branch, the target reaching
  both branches through the sum. Unrolled, a leaf of block ``b`` in unit ``u`` gets

  .. math::

    f = \frac{1}{m_{b,\cdot}} \prod_{j \text{ after } b \text{ in its branch}} \frac{1}{m_{j,z}}
        \prod_{v > u} \frac{1}{m_{v,z}}, \qquad
    m_{u,z} = m_z(S_u) + m_z(F_u),

  where a chain's ``m_z`` is the product of its blocks' (the Jacobian of a composition is a
  product) and a sum's adds (the Jacobian of ``S + F`` is ``J_S + J_F``; the cross term
  ``tr(J_Sᵀ J_F)`` is dropped: it vanishes in expectation when the branch's last kernel has
  a sign-symmetric distribution, as at initialization). ``m_z = 1`` for an identity shortcut,
  ``1/c`` for a subsampling one that keeps one of every ``c`` positions (its Jacobian is a
  selection), and the blocks' product for a projection. The activation after the sum is
  ignored, as a block's ReLU is.

  **The input's scale.** A block with BatchNorm is invariant to the scale of its input, so
  its ``m_z`` is ``q / (r c v)`` where ``v`` is the input's second moment; in a chain of
  normalized blocks ``v = 1`` is assumed. A residual unit's input is the running sum of all
  earlier branches, and its second moment grows with depth (about linearly with identity
  shortcuts). ``input_scale`` chooses ``v`` for the normalized blocks that read the input or
  the output of a residual unit (the first block of each branch; a plain block after a unit);
  every other block keeps ``v = 1``, so chains are unchanged by it:

  * ``"unit"`` (default): ``v = 1`` (the chain's scalars taken literally).
  * ``"propagated"``: ``v`` from a signal-propagation recursion over the current
    parameters. Assumptions: the network input is standardized (mean 0, second moment 1); a
    plain block with BatchNorm is followed by a ReLU (a ResNet stem), its output per channel
    ``ReLU(γ x̂ + β)`` with ``x̂ ~ N(0, 1)``; a branch ends in a BatchNorm, so ``F_u`` has
    per-channel mean ``β_c`` and variance ``γ_c²``; a projection shortcut likewise; an
    identity or subsampling shortcut carries ``z_{u-1}`` (mean ``m``, second moment ``v``)
    into its first ``C_in`` of ``C_out`` channels (subsampling keeps the moments of a
    stationary map; the zero-padded channels carry nothing); shortcut and branch are
    uncorrelated; the pre-activation is Gaussian per channel, and ``σ_u`` is a ReLU:
    ``E relu X = μΦ(μ/s) + sφ(μ/s)``, ``E relu(X)² = (μ² + s²)Φ(μ/s) + μsφ(μ/s)``.
    Per channel ``μ_c = m + β_c``, ``s_c² = (v − m²) + γ_c²`` (projection: ``β_{S,c} + β_c``
    and ``γ_{S,c}² + γ_c²``), averaged over channels. A branch without a BatchNorm at its end
    whose output a normalized block reads is an error (its scale is unknown).

  Why ``"unit"`` is the default: validation accuracy chose it. ResNet-20 (option A, width
  1/4) on CIFAR-10, 30 epochs, 5,000 held-out training images (``train/ablation.py --model
  resnet20``; ``docs/results.md``): ``"unit"`` beat ``"propagated"`` on every seed, with
  non-overlapping ranges. The local Hessians do not settle it on their own
  (``train/local_hessian_resnet.py``; ``train/results/local_hessian/resnet*.md``): the mean
  eigenvalue ``tr(J_zᵀ J_z)/d`` of each unit's input Hessian, without the activation after
  the sum, over the reading's ``m_{u,z}`` (geometric mean over the nine units of ResNet-20) is
  1.09 for ``"propagated"`` and 0.84 for ``"unit"`` at initialization (width 1), 1.13 and
  0.67 after 10 epochs of SGD, but 0.46-0.48 and 0.72 after 10 epochs of scale-amended SGD
  (with either reading), whose γ shrink while the scalars ignore them (``gamma_aware``
  corrects that to 1.54, over-shooting, and diverges in training). Measured there too: the
  recursion's ``v`` is 0.85-1.31 of the measured one; the sum adds within 3.3 % at
  initialization and 18 % after training (the dropped cross term grows); the ReLU after the
  sum multiplies the unit's value by 0.53-0.99, which neither reading models.

  Args:
    specs: a spec tree with the structure of ``params`` (as made by :func:`optax_bm.annotate`),
      or a callable returning one from ``params``.
    params: the current parameters.
    scale_others: scale bias and BatchNorm leaves by ``f`` with ``m_{b,a}`` too (SPEC v1);
      the default ``False`` leaves them at factor 1
      (see :func:`optax_bm.scale_by_back_matching`).
    gamma_aware: multiply ``m_{b,W}`` and ``m_{b,z}`` of normalized blocks by ``E[γ²]``.
    input_scale: ``"unit"`` (default) or ``"propagated"``, the second moment ``v`` of a residual
      unit's input (above); no effect on chains.

  Returns:
    A pytree with the structure of ``params`` holding one scalar per leaf (dtype at least f32),
    handy for logging.

  Example:
    >>> scales = optax_bm.block_scales(specs, params)  # doctest: +SKIP

  References:
    Zhang, Chen & Liu, *On the Local Hessian in Back-propagation*, NeurIPS 2018, §4 and
    supplement §C.1. He, Zhang, Ren & Sun, *Deep Residual Learning for Image Recognition*,
    CVPR 2016 (options A and B). Schoenholz et al., *Deep Information Propagation*, ICLR 2017
    (signal propagation).
  """
  spec_tree = specs_lib.resolve(specs, params)
  spec_leaves, param_leaves, treedef, paths = specs_lib.flatten_specs_like(spec_tree, params)
  factors = leaf_factors(spec_leaves, param_leaves, paths, scale_others=scale_others,
                         gamma_aware=gamma_aware, input_scale=input_scale)
  out = [jnp.ones((), _compute_dtype(p.dtype)) if f is None else f
         for f, p in zip(factors, param_leaves)]
  return jax.tree.unflatten(treedef, out)
