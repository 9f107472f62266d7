"""Per-parameter annotations: which block a leaf belongs to and what its block looks like.

A spec tree has exactly the structure of the parameters being optimized; each leaf is a
:class:`LayerSpec` (or :data:`UNSCALED` for a parameter deliberately left out of the
rescaling). :func:`optax_bm.annotate` builds spec trees from Flax models; users may also
write them by hand.

A chain network needs nothing more: every block is a unit of its own. A residual network is a
chain of *units* ``z_u = σ_u(S_u(z_{u-1}) + F_u(z_{u-1}))``; the blocks of a residual unit
carry a :class:`Residual` saying which unit, which branch and where in the branch they sit,
and what the unit's shortcut is (see docs/method.md, residual networks).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Optional, Union

import jax

KERNEL = "kernel"
OTHER = "other"
CONV = "conv"
DENSE = "dense"

# Branches of a residual unit.
MAIN = "main"  # F_u: the chain of blocks the shortcut is added to
SHORTCUT = "shortcut"  # S_u when it has parameters (a projection)
# Shortcut kinds of a residual unit.
IDENTITY = "identity"  # S_u(z) = z
SUBSAMPLE = "subsample"  # parameter-free: keep 1 of every `shortcut_c` positions, zero-pad
#                          the channels (option A of He et al. 2016)
PROJECTION = "projection"  # a chain of blocks, e.g. 1x1 stride-2 conv + BatchNorm (option B)
SHORTCUT_KINDS = (IDENTITY, SUBSAMPLE, PROJECTION)


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Residual:
  """Where a block sits in a residual unit ``z_u = σ_u(S_u(z_{u-1}) + F_u(z_{u-1}))``.

  Units are numbered along the network, 0 nearest the input, and a block without a
  :class:`Residual` (the stem, the classifier, every block of a chain) is a unit of its own:
  in ResNet-20 the stem is unit 0, the nine basic blocks units 1..9, the classifier unit 10.
  Blocks are numbered so that the blocks of one unit are consecutive (its main branch in
  order, then its shortcut branch).

  Every leaf of every block of one unit repeats the unit's description (``shortcut``,
  ``shortcut_c``, ``post_activation``), so that a leaf's spec can be read on its own.

  Attributes:
    unit: the unit's index ``u``.
    branch: ``"main"`` for the branch ``F_u``; ``"shortcut"`` for a block of a projection
      shortcut ``S_u``.
    position: the block's position in its branch, 0 for the block reading ``z_{u-1}``.
    shortcut: the unit's shortcut: ``"identity"``; ``"subsample"`` (no parameters: keeps 1
      of every ``shortcut_c`` input positions and zero-pads the channels, option A of He et
      al. 2016); ``"projection"`` (a chain of blocks, option B: 1x1 stride-2 conv + BatchNorm).
    shortcut_c: for ``"subsample"``: the input positions per kept position (4 for stride 2
      in two dimensions); 1 otherwise.
    post_activation: whether a pointwise activation (ReLU) follows the sum.

  Example:
    The second convolution of ResNet-20's first basic block (unit 1 after the stem)::

      LayerSpec(block=2, role="kernel", kind="conv", s=1024, c=1.0, normalized=True,
                residual=Residual(unit=1, branch="main", position=1, shortcut="identity"))
  """

  unit: int
  branch: str = MAIN
  position: int = 0
  shortcut: str = IDENTITY
  shortcut_c: float = 1.0
  post_activation: bool = True

  def __post_init__(self):
    def bad(what):
      raise ValueError(f"Residual: {what} (got {self!r}).")

    if not _is_int(self.unit) or self.unit < 0:
      bad("unit must be an int >= 0")
    if self.branch not in (MAIN, SHORTCUT):
      bad(f"branch must be {MAIN!r} or {SHORTCUT!r}")
    if not _is_int(self.position) or self.position < 0:
      bad("position must be an int >= 0 (0 is the block reading the unit's input)")
    if self.shortcut not in SHORTCUT_KINDS:
      bad(f"shortcut must be one of {SHORTCUT_KINDS}")
    if (isinstance(self.shortcut_c, bool) or not isinstance(self.shortcut_c, numbers.Real)
        or not self.shortcut_c > 0):
      bad("shortcut_c must be a positive number")
    if self.shortcut != SUBSAMPLE and self.shortcut_c != 1:
      bad(f"shortcut_c is the contraction of a 'subsample' shortcut; a {self.shortcut!r} "
          "shortcut has shortcut_c=1")
    if self.branch == SHORTCUT and self.shortcut != PROJECTION:
      bad(f"only a 'projection' shortcut has blocks; this unit's shortcut is {self.shortcut!r}")
    if not isinstance(self.post_activation, bool):
      bad("post_activation must be a bool")
    object.__setattr__(self, "unit", int(self.unit))
    object.__setattr__(self, "position", int(self.position))
    object.__setattr__(self, "shortcut_c", float(self.shortcut_c))

  def unit_signature(self):
    """What all blocks of one unit must agree on."""
    return (self.shortcut, self.shortcut_c, self.post_activation)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """The annotation of one parameter leaf (docs/method.md#1-network-blocks-objective).

  A block starts at one kernel layer (convolution or dense) and holds everything up to the
  next kernel layer. Every leaf of a block carries the block's description, so that a leaf's
  spec can be read on its own.

  Attributes:
    block: index of the block along the chain, 0 nearest the input.
    role: ``"kernel"`` for the block's kernel ``W_b``; ``"other"`` for its bias and BatchNorm
      scale/offset ``a_b``.
    kind: ``"conv"`` or ``"dense"``: the kind of the block's kernel op.
    s: output positions of the kernel op per example (``q1*q2`` for a convolution, 1 for dense);
      a positive number (fractional for :func:`optax_bm.annotate`'s ``pooling="effective"``).
    c: spatial contraction: spatial positions of the block's input over those of its output
      feature map, counted before any flattening (4 for a 2x2 pool or a stride-2 SAME
      convolution, 1 for a dense kernel).
    normalized: whether a BatchNorm sits in the block.
    residual: for a block of a residual unit, where it sits in the unit (a :class:`Residual`);
      ``None`` (the default) for a block that is a unit of its own, as in a chain.
  """

  block: int
  role: str
  kind: str
  s: int = 1
  c: float = 1.0
  normalized: bool = False
  residual: Optional[Residual] = None

  def __post_init__(self):
    def bad(what):
      raise ValueError(f"LayerSpec: {what} (got {self!r}).")

    if isinstance(self.block, bool) or not isinstance(self.block, numbers.Integral):
      bad("block must be an int")
    if self.block < 0:
      bad("block must be >= 0 (0 is the block nearest the input)")
    if self.role not in (KERNEL, OTHER):
      bad(f"role must be {KERNEL!r} or {OTHER!r}")
    if self.kind not in (CONV, DENSE):
      bad(f"kind must be {CONV!r} or {DENSE!r}")
    if isinstance(self.s, bool) or not isinstance(self.s, numbers.Real) or not self.s > 0:
      bad("s (output positions per example) must be a positive number")
    if isinstance(self.c, bool) or not isinstance(self.c, numbers.Real) or not self.c > 0:
      bad("c (spatial contraction) must be a positive number")
    if not isinstance(self.normalized, bool):
      bad("normalized must be a bool")
    if self.residual is not None and not isinstance(self.residual, Residual):
      bad("residual must be None or an optax_bm.Residual")
    object.__setattr__(self, "block", int(self.block))
    # Position counts are ints; annotate(..., pooling="effective") makes fractional ones.
    s = float(self.s)
    object.__setattr__(self, "s", int(s) if s.is_integer() else s)
    object.__setattr__(self, "c", float(self.c))

  @property
  def is_kernel(self) -> bool:
    return self.role == KERNEL

  def block_signature(self):
    """What all leaves of one block must agree on."""
    return (self.kind, self.s, self.c, self.normalized, self.residual)


class _Unscaled:
  """Marks a parameter whose update passes through unchanged (opted out explicitly)."""

  _instance = None

  def __new__(cls):
    if cls._instance is None:
      cls._instance = super().__new__(cls)
    return cls._instance

  def __repr__(self):
    return "optax_bm.UNSCALED"

  def __reduce__(self):
    return (_Unscaled, ())


UNSCALED = _Unscaled()
"""Spec leaf for a parameter left out of the back-matching rescaling (factor 1)."""

SpecLeaf = Union[LayerSpec, _Unscaled]
SpecTree = Any
SpecsOrFn = Union[SpecTree, Callable[[Any], SpecTree]]


def is_spec_leaf(x) -> bool:
  return isinstance(x, (LayerSpec, _Unscaled))


def path_str(path) -> str:
  """A readable parameter path: ``conv1/kernel`` (NNX's trailing ``.value`` dropped)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name == "value":  # nnx.Variable's payload
        continue
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts) if parts else "<root>"


def resolve(specs: SpecsOrFn, params) -> SpecTree:
  """Returns the spec tree, calling ``specs(params)`` if it is a callable (like optax masks)."""
  return specs(params) if callable(specs) else specs


def flatten_specs_like(specs: SpecTree, tree, what: str = "params", is_leaf=None):
  """Aligns the spec leaves with ``tree``'s leaves by parameter path.

  Paths are compared as :func:`path_str` renders them, so a spec tree made from
  ``nnx.state(model, nnx.Param)`` (leaves wrapped in ``nnx.Param``) also fits the pure arrays
  that ``nnx.Optimizer`` passes to ``update``, and plain dicts fit ``nnx.State``.

  Returns:
    (spec_leaves, tree_leaves, treedef, paths): lists in ``tree``'s leaf order.

  Raises:
    ValueError: naming the first path (in ``tree``'s order) without a spec, or the first spec
      path without a leaf.
  """
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  spec_with_path = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec_leaf)[0]
  by_path = {}
  for p, s in spec_with_path:
    key = path_str(p)
    if not is_spec_leaf(s):
      raise ValueError(f"optax_bm: spec for parameter {key!r} is {s!r}; expected a "
                       "LayerSpec or optax_bm.UNSCALED.")
    by_path[key] = s
  paths = [path_str(p) for p, _ in leaves_with_path]
  missing = [p for p in paths if p not in by_path]
  if missing:
    raise ValueError(
        f"optax_bm: the spec tree does not match the {what}: {what} path {missing[0]!r} has no "
        f"spec ({len(missing)} {what} leaves without a spec; spec paths look like "
        f"{list(by_path)[:3]}).")
  extra = sorted(set(by_path) - set(paths), key=list(by_path).index)
  if extra:
    raise ValueError(
        f"optax_bm: the spec tree does not match the {what}: spec path {extra[0]!r} has no "
        f"{what} leaf ({len(extra)} specs without a leaf; {what} paths look like {paths[:3]}).")
  return [by_path[p] for p in paths], [x for _, x in leaves_with_path], treedef, paths


def leaves_at(tree, paths, what: str = "params", is_leaf=None) -> list:
  """The leaves of ``tree`` at the given :func:`path_str` paths (wrappers and containers aside)."""
  by_path = {path_str(p): x for p, x in
             jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}
  try:
    return [by_path[p] for p in paths]
  except KeyError as e:
    raise ValueError(f"optax_bm: the {what} have no leaf at path {e.args[0]!r}, which the "
                     "updates have.") from None
