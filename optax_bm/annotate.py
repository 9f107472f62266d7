"""Automatic annotation of Flax models: model -> spec tree.

:func:`annotate` traces the model's forward pass to a jaxpr (abstractly: no FLOPs) and follows
the data flow from the parameters and the input:

* a **kernel op** is a ``conv_general_dilated`` or ``dot_general`` one of whose operands is a
  parameter leaf (through dtype casts and reshapes only) and the other the activations; kernel
  ops are numbered in the order the activations reach them, which must form a chain (each
  kernel reads the activations of the previous block only);
* every other parameter belongs to the block whose activations it first meets (a bias added
  to the conv output, a BatchNorm scale multiplying it);
* a block is **normalized** if its activations are reduced over the batch axis (BatchNorm in
  training mode);
* PRNG keys and whatever is computed from them (a dropout mask) are not activations, whether
  the key is the model's own (NNX) or passed with the sample inputs (``rngs=...``);
* ``s`` is the kernel op's output positions per example, ``c`` the block input's spatial
  positions over the spatial positions of the block output (its per-example size over the
  block's output channels, which counts a flattened map before flattening and a global pool
  as one position). The block input is measured before any explicit padding (``lax.pad``,
  e.g. ``jnp.pad`` in constant mode, then a VALID convolution): ``c`` counts the positions of
  ``z_{b-1}``, not of the padded operand (docs/method.md#3-scalar-local-hessians).

**Residual networks.** An ``add`` of the activations of two different blocks is the sum of a
residual unit ``z_u = σ(S(z_{u-1}) + F(z_{u-1}))`` if one operand is a chain of blocks ``F``
starting at ``z_{u-1}`` and the other is ``z_{u-1}`` itself (identity), ``z_{u-1}`` up to a
strided slice of the spatial axes and zero-padded channels (option A of He et al. 2016:
``jnp.pad(x[:, ::2, ::2, :], ...)``; ``c`` = input positions per kept position), or a second
chain of blocks starting at ``z_{u-1}`` (option B; the branch with more blocks is the main
one). A pointwise nonlinearity between the sum and the next unit's kernels is ``σ``. The
units must form a chain (each reads the previous unit's output); a block reading a sum counts
its input positions there, so a global average pool between the last sum and the classifier
is the classifier's ``c``. Any other operation combining the activations of two blocks (a
concatenation, a product of branches) is refused, naming the primitive and the parameters.

Written by hand because no library does it: Flax's ``nn.intercept_methods`` exists for Linen
only, and a jaxpr sees through whatever module structure the user wrote.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Union

import jax
from jax.extend import core as jex_core
import numpy as np

from optax_bm import specs as specs_lib
from optax_bm.specs import (CONV, DENSE, IDENTITY, KERNEL, MAIN, OTHER, PROJECTION,
                            SHORTCUT, SUBSAMPLE, UNSCALED, LayerSpec, Residual)

# Ops that keep a parameter "itself" (the kernel operand of a kernel op may pass through them).
_PASSTHROUGH = frozenset({
    "convert_element_type", "reshape", "squeeze", "expand_dims", "broadcast_in_dim", "copy",
    "copy_p", "reduce_precision", "sharding_constraint",
})
_BATCH_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                               "argmax", "argmin"})
# One-operand ops an activation may pass through between explicit padding and the kernel op.
_KEEP_UNPADDED = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision",
                            "sharding_constraint"})
# Call-like primitives whose body runs once with the same operands: inlined.
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "custom_jvp_call",
                    "custom_vjp_call", "custom_vjp_call_jaxpr", "checkpoint", "remat",
                    "custom_lin"})
_KERNEL_PRIMITIVES = frozenset({"conv_general_dilated", "dot_general"})
# Ops on PRNG keys: what they return (keys, random bits, a dropout mask) is not activations,
# even when the key was passed with the sample inputs (Linen's ``rngs={"dropout": key}``).
_RANDOM = frozenset({"random_seed", "random_wrap", "random_unwrap", "random_bits",
                     "random_split", "random_fold_in", "random_clone", "threefry2x32"})
# One-operand ops after which an activation is still "the same value" (for shortcuts).
_SAME_VALUE = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision",
                         "sharding_constraint"})
# The sum of a residual unit.
_SUMS = frozenset({"add", "add_any"})
# Pointwise nonlinearities: one after a sum is the unit's activation σ.
_NONLINEAR = frozenset({"max", "min", "tanh", "logistic", "erf", "exp", "log", "log1p",
                        "expm1", "select_n", "abs", "integer_pow", "pow", "sqrt", "rsqrt",
                        "sign", "erfc", "sin", "cos"})


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(v, jex_core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jex_core.Jaxpr):
        yield v


def _contains_kernel_op(jaxpr) -> bool:
  return any(e.primitive.name in _KERNEL_PRIMITIVES
             or any(_contains_kernel_op(j) for j in _sub_jaxprs(e)) for e in jaxpr.eqns)


@dataclasses.dataclass(frozen=True)
class _Info:
  """What a jaxpr variable is made of."""

  param: Optional[int] = None  # the one parameter leaf it is (up to casts/reshapes)
  params: frozenset = frozenset()  # parameter leaves it depends on
  # Activation levels (at most one): 0 = model input, k+1 = kernel op k's output, -(j+1) =
  # the sum j of a residual unit.
  levels: frozenset = frozenset()
  unpadded: Optional[tuple] = None  # shape of the activations before explicit padding
  # Residual units: `base` names the value this one equals up to casts, strided slices and
  # padding (`moves` lists those), so a shortcut can be matched with the input a branch reads.
  base: Optional[int] = None
  moves: tuple = ()
  trail: tuple = ()  # the last primitives applied since the level's op (for error messages)
  unit_shape: Optional[tuple] = None  # after a sum: the sum's shape, until the next kernel
  activated: bool = False  # after a sum: a pointwise nonlinearity was applied since


_CONST = _Info()


@dataclasses.dataclass
class _KernelOp:
  param: int
  kind: str
  in_shape: tuple
  out_shape: tuple
  in_levels: frozenset
  in_base: Optional[int] = None
  in_unit_shape: Optional[tuple] = None  # the sum's shape when it reads a residual unit
  in_activated: bool = False


@dataclasses.dataclass
class _JoinOp:
  """An ``add`` of the activations of two levels: the sum of a residual unit (if it is one)."""

  operands: tuple  # the two operands' _Info
  shapes: tuple  # their shapes
  out_shape: tuple


class _Tracer:
  """Walks a jaxpr (inlining calls) and records kernel ops, parameter uses, batch reductions."""

  def __init__(self, paths, batch_size):
    self.paths = paths
    self.batch_size = batch_size
    self.kernels: list[_KernelOp] = []
    self.uses: dict[int, set] = {}
    self.batch_reduced: set = set()
    self.next_inputs: dict[int, list] = {}  # level -> shapes of kernel-op activation operands
    self.joins: list[_JoinOp] = []
    self.join_inputs: dict[int, list] = {}  # level -> shapes of its values entering a sum
    self._bases = 0

  def new_base(self) -> int:
    self._bases += 1
    return self._bases

  def describe(self, level) -> str:
    """A level in words, naming its parameters."""
    if level == 0:
      return "the model input"
    if level > 0:
      return f"block with kernel {self.paths[self.kernels[level - 1].param]!r}"
    return f"the sum of residual unit {-level - 1}"

  def read(self, env, v):
    if isinstance(v, jex_core.Literal):
      return _CONST
    return env.get(v, _CONST)

  def run(self, jaxpr, in_infos):
    env = dict(zip(jaxpr.invars, in_infos))
    for eqn in jaxpr.eqns:
      ins = [self.read(env, v) for v in eqn.invars]
      outs = self.eqn(eqn, ins)
      for v, info in zip(eqn.outvars, outs):
        env[v] = info
    return [self.read(env, v) for v in jaxpr.outvars]

  def _param_names(self, ins):
    return sorted(self.paths[p] for i in ins for p in i.params)

  def eqn(self, eqn, ins):
    name = eqn.primitive.name
    subs = list(_sub_jaxprs(eqn))
    if name in _CALLS:
      for sub in subs:
        if len(sub.invars) == len(eqn.invars) and len(sub.outvars) == len(eqn.outvars):
          return self.run(sub, ins)
    if name == "optimization_barrier":  # the identity on each operand
      return list(ins)
    if name in _RANDOM:
      return [_CONST] * len(eqn.outvars)
    if subs and any(i.params for i in ins) and any(_contains_kernel_op(j) for j in subs):
      raise ValueError(
          f"optax_bm.annotate: parameters {self._param_names(ins)[:4]} enter a {name!r} "
          "(control flow) that contains convolutions or matrix products; blocks inside loops "
          "cannot be annotated automatically: write the spec tree by hand with LayerSpec.")
    kernel = self._kernel_operand(eqn, ins)
    params = frozenset().union(*(i.params for i in ins)) if ins else frozenset()
    levels = frozenset().union(*(i.levels for i in ins)) if ins else frozenset()
    if kernel is not None:
      return [self._kernel(eqn, ins, kernel, params)]
    if len(levels) > 1:
      active = [i for i in ins if i.levels]
      if name in _SUMS and len(active) == 2:
        return [self._join(eqn, ins, params)]
      raise ValueError(
          f"optax_bm.annotate: a {name!r} combines the activations of "
          f"{' and '.join(self.describe(l) for l in sorted(levels, reverse=True))} (parameters "
          f"{self._param_names(ins)[:6]}); beyond a chain of blocks only the sum of a shortcut "
          "and a branch of the same input (a residual unit) is supported: write the spec tree "
          "by hand with LayerSpec if the scalars still apply.")
    if name in _KERNEL_PRIMITIVES and levels and any(i.params and not i.levels for i in ins):
      raise ValueError(
          f"optax_bm.annotate: a {name} multiplies the activations by a value computed from "
          f"parameters {self._param_names([i for i in ins if not i.levels])[:4]} (not one "
          "parameter leaf up to casts and reshapes, in Flax's layout); write the spec tree "
          "by hand with LayerSpec.")
    if levels:
      # A parameter meeting activations belongs to their block.
      for i in ins:
        if not i.levels:
          for p in i.params:
            self.uses.setdefault(p, set()).add(levels)
      if name in _BATCH_REDUCTIONS:
        self._maybe_batch_reduction(eqn, ins)
    param = None
    if name in _PASSTHROUGH and not levels:
      carriers = {i.param for i in ins if i.params}
      if len(carriers) == 1 and None not in carriers:
        param = carriers.pop()
    if not levels:
      return [_Info(param, params, levels) for _ in eqn.outvars]
    act = next(i for i in ins if i.levels)
    unpadded, base, moves = None, None, ()
    if name == "pad" and ins[0].levels:
      unpadded = ins[0].unpadded or tuple(eqn.invars[0].aval.shape)
    elif name in _KEEP_UNPADDED:
      unpadded = act.unpadded
    if len(eqn.outvars) == 1 and sum(bool(i.levels) for i in ins) == 1:
      if name in _SAME_VALUE:
        base, moves = act.base, act.moves
      elif name in ("slice", "pad") and ins[0].levels:
        move = (name, tuple(eqn.invars[0].aval.shape), tuple(eqn.outvars[0].aval.shape),
                dict(eqn.params))
        base, moves = act.base, act.moves + (move,)
    trail = (act.trail + (name,))[-6:]
    activated = act.activated or (act.unit_shape is not None and name in _NONLINEAR)
    return [_Info(param, params, levels, unpadded,
                  self.new_base() if base is None else base, moves, trail, act.unit_shape,
                  activated) for _ in eqn.outvars]

  def _join(self, eqn, ins, params):
    j = len(self.joins)
    shapes = tuple(tuple(v.aval.shape) for v in eqn.invars)
    self.joins.append(_JoinOp(tuple(ins), shapes, tuple(eqn.outvars[0].aval.shape)))
    for info, shape in zip(ins, shapes):
      (level,) = info.levels
      self.join_inputs.setdefault(level, []).append(shape)
    return _Info(None, params, frozenset({-(j + 1)}), None, self.new_base(), (), (),
                 tuple(eqn.outvars[0].aval.shape), False)

  def _kernel_operand(self, eqn, ins):
    name = eqn.primitive.name
    if name == "conv_general_dilated" and len(ins) == 2:
      lhs, rhs = ins
      if rhs.param is not None and lhs.levels and not rhs.levels:
        return 1
    if name == "dot_general" and len(ins) == 2:
      for k in (1, 0):
        w, x = ins[k], ins[1 - k]
        if w.param is not None and x.levels and not w.levels and eqn.invars[k].aval.ndim == 2:
          return k
    return None

  def _kernel(self, eqn, ins, k, params):
    name = eqn.primitive.name
    w_info, x_info = ins[k], ins[1 - k]
    x_aval = eqn.invars[1 - k].aval
    out_aval = eqn.outvars[0].aval
    path = self.paths[w_info.param]
    if name == "conv_general_dilated":
      dn = eqn.params["dimension_numbers"]
      lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
      nd = len(lhs_spec)
      # Flax layout: lhs NHWC, rhs HWIO, out NHWC.
      if (tuple(lhs_spec) != (0, nd - 1, *range(1, nd - 1))
          or tuple(out_spec) != (0, nd - 1, *range(1, nd - 1))
          or tuple(rhs_spec) != (nd - 1, nd - 2, *range(0, nd - 2))):
        raise ValueError(f"optax_bm.annotate: convolution with kernel {path!r} does not use "
                         f"Flax's NHWC/HWIO layout (dimension numbers {dn}).")
      if eqn.params.get("feature_group_count", 1) != 1:
        raise ValueError(f"optax_bm.annotate: grouped convolution with kernel {path!r} is "
                         "not supported by the scalar local Hessians.")
      kind = CONV
    else:
      (contract, batch) = eqn.params["dimension_numbers"]
      w_contract = contract[k]
      x_contract = contract[1 - k]
      if batch != ((), ()) or tuple(w_contract) != (0,) or tuple(x_contract) != (x_aval.ndim - 1,):
        raise ValueError(f"optax_bm.annotate: dense kernel {path!r} must be used as "
                         "`x @ kernel` with kernel shape (m_in, n_out) (Flax's layout); got "
                         f"dimension numbers {eqn.params['dimension_numbers']}.")
      if k != 1:
        raise ValueError(f"optax_bm.annotate: dense kernel {path!r} multiplies the activations "
                         "from the left; expected `x @ kernel`.")
      kind = DENSE
    level = len(self.kernels)
    for op in self.kernels:
      if op.param == w_info.param:
        raise ValueError(f"optax_bm.annotate: parameter {path!r} is the kernel of two kernel "
                         "ops (weight sharing is not a chain of blocks).")
    in_shape = x_info.unpadded or tuple(x_aval.shape)
    (in_level,) = x_info.levels
    self.next_inputs.setdefault(in_level, []).append(in_shape)
    self.kernels.append(_KernelOp(w_info.param, kind, in_shape, tuple(out_aval.shape),
                                  x_info.levels, x_info.base, x_info.unit_shape,
                                  x_info.activated))
    return _Info(None, params, frozenset({level + 1}), None, self.new_base())

  def _maybe_batch_reduction(self, eqn, ins):
    axes = eqn.params.get("axes", eqn.params.get("axis", ()))
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    for v, i in zip(eqn.invars, ins):
      shape = getattr(v.aval, "shape", ())
      if i.levels and 0 in axes and shape and shape[0] == self.batch_size:
        self.batch_reduced.add(i.levels)


def _per_example_size(shape):
  return int(np.prod(shape[1:])) if len(shape) > 1 else 1


def _unscaled_paths(unscaled, params, paths) -> set:
  if unscaled is None:
    return set()
  if isinstance(unscaled, str):
    unscaled = [unscaled]
  if callable(unscaled):
    unscaled = unscaled(params)
  if isinstance(unscaled, (list, tuple, set, frozenset)) and all(
      isinstance(u, str) for u in unscaled):
    unknown = [u for u in unscaled if u not in paths]
    if unknown:
      raise ValueError(f"optax_bm.annotate: unscaled path {unknown[0]!r} is not a parameter; "
                       f"parameter paths look like {paths[:4]}.")
    return set(unscaled)
  # An optax-style mask: a tree of bools with the parameters' paths.
  mask = {specs_lib.path_str(p): bool(m)
          for p, m in jax.tree_util.tree_flatten_with_path(unscaled)[0]}
  return {p for p in paths if mask.get(p, False)}


def _trace_nnx(model, args, kwargs):
  from flax import nnx

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def forward(params, rest, args, kwargs):
    m = nnx.merge(graphdef, params, rest, copy=True)
    if hasattr(m, "train"):
      m.train()  # BatchNorm on batch statistics: that is what a training step sees.
    return m(*args, **kwargs)

  return params, rest, forward


def _trace_linen(module, variables, args, kwargs):
  if not isinstance(variables, dict) or "params" not in variables:
    raise ValueError("optax_bm.annotate: for a Linen module, call "
                     "annotate(module, variables, *sample_args, **sample_kwargs) with the "
                     "variables from module.init (a dict with a 'params' collection).")
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}

  def forward(params, rest, args, kwargs):
    out, _ = module.apply({"params": params, **rest}, *args, mutable=list(rest), **kwargs)
    return out

  return params, rest, forward


def _depends_on(jaxpr, tainted_invars) -> list:
  """For each output of ``jaxpr``: whether it depends on one of ``tainted_invars`` (indices).

  Call-like equations are followed into their bodies; any other equation with a body is
  treated conservatively (all outputs depend on all inputs).
  """
  tainted = {v for i, v in enumerate(jaxpr.invars) if i in tainted_invars}

  def is_tainted(v):
    return not isinstance(v, jex_core.Literal) and v in tainted

  for eqn in jaxpr.eqns:
    ins = [is_tainted(v) for v in eqn.invars]
    if not any(ins):
      continue
    subs = list(_sub_jaxprs(eqn))
    if (eqn.primitive.name in _CALLS and len(subs) == 1
        and len(subs[0].invars) == len(eqn.invars) and len(subs[0].outvars) == len(eqn.outvars)):
      outs = _depends_on(subs[0], {i for i, t in enumerate(ins) if t})
    else:
      outs = [True] * len(eqn.outvars)
    tainted.update(v for v, t in zip(eqn.outvars, outs) if t)
  return [is_tainted(v) for v in jaxpr.outvars]


def _check_linen_batch_norm_mode(jaxpr, n_params: int, rest: Any, n_outputs: int) -> None:
  """Raises if the traced Linen forward pass used BatchNorm's running statistics.

  In training mode BatchNorm normalizes with the batch's statistics and only *updates* its
  running averages (which the traced forward pass discards); in inference mode
  (``use_running_average=True``, e.g. a ``train`` flag defaulting to False) the output is
  computed from them, the batch axis is not reduced, and every block would be annotated
  ``normalized=False``, so every factor would be wrong.
  """
  leaves = jax.tree_util.tree_flatten_with_path(rest)[0]
  stats = {n_params + i: specs_lib.path_str(p) for i, (p, _) in enumerate(leaves)
           if specs_lib.path_str(p).split("/")[0] == "batch_stats"}
  if not stats:
    return
  used = [path for i, path in sorted(stats.items()) if any(_depends_on(jaxpr, {i})[:n_outputs])]
  if used:
    raise ValueError(
        "optax_bm.annotate: the Linen module's output depends on its BatchNorm running "
        f"statistics ({', '.join(used[:3])}{', ...' if len(used) > 3 else ''}): BatchNorm "
        "ran in inference mode, so its blocks would be annotated normalized=False. Trace the "
        "training forward pass: pass the flag that selects it, e.g. "
        "annotate(module, variables, x, train=True).")


def _chain_back(tracer, level) -> list:
  """Kernel ops from ``level`` back along kernel outputs, latest first (stops at the input
  or at a sum)."""
  out = []
  while level > 0:
    out.append(level - 1)
    (level,) = tracer.kernels[level - 1].in_levels
  return out


def _subsampling(j, info) -> float:
  """The contraction ``c`` of a parameter-free shortcut: strided slices of the spatial axes
  and zero-padding of the channels (option A), or a refusal naming the operation."""
  c = 1.0
  for name, in_shape, out_shape, params in info.moves:
    nd = len(in_shape)
    if name == "slice":
      strides = params.get("strides") or (1,) * nd
      keep = [0, nd - 1]
      if any(params["start_indices"][a] != 0 or strides[a] != 1
             or params["limit_indices"][a] != in_shape[a] for a in keep):
        raise ValueError(
            f"optax_bm.annotate: the shortcut of residual unit {j} slices the batch or channel "
            f"axis ({params}); only a subsampling of the spatial axes is supported.")
      c *= (_per_example_size(in_shape) / in_shape[-1]) / (
          _per_example_size(out_shape) / out_shape[-1])
    else:  # pad
      config = params["padding_config"]
      if any(tuple(map(int, p)) != (0, 0, 0) for p in config[:-1]) or int(config[-1][2]):
        raise ValueError(
            f"optax_bm.annotate: the shortcut of residual unit {j} pads other than the "
            f"channels (padding {config}); only zero-padded channels are supported.")
  return c


def _classify_join(tracer, j) -> dict:
  """Which operand of sum ``j`` is the branch F, which the shortcut S, and of what kind."""
  op = tracer.joins[j]
  levels = [next(iter(o.levels)) for o in op.operands]
  # A parameter-free shortcut: one operand is (up to moves) the input a branch reads.
  for si in (0, 1):
    shortcut = op.operands[si]
    chain = _chain_back(tracer, levels[1 - si])
    for depth, k in enumerate(chain):
      if tracer.kernels[k].in_base == shortcut.base:
        main = chain[:depth + 1][::-1]
        kind = SUBSAMPLE if shortcut.moves else IDENTITY
        c = _subsampling(j, shortcut) if shortcut.moves else 1.0
        return dict(main=main, shortcut=[], kind=kind, c=c,
                    in_level=next(iter(tracer.kernels[main[0]].in_levels)))
  # A projection: both operands are branches reading the same input.
  chains = [_chain_back(tracer, l) for l in levels]
  best = None
  for ia, ka in enumerate(chains[0]):
    for ib, kb in enumerate(chains[1]):
      if (ka != kb and tracer.kernels[ka].in_base == tracer.kernels[kb].in_base
          and (best is None or ia + ib < sum(best))):
        best = (ia, ib)
  if best is not None:
    a, b = chains[0][:best[0] + 1][::-1], chains[1][:best[1] + 1][::-1]
    if (len(b), -b[0]) > (len(a), -a[0]):  # the main branch: more blocks; tie: first run
      a, b = b, a
    return dict(main=a, shortcut=b, kind=PROJECTION, c=1.0,
                in_level=next(iter(tracer.kernels[a[0]].in_levels)))
  names = sorted({tracer.paths[tracer.kernels[k].param] for ch in chains for k in ch[:2]})
  raise ValueError(
      f"optax_bm.annotate: an 'add' sums {tracer.describe(levels[0])} and "
      f"{tracer.describe(levels[1])} (parameters {names}), which is not a residual unit: "
      "neither operand is the input of the other's branch up to a strided slice and zero "
      "channel padding, nor do both start from the same input (the operands' last operations: "
      f"{list(op.operands[0].trail)} and {list(op.operands[1].trail)}).")


def _units(tracer, out_infos):
  """The network as a chain of units: ``[("plain", kernel) | ("unit", description)]`` in
  order, and the level of the last unit's output. Raises naming the kernel that breaks it."""
  units = [_classify_join(tracer, j) for j in range(len(tracer.joins))]
  owner = {}
  for j, u in enumerate(units):
    for k in u["main"] + u["shortcut"]:
      if k in owner:
        raise ValueError(
            f"optax_bm.annotate: kernel {tracer.paths[tracer.kernels[k].param]!r} lies in the "
            f"branches of two sums (residual units {owner[k]} and {j}); units must be "
            "chained, not nested.")
      owner[k] = j
  order = sorted([(k, ("plain", k)) for k in range(len(tracer.kernels)) if k not in owner]
                 + [(min(u["main"] + u["shortcut"]), ("unit", j)) for j, u in enumerate(units)])
  items, expected = [], 0
  for _, (what, x) in order:
    k = x if what == "plain" else units[x]["main"][0]
    level = next(iter(tracer.kernels[k].in_levels)) if what == "plain" else units[x]["in_level"]
    if level != expected:
      path = tracer.paths[tracer.kernels[k].param]
      raise ValueError(
          f"optax_bm.annotate: the model is not a chain of blocks: kernel {path!r} (block "
          f"{len(items)}) reads activations of levels [{level}] (0 = the input, b+1 = block "
          f"b), expected {tracer.describe(expected)} only (branches that are not residual "
          "units are not chains).")
    if items and items[-1][0] == "unit":  # the previous unit's σ, seen by its reader
      items[-1][1]["activated"] = tracer.kernels[k].in_activated
    items.append((what, x if what == "plain" else units[x]))
    expected = x + 1 if what == "plain" else -(x + 1)
  if items and items[-1][0] == "unit":
    items[-1][1]["activated"] = any(expected in i.levels and i.activated for i in out_infos)
  return items, expected


POOLING_READINGS = ("before", "after", "effective")


def _positions(pooling: str, kind: str, s: int, c_op: float, c_pool: float,
               pool_below: float) -> dict:
  """``s`` and ``c`` of one block under a reading of the paper's pooling
  (docs/method.md#62-pooling-in-s-and-c).

  ``s`` is the kernel op's output positions, ``c_op`` its own spatial contraction (stride),
  ``c_pool`` the block's contraction after the kernel op (pooling), ``pool_below`` the
  previous block's ``c_pool``.
  """
  if pooling == "before":  # SPEC v1
    return dict(s=s, c=c_op * c_pool)
  if pooling == "after":  # the authors' script: s after pooling, c on the reading block
    return dict(s=s / c_pool, c=c_op * pool_below)
  # "effective": fitted to measured local Hessians at initialization (assumes BN -> ReLU
  # [-> max-pool], as in VGG): ReLU passes gradient through half the positions, a max-pool of
  # k positions through one (nonzero with probability 1 - 2^-k); H_z fits c = sqrt(c_pool).
  if kind == DENSE:
    return dict(s=s, c=c_op * c_pool)
  rho = 0.5 if c_pool == 1 else (1.0 - 2.0 ** -c_pool) / c_pool
  return dict(s=s * rho, c=c_op * c_pool ** 0.5)


def annotate(model: Any, *sample_args: Any,
             unscaled: Optional[Union[Iterable[str], Any, Callable[[Any], Any]]] = None,
             pooling: str = "before",
             **sample_kwargs: Any) -> Any:
  """Annotates every parameter of a Flax model with its block (a spec tree).

  Runs the model abstractly on the sample inputs (``jax.make_jaxpr``: shapes only, no
  FLOPs), finds the kernel layers (convolutions and dense layers) and their order along the
  chain, each block's ``s``, ``c`` and whether a BatchNorm sits in it, and places every bias
  and BatchNorm parameter in its block (see the module docstring for the rules). Residual
  units (identity, option-A subsampling or option-B projection shortcuts, an activation
  after the sum) are recognized; their blocks carry an :class:`optax_bm.Residual` (unit,
  branch, position, shortcut kind) and are numbered unit by unit, main branch first.

  Args:
    model: a Flax NNX module (``nnx.Module``), or a Linen module, in which case the first
      sample argument must be its ``variables`` (``{'params': ..., 'batch_stats': ...}``).
      NNX models are traced in training mode (``model.train()`` on a copy); for Linen pass
      the flag that selects training mode (e.g. ``train=True``) in ``sample_kwargs``.
    *sample_args: sample inputs (arrays or ``jax.ShapeDtypeStruct``), batch axis first.
    unscaled: parameters to leave out of the rescaling (spec :data:`optax_bm.UNSCALED`):
      an iterable of paths like ``"embed/scale"``, an optax-style mask (tree of bools or
      callable on params). Without it, a parameter the annotation cannot place is an error.
    pooling: how the block's pooling enters ``s`` and ``c`` (docs/method.md#62-pooling-in-s-and-c):
      ``"before"`` (SPEC v1): ``s`` counts the kernel op's output positions, before the
      block's pooling, and the pooling's contraction sits in the pooled block's own ``c``;
      ``"after"`` (the first author's public script): ``s`` counts the block's output
      positions after pooling, and the pooling's contraction moves to ``c`` of the block that
      reads the pooled map; ``"effective"``: positions that carry gradient through
      ReLU and max-pool (``s/2`` unpooled, ``s (1 - 2^-k)/k`` after a ``k``-position max-pool)
      and ``c = sqrt(k)``, the fit to the local Hessians measured at initialization
      (``train/results/local_hessian/vgg.md``; assumes BatchNorm -> ReLU -> max-pool).
      The default stays ``"before"``: on a validation split of the full CIFAR-10 (VGG11-BN
      width 1/8, 3 seeds x 30 epochs, each at its best screened learning rate) ``"after"``
      ties it (80.20 % at lr 0.01 against 80.26 % at lr 0.03, seed ranges overlapping) and
      is far behind at the paper's lr 0.1 (64.88 % against 73.64 % in 10 epochs);
      ``"effective"`` reached 75.10 % at best in 10 epochs
      (``train/results/ablation_cifar10/ablation.md``).
    **sample_kwargs: keyword arguments of the forward pass.

  Returns:
    A tree of :class:`optax_bm.LayerSpec` with exactly the structure of the optimized
    parameters: ``nnx.state(model, nnx.Param)`` for NNX, ``variables['params']`` for Linen.

  Raises:
    ValueError: naming the parameter path, when a parameter cannot be placed, the model is
      not a chain of blocks and residual units (a concatenation, a product of branches, a
      sum that is not a shortcut plus a branch: the error names the primitive), or a kernel
      does not use Flax's layout. ``pooling`` other than ``"before"`` is not implemented for
      residual networks yet.

  Example:
    >>> model = train.models.vgg("vgg11", num_classes=10, rngs=nnx.Rngs(0))  # doctest: +SKIP
    >>> specs = optax_bm.annotate(model, jnp.zeros((2, 32, 32, 3)))  # doctest: +SKIP
    >>> tx = optax_bm.scale_amended_sgd(0.1, specs)  # doctest: +SKIP

  References:
    Zhang, Chen & Liu, *On the Local Hessian in Back-propagation*, NeurIPS 2018, §4 and
    supplement §C.
  """
  try:
    from flax import nnx
    is_nnx = isinstance(model, nnx.Module)
  except ImportError:  # pragma: no cover
    is_nnx = False
  if is_nnx:
    params, rest, forward = _trace_nnx(model, sample_args, sample_kwargs)
    args = sample_args
  else:
    import flax.linen as nn
    if not isinstance(model, nn.Module):
      raise TypeError(f"optax_bm.annotate: expected a Flax nnx.Module or linen Module, got "
                      f"{type(model).__name__}.")
    if not sample_args:
      raise ValueError("optax_bm.annotate: a Linen module needs its variables as the first "
                       "sample argument.")
    params, rest, forward = _trace_linen(model, sample_args[0], sample_args[1:], sample_kwargs)
    args = sample_args[1:]

  arrays = [x for x in jax.tree.leaves((args, sample_kwargs))
            if hasattr(x, "shape") and hasattr(x, "dtype") and len(x.shape) > 0]
  if not arrays:
    raise ValueError("optax_bm.annotate: needs at least one sample input array (batch first).")
  batch_size = arrays[0].shape[0]

  param_paths_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [specs_lib.path_str(p) for p, _ in param_paths_leaves]
  n_params = len(paths)

  def to_abstract(x):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x

  flat_params, params_def = jax.tree.flatten(params)
  # Only arrays are traced; Python flags (train=True) and other leaves stay static.
  inputs_flat, inputs_def = jax.tree.flatten((args, sample_kwargs))
  is_array = [hasattr(x, "shape") and hasattr(x, "dtype") for x in inputs_flat]

  def flat_forward(flat_params, rest, input_arrays):
    it = iter(input_arrays)
    merged = [next(it) if a else x for x, a in zip(inputs_flat, is_array)]
    call_args, call_kwargs = jax.tree.unflatten(inputs_def, merged)
    return forward(jax.tree.unflatten(params_def, flat_params), rest, call_args, call_kwargs)

  closed = jax.make_jaxpr(flat_forward)(
      [to_abstract(x) for x in flat_params], jax.tree.map(to_abstract, rest),
      [to_abstract(x) for x, a in zip(inputs_flat, is_array) if a])
  jaxpr = closed.jaxpr
  if not is_nnx:
    _check_linen_batch_norm_mode(jaxpr, n_params, rest, len(jaxpr.outvars))
  n_rest = len(jax.tree.leaves(rest))
  n_args = len(jaxpr.invars) - n_params - n_rest
  in_infos = ([_Info(i, frozenset({i})) for i in range(n_params)] + [_CONST] * n_rest
              + [_Info(levels=frozenset({0}), base=-(a + 1)) for a in range(n_args)])
  tracer = _Tracer(paths, batch_size)
  out_infos = tracer.run(jaxpr, in_infos)

  if not tracer.kernels:
    raise ValueError("optax_bm.annotate: found no kernel layer (convolution or dense) acting "
                     "on the input.")
  if pooling not in POOLING_READINGS:
    raise ValueError(f"optax_bm.annotate: pooling={pooling!r}; choose from "
                     f"{', '.join(map(repr, POOLING_READINGS))}.")
  if tracer.joins and pooling != "before":
    raise ValueError(f"optax_bm.annotate: pooling={pooling!r} is not implemented for residual "
                     "networks yet; use pooling='before'.")
  # Units in order: ("plain", kernel) or ("unit", description); the level of the output.
  items, top_level = _units(tracer, out_infos)
  out_shapes = [tuple(v.aval.shape) for v, i in zip(jaxpr.outvars, out_infos)
                if top_level in i.levels]
  if not out_shapes:
    raise ValueError("optax_bm.annotate: the model's output does not depend on its last kernel "
                     f"{paths[tracer.kernels[-1].param]!r}.")

  # Blocks numbered unit by unit (in a residual unit: its main branch, then its shortcut).
  block_of, residual_of = {}, {}
  for u, (what, x) in enumerate(items):
    if what == "plain":
      block_of[x] = len(block_of)
      residual_of[x] = None
      continue
    for branch, kernels in ((MAIN, x["main"]), (SHORTCUT, x["shortcut"])):
      for pos, k in enumerate(kernels):
        block_of[k] = len(block_of)
        residual_of[k] = Residual(u, branch, pos, x["kind"], x["c"], x["activated"])

  block_specs = {}
  pool_below = 1.0  # c_pool of the previous block (pooling="after" moves it up one block)
  for k in sorted(block_of, key=block_of.get):
    op, b = tracer.kernels[k], block_of[k]
    n_out = op.out_shape[-1]
    s = _per_example_size(op.out_shape) // n_out
    # A block reading a unit's sum counts its input positions there (before any pooling).
    in_shape = op.in_unit_shape or op.in_shape
    in_positions = _per_example_size(in_shape) // in_shape[-1]
    if op.kind == DENSE:
      c_op, c_pool = (float(in_positions) if op.in_unit_shape else 1.0), 1.0
    else:
      nxt = (tracer.next_inputs.get(k + 1) or tracer.join_inputs.get(k + 1) or out_shapes)
      size = _per_example_size(nxt[0])
      if size % n_out:
        raise ValueError(
            f"optax_bm.annotate: cannot count the output positions of block {b} (kernel "
            f"{paths[op.param]!r}): its output of {size} values per example is not a multiple "
            f"of its {n_out} channels.")
      # c = input positions / block output positions = c_op (stride) · c_pool
      # (docs/method.md#3-scalar-local-hessians).
      c_op = in_positions / s
      c_pool = s / (size // n_out)
    block_specs[b] = dict(kind=op.kind, **_positions(pooling, op.kind, s, c_op, c_pool,
                                                     pool_below),
                          normalized=frozenset({k + 1}) in tracer.batch_reduced,
                          residual=residual_of[k])
    pool_below = c_pool

  skip = _unscaled_paths(unscaled, params, paths)
  kernel_of = {op.param: block_of[k] for k, op in enumerate(tracer.kernels)}
  leaf_specs = []
  for i, path in enumerate(paths):
    if path in skip:
      leaf_specs.append(UNSCALED)
    elif i in kernel_of:
      leaf_specs.append(LayerSpec(block=kernel_of[i], role=KERNEL, **block_specs[kernel_of[i]]))
    else:
      uses = tracer.uses.get(i, set())
      level = next(iter(next(iter(uses)))) if len(uses) == 1 else None
      if len(uses) != 1 or len(next(iter(uses))) != 1 or level <= 0:
        why = ("is never used on the activations" if not uses else
               "acts on the model input before the first kernel" if uses == {frozenset({0})}
               else f"acts on {tracer.describe(level)}, after the sum, outside every block"
               if level is not None and level < 0
               else f"meets the activations of several blocks (levels {sorted(map(sorted, uses))})")
        raise ValueError(
            f"optax_bm.annotate: cannot place parameter {path!r} in a block: it {why}. Pass "
            f"unscaled=[{path!r}] to leave it out of the rescaling.")
      b = block_of[level - 1]
      leaf_specs.append(LayerSpec(block=b, role=OTHER, **block_specs[b]))
  return jax.tree.unflatten(params_def, leaf_specs)
