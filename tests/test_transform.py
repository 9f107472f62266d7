"""Optax citizenship, bad input, block_scales by hand, and LSALR by hand."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import optax_bm
from optax_bm import LayerSpec, UNSCALED
from tests import nets


def _setup(dtype=jnp.float32, seed=0):
  model = nets.stride2_net(dtype)
  x = jax.random.normal(jax.random.key(seed), (4, 8, 8, 3), dtype)
  y = jnp.arange(4) % 5
  specs = optax_bm.annotate(model, x)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = nnx.as_pure(nnx.grad(lambda m: nets.cross_entropy(y, 5)(m(x)))(model))
  return model, specs, params, grads


# --- block_scales by hand --------------------------------------------------------------------


def test_block_scales_match_hand_computed_values():
  # Two blocks: conv (3x3, 2 -> 4, BN, s=16, c=4) then dense (8 -> 3, no BN).
  w0 = jnp.full((3, 3, 2, 4), 0.5)  # ||W0||² = 72 * 0.25 = 18
  w1 = jnp.full((8, 3), 2.0)  # ||W1||² = 24 * 4 = 96
  params = {"c": {"kernel": w0, "bias": jnp.zeros(4)}, "d": {"kernel": w1, "bias": jnp.zeros(3)}}
  specs = {"c": {"kernel": LayerSpec(0, "kernel", "conv", 16, 4, True),
                 "bias": LayerSpec(0, "other", "conv", 16, 4, True)},
           "d": {"kernel": LayerSpec(1, "kernel", "dense", 1, 1, False),
                 "bias": LayerSpec(1, "other", "dense", 1, 1, False)}}
  sc = optax_bm.block_scales(specs, params, scale_others=True)  # SPEC v1
  # Top (dense, no BN): m_W = s = 1, m_a = 1, m_z = q / c = (96 / 8) / 1 = 12.
  # Block 0 (conv + BN): r = 18 / 4 = 4.5, m_W = 16 / 4.5, m_a = 16; A_0 = 1 / 12.
  np.testing.assert_allclose(sc["d"]["kernel"], 1.0)
  np.testing.assert_allclose(sc["d"]["bias"], 1.0)
  np.testing.assert_allclose(sc["c"]["kernel"], (1 / 12) / (16 / 4.5), rtol=1e-6)
  np.testing.assert_allclose(sc["c"]["bias"], (1 / 12) / 16, rtol=1e-6)
  m = optax_bm.local_hessian_scalars(specs["c"]["kernel"], w0)
  np.testing.assert_allclose(m.m_z, 4 / (2 * 4), rtol=1e-6)  # n_out / (m_in c)
  # The default (docs/method.md#63-bias-and-batchnorm-parameters-factor-1): the same kernels,
  # biases at 1.
  default = optax_bm.block_scales(specs, params)
  np.testing.assert_allclose(default["c"]["kernel"], sc["c"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(default["c"]["bias"], 1.0)
  np.testing.assert_allclose(default["d"]["bias"], 1.0)


# --- optax citizenship -----------------------------------------------------------------------


def test_jitted_update_does_not_retrace():
  _, specs, params, grads = _setup()
  tx = optax_bm.scale_amended_sgd(0.1, specs)
  traces = []

  @jax.jit
  def step(g, s, p):
    traces.append(1)
    return tx.update(g, s, p)

  state = tx.init(params)
  u, state = step(grads, state, params)
  params2 = optax.apply_updates(params, u)
  u2, state = step(grads, state, params2)
  assert len(traces) == 1
  assert step._cache_size() == 1


def test_chain_matches_manual_composition():
  _, specs, params, grads = _setup()
  scales = optax_bm.block_scales(specs, params)
  tx = optax.chain(optax_bm.scale_by_back_matching(specs), optax.scale(-0.1))
  u, _ = tx.update(grads, tx.init(params), params)
  want = jax.tree.map(lambda g, s: -0.1 * g * s, grads, scales)
  chex.assert_trees_all_close(u, want, rtol=1e-6)


def test_scale_amended_sgd_first_step_by_hand():
  _, specs, params, grads = _setup()
  wd, lr, mu = 5e-3, 0.1, 0.9
  tx = optax_bm.scale_amended_sgd(lr, specs, momentum=mu, nesterov=True, weight_decay=wd)
  u, _ = tx.update(grads, tx.init(params), params)
  # d = f ⊙ (g + λθ); v = d; Nesterov update = -η (d + μ v) = -η (1 + μ) d.
  d = optax_bm.scale_by_back_matching(specs).update(
      jax.tree.map(lambda g, p: g + wd * p, grads, params), None, params)[0]
  chex.assert_trees_all_close(u, jax.tree.map(lambda x: -lr * (1 + mu) * x, d), rtol=1e-6)


def test_masked_leaves_pass_through_and_masked_kernel_errors():
  _, specs, params, grads = _setup()
  plain, _ = optax_bm.scale_by_back_matching(specs).update(grads, None, params)
  not_bn = jax.tree_util.tree_map_with_path(
      lambda p, _: "bn" not in optax_bm.specs.path_str(p), params)
  tx = optax.masked(optax_bm.scale_by_back_matching(specs), not_bn)
  u, _ = tx.update(grads, tx.init(params), params)
  for (path, got), want, g in zip(jax.tree_util.tree_flatten_with_path(u)[0],
                                  jax.tree.leaves(plain), jax.tree.leaves(grads)):
    if "bn" in optax_bm.specs.path_str(path):
      np.testing.assert_array_equal(got, g)
    else:
      np.testing.assert_allclose(got, want, rtol=1e-6)
  only_top_hidden = jax.tree_util.tree_map_with_path(
      lambda p, _: optax_bm.specs.path_str(p) != "blocks/2/fc/kernel", params)
  tx = optax.masked(optax_bm.scale_by_back_matching(specs), only_top_hidden)
  with pytest.raises(ValueError, match="blocks/2/fc/kernel.*masked out"):
    tx.update(grads, tx.init(params), params)


def test_multisteps_accumulates_then_steps():
  _, specs, params, grads = _setup()
  inner = optax_bm.scale_amended_sgd(0.1, specs)
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  state = tx.init(params)
  g2 = jax.tree.map(lambda g: 3.0 * g, grads)
  u1, state = tx.update(grads, state, params)
  chex.assert_trees_all_equal(u1, jax.tree.map(jnp.zeros_like, grads))
  u2, state = tx.update(g2, state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, grads, g2)
  want, _ = inner.update(mean, inner.init(params), params)
  chex.assert_trees_all_close(u2, want, rtol=1e-5)


def test_apply_if_finite_skips_nan_and_keeps_state_clean():
  _, specs, params, grads = _setup()
  tx = optax.apply_if_finite(optax_bm.scale_amended_sgd(0.1, specs), max_consecutive_errors=3)
  state = tx.init(params)
  u, state = tx.update(grads, state, params)
  good_inner = state.inner_state
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  u_bad, state_bad = jax.jit(tx.update)(bad, state, params)
  chex.assert_trees_all_equal(u_bad, jax.tree.map(jnp.zeros_like, grads))
  chex.assert_trees_all_equal(state_bad.inner_state, good_inner)
  assert int(state_bad.notfinite_count) == 1
  assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(state_bad))


def test_inject_hyperparams_equals_plain_optimizer():
  _, specs, params, grads = _setup()
  plain = optax_bm.scale_amended_sgd(0.05, specs, weight_decay=2e-3)
  injected = optax.inject_hyperparams(optax_bm.scale_amended_sgd)(
      learning_rate=0.05, specs=specs, weight_decay=2e-3)
  sp, si = plain.init(params), injected.init(params)
  assert set(si.hyperparams) >= {"learning_rate", "weight_decay", "momentum"}
  p1 = p2 = params
  for _ in range(3):
    up, sp = plain.update(grads, sp, p1)
    ui, si = jax.jit(injected.update)(grads, si, p2)
    chex.assert_trees_all_close(up, ui, rtol=1e-6)
    p1, p2 = optax.apply_updates(p1, up), optax.apply_updates(p2, ui)
  # The injected learning rate is live.
  si.hyperparams["learning_rate"] = jnp.asarray(0.0)
  ui, _ = injected.update(grads, si, p2)
  assert all(float(jnp.abs(l).max()) == 0.0 for l in jax.tree.leaves(ui))


def test_inject_hyperparams_with_callable_specs_as_static_arg():
  _, specs, params, grads = _setup()
  tx = optax.inject_hyperparams(optax_bm.scale_amended_sgd, static_args="specs")(
      learning_rate=0.1, specs=lambda p: specs)
  u, _ = tx.update(grads, tx.init(params), params)
  want, _ = optax_bm.scale_amended_sgd(0.1, specs).update(
      grads, optax_bm.scale_amended_sgd(0.1, specs).init(params), params)
  chex.assert_trees_all_close(u, want, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float64])
def test_dtypes_are_kept(dtype):
  with jax.enable_x64(dtype == jnp.float64):
    _, specs, params, grads = _setup(dtype)
    for tx in (optax_bm.scale_amended_sgd(0.1, specs), optax_bm.lsalr(0.1)):
      u, state = jax.jit(tx.update)(grads, tx.init(params), params)
      for l in jax.tree.leaves(u) + jax.tree.leaves(state):
        if jnp.issubdtype(l.dtype, jnp.floating):
          assert l.dtype == dtype, (l.dtype, dtype)
      assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(u))


def test_init_on_shape_dtype_structs():
  _, specs, params, grads = _setup()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  tx = optax_bm.scale_amended_sgd(0.1, specs)
  state = tx.init(abstract)
  shapes = jax.eval_shape(tx.init, abstract)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, shapes)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, tx.init(params))


def test_sharding_is_kept_on_a_4_device_mesh():
  assert jax.device_count() >= 4, "tests/conftest.py sets 4 CPU devices"
  _, specs, params, grads = _setup()
  mesh = Mesh(np.array(jax.devices()[:4]), ("model",))

  def shard(x):  # output features over the mesh where they divide, else replicated
    spec = P(*([None] * (x.ndim - 1)), "model") if x.shape[-1] % 4 == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))

  params_s, grads_s = jax.tree.map(shard, params), jax.tree.map(shard, grads)
  tx = optax_bm.scale_amended_sgd(0.1, specs)
  u, _ = jax.jit(tx.update)(grads_s, tx.init(params_s), params_s)
  n_sharded = 0
  for got, p in zip(jax.tree.leaves(u), jax.tree.leaves(params_s)):
    assert got.sharding.is_equivalent_to(p.sharding, got.ndim), (got.sharding, p.sharding)
    n_sharded += not p.sharding.is_fully_replicated
  assert n_sharded >= 3
  want, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_close(u, want, rtol=1e-5)


# --- bad input -------------------------------------------------------------------------------


def test_update_without_params_raises_like_optax():
  _, specs, params, grads = _setup()
  tx = optax_bm.scale_by_back_matching(specs)
  with pytest.raises(ValueError, match="not passing `params`"):
    tx.update(grads, tx.init(params))


def test_spec_tree_mismatch_names_the_path():
  _, specs, params, grads = _setup()
  bad = dict(nnx.as_pure(specs))
  bad["blocks"] = dict(bad["blocks"])
  del bad["blocks"][1]
  tx = optax_bm.scale_by_back_matching(bad)
  with pytest.raises(ValueError, match=r"params path 'blocks/1/conv/bias' has no spec"):
    tx.init(params)  # at init already, not only at the first update
  with pytest.raises(ValueError, match=r"updates path 'blocks/1/conv/bias' has no spec"):
    tx.update(grads, optax_bm.ScaleByBackMatchingState(), params)
  extra = {**nnx.as_pure(specs), "ghost": {"kernel": LayerSpec(0, "kernel", "dense")}}
  with pytest.raises(ValueError, match=r"spec path 'ghost/kernel' has no updates leaf"):
    optax_bm.scale_by_back_matching(extra).update(grads, None, params)
  with pytest.raises(ValueError, match="expected a LayerSpec"):
    optax_bm.block_scales(jax.tree.map(lambda _: 1.0, params), params)


def test_inconsistent_block_specs_are_rejected():
  w = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="two kernels"):
    optax_bm.block_scales([LayerSpec(0, "kernel", "dense"), LayerSpec(0, "kernel", "dense")],
                          [w, w])
  with pytest.raises(ValueError, match="without gaps"):
    optax_bm.block_scales([LayerSpec(0, "kernel", "dense"), LayerSpec(2, "kernel", "dense")],
                          [w, w])
  with pytest.raises(ValueError, match="disagree"):
    optax_bm.block_scales([LayerSpec(0, "kernel", "dense"),
                           LayerSpec(0, "other", "dense", normalized=True)], [w, w[0]])
  with pytest.raises(ValueError, match="dense kernel but has shape"):
    optax_bm.block_scales([LayerSpec(0, "kernel", "dense")], [jnp.ones((3, 3, 4, 3))])


@pytest.mark.parametrize("field,value,msg", [
    ("block", -1, "block must be >= 0"), ("role", "bias", "role must be"),
    ("kind", "conv3d", "kind must be"), ("s", 0, "s .* must be a positive number"),
    ("s", "4", "s .* must be a positive"),
    ("c", 0.0, "c .* must be a positive"), ("normalized", 1, "normalized must be a bool"),
])
def test_layer_spec_rejects_invalid_values(field, value, msg):
  kw = dict(block=0, role="kernel", kind="conv", s=4, c=4.0, normalized=True)
  kw[field] = value
  with pytest.raises(ValueError, match=msg):
    LayerSpec(**kw)


def test_all_zero_kernels_give_finite_updates():
  _, specs, params, grads = _setup()
  zero = jax.tree.map(jnp.zeros_like, params)
  for tx in (optax_bm.scale_amended_sgd(0.1, specs), optax_bm.lsalr(0.1)):
    u, _ = tx.update(grads, tx.init(zero), zero)
    assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(u))
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, grads), tx.init(zero), zero)
    assert all(bool(jnp.all(l == 0)) for l in jax.tree.leaves(u))


def test_unscaled_leaves_pass_through():
  model, _, params, grads = _setup()
  x = jnp.zeros((4, 8, 8, 3))
  specs = optax_bm.annotate(model, x, unscaled=["blocks/0/bn/scale"])
  assert nnx.as_pure(specs)["blocks"][0]["bn"]["scale"] is UNSCALED
  u, _ = optax_bm.scale_by_back_matching(specs).update(grads, None, params)
  np.testing.assert_array_equal(u["blocks"][0]["bn"]["scale"], grads["blocks"][0]["bn"]["scale"])


# --- LSALR -----------------------------------------------------------------------------------


def test_lsalr_matches_formula_by_hand():
  g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[0.0, 0.5], [0.0, 0.0]]),
       "z": jnp.zeros(3)}
  u, _ = optax_bm.scale_by_lsalr().update(g, None)
  # ‖a‖ = 5: 1 + ln(1 + 1/5) = 1.1823215567939546; ‖b‖ = 0.5: 1 + ln 3 = 2.09861228866811.
  np.testing.assert_allclose(u["a"], [3 * 1.1823215567939546, 4 * 1.1823215567939546],
                             rtol=1e-6)
  np.testing.assert_allclose(u["b"], [[0.0, 0.5 * 2.09861228866811], [0.0, 0.0]], rtol=1e-6)
  np.testing.assert_array_equal(u["z"], jnp.zeros(3))


def test_lsalr_optimizer_two_steps_by_hand():
  theta = {"w": jnp.array([1.0, 0.0])}
  g = {"w": jnp.array([0.0, 0.2])}
  lr, wd, mu = 0.1, 1e-3, 0.9
  tx = optax_bm.lsalr(lr, weight_decay=wd, momentum=mu, nesterov=True)
  state = tx.init(theta)
  u1, state = tx.update(g, state, theta)
  d1 = np.array([wd * 1.0, 0.2])
  f1 = 1 + math.log1p(1 / np.linalg.norm(d1))
  v1 = f1 * d1
  np.testing.assert_allclose(u1["w"], -lr * (f1 * d1 + mu * v1), rtol=1e-6)
  theta2 = optax.apply_updates(theta, u1)
  u2, state = tx.update(g, state, theta2)
  d2 = np.array([wd * float(theta2["w"][0]), 0.2 + wd * float(theta2["w"][1])])
  f2 = 1 + math.log1p(1 / np.linalg.norm(d2))
  v2 = mu * v1 + f2 * d2
  np.testing.assert_allclose(u2["w"], -lr * (f2 * d2 + mu * v2), rtol=1e-6)


def test_lars_paper_setting_is_optax_lars():
  """The paper's LARS is optax.lars(2.0, 1e-3, trust 1e-3): layer lr η·1e-3·‖W‖/‖δW‖."""
  theta = {"w": jnp.array([3.0, 4.0])}
  g = {"w": jnp.array([0.6, 0.8])}
  tx = optax.lars(2.0, weight_decay=1e-3, trust_coefficient=1e-3, momentum=0.0)
  u, _ = tx.update(g, tx.init(theta), theta)
  d = np.array([0.6, 0.8]) + 1e-3 * np.array([3.0, 4.0])
  np.testing.assert_allclose(u["w"], -2.0 * 1e-3 * 5.0 / np.linalg.norm(d) * d, rtol=1e-6)
