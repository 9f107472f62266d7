"""Per-parameter annotations: which block a leaf belongs to and what its block looks like.

A spec tree has exactly the structure of the parameters being optimized; each leaf is a
:class:`LayerSpec` (or :data:`UNSCALED` for a parameter deliberately left out of the
rescaling). :func:`optax_bm.annotate` builds spec trees from Flax models; users may also
write them by hand.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Union

import jax

KERNEL = "kernel"
OTHER = "other"
CONV = "conv"
DENSE = "dense"


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
  """

  block: int
  role: str
  kind: str
  s: int = 1
  c: float = 1.0
  normalized: bool = False

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
    return (self.kind, self.s, self.c, self.normalized)


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
