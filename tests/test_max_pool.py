"""train.models.max_pool_2x2: the same function as nnx.max_pool's 2×2 / stride-2 pool, in
value and in every derivative (bit for bit, ties included), and the VGG built with it is the
same model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_bm
from train import models


def _reference(x):
  return nnx.max_pool(x, (2, 2), strides=(2, 2))


def _inputs():
  key = jax.random.key(0)
  # After a ReLU most windows of a narrow layer hold zeros: ties are the common case. Small
  # integers add ties between positive values too.
  relu = jax.nn.relu(jax.random.normal(key, (4, 8, 6, 5)))
  ints = jax.random.randint(jax.random.fold_in(key, 1), (4, 8, 6, 5), -2, 3).astype(jnp.float32)
  return [relu, ints, jnp.zeros((2, 4, 4, 3))]


@pytest.mark.parametrize("which", range(3))
def test_same_values_and_derivatives_bit_for_bit(which):
  x = _inputs()[which]
  y = models.max_pool_2x2(x)
  np.testing.assert_array_equal(y, _reference(x))
  ct = jax.random.normal(jax.random.key(2), y.shape)
  # Reverse mode: the cotangent of a window goes to its first maximum, as select-and-scatter.
  for f in (jax.jit, lambda g: g):
    np.testing.assert_array_equal(f(lambda x: jax.vjp(models.max_pool_2x2, x)[1](ct)[0])(x),
                                  jax.vjp(_reference, x)[1](ct)[0])
  t = jax.random.normal(jax.random.key(3), x.shape)
  np.testing.assert_array_equal(jax.jvp(models.max_pool_2x2, (x,), (t,))[1],
                                jax.jvp(_reference, (x,), (t,))[1])


def test_second_derivatives_as_the_reference():
  x = jax.random.normal(jax.random.key(4), (2, 4, 4, 3))
  v = jax.random.normal(jax.random.key(5), x.shape)

  def hvp(pool):
    f = lambda x: jnp.sum(jnp.sin(pool(x)) ** 2)  # noqa: E731
    return jax.jvp(jax.grad(f), (x,), (v,))[1]

  np.testing.assert_allclose(hvp(models.max_pool_2x2), hvp(_reference), rtol=1e-6, atol=1e-7)


def test_odd_maps_are_refused():
  with pytest.raises(ValueError, match="the map is 5×4; height and width must be even"):
    models.max_pool_2x2(jnp.zeros((1, 5, 4, 2)))


def test_no_reduce_window_in_the_vgg_step():
  model = models.vgg("vgg11", 10, 1 / 16, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p, x):
    return jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(x))

  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, jnp.zeros((2, 32, 32, 3))))
  assert "reduce_window" not in jaxpr and "select_and_scatter" not in jaxpr


def test_vgg_same_model_with_either_pool(monkeypatch):
  sample = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  labels = jnp.arange(8) % 10

  def run():
    model = models.vgg("vgg11", 10, 1 / 8, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
      m = nnx.merge(graphdef, p, rest, copy=True)
      ce = -jnp.mean(jax.nn.log_softmax(m(x))[jnp.arange(8), labels])
      return ce, nnx.state(m, nnx.BatchStat)

    return optax_bm.annotate(model, sample), jax.jit(jax.value_and_grad(loss, has_aux=True))(
        params)

  specs, ((l1, stats1), g1) = run()
  monkeypatch.setattr(models, "max_pool_2x2", _reference)
  model = models.vgg("vgg11", 10, 1 / 8, rngs=nnx.Rngs(0))
  model.eval()
  assert "reduce_window" in str(jax.make_jaxpr(lambda x: model(x))(x))  # the patch took
  ref_specs, ((l0, stats0), g0) = run()
  assert specs == ref_specs
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves((g0, stats0)), jax.tree.leaves((g1, stats1))):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(a))))
