"""Local Hessians (exact, matrix-free, spectral estimates) and supplement eqs. 7–10, 14–19.

Precision checks run in float64 (``jax.enable_x64`` fixture, restored afterwards); the
matrix-free smoke test runs in float32 as users would.
"""

import math

import chex
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_bm
from optax_bm import backmatching
from optax_bm import hessian as hs
from optax_bm.specs import LayerSpec, path_str
from tests import nets

DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _conv(kernel, x, stride=1, padding="SAME"):
  strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DN)


def _leaf(tree, path):
  """The leaf of ``tree`` at a path like ``conv/kernel`` (NNX's ``.value`` dropped)."""
  found = [x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if path_str(p) == path]
  assert len(found) == 1, path
  return found[0]


def _replace(tree, path, value):
  return jax.tree_util.tree_map_with_path(lambda p, x: value if path_str(p) == path else x, tree)


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


# --- small blocks (Flax NNX modules from tests/nets.py, run as pure functions) --------------


def _block(name):
  """(fn, params, z): a small block in float64 and an input batch."""
  r = nnx.Rngs(3)
  f64 = jnp.float64
  if name == "dense":
    mod, z = nets.DenseBlock(5, 4, rngs=r, relu=True, dtype=f64), _normal(1, (6, 5))
  elif name == "dense_bn":
    mod, z = nets.DenseBlock(5, 4, rngs=r, bn=True, relu=True, dtype=f64), _normal(1, (6, 5))
  elif name == "conv":
    mod, z = nets.ConvBlock(2, 3, rngs=r, bn=False, dtype=f64), _normal(1, (3, 5, 5, 2))
  elif name == "conv_bn_pool":
    mod = nets.ConvBlock(2, 3, rngs=r, bn=True, pool=True, tail="flatten", dtype=f64)
    z = _normal(1, (3, 6, 6, 2))
  elif name == "conv_bn_stride2":
    mod, z = nets.ConvBlock(2, 3, rngs=r, stride=2, bn=True, dtype=f64), _normal(1, (3, 6, 6, 2))
  else:
    raise ValueError(name)
  (fn,), (params,) = backmatching.nnx_blocks([mod])
  # Non-trivial BatchNorm scale/offset and bias, so no parameter sits at a special value.
  leaves, treedef = jax.tree.flatten(params)
  leaves = [l if l.ndim > 1 else l + 0.3 * _normal(10 + i, l.shape) for i, l in enumerate(leaves)]
  return fn, jax.tree.unflatten(treedef, leaves), z


BLOCKS = ["dense", "dense_bn", "conv", "conv_bn_pool", "conv_bn_stride2"]


def _hessian_of_local_loss(fn, params, z, wrt):
  """jax.hessian of the back-matching loss at the matching point (target = F(θ, z))."""
  target = jax.lax.stop_gradient(fn(params, z))
  n = z.shape[0]
  point = params if wrt == "params" else z
  flat, unravel = ravel_pytree(point)

  def loss(v):
    out = fn(unravel(v), z) if wrt == "params" else fn(params, unravel(v))
    sq = 0.5 * jnp.sum(jnp.square(target - out))
    return sq / n if wrt == "params" else sq

  return jax.jit(jax.hessian(loss))(flat)


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("wrt", ["params", "input"])
def test_local_hessian_is_hessian_of_local_loss_at_matching_point(x64, name, wrt):
  fn, params, z = _block(name)
  got = hs.local_hessian(fn, params, z, wrt)
  want = _hessian_of_local_loss(fn, params, z, wrt)
  scale = float(jnp.abs(want).max())
  assert scale > 0
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * scale)
  np.testing.assert_allclose(got, got.T, rtol=0, atol=1e-12 * scale)


def test_local_hessian_is_not_hessian_away_from_matching_point(x64):
  """Guard against a vacuous check: with a residual, BN's curvature term makes them differ."""
  fn, params, z = _block("dense_bn")
  target = fn(params, z) + 0.5 * _normal(7, (6, 4))
  flat, unravel = ravel_pytree(z)
  full = jax.jit(jax.hessian(lambda v: 0.5 * jnp.sum(jnp.square(target - fn(params, unravel(v))))))(flat)
  gn = hs.local_hessian(fn, params, z, "input")
  assert float(jnp.abs(full - gn).max()) > 1e-3 * float(jnp.abs(gn).max())


@pytest.mark.parametrize("name,wrt", [("dense_bn", "input"), ("conv_bn_pool", "params")])
def test_hvp_and_operator_match_dense(x64, name, wrt):
  fn, params, z = _block(name)
  dense = hs.local_hessian(fn, params, z, wrt)
  op = hs.gauss_newton_operator(fn, params, z, wrt)
  v = _normal(5, (op.dim,))
  want = dense @ v
  tol = 1e-11 * float(jnp.abs(want).max())
  np.testing.assert_allclose(op.matvec(v), want, rtol=0, atol=tol)
  np.testing.assert_allclose(hs.hvp(fn, params, z, v, wrt), want, rtol=0, atol=tol)
  v_tree = op.unravel(v)
  got_tree = hs.hvp(fn, params, z, v_tree, wrt)
  chex.assert_trees_all_equal_structs(got_tree, v_tree)
  np.testing.assert_allclose(ravel_pytree(got_tree)[0], want, rtol=0, atol=tol)
  np.testing.assert_allclose(jax.jit(op.matvec)(v), want, rtol=0, atol=tol)


def test_bad_wrt_and_sizes(x64):
  fn, params, z = _block("dense")
  with pytest.raises(ValueError, match="wrt"):
    hs.local_hessian(fn, params, z, "weights")
  with pytest.raises(ValueError, match="entries"):
    hs.hvp(fn, params, z, jnp.ones(3), "params")
  with pytest.raises(ValueError, match="num_steps"):
    hs.lanczos(lambda v: v, 4, 5, jax.random.key(0))


# --- Lanczos, quadrature, traces -------------------------------------------------------------


class _Case:
  """A small singular local Hessian (conv + BN + ReLU + pool, H_z, dim 108) and its spectrum;
  ``run(f, *args)`` jits ``f(operator, *args)`` with the operator built inside the jit."""

  def __init__(self):
    self.fn, self.params, self.z = _block("conv_bn_pool")
    self.dense = hs.local_hessian(self.fn, self.params, self.z, "input")
    self.dim = self.dense.shape[0]
    self.evals = jnp.linalg.eigvalsh(self.dense)
    self._jitted = {}

  def run(self, f, *args):
    if f not in self._jitted:
      g = lambda p, z, *a: f(hs.gauss_newton_operator(self.fn, p, z, "input"), *a)
      self._jitted[f] = jax.jit(g)
    return self._jitted[f](self.params, self.z, *args)


@pytest.fixture
def spectrum_case(x64):
  return _Case()


def test_lanczos_full_run_recovers_spectrum(spectrum_case):
  """num_steps = dim with reorthogonalization: Ritz values are the eigenvalues (the zero
  eigenvalue's multiplicity forces breakdowns and restarts, which must be handled)."""
  c = spectrum_case
  res = c.run(lambda op, k: hs.lanczos(op.matvec, op.dim, op.dim, k), jax.random.key(0))
  assert int(jnp.sum(res.betas == 0)) > 0  # the restart path was exercised
  np.testing.assert_allclose(res.ritz_values, c.evals, rtol=0, atol=1e-9 * float(c.evals[-1]))
  np.testing.assert_allclose(jnp.sum(res.weights), 1.0, atol=1e-12)


@pytest.mark.parametrize("reorth", [True, False])
def test_lanczos_extreme_eigenvalues(spectrum_case, reorth):
  """30 of 108 steps: λ_max to 1e-8 relative; all Ritz values inside the spectrum (interlacing);
  λ_min (= 0 here: ReLU-dead outputs, BN invariances) approached from above to 2% of λ_max."""
  c = spectrum_case
  lam_max = float(c.evals[-1])
  res = c.run(lambda op, k: hs.lanczos(op.matvec, op.dim, 30, k, reorthogonalize=reorth),
              jax.random.key(1))
  assert abs(float(res.ritz_values[-1]) - lam_max) <= 1e-8 * lam_max
  assert float(res.ritz_values[0]) >= float(c.evals[0]) - 1e-10 * lam_max
  assert float(res.ritz_values[-1]) <= lam_max * (1 + 1e-10)
  assert float(res.ritz_values[0]) <= float(c.evals[0]) + 0.02 * lam_max
  if reorth:  # no ghosts: distinct Ritz values near the top
    assert float(res.ritz_values[-1] - res.ritz_values[-2]) > 1e-6 * lam_max


def test_lanczos_reproducible_for_a_key(spectrum_case):
  c = spectrum_case
  f = lambda op, k: hs.lanczos(op.matvec, op.dim, 20, k)
  a, b, d = (c.run(f, jax.random.key(i)) for i in (3, 3, 4))
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(a.alphas, d.alphas)


def test_lanczos_quadrature_is_exact_for_low_moments(spectrum_case):
  """k steps: Σ w θ^p = v^T H^p v / v^T v for p < 2k (Gauss quadrature), with the same start."""
  c = spectrum_case
  v = jax.random.rademacher(jax.random.key(9), (c.dim,), jnp.float64)
  k = 6
  res = c.run(lambda op, v: hs.lanczos(op.matvec, op.dim, k, jax.random.key(0), start=v), v)
  u = v / jnp.linalg.norm(v)
  hp = u
  for p in range(1, 2 * k):
    hp = c.dense @ hp
    want = float(u @ hp)
    got = float(jnp.sum(res.weights * res.ritz_values ** p))
    assert abs(got - want) <= 1e-8 * abs(want), (p, got, want)


def test_spectral_density_mean_and_zero_mass(spectrum_case):
  """SLQ: the estimated mean eigenvalue is within 4 exact standard errors of tr/dim; the mass
  at (near) zero estimates the fraction of zero eigenvalues within 0.1."""
  c = spectrum_case
  probes = 20
  sd = c.run(lambda op, k: hs.spectral_density(op.matvec, op.dim, 25, probes, k),
             jax.random.key(2))
  chex.assert_shape(sd.nodes, (probes, 25))
  np.testing.assert_allclose(jnp.sum(sd.weights), 1.0, atol=1e-12)
  mean = float(jnp.trace(c.dense)) / c.dim
  off = c.dense - jnp.diag(jnp.diag(c.dense))
  sigma = math.sqrt(2 * float(jnp.sum(off ** 2)) / probes) / c.dim
  assert abs(float(sd.mean()) - mean) <= 4 * sigma
  lam_max = float(c.evals[-1])
  zero_frac = float(jnp.mean(c.evals <= 1e-9 * lam_max))
  assert zero_frac > 0.2  # the case is genuinely singular
  assert abs(float(sd.mass_below(1e-6 * lam_max)) - zero_frac) <= 0.1
  grid = jnp.linspace(-1.0, lam_max + 1.0, 2001)
  dens = sd.smoothed(grid, 0.05 * lam_max)
  assert abs(float(jnp.sum(dens) * (grid[1] - grid[0])) - 1.0) < 1e-3


def test_hutchinson_within_exact_standard_error(spectrum_case):
  """Rademacher Hutchinson: |estimate − tr H| <= 4 σ, σ² = 2(‖H‖_F² − Σ H_ii²)/S exactly; the
  reported standard error is within a factor 2 of σ; reproducible for a key."""
  c = spectrum_case
  s = 200
  f = lambda op, k: (hs.hutchinson_trace(op.matvec, op.dim, s, k),
                     hs.mean_eigenvalue(op.matvec, op.dim, s, k))
  est, me = c.run(f, jax.random.key(5))
  tr = float(jnp.trace(c.dense))
  off = c.dense - jnp.diag(jnp.diag(c.dense))
  sigma = math.sqrt(2 * float(jnp.sum(off ** 2)) / s)
  assert abs(float(est.value) - tr) <= 4 * sigma
  assert 0.5 * sigma <= float(est.stderr) <= 2 * sigma
  assert sigma < 0.05 * tr  # the check has teeth
  again, _ = c.run(f, jax.random.key(5))
  chex.assert_trees_all_equal(est, again)
  np.testing.assert_allclose(me.value, est.value / c.dim, rtol=1e-14)
  np.testing.assert_allclose(me.stderr, est.stderr / c.dim, rtol=1e-14)


def test_hutchpp_exact_on_low_rank_and_close_otherwise(spectrum_case):
  """H_θ of a dense block with 2 examples × 3 outputs has rank <= 6: Hutch++ with k = 8 is
  exact (plain Hutchinson is not); on the singular conv case it is within 4 of its own
  standard errors."""
  mod = nets.DenseBlock(10, 3, rngs=nnx.Rngs(0), dtype=jnp.float64)
  (fn,), (params,) = backmatching.nnx_blocks([mod])
  z = _normal(2, (2, 10))
  tr = float(jnp.trace(hs.local_hessian(fn, params, z, "params")))

  @jax.jit
  def both(params, z, key):
    op = hs.gauss_newton_operator(fn, params, z, "params")
    return (hs.hutchpp_trace(op.matvec, op.dim, 24, key),
            hs.hutchinson_trace(op.matvec, op.dim, 24, key))

  est, plain = both(params, z, jax.random.key(0))
  assert abs(float(est.value) - tr) <= 1e-10 * tr
  assert abs(float(plain.value) - tr) > 1e-6 * tr
  c = spectrum_case
  est2 = c.run(lambda op, k: hs.hutchpp_trace(op.matvec, op.dim, 60, k), jax.random.key(1))
  assert abs(float(est2.value) - float(jnp.trace(c.dense))) <= 4 * float(est2.stderr)


# --- the scalar local Hessians beside the measured mean eigenvalue ----------------------


def test_compare_with_scalars_matches_dense_traces(x64):
  mod = nets.ConvBlock(2, 3, rngs=nnx.Rngs(1), bn=True, pool=True, dtype=jnp.float64)
  (fn,), (params,) = backmatching.nnx_blocks([mod])
  z = _normal(4, (4, 6, 6, 2))
  specs = nets.hand_specs(params, 0, "conv", 36, 4.0, True)
  cmp = hs.compare_with_scalars(fn, params, z, specs, jax.random.key(0), num_samples=400)
  dense_p = hs.local_hessian(fn, params, z, "params")
  dense_z = hs.local_hessian(fn, params, z, "input")
  # Kernel block of H_θ: flattened-params order is bias, kernel (sorted keys), then bn.
  kernel_w = _leaf(params, "conv/kernel")
  fn_w = lambda w, x: fn(_replace(params, "conv/kernel", w), x)
  want_w = float(jnp.trace(hs.local_hessian(fn_w, kernel_w, z, "params"))) / kernel_w.size
  want_z = float(jnp.trace(dense_z)) / dense_z.shape[0]
  assert abs(float(cmp.mean_w) - want_w) <= 4 * float(cmp.mean_w_stderr)
  assert abs(float(cmp.mean_z) - want_z) <= 4 * float(cmp.mean_z_stderr)
  assert float(cmp.mean_w_stderr) < 0.1 * want_w and float(cmp.mean_z_stderr) < 0.1 * want_z
  sc = optax_bm.local_hessian_scalars(_leaf(specs, "conv/kernel"), kernel_w)
  np.testing.assert_allclose(cmp.m_w, sc.m_w)
  np.testing.assert_allclose(cmp.m_z, sc.m_z)
  np.testing.assert_allclose(cmp.m_a, sc.m_a)
  assert cmp.dim_w == kernel_w.size and cmp.dim_z == z.size
  # The other parameters' mean eigenvalues are exact: under BN the conv bias is a null direction.
  np.testing.assert_allclose(cmp.mean_a["conv/bias"], 0.0, atol=1e-12 * want_w)
  del dense_p
  for path in ("bn/scale", "bn/bias"):
    leaf = _leaf(params, path)
    fn_l = lambda v, x, path=path: fn(_replace(params, path, v), x)
    want = float(jnp.trace(hs.local_hessian(fn_l, leaf, z, "params"))) / leaf.size
    np.testing.assert_allclose(cmp.mean_a[path], want, rtol=1e-12)


def test_spec_scalars_are_exact_for_a_linear_valid_conv(x64):
  """Where the scalars' derivation has no approximation: a bias-free conv without BN or ReLU,
  VALID padding (every tap in bounds). Then tr(H_z)/dim = ‖W‖²/(m_in c) = m_z exactly, with
  c = p1 p2 / (q1 q2), and tr(H_W)/dim = s · (mean square of the im2col entries), = m_W = s
  when the input has unit second moment."""
  kernel = _normal(0, (3, 3, 3, 4))
  x = _normal(1, (2, 7, 7, 3))
  fn = lambda w, z: _conv(w, z, 1, "VALID")
  q, p = 5 * 5, 7 * 7
  spec = LayerSpec(0, "kernel", "conv", s=q, c=p / q, normalized=False)
  sc = optax_bm.local_hessian_scalars(spec, kernel)
  h_z = hs.local_hessian(fn, kernel, x, "input")
  np.testing.assert_allclose(jnp.trace(h_z) / h_z.shape[0], sc.m_z, rtol=1e-12)
  h_w = hs.local_hessian(fn, kernel, x, "params")
  a = hs.im2col(x, (3, 3), 1, "VALID")
  np.testing.assert_allclose(jnp.trace(h_w) / h_w.shape[0], q * jnp.mean(a ** 2), rtol=1e-12)
  np.testing.assert_allclose(sc.m_w, q)
  # SAME padding loses the taps over the border: the scalar then overestimates by a known
  # amount, which the measurement must show.
  h_same = hs.local_hessian(lambda w, z: _conv(w, z, 1, "SAME"), kernel, x, "input")
  in_bounds = sum(((7 - abs(i - 1)) * (7 - abs(j - 1))) * float(jnp.sum(kernel[i, j] ** 2))
                  for i in range(3) for j in range(3))
  np.testing.assert_allclose(jnp.trace(h_same) / h_same.shape[0], in_bounds / (p * 3),
                             rtol=1e-12)
  assert in_bounds / (p * 3) < float(jnp.sum(kernel ** 2)) / 3  # below the SAME-conv scalar


# --- supplement §B: BN back-propagation, eqs. 7–10 -------------------------------------------


def test_bn_backprop_eqs_7_to_10_match_autodiff_and_flax(x64):
  m, m_in, n_out = 7, 5, 4
  kernel, z_prev = _normal(0, (m_in, n_out)), _normal(1, (m, m_in))
  gamma, beta = 1 + 0.3 * _normal(2, (n_out,)), 0.3 * _normal(3, (n_out,))
  target = _normal(4, (m, n_out))
  g = hs.bn_dense_backmatching_grads(kernel, z_prev, target, gamma, beta)

  def bn(zt):
    mu, var = zt.mean(0), zt.var(0)
    return gamma * (zt - mu) / jnp.sqrt(var + 1e-5) + beta

  loss_zt = lambda zt: 0.5 * jnp.sum(jnp.square(target - bn(zt)))
  tol = dict(rtol=1e-12, atol=1e-13)
  np.testing.assert_allclose(g.z, bn(z_prev @ kernel), **tol)
  np.testing.assert_allclose(g.dl_dz, g.z - target, **tol)  # (7)
  np.testing.assert_allclose(g.dl_dz_tilde, jax.grad(loss_zt)(z_prev @ kernel), **tol)  # (8)
  # ∂ℓ/∂Var and ∂ℓ/∂E as partial derivatives of ℓ(γ (z̃ − E)/sqrt(Var + ε) + β) at fixed z̃.
  zt = z_prev @ kernel
  part = lambda mu, var: 0.5 * jnp.sum(jnp.square(
      target - (gamma * (zt - mu) / jnp.sqrt(var + 1e-5) + beta)))
  dmu, dvar = jax.grad(part, (0, 1))(zt.mean(0), zt.var(0))
  np.testing.assert_allclose(g.dl_dvar, dvar, **tol)
  np.testing.assert_allclose(g.dl_dmean, dmu, **tol)
  loss = lambda w, z: 0.5 * jnp.sum(jnp.square(target - bn(z @ w)))
  dw, dz = jax.grad(loss, (0, 1))(kernel, z_prev)
  np.testing.assert_allclose(g.dl_dz_prev, dz, **tol)  # (9)
  np.testing.assert_allclose(g.dl_dkernel, dw, **tol)  # (10)
  # The same block built from Flax layers (dense with bias -> nnx.BatchNorm in training mode).
  lin = nnx.Linear(m_in, n_out, rngs=nnx.Rngs(0), param_dtype=jnp.float64, dtype=jnp.float64)
  bnm = nets.batch_norm(n_out, rngs=nnx.Rngs(0), dtype=jnp.float64)
  lin.kernel[...], lin.bias[...] = kernel, 0.5 * _normal(5, (n_out,))
  bnm.scale[...], bnm.bias[...] = gamma, beta
  (fn,), (params,) = backmatching.nnx_blocks([nnx.Sequential(lin, bnm)])
  flax_loss = lambda p, z: 0.5 * jnp.sum(jnp.square(target - fn(p, z)))
  gp, gz = jax.grad(flax_loss, (0, 1))(params, z_prev)
  np.testing.assert_allclose(gz, g.dl_dz_prev, rtol=1e-9, atol=1e-10)
  np.testing.assert_allclose(_leaf(gp, "layers/0/kernel"), g.dl_dkernel, rtol=1e-9, atol=1e-10)
  np.testing.assert_allclose(_leaf(gp, "layers/0/bias"), 0.0, atol=1e-10)  # BN removes the bias


def test_bn_backprop_defaults_are_identity_affine(x64):
  kernel, z_prev, target = _normal(0, (3, 2)), _normal(1, (5, 3)), _normal(2, (5, 2))
  a = hs.bn_dense_backmatching_grads(kernel, z_prev, target)
  b = hs.bn_dense_backmatching_grads(kernel, z_prev, target, jnp.ones(2), jnp.zeros(2))
  chex.assert_trees_all_close(a, b, rtol=0, atol=1e-14)
  np.testing.assert_allclose(a.z.mean(0), 0.0, atol=1e-12)


# --- supplement §C: convolution, eqs. 14–19 --------------------------------------------------

CONV_CASES = [((3, 3), 1, "SAME"), ((3, 3), 2, "SAME"), ((2, 3), 1, "VALID"),
              ((2, 3), (2, 1), ((1, 2), (0, 1))), ((1, 1), 1, "SAME")]
HESSIAN_CASES = [CONV_CASES[0], CONV_CASES[1], CONV_CASES[3]]


@pytest.mark.parametrize("window,stride,padding", CONV_CASES)
def test_eq14_im2col_forward_matches_lax(x64, window, stride, padding):
  kernel, x = _normal(0, (*window, 3, 4)), _normal(1, (2, 7, 6, 3))
  want = _conv(kernel, x, stride, padding)
  np.testing.assert_allclose(hs.conv_im2col(kernel, x, stride, padding), want, rtol=0,
                             atol=1e-12)
  a = hs.im2col(x, window, stride, padding)
  chex.assert_shape(a, (2, window[0] * window[1] * 3, want.shape[1] * want.shape[2]))
  b_col = hs.kernel_row(kernel) @ a  # literally eq. 14
  np.testing.assert_allclose(b_col, want.reshape(2, -1, 4).transpose(0, 2, 1), atol=1e-12)
  wa = hs.conv_as_matrix(kernel, (7, 6), stride, padding)
  np.testing.assert_allclose((x.reshape(2, -1) @ wa.T).reshape(want.shape), want, atol=1e-12)


@pytest.mark.parametrize("window,stride,padding", HESSIAN_CASES)
def test_eqs_15_16_backprop(x64, window, stride, padding):
  """δa = W_a^T δb per example (eq. 15, columns w_{j u1 u2 →}); δW_row = E δb_col a_i2c^T (16)."""
  kernel, x = _normal(0, (*window, 3, 4)), _normal(1, (3, 7, 6, 3))
  out, vjp = jax.vjp(lambda w, z: _conv(w, z, stride, padding), kernel, x)
  db = _normal(2, out.shape)
  dw, dx = vjp(db)
  wa = hs.conv_as_matrix(kernel, (7, 6), stride, padding)
  np.testing.assert_allclose((db.reshape(3, -1) @ wa).reshape(x.shape), dx, atol=1e-12)
  a = hs.im2col(x, window, stride, padding)
  db_col = db.reshape(3, -1, 4).transpose(0, 2, 1)
  dw_row = jnp.einsum("nku,npu->kp", db_col, a) / 3  # E over the batch
  np.testing.assert_allclose(dw_row, hs.kernel_row(dw) / 3, atol=1e-12)
  np.testing.assert_allclose(hs.kernel_col(kernel) @ hs.kernel_col(kernel).T,
                             jnp.einsum("hwik,hwjk->ij", kernel, kernel), atol=1e-12)


@pytest.mark.parametrize("window,stride,padding", HESSIAN_CASES)
def test_eq17_kernel_hessian(x64, window, stride, padding):
  """H_W = E a a^T: equals jax.hessian of (1/2N)Σ‖t − conv‖² at t = conv, and is block diagonal
  over output channels with identical blocks (H_{W_n} ⊗ I in Flax's flattened order)."""
  n_out = 3
  kernel, x = _normal(0, (*window, 2, n_out)), _normal(1, (4, 6, 5, 2))
  t = _conv(kernel, x, stride, padding)
  loss = lambda w: 0.5 * jnp.sum(jnp.square(t - _conv(w.reshape(kernel.shape), x, stride,
                                                        padding))) / x.shape[0]
  want = jax.jit(jax.hessian(loss))(kernel.ravel())
  got = hs.conv_kernel_hessian(x, window, n_out, stride, padding)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-11 * float(jnp.abs(want).max()))
  block = hs.conv_kernel_hessian(x, window, n_out, stride, padding, block_only=True)
  h4 = want.reshape(block.shape[0], n_out, block.shape[0], n_out)
  for k in range(n_out):
    np.testing.assert_allclose(h4[:, k, :, k], block, atol=1e-11 * float(jnp.abs(want).max()))
  off = h4.at[:, jnp.arange(n_out), :, jnp.arange(n_out)].set(0.0)
  assert float(jnp.abs(off).max()) == 0.0
  np.testing.assert_allclose(got, hs.local_hessian(lambda w, z: _conv(w, z, stride, padding),
                                                    kernel, x, "params"), atol=1e-10)


@pytest.mark.parametrize("window,stride,padding", HESSIAN_CASES)
def test_eqs_18_19_input_hessian(x64, window, stride, padding):
  """H_a = W_a^T W_a (eq. 19), entry (j,u),(k,v) = w_{ju→}·w_{kv→} (eq. 18): equals jax.hessian
  of ½Σ‖t − conv(W, a)‖² wrt the batch's input at t = conv, = I_N ⊗ H_a."""
  kernel, x = _normal(0, (*window, 2, 3)), _normal(1, (2, 5, 4, 2))
  t = _conv(kernel, x, stride, padding)
  loss = lambda v: 0.5 * jnp.sum(jnp.square(t - _conv(kernel, v.reshape(x.shape), stride,
                                                        padding)))
  want = jax.jit(jax.hessian(loss))(x.ravel())
  h_a = hs.conv_input_hessian(kernel, (5, 4), stride, padding)
  np.testing.assert_allclose(jnp.kron(jnp.eye(2), h_a), want, rtol=0,
                             atol=1e-11 * float(jnp.abs(want).max()))
  wa = hs.conv_as_matrix(kernel, (5, 4), stride, padding)
  col = lambda j, u1, u2: wa[:, (u1 * 4 + u2) * 2 + j]
  np.testing.assert_allclose(h_a[(1 * 4 + 2) * 2 + 0, (2 * 4 + 3) * 2 + 1],
                             col(0, 1, 2) @ col(1, 2, 3), atol=1e-12)


def test_wa_column_sparsity_and_c(x64):
  """Columns of W_a have at most n·⌈h/s⌉·⌈w/s⌉ non-zeros, and on average over an interior
  periodic cell n·wh/c with c = s1·s2 (supplement: 'approximately n × wh/c non-zero elements')."""
  n_out = 4
  kernel = _normal(0, (3, 3, 2, n_out))
  for stride, c in ((1, 1), (2, 4)):
    wa = hs.conv_as_matrix(kernel, (12, 12), stride, "SAME")
    nnz = jnp.sum(wa != 0, axis=0).reshape(12, 12, 2)
    bound = n_out * math.ceil(3 / stride) ** 2
    assert int(nnz.max()) == bound
    interior = nnz[4:8, 4:8]
    np.testing.assert_allclose(jnp.mean(interior), n_out * 9 / c)


# --- matrix-free path on a (reduced-size) conv block, float32 ---------------------------------


def test_matrix_free_smoke_conv_bn_block():
  """8→8 3×3 conv + BN + ReLU on 2×12×12×8 (H_z: dim 2304, H_W: 576) in float32, jitted:
  λ_max from two keys agree to 1e-3; a random Rayleigh quotient lies between the Ritz extremes;
  the Hutchinson mean is positive and below λ_max; H_W's Ritz max matches the largest eigenvalue
  of the dense kernel Hessian to 1e-4."""
  mod = nets.ConvBlock(8, 8, rngs=nnx.Rngs(0), bn=True)
  (fn,), (params,) = backmatching.nnx_blocks([mod])
  z = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 12, 12, 8)))
  kernel = _leaf(params, "conv/kernel")
  fn_w = lambda w, x: fn(_replace(params, "conv/kernel", w), x)

  @jax.jit
  def analyse(params, kernel, z, key):
    op = hs.gauss_newton_operator(fn, params, z, "input")
    k1, k2, k3 = jax.random.split(key, 3)
    r1 = hs.lanczos(op.matvec, op.dim, 40, k1)
    r2 = hs.lanczos(op.matvec, op.dim, 40, k2)
    tr = hs.hutchinson_trace(op.matvec, op.dim, 16, k3)
    v = jax.random.normal(k3, (op.dim,))
    rq = jnp.vdot(v, op.matvec(v)) / jnp.vdot(v, v)
    op_w = hs.gauss_newton_operator(fn_w, kernel, z, "params")
    rw = hs.lanczos(op_w.matvec, op_w.dim, 60, k3)
    return r1.ritz_values, r2.ritz_values, tr, rq, rw.ritz_values

  r1, r2, tr, rq, rw = analyse(params, kernel, z, jax.random.key(1))
  assert r1.dtype == jnp.float32
  assert np.all(np.isfinite(r1)) and np.all(np.isfinite(r2))
  lam = float(r1[-1])
  assert abs(float(r2[-1]) - lam) <= 1e-3 * lam
  assert float(r1[0]) <= float(rq) <= lam * (1 + 1e-5)
  assert 0 < float(tr.value) / z.size < lam
  lam_w = float(jnp.linalg.eigvalsh(hs.local_hessian(fn_w, kernel, z, "params"))[-1])
  assert abs(float(rw[-1]) - lam_w) <= 1e-4 * lam_w
