"""Residual units: scalars through a sum, Proposition 1 through a sum, the transformation
equals block-wise back-matching, the input-scale recursion, optax citizenship."""

import functools
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_bm
from optax_bm import LayerSpec, Residual, backmatching
from tests import nets

ETA = 0.1
BATCH = 6
KINDS = ["identity", "subsample", "projection"]


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _data(hw=8, classes=5, seed=0, dtype=jnp.float64):
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (BATCH, hw, hw, 3), dtype)
  y = jax.random.randint(ky, (BATCH,), 0, classes)
  return x, y


def _rel_err(a, b):
  a = np.concatenate([np.ravel(l) for l in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(l) for l in jax.tree.leaves(b)])
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _direction(old, new):
  return jax.tree.map(lambda o, n: (o - n) / ETA, old, new)


def _row_specs(params_b, row):
  block, kind, s, c, norm, res = row
  return jax.tree_util.tree_map_with_path(
      lambda p, _: LayerSpec(block, "kernel" if optax_bm.specs.path_str(p).endswith("kernel")
                             else "other", kind, s, c, norm, res), params_b)


def _reference_units(model, table=None):
  """The model as the reference loop's units: (fns, params, per-block spec trees)."""
  fns, params, specs = [], [], []
  for u, m in enumerate(model.units):
    if isinstance(m, nets.ResUnit):
      mf, mp = backmatching.nnx_blocks(m.main)
      sf, sp = backmatching.nnx_blocks(m.shortcut) if len(m.shortcut) else ([], [])
      shortcut = {"projection": sf, "identity": "identity"}.get(
          m.kind, functools.partial(nets.subsample, cout=m.cout))
      fns.append(backmatching.ResidualUnit(mf, shortcut, nnx.relu if m.act else None))
      params.append({"main": mp, "shortcut": sp})
      if table is not None:
        specs.append({br: [_row_specs(p, table[f"units/{u}/{br}/{j}"]) for j, p in
                           enumerate(ps)] for br, ps in (("main", mp), ("shortcut", sp))})
    else:
      f, p = backmatching.nnx_blocks([m])
      fns += f
      params += p
      if table is not None:
        specs.append(_row_specs(p[0], table[f"units/{u}"]))
  return fns, params, specs


def _full_gradient(fns, params, x, loss):
  def J(ps):
    z = x
    for f, p in zip(fns, ps):
      z = f.apply(p, z) if isinstance(f, backmatching.ResidualUnit) else f(p, z)
    return loss(z)

  return jax.grad(J)(params)


# --- Proposition 1 through a sum ----------------------------------------------------------


@pytest.mark.parametrize("kind,act", [(k, True) for k in KINDS] + [("subsample", False)])
def test_proposition_1_through_a_sum(x64, kind, act):
  """'gradient' back-matching over residual units = -η∇J (f64, 1e-10), every shortcut kind."""
  model = nets.residual_net(kind, act=act, dtype=jnp.float64)
  x, y = _data()
  loss = nets.cross_entropy(y, 5)
  fns, params, _ = _reference_units(model)
  res = backmatching.back_matching_step(fns, params, x, loss, ETA, solver="gradient")
  grads = _full_gradient(fns, params, x, loss)
  for u in range(len(fns)):
    assert _rel_err(_direction(params[u], res.params[u]), grads[u]) < 1e-10, u
  # The unit targets move by exactly -N ∂J/∂z_u (step 1 on the summed z-problem).
  for u in (1, 2):
    def J_from(z, u=u):
      for f, p in zip(fns[u + 1:], params[u + 1:]):
        z = f.apply(p, z) if isinstance(f, backmatching.ResidualUnit) else f(p, z)
      return loss(z)
    g = jax.grad(J_from)(res.activations[u + 1])
    np.testing.assert_allclose(res.targets[u + 1] - res.activations[u + 1], -BATCH * g,
                               rtol=1e-9, atol=1e-13)


# --- the transformation is block-wise back-matching ----------------------------------------


def _transform_updates(model, specs, x, loss, **kw):
  full_params = nnx.state(model, nnx.Param)
  grads = nnx.grad(lambda m: loss(m(x)))(model)
  tx = optax_bm.scale_by_back_matching(specs, **kw)
  updates, _ = jax.jit(tx.update)(nnx.as_pure(grads), tx.init(full_params),
                                  nnx.as_pure(full_params))
  return nnx.as_pure(updates), nnx.as_pure(grads)


def _compare(updates, res, params, fns):
  for u, f in enumerate(fns):
    want = _direction(nnx.as_pure(params[u]), nnx.as_pure(res.params[u]))
    if isinstance(f, backmatching.ResidualUnit):
      for br in ("main", "shortcut"):
        for j in range(len(want[br])):
          got = updates["units"][u][br][j]
          assert _rel_err(got, want[br][j]) < 1e-10, (u, br, j)
    else:
      assert _rel_err(updates["units"][u], want) < 1e-10, u


def _randomize_batchnorm(model):
  """γ and β away from 1 and 0, so that the propagated input scale depends on them."""
  bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
  for i, bn in enumerate(bns):
    k1, k2 = jax.random.split(jax.random.key(10 + i))
    bn.scale[...] = jax.random.uniform(k1, bn.scale.shape, bn.scale.dtype, 0.3, 1.6)
    bn.bias[...] = 0.3 * jax.random.normal(k2, bn.bias.shape, bn.bias.dtype)


@pytest.mark.parametrize("input_scale", ["propagated", "unit"])
@pytest.mark.parametrize("kind", KINDS)
def test_transform_equals_scalar_back_matching_nnx(x64, kind, input_scale):
  """annotate + the transformation = block-wise back-matching over units (f64, 1e-10)."""
  model = nets.residual_net(kind, dtype=jnp.float64)
  _randomize_batchnorm(model)
  table = nets.residual_expected(kind)
  x, y = _data()
  loss = nets.cross_entropy(y, 5)
  fns, params, block_specs = _reference_units(model, table)
  res = backmatching.back_matching_step(fns, params, x, loss, ETA, solver="scalar",
                                        specs=block_specs, input_scale=input_scale)
  specs = optax_bm.annotate(model, x)
  by_hand = nets.specs_from_table(nnx.as_pure(nnx.state(model, nnx.Param)), table)
  assert jax.tree.leaves(nnx.as_pure(specs)) == jax.tree.leaves(by_hand)
  updates, grads = _transform_updates(model, specs, x, loss, input_scale=input_scale)
  _compare(updates, res, params, fns)
  assert _rel_err(updates, grads) > 1e-2  # not vacuous
  # The two readings differ on a residual net.
  other, _ = _transform_updates(model, specs, x, loss,
                                input_scale={"unit": "propagated"}.get(input_scale, "unit"))
  assert _rel_err(other, updates) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_transform_equals_scalar_back_matching_linen(x64, kind):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  model = nets.LinenResNet(kind, dtype=jnp.float64)
  x, y = _data()
  loss = nets.cross_entropy(y, 5)
  variables = model.init(jax.random.key(1), x, train=True)
  # γ and β away from 1 and 0 (the propagated input scale reads them).
  def perturb(path, v):
    name = optax_bm.specs.path_str(path)
    k = jax.random.key(zlib.crc32(name.encode()))
    if name.endswith("BatchNorm_0/scale"):
      return jax.random.uniform(k, v.shape, v.dtype, 0.3, 1.6)
    if name.endswith("BatchNorm_0/bias"):
      return 0.3 * jax.random.normal(k, v.shape, v.dtype)
    return v
  variables = {**variables,
               "params": jax.tree_util.tree_map_with_path(perturb, variables["params"])}
  P, S = variables["params"], variables["batch_stats"]

  def block(mod, *where):
    p, st = P, S
    for w in where:
      p, st = p[w], st[w]
    fn = lambda q, z, st=st: mod.apply({"params": q, "batch_stats": st}, z, True,  # noqa: E731
                                       mutable=["batch_stats"])[0]
    return fn, p

  wide = kind != "identity"
  cout, stride = (8, 2) if wide else (4, 1)
  stem = block(nets.LinenConvBN(4, dtype=jnp.float64), "stem")
  u1 = [block(nets.LinenConvBN(4, dtype=jnp.float64), "u1", "main_0"),
        block(nets.LinenConvBN(4, relu=False, dtype=jnp.float64), "u1", "main_1")]
  u2 = [block(nets.LinenConvBN(cout, stride, dtype=jnp.float64), "u2", "main_0"),
        block(nets.LinenConvBN(cout, relu=False, dtype=jnp.float64), "u2", "main_1")]
  proj = ([block(nets.LinenConvBN(cout, stride, kernel=1, relu=False, dtype=jnp.float64), "u2",
                 "proj")] if kind == "projection" else [])
  head = (lambda q, z: nn.Dense(5, dtype=jnp.float64, param_dtype=jnp.float64).apply(
      {"params": q}, z.mean(axis=(1, 2))), P["fc"])
  shortcut = {"projection": [f for f, _ in proj], "identity": "identity"}.get(
      kind, functools.partial(nets.subsample, cout=cout))
  fns = [stem[0], backmatching.ResidualUnit([f for f, _ in u1], "identity", jax.nn.relu),
         backmatching.ResidualUnit([f for f, _ in u2], shortcut, jax.nn.relu), head[0]]
  params = [stem[1], {"main": [p for _, p in u1], "shortcut": []},
            {"main": [p for _, p in u2], "shortcut": [p for _, p in proj]}, head[1]]
  specs = optax_bm.annotate(model, variables, x, train=True)
  # The reference's per-block specs: annotate's, cut along the same module boundaries.
  block_specs = [specs["stem"], {"main": [specs["u1"]["main_0"], specs["u1"]["main_1"]],
                                 "shortcut": []},
                 {"main": [specs["u2"]["main_0"], specs["u2"]["main_1"]],
                  "shortcut": [specs["u2"]["proj"]] if proj else []}, specs["fc"]]
  table = nets.residual_expected(kind)
  for name, row in (("stem", "units/0"), ("u1/main_0", "units/1/main/0"),
                    ("u2/main_1", "units/2/main/1"), ("fc", "units/3")):
    got = [s for s in jax.tree.leaves(specs, is_leaf=optax_bm.specs.is_spec_leaf)
           if s.is_kernel and s.block == table[row][0]][0]
    assert (got.block, got.kind, got.s, got.c, got.normalized, got.residual) == table[row], name
  res = backmatching.back_matching_step(fns, params, x, loss, ETA, solver="scalar",
                                        specs=block_specs)
  grads = jax.grad(lambda p: loss(model.apply({**variables, "params": p}, x, train=True,
                                              mutable=["batch_stats"])[0]))(P)
  tx = optax_bm.scale_by_back_matching(specs)
  updates, _ = jax.jit(tx.update)(grads, tx.init(P), P)
  want = [_direction(p, q) for p, q in zip(params, res.params)]
  assert _rel_err(updates["stem"], want[0]) < 1e-10
  assert _rel_err(updates["fc"], want[3]) < 1e-10
  for u, name in ((1, "u1"), (2, "u2")):
    for j in range(2):
      assert _rel_err(updates[name][f"main_{j}"], want[u]["main"][j]) < 1e-10, (name, j)
  if proj:
    assert _rel_err(updates["u2"]["proj"], want[2]["shortcut"][0]) < 1e-10
  assert _rel_err(updates, grads) > 1e-2


@pytest.mark.parametrize("scale_others,gamma_aware", [(True, False), (False, True)])
def test_other_readings_equal_scalar_back_matching_through_a_sum(x64, scale_others,
                                                                 gamma_aware):
  """Also: no activation after the sums, a three-block branch (a bottleneck's shape) beside
  a projection; the annotation of that net is checked against the hand-made table too."""
  model = nets.residual_net("projection", act=False, dtype=jnp.float64, depth=3)
  _randomize_batchnorm(model)
  table = nets.residual_expected("projection", act=False, depth=3)
  x, y = _data()
  loss = nets.cross_entropy(y, 5)
  fns, params, block_specs = _reference_units(model, table)
  kw = dict(scale_others=scale_others, gamma_aware=gamma_aware)
  res = backmatching.back_matching_step(fns, params, x, loss, ETA, solver="scalar",
                                        specs=block_specs, **kw)
  specs = nets.specs_from_table(nnx.as_pure(nnx.state(model, nnx.Param)), table)
  assert jax.tree.leaves(nnx.as_pure(optax_bm.annotate(model, x))) == jax.tree.leaves(specs)
  updates, _ = _transform_updates(model, specs, x, loss, **kw)
  _compare(updates, res, params, fns)


def test_other_solvers_refuse_residual_units(x64):
  model = nets.residual_net("identity", dtype=jnp.float64)
  x, y = _data()
  fns, params, _ = _reference_units(model)
  for solver in ("steps", "gauss_newton"):
    with pytest.raises(ValueError, match="not implemented for residual units"):
      backmatching.back_matching_step(fns, params, x, nets.cross_entropy(y, 5), ETA,
                                      solver=solver)


# --- block_scales by hand -------------------------------------------------------------------


def _relu_moments_by_quadrature(mu, var):
  s = np.sqrt(var)
  t = np.linspace(-12, 12, 200001)
  x = mu + s * t
  w = np.exp(-0.5 * t * t) / np.sqrt(2 * np.pi) * (t[1] - t[0])
  r = np.maximum(x, 0)
  return float(np.sum(w * r)), float(np.sum(w * r * r))


def _dense_residual(shortcut):
  """Hand specs and params: stem (2->4, BN), unit 1 identity (4->4, 4->4), unit 2 with the
  given shortcut (4->6, 6->6 [+ projection 4->6]), classifier 6->3; every kernel constant."""
  def res(u, kind, br="main", pos=0, c=1.0):
    return Residual(u, br, pos, kind, c)

  rows = [("stem", (2, 4), 0.5, None), ("u1a", (4, 4), 0.25, res(1, "identity")),
          ("u1b", (4, 4), 1.0, res(1, "identity", pos=1)),
          ("u2a", (4, 6), 0.5, res(2, shortcut, c=4.0 if shortcut == "subsample" else 1.0)),
          ("u2b", (6, 6), 2.0, res(2, shortcut, pos=1,
                                   c=4.0 if shortcut == "subsample" else 1.0))]
  if shortcut == "projection":
    rows.append(("u2s", (4, 6), 1.0, res(2, shortcut, br="shortcut")))
  params, specs = {}, {}
  for b, (name, shape, a, r) in enumerate(rows):
    params[name] = {"kernel": jnp.full(shape, a), "bn": {"scale": jnp.ones(shape[1]),
                                                           "bias": jnp.zeros(shape[1])}}
    spec = lambda role, r=r, b=b: LayerSpec(b, role, "dense", 1, 1.0, True, r)  # noqa: E731
    specs[name] = {"kernel": spec("kernel"), "bn": {"scale": spec("other"),
                                                    "bias": spec("other")}}
  params["fc"] = {"kernel": jnp.ones((6, 3)), "bias": jnp.zeros(3)}
  specs["fc"] = {k: LayerSpec(len(rows), role, "dense") for k, role in
                 (("kernel", "kernel"), ("bias", "other"))}
  r = {name: shape[0] * a * a for name, shape, a, _ in rows}  # r = ||W||² / n_out
  return params, specs, r


@pytest.mark.parametrize("shortcut", ["identity", "projection"])
def test_block_scales_of_residual_units_by_hand(shortcut):
  params, specs, r = _dense_residual(shortcut)
  # BatchNorm dense blocks: m_z = n_out / m_in; the classifier: m_z = ||W||²/m_in = 18/6 = 3.
  # Reading "unit" (v = 1): m_{1,z} = 1·1 + 1 = 2; unit 2: m_z(F) = 1.5·1 = 1.5, plus 1
  # (identity 4->6 is not possible: "identity" here stands for the shortcut scalar only) or
  # the projection's 1.5.
  m2 = 1.5 + (1.0 if shortcut == "identity" else 1.5)
  sc = optax_bm.block_scales(specs, params, input_scale="unit")
  np.testing.assert_allclose(sc["fc"]["kernel"], 1.0)
  np.testing.assert_allclose(sc["u2b"]["kernel"], r["u2b"] / 3, rtol=1e-6)
  np.testing.assert_allclose(sc["u2a"]["kernel"], r["u2a"] / 1.0 / 3, rtol=1e-6)  # m_{u2b,z}=1
  if shortcut == "projection":
    np.testing.assert_allclose(sc["u2s"]["kernel"], r["u2s"] / 3, rtol=1e-6)
  np.testing.assert_allclose(sc["u1b"]["kernel"], r["u1b"] / (3 * m2), rtol=1e-6)
  np.testing.assert_allclose(sc["u1a"]["kernel"], r["u1a"] / 1.0 / (3 * m2), rtol=1e-6)
  np.testing.assert_allclose(sc["stem"]["kernel"], r["stem"] / (3 * m2 * 2), rtol=1e-6)
  np.testing.assert_allclose(sc["u1a"]["bn"]["scale"], 1.0)  # others: factor 1
  chex.assert_trees_all_equal(optax_bm.block_scales(specs, params), sc)  # "unit": the default
  # Reading "propagated": the stem's output ReLU(x̂) has mean 1/√(2π) and second moment 1/2;
  # unit 1 (identity, ReLU after the sum) has a Gaussian pre-activation of mean m0 and
  # variance (1/2 − m0²) + γ² = 1.5 − m0².
  m0, v0 = _relu_moments_by_quadrature(0.0, 1.0)
  np.testing.assert_allclose([m0, v0], [1 / np.sqrt(2 * np.pi), 0.5], rtol=1e-6)
  v1 = _relu_moments_by_quadrature(m0, v0 - m0 ** 2 + 1.0)[1]
  m1_uz = 1.0 / v0 + 1.0  # the first block reads z_0: m_z / v0
  m2_uz = 1.5 / v1 + (1.0 if shortcut == "identity" else 1.5 / v1)
  sc = optax_bm.block_scales(specs, params, input_scale="propagated")
  np.testing.assert_allclose(sc["u2b"]["kernel"], r["u2b"] / 3, rtol=1e-6)
  np.testing.assert_allclose(sc["u1b"]["kernel"], r["u1b"] / (3 * m2_uz), rtol=1e-5)
  np.testing.assert_allclose(sc["stem"]["kernel"], r["stem"] / (3 * m2_uz * m1_uz),
                             rtol=1e-5)


def test_subsample_shortcut_scalar_and_moments_by_hand():
  """Option A: m_z(S) = 1/c; the zero-padded channels carry only the branch."""
  params, specs, r = _dense_residual("subsample")
  m0, v0 = 1 / np.sqrt(2 * np.pi), 0.5
  sc = optax_bm.block_scales(specs, params, input_scale="unit")
  m2 = 1.5 + 1 / 4
  np.testing.assert_allclose(sc["stem"]["kernel"], r["stem"] / (3 * m2 * 2), rtol=1e-6)
  # Add a normalized plain block after unit 2 to read its output: its m_z is divided by v2.
  params["fc2"] = {"kernel": jnp.ones((6, 6)), "bn": {"scale": jnp.ones(6),
                                                       "bias": jnp.zeros(6)}}
  specs["fc2"] = {"kernel": LayerSpec(5, "kernel", "dense", 1, 1.0, True),
                  "bn": {"scale": LayerSpec(5, "other", "dense", 1, 1.0, True),
                         "bias": LayerSpec(5, "other", "dense", 1, 1.0, True)}}
  specs["fc"] = {k: LayerSpec(6, v.role, "dense") for k, v in specs["fc"].items()}
  v1 = _relu_moments_by_quadrature(m0, v0 - m0 ** 2 + 1.0)
  m1 = v1[0]
  # Unit 2 keeps 4 of 6 channels of z_1 (zero-padding the others).
  v2 = (4 / 6) * _relu_moments_by_quadrature(m1, v1[1] - m1 ** 2 + 1.0)[1] + (2 / 6) * 0.5
  sc = optax_bm.block_scales(specs, params, input_scale="propagated")
  # u2b's factor: r / m_{fc2,z} / m_{fc,z} with m_{fc2,z} = (6/6) / v2.
  np.testing.assert_allclose(sc["u2b"]["kernel"], r["u2b"] * v2 / 3, rtol=1e-5)


# --- bad specs --------------------------------------------------------------------------


def test_bad_residual_specs_are_rejected_naming_the_block():
  params, specs, _ = _dense_residual("projection")

  def with_res(name, **kw):
    out = jax.tree.map(lambda s: s, specs, is_leaf=optax_bm.specs.is_spec_leaf)
    out[name] = jax.tree.map(
        lambda s: LayerSpec(s.block, s.role, s.kind, s.s, s.c, s.normalized,
                            Residual(**{**vars(s.residual), **kw})),
        specs[name], is_leaf=optax_bm.specs.is_spec_leaf)
    return out

  with pytest.raises(ValueError, match=r"'u2a/kernel' \(block 3\) is annotated with unit 5"):
    optax_bm.block_scales(with_res("u2a", unit=5), params)
  with pytest.raises(ValueError, match=r"'u2b/kernel' \(block 4\) is at position 2 .*expected 1"):
    optax_bm.block_scales(with_res("u2b", position=2), params)
  with pytest.raises(ValueError, match=r"blocks of unit 2 disagree.*'u2b/kernel'"):
    optax_bm.block_scales(with_res("u2b", post_activation=False), params)
  no_proj = {k: v for k, v in specs.items() if k != "u2s"}
  no_proj["fc"] = {k: LayerSpec(5, v.role, "dense") for k, v in specs["fc"].items()}
  with pytest.raises(ValueError, match="'projection' shortcut but no block"):
    optax_bm.block_scales(no_proj, {k: v for k, v in params.items() if k != "u2s"})
  with pytest.raises(ValueError, match="only a 'projection' shortcut has blocks"):
    Residual(1, "shortcut", 0, "identity")
  with pytest.raises(ValueError, match="shortcut_c is the contraction"):
    Residual(1, shortcut="identity", shortcut_c=4)
  with pytest.raises(ValueError, match="shortcut must be one of"):
    Residual(1, shortcut="concat")
  with pytest.raises(ValueError, match="residual must be None or"):
    LayerSpec(0, "kernel", "dense", residual=(1, "main"))
  with pytest.raises(ValueError, match="input_scale='sqrt'"):
    optax_bm.scale_by_back_matching(specs, input_scale="sqrt")
  # A branch without BatchNorm at its end: its scale is unknown to the recursion.
  no_bn = dict(params)
  no_bn_specs = dict(specs)
  no_bn["u1b"] = {"kernel": params["u1b"]["kernel"]}
  no_bn_specs["u1b"] = {"kernel": LayerSpec(2, "kernel", "dense", 1, 1.0, False,
                                            specs["u1b"]["kernel"].residual)}
  with pytest.raises(ValueError, match=r"unit 1's main branch.*'u1b/kernel'.*input_scale='unit'"):
    optax_bm.block_scales(no_bn_specs, no_bn, input_scale="propagated")
  optax_bm.block_scales(no_bn_specs, no_bn)  # the default, "unit", needs no recursion


# --- optax citizenship with residual specs ---------------------------------------------------


def _setup(dtype=jnp.float32, kind="projection"):
  model = nets.residual_net(kind, dtype=dtype)
  x, y = _data(dtype=dtype)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  specs = nets.specs_from_table(params, nets.residual_expected(kind))
  grads = nnx.as_pure(nnx.grad(lambda m: nets.cross_entropy(y, 5)(m(x)))(model))
  return specs, params, grads


def test_residual_specs_work_under_jit_chain_masked_multisteps_and_apply_if_finite():
  specs, params, grads = _setup()
  tx = optax_bm.scale_amended_sgd(0.1, specs)
  traces = []

  @jax.jit
  def step(g, s, p):
    traces.append(1)
    return tx.update(g, s, p)

  state = tx.init(params)
  u, state = step(grads, state, params)
  step(grads, state, optax.apply_updates(params, u))
  assert len(traces) == 1
  scales = optax_bm.block_scales(specs, params)
  chained = optax.chain(optax_bm.scale_by_back_matching(specs), optax.scale(-0.1))
  got, _ = chained.update(grads, chained.init(params), params)
  chex.assert_trees_all_close(got, jax.tree.map(lambda g, s: -0.1 * g * s, grads, scales),
                              rtol=1e-6)
  # Masked: BatchNorm leaves pass through, the kernels keep their factors (with the "unit"
  # reading: the propagated one reads γ and β, and masking them out is an error naming one).
  not_bn = jax.tree_util.tree_map_with_path(
      lambda p, _: "bn" not in optax_bm.specs.path_str(p), params)
  masked = optax.masked(optax_bm.scale_by_back_matching(specs, input_scale="propagated"), not_bn)
  with pytest.raises(ValueError, match="'units/0/bn/scale'.*masked out.*input_scale='unit'"):
    masked.update(grads, masked.init(params), params)
  masked = optax.masked(optax_bm.scale_by_back_matching(specs, input_scale="unit"), not_bn)
  got, _ = masked.update(grads, masked.init(params), params)
  plain, _ = optax_bm.scale_by_back_matching(specs, input_scale="unit").update(
      grads, None, params)
  for (path, g_m), g_p, g in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                                 jax.tree.leaves(plain), jax.tree.leaves(grads)):
    want = g if "bn" in optax_bm.specs.path_str(path) else g_p
    np.testing.assert_allclose(g_m, want, rtol=1e-6)
  # Masking the classifier's bias only changes nothing else.
  not_fc_bias = jax.tree_util.tree_map_with_path(
      lambda p, _: optax_bm.specs.path_str(p) != "units/3/fc/bias", params)
  masked = optax.masked(optax_bm.scale_by_back_matching(specs), not_fc_bias)
  got, _ = masked.update(grads, masked.init(params), params)
  plain, _ = optax_bm.scale_by_back_matching(specs).update(grads, None, params)
  chex.assert_trees_all_close(got, plain, rtol=1e-6)
  # MultiSteps
  ms = optax.MultiSteps(optax_bm.scale_amended_sgd(0.1, specs), every_k_schedule=2)
  s = ms.init(params)
  u1, s = ms.update(grads, s, params)
  u2, s = ms.update(jax.tree.map(lambda g: 3 * g, grads), s, params)
  inner = optax_bm.scale_amended_sgd(0.1, specs)
  want, _ = inner.update(jax.tree.map(lambda g: 2 * g, grads), inner.init(params), params)
  chex.assert_trees_all_close(u2, want, rtol=1e-5)
  # apply_if_finite
  safe = optax.apply_if_finite(optax_bm.scale_amended_sgd(0.1, specs), 3)
  s = safe.init(params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  u_bad, s_bad = jax.jit(safe.update)(bad, s, params)
  chex.assert_trees_all_equal(u_bad, jax.tree.map(jnp.zeros_like, grads))
  assert int(s_bad.notfinite_count) == 1


def test_residual_specs_with_inject_hyperparams_dtypes_and_abstract_init():
  specs, params, grads = _setup()
  for input_scale in ("propagated", "unit"):
    plain = optax_bm.scale_amended_sgd(0.05, specs, input_scale=input_scale)
    injected = optax.inject_hyperparams(optax_bm.scale_amended_sgd, static_args="input_scale")(
        learning_rate=0.05, specs=specs, input_scale=input_scale)
    up, _ = plain.update(grads, plain.init(params), params)
    ui, _ = jax.jit(injected.update)(grads, injected.init(params), params)
    chex.assert_trees_all_close(up, ui, rtol=1e-5)  # jit vs eager float32 rounding
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  tx = optax_bm.scale_amended_sgd(0.1, specs)
  chex.assert_trees_all_equal_shapes_and_dtypes(tx.init(abstract), tx.init(params))
  for dtype in (jnp.bfloat16, jnp.float64):
    with jax.enable_x64(dtype == jnp.float64):
      specs, params, grads = _setup(dtype)
      u, state = jax.jit(tx.update)(grads, tx.init(params), params)
      for l in jax.tree.leaves(u) + jax.tree.leaves(state):
        if jnp.issubdtype(l.dtype, jnp.floating):
          assert l.dtype == dtype, (l.dtype, dtype)
      assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(u))


# --- unit_scalars and the measurement script -----------------------------------------------


def test_unit_scalars_and_local_hessian_script_on_a_tiny_resnet():
  """The shortcut's local Hessian is exact (1 and 1/4, even by Hutchinson: J_SᵀJ_S is a 0/1
  diagonal); the recursion predicts the stem's second moment 1/2 at γ = 1, β = 0."""
  from train import local_hessian_resnet as lhr  # pylint: disable=import-outside-toplevel

  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  result = lhr.measure("resnet20", 1 / 16, images, probes=2, seed=0, max_units=4)
  rows = result["rows"]
  assert [r["shortcut"] for r in rows] == ["identity"] * 3 + ["subsample"]
  for r in rows:
    np.testing.assert_allclose(r["shortcut_only"], 1.0 if r["shortcut"] == "identity" else 0.25,
                               rtol=1e-6)
    assert r["m_uz_unit"] == pytest.approx(2.0 if r["shortcut"] == "identity" else 0.75)
  np.testing.assert_allclose(rows[0]["v_in_propagated"], 0.5, rtol=1e-6)
  assert rows[0]["m_uz_propagated"] == pytest.approx(1 / 0.5 + 1)
  assert "| unit | shortcut |" in lhr.markdown(result)
  model = nets.residual_net("projection")
  specs = optax_bm.annotate(model, jnp.zeros((2, 8, 8, 3)))
  units = optax_bm.unit_scalars(specs, nnx.as_pure(nnx.state(model, nnx.Param)),
                                input_scale="propagated")
  assert [(u.blocks, u.residual) for u in units] == [
      ((0,), False), ((1, 2), True), ((3, 4, 5), True), ((6,), False)]
  assert units[0].v_in is None and units[3].v_in is None  # no normalized reader of a sum
