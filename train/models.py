"""VGG with BatchNorm for 32×32 inputs (CIFAR), in Flax NNX.

The network is an explicit chain of blocks, as `optax_bm.annotate` expects (SPEC §1): every
block starts at one kernel layer and holds what follows it up to the next one,

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
MODELS = tuple(CFGS)


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
      x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
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
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
  return VGG(CFGS[key], num_classes, width=width, dtype=dtype, param_dtype=param_dtype,
             rngs=rngs, small_map_conv=small_map_conv)
