"""Small chain networks for the core tests: each model is an explicit list of blocks.

A block is one kernel layer and everything up to the next one
(docs/method.md#1-network-blocks-objective), so the reference back-matching loop can run the
very same modules block by block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import nnx

from optax_bm import LayerSpec


def batch_norm(features, *, rngs, dtype=jnp.float32):
  """``nnx.BatchNorm`` whose running statistics are at least as wide as ``dtype``.

  Flax keeps them in float32 whatever ``dtype``; a float64 training-mode pass would then write
  float64 averages into them, which JAX warns will be an error (dtype-cast FutureWarning).
  Narrower dtypes (bfloat16) keep float32 statistics, as Flax does.
  """
  bn = nnx.BatchNorm(features, rngs=rngs, dtype=dtype, param_dtype=dtype)
  stats_dtype = jnp.promote_types(jnp.float32, dtype)
  bn.mean = nnx.BatchStat(bn.mean[...].astype(stats_dtype))
  bn.var = nnx.BatchStat(bn.var[...].astype(stats_dtype))
  return bn


class ConvBlock(nnx.Module):
  """conv -> [BatchNorm] -> ReLU -> [pool] -> [flatten | global average pool]."""

  def __init__(self, cin, cout, *, rngs, stride=1, bn=True, pool=False, tail=None,
               dtype=jnp.float32):
    self.conv = nnx.Conv(cin, cout, (3, 3), strides=stride, padding="SAME", rngs=rngs,
                         dtype=dtype, param_dtype=dtype)
    self.bn = batch_norm(cout, rngs=rngs, dtype=dtype) if bn else None
    self.pool = pool
    self.tail = tail

  def __call__(self, x):
    x = self.conv(x)
    if self.bn is not None:
      x = self.bn(x)
    x = nnx.relu(x)
    if self.pool:
      x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    if self.tail == "flatten":
      x = x.reshape(x.shape[0], -1)
    elif self.tail == "gap":
      x = x.mean(axis=(1, 2))
    return x


class DenseBlock(nnx.Module):
  """dense -> [BatchNorm -> ReLU] (hidden) or dense alone (classifier)."""

  def __init__(self, din, dout, *, rngs, bn=False, relu=False, dtype=jnp.float32):
    self.fc = nnx.Linear(din, dout, rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.bn = batch_norm(dout, rngs=rngs, dtype=dtype) if bn else None
    self.relu = relu

  def __call__(self, x):
    x = self.fc(x)
    if self.bn is not None:
      x = self.bn(x)
    return nnx.relu(x) if self.relu else x


class Chain(nnx.Module):

  def __init__(self, blocks):
    self.blocks = nnx.List(blocks)

  def __call__(self, x):
    for b in self.blocks:
      x = b(x)
    return x


def vgg_like(dtype=jnp.float32, seed=0, hw=8, classes=5):
  """conv-BN-ReLU-pool, conv-BN-ReLU, conv-BN-ReLU-pool-flatten, dense-BN-ReLU, dense."""
  r = nnx.Rngs(seed)
  s = hw // 4
  return Chain([
      ConvBlock(3, 4, rngs=r, pool=True, dtype=dtype),
      ConvBlock(4, 6, rngs=r, dtype=dtype),
      ConvBlock(6, 8, rngs=r, pool=True, tail="flatten", dtype=dtype),
      DenseBlock(8 * s * s, 7, rngs=r, bn=True, relu=True, dtype=dtype),
      DenseBlock(7, classes, rngs=r, dtype=dtype),
  ])


def vgg_like_expected(hw=8):
  """Hand-computed (kind, s, c, normalized) of :func:`vgg_like`'s blocks."""
  return [("conv", hw * hw, 4.0, True), ("conv", (hw // 2) ** 2, 1.0, True),
          ("conv", (hw // 2) ** 2, 4.0, True), ("dense", 1, 1.0, True),
          ("dense", 1, 1.0, False)]


def stride2_net(dtype=jnp.float32, seed=1, classes=5):
  """A stride-2 SAME convolution, an unnormalized conv block, flatten, classifier."""
  r = nnx.Rngs(seed)
  return Chain([
      ConvBlock(3, 4, rngs=r, stride=2, dtype=dtype),
      ConvBlock(4, 5, rngs=r, bn=False, tail="flatten", dtype=dtype),
      DenseBlock(5 * 4 * 4, classes, rngs=r, dtype=dtype),
  ])


def stride2_expected():
  return [("conv", 16, 4.0, True), ("conv", 16, 1.0, False), ("dense", 1, 1.0, False)]


def gap_net(dtype=jnp.float32, seed=2, classes=5):
  """conv-BN-pool, conv-BN, global average pool over 4x4, classifier."""
  r = nnx.Rngs(seed)
  return Chain([
      ConvBlock(3, 4, rngs=r, pool=True, dtype=dtype),
      ConvBlock(4, 6, rngs=r, tail="gap", dtype=dtype),
      DenseBlock(6, classes, rngs=r, dtype=dtype),
  ])


def gap_expected():
  return [("conv", 64, 4.0, True), ("conv", 16, 16.0, True), ("dense", 1, 1.0, False)]


# --- Linen: the same VGG-like chain, one submodule per block -------------------------------


class LinenConvBlock(nn.Module):
  features: int
  pool: bool = False
  flatten: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.features, (3, 3), padding="SAME", dtype=self.dtype,
                param_dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype,
                     param_dtype=self.dtype)(x)
    x = nn.relu(x)
    if self.pool:
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    if self.flatten:
      x = x.reshape(x.shape[0], -1)
    return x


class LinenDense(nn.Module):
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.dtype)(x)


class LinenChain(nn.Module):
  dtype: jnp.dtype = jnp.float32
  classes: int = 5

  def setup(self):
    self.blocks = [LinenConvBlock(4, pool=True, dtype=self.dtype),
                   LinenConvBlock(6, pool=True, flatten=True, dtype=self.dtype),
                   LinenDense(self.classes, dtype=self.dtype)]

  def __call__(self, x, train: bool = True):
    for b in self.blocks:
      x = b(x, train)
    return x


def linen_expected(hw=8):
  return [("conv", hw * hw, 4.0, True), ("conv", (hw // 2) ** 2, 4.0, True),
          ("dense", 1, 1.0, False)]


# --- helpers --------------------------------------------------------------------------------


def hand_specs(params_b, block, kind, s, c, normalized):
  """A block's spec tree written by hand: leaves named 'kernel' are the kernel."""

  def one(path, _):
    last = [k for k in path if getattr(k, "name", None) != "value"][-1]
    name = getattr(last, "key", getattr(last, "name", None))
    role = "kernel" if name == "kernel" else "other"
    return LayerSpec(block=block, role=role, kind=kind, s=s, c=c, normalized=normalized)

  return jax.tree_util.tree_map_with_path(one, params_b)


def cross_entropy(labels, classes):
  def loss(logits):
    onehot = jax.nn.one_hot(labels, classes, dtype=logits.dtype)
    return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1))

  return loss


# --- residual networks: units z_u = σ(S(z) + F(z)) -----------------------------------------


class ConvBN(nnx.Module):
  """conv (3x3 SAME or 1x1) -> BatchNorm [-> ReLU]: one block of a residual unit."""

  def __init__(self, cin, cout, *, rngs, stride=1, kernel=3, relu=True, dtype=jnp.float32):
    self.conv = nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding="SAME",
                         use_bias=False, rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.bn = batch_norm(cout, rngs=rngs, dtype=dtype)
    self.relu = relu

  def __call__(self, x):
    x = self.bn(self.conv(x))
    return nnx.relu(x) if self.relu else x


def subsample(x, cout):
  """Option A: keep every other row and column, zero-pad the channels to ``cout``."""
  x = x[:, ::2, ::2, :]
  pad = cout - x.shape[-1]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))


class ResUnit(nnx.Module):
  """Post-activation basic block: conv-BN-ReLU-conv-BN + shortcut [-> ReLU]."""

  def __init__(self, cin, cout, *, rngs, stride=1, shortcut="identity", act=True,
               dtype=jnp.float32, depth=2):
    self.main = nnx.List([ConvBN(cin, cout, stride=stride, rngs=rngs, dtype=dtype)]
                         + [ConvBN(cout, cout, rngs=rngs, dtype=dtype) for _ in range(depth - 2)]
                         + [ConvBN(cout, cout, relu=False, rngs=rngs, dtype=dtype)])
    self.shortcut = nnx.List(
        [ConvBN(cin, cout, stride=stride, kernel=1, relu=False, rngs=rngs, dtype=dtype)]
        if shortcut == "projection" else [])
    self.kind = shortcut
    self.cout = cout
    self.act = act

  def shortcut_fn(self, x):
    return subsample(x, self.cout) if self.kind == "subsample" else x

  def __call__(self, x):
    f = x
    for b in self.main:
      f = b(f)
    s = self.shortcut[0](x) if self.kind == "projection" else self.shortcut_fn(x)
    y = s + f
    return nnx.relu(y) if self.act else y


class Head(nnx.Module):
  """Global average pool -> dense (the classifier reads the last unit's output)."""

  def __init__(self, din, dout, *, rngs, dtype=jnp.float32):
    self.fc = nnx.Linear(din, dout, rngs=rngs, dtype=dtype, param_dtype=dtype)

  def __call__(self, x):
    return self.fc(x.mean(axis=(1, 2)))


class ResNetLike(nnx.Module):

  def __init__(self, units):
    self.units = nnx.List(units)

  def __call__(self, x):
    for u in self.units:
      x = u(x)
    return x


def residual_net(shortcut="subsample", act=True, dtype=jnp.float32, seed=3, classes=5,
                 depth=2):
  """stem conv-BN-ReLU (3->4), an identity unit (4->4), a unit with the given shortcut
  (4->8 stride 2; 4->4 stride 1 for "identity") whose branch has ``depth`` blocks, GAP,
  dense."""
  r = nnx.Rngs(seed)
  wide = shortcut != "identity"
  cout, stride = (8, 2) if wide else (4, 1)
  return ResNetLike([
      ConvBN(3, 4, rngs=r, dtype=dtype),
      ResUnit(4, 4, rngs=r, act=act, dtype=dtype),
      ResUnit(4, cout, stride=stride, shortcut=shortcut, rngs=r, act=act, dtype=dtype,
              depth=depth),
      Head(cout, classes, rngs=r, dtype=dtype),
  ])


def residual_expected(shortcut="subsample", act=True, hw=8, depth=2):
  """Hand-computed {module path: (block, kind, s, c, normalized, Residual)} of residual_net."""
  from optax_bm import Residual  # pylint: disable=import-outside-toplevel

  wide = shortcut != "identity"
  c2 = 4.0 if wide else 1.0
  s2 = (hw // 2) ** 2 if wide else hw * hw
  r1 = lambda br, pos: Residual(1, br, pos, "identity", post_activation=act)  # noqa: E731
  r2 = lambda br, pos: Residual(2, br, pos, shortcut, c2 if shortcut == "subsample" else 1.0,
                                post_activation=act)  # noqa: E731
  out = {
      "units/0": (0, "conv", hw * hw, 1.0, True, None),
      "units/1/main/0": (1, "conv", hw * hw, 1.0, True, r1("main", 0)),
      "units/1/main/1": (2, "conv", hw * hw, 1.0, True, r1("main", 1)),
      "units/2/main/0": (3, "conv", s2, c2, True, r2("main", 0)),
  }
  for j in range(1, depth):
    out[f"units/2/main/{j}"] = (3 + j, "conv", s2, 1.0, True, r2("main", j))
  if shortcut == "projection":
    out["units/2/shortcut/0"] = (3 + depth, "conv", s2, c2, True, r2("shortcut", 0))
  # The classifier reads the last unit's output through a global average pool.
  out["units/3"] = (len(out), "dense", 1, float(s2), False, None)
  return out


def specs_from_table(params, table):
  """A spec tree over ``params`` from {module path prefix: (block, kind, s, c, norm, res)}."""

  def one(path, _):
    key = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                   for k in path if getattr(k, "name", None) != "value")
    prefix = max((p for p in table if key.startswith(p + "/")), key=len)
    block, kind, s, c, norm, res = table[prefix]
    role = "kernel" if key.endswith("kernel") else "other"
    return LayerSpec(block=block, role=role, kind=kind, s=s, c=c, normalized=norm,
                     residual=res)

  return jax.tree_util.tree_map_with_path(one, params)


class LinenConvBN(nn.Module):
  features: int
  stride: int = 1
  kernel: int = 3
  relu: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride, padding="SAME",
                use_bias=False, dtype=self.dtype, param_dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, param_dtype=self.dtype)(x)
    return nn.relu(x) if self.relu else x


class LinenResUnit(nn.Module):
  features: int
  stride: int = 1
  shortcut: str = "identity"
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.main = [LinenConvBN(self.features, self.stride, dtype=self.dtype),
                 LinenConvBN(self.features, relu=False, dtype=self.dtype)]
    if self.shortcut == "projection":
      self.proj = LinenConvBN(self.features, self.stride, kernel=1, relu=False, dtype=self.dtype)

  def __call__(self, x, train: bool = True):
    f = x
    for b in self.main:
      f = b(f, train)
    if self.shortcut == "projection":
      s = self.proj(x, train)
    elif self.shortcut == "subsample":
      s = subsample(x, self.features)
    else:
      s = x
    return nn.relu(s + f)


class LinenResNet(nn.Module):
  """Linen twin of :func:`residual_net` (ReLU after the sums)."""

  shortcut: str = "subsample"
  dtype: jnp.dtype = jnp.float32
  classes: int = 5

  def setup(self):
    wide = self.shortcut != "identity"
    self.stem = LinenConvBN(4, dtype=self.dtype)
    self.u1 = LinenResUnit(4, dtype=self.dtype)
    self.u2 = LinenResUnit(8 if wide else 4, 2 if wide else 1, self.shortcut, dtype=self.dtype)
    self.fc = nn.Dense(self.classes, dtype=self.dtype, param_dtype=self.dtype)

  def __call__(self, x, train: bool = True):
    x = self.u2(self.u1(self.stem(x, train), train), train)
    return self.fc(x.mean(axis=(1, 2)))
