"""The optimizer equals block-wise back-matching; Proposition 1; the other solvers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_bm
from optax_bm import backmatching
from tests import nets

ETA = 0.1
BATCH = 6


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _data(hw=8, classes=5, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (BATCH, hw, hw, 3), jnp.float64)
  y = jax.random.randint(ky, (BATCH,), 0, classes)
  return x, y


def _full_gradient(fns, params, x, loss):
  def J(ps):
    z = x
    for f, p in zip(fns, ps):
      z = f(p, z)
    return loss(z)

  return jax.grad(J)(params)


def _rel_err(a, b):
  a, b = np.concatenate([np.ravel(l) for l in jax.tree.leaves(a)]), np.concatenate(
      [np.ravel(l) for l in jax.tree.leaves(b)])
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _direction(old, new):
  return jax.tree.map(lambda o, n: (o - n) / ETA, old, new)


def test_proposition_1_gradient_solver_is_gradient_descent():
  """'gradient' back-matching = -η∇J on a VGG-like chain (BN, ReLU, max-pool, dense), f64."""
  model = nets.vgg_like(jnp.float64)
  x, y = _data()
  loss = nets.cross_entropy(y, 5)
  fns, params = backmatching.nnx_blocks(model.blocks)
  res = backmatching.back_matching_step(fns, params, x, loss, ETA, solver="gradient")
  grads = _full_gradient(fns, params, x, loss)
  for b in range(len(fns)):
    assert _rel_err(_direction(params[b], res.params[b]), grads[b]) < 1e-10, b
  # The z-targets move by exactly -N ∂J/∂z (step 1 on the summed z-problem, eq. (2)).
  z_grads = jax.grad(lambda z: loss(fns[-1](params[-1], z)))(res.activations[-2])
  np.testing.assert_allclose(res.targets[-1] - res.activations[-2], -BATCH * z_grads,
                             rtol=1e-10, atol=1e-14)


def _nnx_equivalence(model, expected, hw=8):
  x, y = _data(hw)
  loss = nets.cross_entropy(y, 5)
  fns, params = backmatching.nnx_blocks(model.blocks)
  block_specs = [nets.hand_specs(p, b, *e) for b, (p, e) in enumerate(zip(params, expected))]
  res = backmatching.back_matching_step(fns, params, x, loss, ETA, solver="scalar",
                                        specs=block_specs)

  specs = optax_bm.annotate(model, x)
  full_params = nnx.state(model, nnx.Param)
  grads = nnx.grad(lambda m: loss(m(x)))(model)
  tx = optax_bm.scale_by_back_matching(specs)
  updates, _ = jax.jit(tx.update)(nnx.as_pure(grads), tx.init(full_params),
                                  nnx.as_pure(full_params))
  for b in range(len(fns)):
    got = nnx.as_pure(updates["blocks"][b])
    want = _direction(nnx.as_pure(params[b]), nnx.as_pure(res.params[b]))
    assert _rel_err(got, want) < 1e-10, b
  return res, updates


@pytest.mark.parametrize("make,expected", [
    (nets.vgg_like, nets.vgg_like_expected()),
    (nets.stride2_net, nets.stride2_expected()),
    (nets.gap_net, nets.gap_expected()),
], ids=["vgg_like", "stride2", "global_avg_pool"])
def test_transform_equals_scalar_back_matching_nnx(make, expected):
  _nnx_equivalence(make(jnp.float64), expected)


def test_transform_equals_scalar_back_matching_linen():
  model = nets.LinenChain(dtype=jnp.float64)
  x, y = _data()
  loss = nets.cross_entropy(y, 5)
  variables = model.init(jax.random.key(0), x, train=True)
  names = sorted(variables["params"])  # blocks_0, blocks_1, blocks_2
  modules = [  # the same submodules as LinenChain.setup, applied one at a time
      nets.LinenConvBlock(4, pool=True, dtype=jnp.float64),
      nets.LinenConvBlock(6, pool=True, flatten=True, dtype=jnp.float64),
      nets.LinenDense(5, dtype=jnp.float64)]

  def make_fn(mod, name):
    def fn(p, z):
      vs = {"params": p}
      if name in variables.get("batch_stats", {}):
        vs["batch_stats"] = variables["batch_stats"][name]
      out, _ = mod.apply(vs, z, True, mutable=["batch_stats"])
      return out
    return fn

  fns = [make_fn(m, n) for m, n in zip(modules, names)]
  params = [variables["params"][n] for n in names]
  block_specs = [nets.hand_specs(p, b, *e) for b, (p, e) in
                 enumerate(zip(params, nets.linen_expected()))]
  res = backmatching.back_matching_step(fns, params, x, loss, ETA, solver="scalar",
                                        specs=block_specs)

  specs = optax_bm.annotate(model, variables, x, train=True)
  grads = jax.grad(lambda p: loss(model.apply({**variables, "params": p}, x, train=True,
                                              mutable=["batch_stats"])[0]))(variables["params"])
  tx = optax_bm.scale_by_back_matching(specs)
  updates, _ = tx.update(grads, tx.init(variables["params"]), variables["params"])
  for b, n in enumerate(names):
    want = _direction(params[b], res.params[b])
    assert _rel_err(updates[n], want) < 1e-10, n
  # And the transformation differs from the plain gradient (the test is not vacuous).
  assert _rel_err(updates, grads) > 1e-2


def test_scalar_solver_is_not_plain_gradient():
  model = nets.vgg_like(jnp.float64)
  res, updates = _nnx_equivalence(model, nets.vgg_like_expected())
  x, y = _data()
  grads = nnx.grad(lambda m: nets.cross_entropy(y, 5)(m(x)))(model)
  assert _rel_err(nnx.as_pure(updates), nnx.as_pure(grads)) > 1e-2


def test_steps_solver_with_one_step_is_gradient():
  model = nets.stride2_net(jnp.float64)
  x, y = _data()
  loss = nets.cross_entropy(y, 5)
  fns, params = backmatching.nnx_blocks(model.blocks)
  a = backmatching.back_matching_step(fns, params, x, loss, ETA, solver="gradient")
  b = backmatching.back_matching_step(fns, params, x, loss, ETA, solver="steps", inner_steps=1)
  chex.assert_trees_all_close(a.params, b.params, rtol=1e-12)
  c = backmatching.back_matching_step(fns, params, x, loss, ETA, solver="steps", inner_steps=3)
  assert _rel_err(c.params, a.params) > 1e-8


def test_gauss_newton_solver_matches_dense_solve():
  """The θ-step of the top block is (J^T ∇²ℓ J + λI)^{-1} ∇ℓ, checked with dense matrices."""
  model = nets.stride2_net(jnp.float64)
  x, y = _data()
  loss = nets.cross_entropy(y, 5)
  fns, params = backmatching.nnx_blocks(model.blocks)
  lam = 1e-2
  res = backmatching.back_matching_step(fns, params, x, loss, ETA, solver="gauss_newton",
                                        damping=lam, cg_maxiter=500)
  from jax.flatten_util import ravel_pytree

  top = len(fns) - 1
  z = res.activations[top]
  flat, unravel = ravel_pytree(params[top])
  out = lambda v: fns[top](unravel(v), z)
  J = jax.jacobian(lambda v: out(v).ravel())(flat)
  H_out = jax.hessian(lambda o: loss(o.reshape(out(flat).shape)))(out(flat).ravel())
  G = J.T @ H_out @ J
  g = jax.grad(lambda v: loss(out(v)))(flat)
  d = np.linalg.solve(G + lam * np.eye(G.shape[0]), g)
  got = (flat - ravel_pytree(res.params[top])[0]) / ETA
  np.testing.assert_allclose(got, d, rtol=1e-6, atol=1e-10)
  # Lower blocks move and the top-block local loss decreases more than with a gradient step.
  new_loss = loss(fns[top](res.params[top], z))
  grad_step = backmatching.back_matching_step(fns, params, x, loss, ETA, solver="gradient")
  assert new_loss < loss(fns[top](grad_step.params[top], z))


def test_bad_solver_and_missing_specs():
  model = nets.stride2_net(jnp.float64)
  x, y = _data()
  fns, params = backmatching.nnx_blocks(model.blocks)
  with pytest.raises(ValueError, match="solver must be one of"):
    backmatching.back_matching_step(fns, params, x, nets.cross_entropy(y, 5), ETA, solver="x")
  with pytest.raises(ValueError, match="needs one spec tree per block"):
    backmatching.back_matching_step(fns, params, x, nets.cross_entropy(y, 5), ETA,
                                    solver="scalar")


# The readings of docs/method.md#6-open-points-and-what-decided-them
# (hand-computed s, c of nets.vgg_like at hw=8 under each pooling).
_READING_SPECS = {
    "before": nets.vgg_like_expected(),
    # s after pooling; the pooling's c moves to the block reading the pooled map.
    "after": [("conv", 16, 1.0, True), ("conv", 16, 4.0, True), ("conv", 4, 1.0, True),
              ("dense", 1, 4.0, True), ("dense", 1, 1.0, False)],
    # s·(1 - 2^-4)/4 after a 2x2 max-pool, s/2 unpooled, c = sqrt(4); dense blocks unchanged.
    "effective": [("conv", 15.0, 2.0, True), ("conv", 8, 1.0, True), ("conv", 3.75, 2.0, True),
                  ("dense", 1, 1.0, True), ("dense", 1, 1.0, False)],
}


@pytest.mark.parametrize("pooling,scale_others,gamma_aware", [
    ("before", False, False),  # the default
    ("before", True, False),  # SPEC v1
    ("before", True, True), ("before", False, True),
    ("after", False, False), ("after", True, False), ("effective", False, False),
])
def test_every_reading_equals_scalar_back_matching(pooling, scale_others, gamma_aware):
  """Each reading the transform offers is block-wise back-matching (f64, 1e-10)."""
  model = nets.vgg_like(jnp.float64)
  # BatchNorm scales away from 1, so that the γ²-aware scalars differ from the plain ones.
  bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
  for i, bn in enumerate(bns):
    bn.scale[...] = jax.random.uniform(jax.random.key(i), bn.scale.shape, jnp.float64, 0.2, 1.5)
  x, y = _data()
  loss = nets.cross_entropy(y, 5)
  fns, params = backmatching.nnx_blocks(model.blocks)
  specs = optax_bm.annotate(model, x, pooling=pooling)
  block_specs = [nets.hand_specs(p, b, *e)
                 for b, (p, e) in enumerate(zip(params, _READING_SPECS[pooling]))]
  for b, want in enumerate(block_specs):  # annotate's reading is the hand-computed one
    assert jax.tree.leaves(nnx.as_pure(specs["blocks"][b])) == jax.tree.leaves(want), b
  res = backmatching.back_matching_step(fns, params, x, loss, ETA, solver="scalar",
                                        specs=block_specs, scale_others=scale_others,
                                        gamma_aware=gamma_aware)
  full_params = nnx.state(model, nnx.Param)
  grads = nnx.grad(lambda m: loss(m(x)))(model)
  tx = optax_bm.scale_by_back_matching(specs, scale_others=scale_others,
                                       gamma_aware=gamma_aware)
  updates, _ = jax.jit(tx.update)(nnx.as_pure(grads), tx.init(full_params),
                                  nnx.as_pure(full_params))
  for b in range(len(fns)):
    want = _direction(nnx.as_pure(params[b]), nnx.as_pure(res.params[b]))
    assert _rel_err(nnx.as_pure(updates["blocks"][b]), want) < 1e-10, b
  # Not vacuous: the reading changes the update against SPEC v1 (SPEC v1's against the default).
  is_v1 = (pooling, scale_others, gamma_aware) == ("before", True, False)
  other, _ = optax_bm.scale_by_back_matching(optax_bm.annotate(model, x, pooling="before"),
                                             scale_others=not is_v1, gamma_aware=False).update(
      nnx.as_pure(grads), None, nnx.as_pure(full_params))
  assert _rel_err(updates, other) > 1e-3
  if not scale_others:  # bias/BatchNorm leaves keep the plain gradient
    g = nnx.as_pure(grads)
    np.testing.assert_allclose(updates["blocks"][0]["bn"]["scale"],
                               g["blocks"][0]["bn"]["scale"])
