"""VGG with BatchNorm and the CIFAR ResNets for 32×32 inputs (CIFAR), in Flax NNX.

:data:`MODELS` names them all; :func:`create` builds any of them by name.

The network is an explicit chain of blocks, as `optax_bm.annotate` expects
(docs/method.md#1-network-blocks-objective): every block starts at one kernel layer and holds
what follows it up to the next one,

    ConvBlock  = 3×3 conv (SAME, no bias) -> BatchNorm -> ReLU [-> 2×2 max-pool] [-> flatten]
    classifier = dense (512·width -> num_classes)

with the standard configurations (Simonyan & Zisserman 2015, configurations A, B, D, E) and
five 2×2 max-pools, so the last feature map is 1×1×(512·width). The convolutions carry no
bias: BatchNorm's offset follows each one, so a bias would be redundant.

Compute dtype and parameter dtype are separate: ``dtype=jnp.bfloat16`` computes in bf16 with
fp32 parameters (and fp32 BatchNorm statistics); the logits are returned in fp32.

On the CPU backend the convolutions on 2×2 maps go through
:func:`train.small_map_conv.conv_general_dilated` (the same convolution computed as one matrix
product; XLA:CPU otherwise runs it 30-40× slower, see that module). ``small_map_conv=`` forces
it on or off; parameters, annotations and results do not depend on it beyond float rounding.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

from train import small_map_conv as small_map_conv_lib

# Channels per conv layer, "M" = 2×2 max-pool after the previous conv.
CFGS: dict[str, tuple] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}


def _quadrants(x: jax.Array) -> tuple:
  """The four corners of every 2×2 window, in the window's row-major order."""
  return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


@jax.custom_jvp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2×2 max-pool, stride 2, of an NHWC map with even height and width.

  Computes exactly what ``nnx.max_pool(x, (2, 2), strides=(2, 2))`` computes, values and
  derivatives: the tangent (and so the cotangent) of a window goes to its first maximum in
  row-major order, as ``lax.reduce_window``'s derivative (select-and-scatter) does. Why by
  hand: XLA:CPU runs reduce-window and select-and-scatter in its generic loop emitter; as a
  maximum of the four strided quadrants with this rule the forward and backward pool is
  3-15× faster there (``benchmarks/README.md``, fix 3), and it stays an ordinary
  differentiable function (forward mode, Hessians) on every backend.
  """
  n, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"max_pool_2x2: the map is {h}×{w}; height and width must be even")
  a, b, c_, d = _quadrants(x)
  return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c_, d))


@max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  y = max_pool_2x2(x)
  a, b, c, _ = _quadrants(x)
  first_a = a == y
  first_b = (b == y) & ~first_a
  first_c = (c == y) & ~(first_a | first_b)
  ta, tb, tc, td = _quadrants(t)
  return y, jnp.where(first_a, ta, jnp.where(first_b, tb, jnp.where(first_c, tc, td)))


def scaled_channels(c: int, width: float) -> int:
  """``round(c · width)``, at least 1."""
  return max(1, int(round(c * width)))


class ConvBlock(nnx.Module):
  """conv 3×3 SAME -> BatchNorm -> ReLU [-> max-pool 2×2] [-> flatten]."""

  def __init__(self, in_features: int, out_features: int, *, pool: bool, flatten: bool,
               dtype: Any, param_dtype: Any, rngs: nnx.Rngs, small_map_conv: bool = False):
    conv_fn = (small_map_conv_lib.conv_general_dilated if small_map_conv
               else jax.lax.conv_general_dilated)
    self.conv = nnx.Conv(in_features, out_features, kernel_size=(3, 3), padding="SAME",
                         use_bias=False, dtype=dtype, param_dtype=param_dtype,
                         conv_general_dilated=conv_fn, rngs=rngs)
    self.bn = nnx.BatchNorm(out_features, momentum=0.9, epsilon=1e-5, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
    self.pool = pool
    self.flatten = flatten

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn(self.conv(x)))
    if self.pool:
      x = max_pool_2x2(x)
    if self.flatten:
      x = x.reshape(x.shape[0], -1)
    return x


class VGG(nnx.Module):
  """VGG-BN for 32×32 images: a chain of :class:`ConvBlock` then one dense classifier.

  The module follows NNX's train/eval convention: ``model.train()`` (the default after
  construction) normalizes with batch statistics and updates the running averages,
  ``model.eval()`` uses the running averages.
  """

  def __init__(self, cfg: Sequence[Union[int, str]], num_classes: int, *, width: float = 1.0,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               in_features: int = 3, image_size: int = 32, rngs: nnx.Rngs,
               small_map_conv: Optional[bool] = None):
    if width <= 0:
      raise ValueError(f"width must be positive, got {width}")
    convs = []  # (out_features, pool_after)
    for item in cfg:
      if item == "M":
        if not convs or convs[-1][1]:
          raise ValueError(f"VGG cfg {cfg}: a pool must follow a conv")
        convs[-1] = (convs[-1][0], True)
      else:
        convs.append((scaled_channels(int(item), width), False))
    pools = sum(p for _, p in convs)
    if image_size % (2 ** pools):
      raise ValueError(f"image size {image_size} is not divisible by 2**{pools}")
    final_hw = image_size // 2 ** pools
    if small_map_conv is None:
      small_map_conv = jax.default_backend() == "cpu"
    blocks = []
    cin = in_features
    for i, (cout, pool) in enumerate(convs):
      blocks.append(ConvBlock(cin, cout, pool=pool, flatten=i == len(convs) - 1, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs,
                              small_map_conv=small_map_conv))
      cin = cout
    self.blocks = nnx.List(blocks)
    self.classifier = nnx.Linear(cin * final_hw * final_hw, num_classes, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    for block in self.blocks:
      x = block(x)
    return self.classifier(x).astype(jnp.float32)


def vgg(name: str, num_classes: int, width: float = 1.0, dtype: Any = jnp.float32, *,
        rngs: nnx.Rngs, param_dtype: Any = jnp.float32,
        small_map_conv: Optional[bool] = None) -> VGG:
  """VGG11/13/16/19 with BatchNorm for 32×32 inputs.

  Args:
    name: ``"vgg11"``, ``"vgg13"``, ``"vgg16"`` or ``"vgg19"``.
    num_classes: size of the classifier's output.
    width: channel multiplier; every conv has ``max(1, round(c · width))`` channels.
    dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``).
    rngs: initialization randomness.
    param_dtype: parameter dtype (fp32 by default, also in bf16 compute).
    small_map_conv: compute the convolutions on 2×2 maps as matrix products
      (:mod:`train.small_map_conv`); ``None`` (default): on the CPU backend only, where XLA's
      own lowering of them is slow. Untested for speed on GPU/TPU, hence off there.

  Returns:
    A :class:`VGG` in training mode.
  """
  key = name.lower()
  if key not in CFGS:
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(CFGS)}")
  return VGG(CFGS[key], num_classes, width=width, dtype=dtype, param_dtype=param_dtype,
             rngs=rngs, small_map_conv=small_map_conv)


# --------------------------------------------------------------------------------------------
# CIFAR ResNets (He, Zhang, Ren & Sun 2016, §4.2)

# 6n + 2 layers: three stages of n basic blocks.
RESNET_DEPTHS: dict[str, int] = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9,
                                 "resnet110": 18}
RESNET_STAGES = (16, 32, 64)  # channels per stage (×width); stages 2 and 3 start with stride 2
# "resnet20" (option A shortcuts, as in the paper's CIFAR experiments) and "resnet20b" (option
# B: 1×1 stride-2 convolution + BatchNorm where the shape changes).
RESNETS = tuple(RESNET_DEPTHS) + tuple(f"{name}b" for name in RESNET_DEPTHS)
MODELS = tuple(CFGS) + RESNETS


class ConvBN(nnx.Module):
  """One block of a residual unit or the stem: conv (no bias) -> BatchNorm [-> ReLU]."""

  def __init__(self, in_features: int, out_features: int, *, kernel_size: int = 3,
               stride: int = 1, relu: bool = True, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    self.conv = nnx.Conv(in_features, out_features, kernel_size=(kernel_size, kernel_size),
                         strides=stride, padding="SAME", use_bias=False, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    self.bn = nnx.BatchNorm(out_features, momentum=0.9, epsilon=1e-5, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
    self.relu = relu

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.bn(self.conv(x))
    return nnx.relu(x) if self.relu else x


def subsample_shortcut(x: jax.Array, out_features: int) -> jax.Array:
  """Option A: every other row and column, channels zero-padded (half on each side)."""
  x = x[:, ::2, ::2, :]
  pad = out_features - x.shape[-1]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))


class BasicBlock(nnx.Module):
  """Post-activation basic block: ``relu(S(x) + bn(conv(relu(bn(conv(x))))))``.

  ``S`` is the identity where the shape is kept; where it changes (stride 2, more channels)
  it is option A (:func:`subsample_shortcut`, no parameters) or option B (a 1×1 stride-2
  :class:`ConvBN` without ReLU).
  """

  def __init__(self, in_features: int, out_features: int, *, stride: int, option: str,
               dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.main = nnx.List([ConvBN(in_features, out_features, stride=stride, **kw),
                          ConvBN(out_features, out_features, relu=False, **kw)])
    changes = stride != 1 or in_features != out_features
    self.option = option if changes else "identity"
    self.shortcut = nnx.List(
        [ConvBN(in_features, out_features, kernel_size=1, stride=stride, relu=False, **kw)]
        if self.option == "B" else [])
    self.stride = stride
    self.out_features = out_features

  def __call__(self, x: jax.Array) -> jax.Array:
    f = x
    for block in self.main:
      f = block(f)
    if self.option == "B":
      s = self.shortcut[0](x)
    elif self.option == "A":
      s = subsample_shortcut(x, self.out_features) if self.stride == 2 else jnp.pad(
          x, ((0, 0), (0, 0), (0, 0), (0, self.out_features - x.shape[-1])))
    else:
      s = x
    return nnx.relu(s + f)


class ResNet(nnx.Module):
  """CIFAR ResNet: stem conv-BN-ReLU, 3 stages × n :class:`BasicBlock`, global average pool,
  dense classifier (He et al. 2016, §4.2). Train/eval mode as :class:`VGG`."""

  def __init__(self, n: int, num_classes: int, *, width: float = 1.0, option: str = "A",
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               in_features: int = 3, rngs: nnx.Rngs):
    if width <= 0:
      raise ValueError(f"width must be positive, got {width}")
    if option not in ("A", "B"):
      raise ValueError(f"option must be 'A' or 'B', got {option!r}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    stages = [scaled_channels(c, width) for c in RESNET_STAGES]
    self.stem = ConvBN(in_features, stages[0], **kw)
    units, cin = [], stages[0]
    for i, cout in enumerate(stages):
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        units.append(BasicBlock(cin, cout, stride=stride, option=option, **kw))
        cin = cout
    self.units = nnx.List(units)
    self.classifier = nnx.Linear(cin, num_classes, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.stem(x.astype(self.dtype))
    for unit in self.units:
      x = unit(x)
    return self.classifier(x.mean(axis=(1, 2))).astype(jnp.float32)


def resnet(name: str, num_classes: int, width: float = 1.0, dtype: Any = jnp.float32, *,
           rngs: nnx.Rngs, param_dtype: Any = jnp.float32) -> ResNet:
  """ResNet-20/32/44/56/110 for 32×32 inputs; a trailing ``b`` selects option-B shortcuts.

  Args:
    name: e.g. ``"resnet20"`` (option A: parameter-free subsampling shortcuts, as in He et
      al.'s CIFAR experiments) or ``"resnet20b"`` (option B: 1×1 stride-2 conv + BatchNorm).
    num_classes: size of the classifier's output.
    width: channel multiplier on 16-32-64.
    dtype: compute dtype; ``param_dtype``: parameter dtype.
    rngs: initialization randomness.

  Returns:
    A :class:`ResNet` in training mode.
  """
  key = name.lower()
  option = "B" if key.endswith("b") else "A"
  depth = key[:-1] if option == "B" else key
  if depth not in RESNET_DEPTHS:
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
  return ResNet(RESNET_DEPTHS[depth], num_classes, width=width, option=option, dtype=dtype,
                param_dtype=param_dtype, rngs=rngs)


def create(name: str, num_classes: int, width: float = 1.0, dtype: Any = jnp.float32, *,
           rngs: nnx.Rngs, param_dtype: Any = jnp.float32,
           small_map_conv: Optional[bool] = None) -> nnx.Module:
  """Any model of :data:`MODELS` by name (``small_map_conv`` only concerns the VGGs)."""
  if name.lower() in CFGS:
    return vgg(name, num_classes, width, dtype, rngs=rngs, param_dtype=param_dtype,
               small_map_conv=small_map_conv)
  return resnet(name, num_classes, width, dtype, rngs=rngs, param_dtype=param_dtype)
