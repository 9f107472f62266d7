"""train.models: the CIFAR ResNets of He et al. (2016) and the by-name factory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import models


def _count(model):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name,units,params", [
    # Option A: the parameter counts of the usual reimplementations (0.27M, 0.85M: He et al.
    # Table 6); option B adds two 1x1 projections with BatchNorm.
    ("resnet20", 9, 269_722), ("resnet56", 27, 853_018),
    ("resnet20b", 9, 269_722 + 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64)])
def test_resnet_structure_and_parameter_count(name, units, params):
  model = nnx.eval_shape(lambda: models.create(name, 10, rngs=nnx.Rngs(0)))
  assert len(model.units) == units
  assert _count(model) == params
  assert [u.option for u in model.units][units // 3] == ("B" if name.endswith("b") else "A")
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda st, x: nnx.merge(graphdef, st)(x), state,
                       jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert out.shape == (2, 10) and out.dtype == jnp.float32


def test_resnet_width_bf16_and_option_a_shortcut():
  model = models.create("resnet20", 10, width=1 / 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert model.stem.conv.out_features == 2 and model.classifier.in_features == 8
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert model(jnp.ones((2, 32, 32, 3))).dtype == jnp.float32
  x = jnp.arange(2 * 4 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 4, 2)
  s = models.subsample_shortcut(x, 4)
  np.testing.assert_array_equal(s[..., 1:3], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(s[..., 0], 0)
  np.testing.assert_array_equal(s[..., 3], 0)


def test_create_and_models_list():
  assert set(models.MODELS) >= {"vgg11", "vgg19", "resnet20", "resnet32", "resnet56",
                                "resnet20b"}
  assert isinstance(nnx.eval_shape(lambda: models.create("vgg11", 10, width=1 / 16,
                                                         rngs=nnx.Rngs(0))), models.VGG)
  with pytest.raises(ValueError, match="unknown model 'resnet21'"):
    models.create("resnet21", 10, rngs=nnx.Rngs(0))
