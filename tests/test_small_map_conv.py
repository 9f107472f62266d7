"""train/small_map_conv.py: the matrix-product form equals lax.conv, in value and derivatives,
and the VGG built with it is the same model (parameters, annotations, outputs, gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_bm
from train import models
from train import small_map_conv as smc

_NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _lax(x, w, padding="SAME", strides=None):
  return jax.lax.conv_general_dilated(x, w, strides or (1,) * (x.ndim - 2), padding,
                                      dimension_numbers=_spec(x))


def _spec(x):
  return {4: _NHWC, 3: ("NHC", "HIO", "NHC"), 5: ("NDHWC", "DHWIO", "NDHWC")}[x.ndim]


def _ours(x, w, padding="SAME", strides=None):
  return smc.conv_general_dilated(x, w, strides or (1,) * (x.ndim - 2), padding,
                                  dimension_numbers=_spec(x))


def _uses_small_map_path(x, w, **kw):
  jaxpr = jax.make_jaxpr(lambda x, w: _ours(x, w, **kw))(x, w)
  return "optimization_barrier" in str(jaxpr)


def _rand(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


# (input map, kernel, padding, strides, small-map path expected)
CASES = [
    ((2, 2), (3, 3), "SAME", None, True),
    ((1, 1), (3, 3), "SAME", None, True),
    ((1, 2), (3, 3), "SAME", None, True),
    ((2, 1), (3, 3), ((1, 1), (1, 1)), None, True),  # SAME written as explicit pads
    ((3, 3), (5, 5), "SAME", None, True),  # 5×5 kernel reaches a 3×3 map
    ((2,), (3,), "SAME", None, True),  # 1-D
    ((2, 2, 2), (3, 3, 3), "SAME", None, True),  # 3-D
    ((3, 3), (3, 3), "SAME", None, False),  # map not smaller than the kernel
    ((4, 4), (3, 3), "SAME", None, False),
    ((2, 2), (3, 3), "VALID", None, False),  # VALID: not a small map case
    ((2, 2), (3, 3), ((0, 2), (1, 1)), None, False),  # asymmetric pads
    ((2, 2), (3, 3), "SAME", (2, 2), False),  # strided
    ((4, 4), (5, 5), "SAME", None, False),  # 4 > lo + 1: some taps fall outside
]


@pytest.mark.parametrize("map_shape,kernel,padding,strides,small", CASES)
def test_equals_lax_conv_in_value_and_gradients(x64, map_shape, kernel, padding, strides,
                                               small):
  x = _rand((3, *map_shape, 4), 0)
  w = _rand((*kernel, 4, 5), 1)
  assert _uses_small_map_path(x, w, padding=padding, strides=strides) == small
  want = _lax(x, w, padding, strides)
  got = _ours(x, w, padding, strides)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  assert got.dtype == want.dtype

  # The matrix-product form (the JVP rule) gives the value under differentiation.
  y_jvp, _ = jax.jvp(lambda x: _ours(x, w, padding, strides), (x,), (x,))
  np.testing.assert_allclose(y_jvp, want, rtol=1e-12, atol=1e-12)
  weights = _rand(want.shape, 2)  # a loss that tells output positions apart

  def loss(conv):
    return lambda x, w: jnp.sum(weights * jnp.sin(conv(x, w, padding, strides)))

  for a, b in zip(jax.grad(loss(_ours), (0, 1))(x, w), jax.grad(loss(_lax), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_forward_mode_and_second_derivatives(x64):
  """jvp, linearize + linear_transpose (what optax_bm.hessian uses) and jax.hessian."""
  x, w = _rand((2, 2, 2, 3), 2), _rand((3, 3, 3, 2), 3)
  dx, dw = _rand(x.shape, 4), _rand(w.shape, 5)
  assert _uses_small_map_path(x, w)
  (y0, t0), (y1, t1) = (jax.jvp(f, (x, w), (dx, dw)) for f in (_lax, _ours))
  np.testing.assert_allclose(y1, y0, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(t1, t0, rtol=1e-12, atol=1e-12)
  _, lin = jax.linearize(lambda x: _ours(x, w), x)
  (vjp,) = jax.linear_transpose(lin, x)(y0)
  np.testing.assert_allclose(vjp, jax.vjp(lambda x: _lax(x, w), x)[1](y0)[0], rtol=1e-12)

  def scalar(f):
    return lambda v: jnp.sum(jnp.tanh(f(v.reshape(x.shape), w)) ** 2)

  np.testing.assert_allclose(jax.hessian(scalar(_ours))(x.ravel()),
                             jax.hessian(scalar(_lax))(x.ravel()), rtol=1e-9, atol=1e-12)


def test_low_precision_and_preferred_element_type():
  x = jax.random.normal(jax.random.key(0), (4, 2, 2, 8), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (3, 3, 8, 8), jnp.bfloat16)
  got = _ours(x, w)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), _lax(x, w).astype(jnp.float32),
                             rtol=5e-2, atol=5e-2)
  out = smc.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_NHWC,
                                 preferred_element_type=jnp.float32)
  assert out.dtype == jnp.float32
  grads = jax.grad(lambda x, w: jnp.sum(_ours(x, w).astype(jnp.float32)), (0, 1))(x, w)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


def test_no_operand_swapped_convolution_in_the_compiled_gradient():
  """The point of the module: XLA gets no conv with the 2×2 activations as the kernel (HLO
  marks those with rhs_reversal; XLA:CPU runs them in its slow generic loop emitter)."""
  x = jnp.ones((8, 2, 2, 16))
  w = jnp.ones((3, 3, 16, 16))
  hlo = jax.jit(jax.grad(lambda x, w: jnp.sum(_ours(x, w) ** 2), (0, 1))).lower(
      x, w).compile().as_text()
  convs = [line for line in hlo.splitlines() if " convolution(" in line]
  assert not [c for c in convs if "rhs_reversal" in c], convs


def _vgg_pair(name="vgg11", dtype=jnp.float32):
  return [models.vgg(name, 10, 1 / 16, dtype=dtype, rngs=nnx.Rngs(0), small_map_conv=on)
          for on in (False, True)]


def test_vgg_default_uses_it_on_cpu_only_for_the_2x2_maps():
  model = models.vgg("vgg11", 10, 1 / 16, rngs=nnx.Rngs(0))
  assert jax.default_backend() == "cpu"
  assert all(b.conv.conv_general_dilated is smc.conv_general_dilated for b in model.blocks)
  graphdef, state = nnx.split(model)
  jaxpr = str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(
      state, jnp.zeros((2, 32, 32, 3))))
  assert jaxpr.count("optimization_barrier") == 2  # VGG11 has two convolutions on 2×2 maps
  off = models.vgg("vgg11", 10, 1 / 16, rngs=nnx.Rngs(0), small_map_conv=False)
  assert all(b.conv.conv_general_dilated is jax.lax.conv_general_dilated for b in off.blocks)


@pytest.mark.parametrize("name", ["vgg11", "vgg16"])
def test_vgg_same_model_with_and_without(name):
  plain, fast = _vgg_pair(name)
  assert (jax.tree.map(jnp.shape, nnx.state(plain, nnx.Param))
          == jax.tree.map(jnp.shape, nnx.state(fast, nnx.Param)))
  sample = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  assert optax_bm.annotate(plain, sample) == optax_bm.annotate(fast, sample)

  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  labels = jnp.arange(8) % 10

  def loss_and_grads(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
      m = nnx.merge(graphdef, p, rest, copy=True)
      logits = m(x)
      ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels])
      return ce, nnx.state(m, nnx.BatchStat)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (l0, stats0), g0 = loss_and_grads(plain)
  (l1, stats1), g1 = loss_and_grads(fast)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))))
  for a, b in zip(jax.tree.leaves(stats0), jax.tree.leaves(stats1)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  plain.eval()
  fast.eval()
  np.testing.assert_allclose(nnx.jit(lambda m: m(x))(fast), nnx.jit(lambda m: m(x))(plain),
                             rtol=1e-4, atol=1e-5)
