"""annotate(): block order, s, c and normalization found from the model itself."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import optax_bm
from optax_bm import LayerSpec, Residual, UNSCALED
from optax_bm.specs import path_str
from tests import nets
from train import models


def _by_path(specs):
  return {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=optax_bm.specs.is_spec_leaf)[0]}


def _block_table(specs):
  """[(kind, s, c, normalized)] per block, from the kernel leaves, in block order."""
  kernels = sorted((s for s in _by_path(specs).values()
                    if isinstance(s, LayerSpec) and s.is_kernel), key=lambda s: s.block)
  assert [s.block for s in kernels] == list(range(len(kernels)))
  return [(s.kind, s.s, s.c, s.normalized) for s in kernels]


def _expected_from_cfg(cfg, image=32):
  """Walks a VGG cfg by hand: s = (spatial size)², c = 4 where a 2x2 pool follows."""
  out, hw = [], image
  items = list(cfg)
  for i, item in enumerate(items):
    if item == "M":
      continue
    pool = i + 1 < len(items) and items[i + 1] == "M"
    out.append(("conv", hw * hw, 4.0 if pool else 1.0, True))
    hw //= 2 if pool else 1
  return out + [("dense", 1, 1.0, False)]


VGG11_BY_HAND = [  # spatial sizes 32,16,8,8,4,4,2,2; pools after convs 1,2,4,6,8
    ("conv", 1024, 4.0, True), ("conv", 256, 4.0, True), ("conv", 64, 1.0, True),
    ("conv", 64, 4.0, True), ("conv", 16, 1.0, True), ("conv", 16, 4.0, True),
    ("conv", 4, 1.0, True), ("conv", 4, 4.0, True), ("dense", 1, 1.0, False)]


@pytest.mark.parametrize("name", ["vgg11", "vgg13", "vgg16", "vgg19"])
def test_vgg_specs_equal_hand_computed(name):
  model = models.vgg(name, num_classes=10, width=1 / 16, rngs=nnx.Rngs(0))
  specs = optax_bm.annotate(model, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  table = _block_table(specs)
  assert table == _expected_from_cfg(models.CFGS[name])
  if name == "vgg11":
    assert table == VGG11_BY_HAND
  # Every BatchNorm parameter sits in its conv's block; the classifier bias in the top block.
  by_path = _by_path(specs)
  n_blocks = len(table)
  for path, s in by_path.items():
    if path.startswith("blocks/"):
      assert s.block == int(path.split("/")[1]), path
      assert s.is_kernel == path.endswith("conv/kernel"), path
    else:
      assert path.startswith("classifier/") and s.block == n_blocks - 1, path
  # The spec tree has exactly the structure of the optimized parameters.
  assert jax.tree.structure(specs) == jax.tree.structure(nnx.state(model, nnx.Param))


def test_annotate_works_in_eval_mode_and_leaves_the_model_alone():
  model = nets.vgg_like()
  model.eval()
  specs = optax_bm.annotate(model, jnp.zeros((3, 8, 8, 3)))
  assert _block_table(specs) == nets.vgg_like_expected()
  assert model.blocks[0].bn.use_running_average  # still in eval mode


def test_annotate_bf16_compute_and_linen():
  model = models.vgg("vgg11", num_classes=10, width=1 / 16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert _block_table(optax_bm.annotate(model, jnp.zeros((2, 32, 32, 3)))) == VGG11_BY_HAND
  lin = nets.LinenChain()
  variables = lin.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))
  specs = optax_bm.annotate(lin, variables, jnp.zeros((2, 8, 8, 3)), train=True)
  assert _block_table(specs) == nets.linen_expected()
  assert jax.tree.structure(specs) == jax.tree.structure(variables["params"])
  with pytest.raises(ValueError, match="variables"):
    optax_bm.annotate(lin, jnp.zeros((2, 8, 8, 3)))


class _LinenEvalByDefault(nets.LinenChain):
  """A Linen model whose ``train`` flag defaults to False, as many do."""

  def __call__(self, x, train: bool = False):
    return super().__call__(x, train)


def test_linen_batch_norm_in_inference_mode_is_an_error():
  x = jnp.zeros((2, 8, 8, 3))
  lin = _LinenEvalByDefault()
  variables = lin.init(jax.random.key(0), x)
  # Without train=True, BatchNorm uses its running statistics: all blocks would read
  # normalized=False, every factor wrong (issue 13, item 6).
  for kwargs in ({}, {"train": False}):
    with pytest.raises(ValueError, match=r"running statistics \(batch_stats/.*inference mode.*"
                       r"train=True"):
      optax_bm.annotate(lin, variables, x, **kwargs)
  specs = optax_bm.annotate(lin, variables, x, train=True)
  assert _block_table(specs) == nets.linen_expected()
  # Under jit (a pjit in the traced forward pass) the dependence is still found.
  jitted = nn.jit(_LinenEvalByDefault)()
  with pytest.raises(ValueError, match="inference mode"):
    optax_bm.annotate(jitted, jitted.init(jax.random.key(0), x), x)


class _InputScale(nnx.Module):
  def __init__(self, rngs):
    self.gain = nnx.Param(jnp.ones((3,)))
    self.body = nets.stride2_net()

  def __call__(self, x):
    return self.body(x * self.gain)


class _Unused(nnx.Module):
  def __init__(self):
    self.body = nets.stride2_net()
    self.spare = nnx.Param(jnp.ones((2,)))

  def __call__(self, x):
    return self.body(x)


class _Residual(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.b = nnx.Conv(4, 4, (3, 3), rngs=rngs)
    self.c = nnx.Conv(4, 4, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.a(x))
    h = nnx.relu(self.c(nnx.relu(self.b(h))) + h)
    return self.fc(h.mean(axis=(1, 2)))


def test_unplaceable_parameter_is_an_error_naming_it_unless_opted_out():
  x = jnp.zeros((2, 8, 8, 3))
  with pytest.raises(ValueError, match=r"'gain'.*acts on the model input.*unscaled=\['gain'\]"):
    optax_bm.annotate(_InputScale(nnx.Rngs(0)), x)
  specs = optax_bm.annotate(_InputScale(nnx.Rngs(0)), x, unscaled=["gain"])
  assert _by_path(specs)["gain"] is UNSCALED
  assert _block_table(specs) == nets.stride2_expected()
  with pytest.raises(ValueError, match=r"'spare'.*never used"):
    optax_bm.annotate(_Unused(), x)
  mask = lambda p: jax.tree_util.tree_map_with_path(lambda k, _: path_str(k) == "spare", p)
  assert _by_path(optax_bm.annotate(_Unused(), x, unscaled=mask))["spare"] is UNSCALED
  with pytest.raises(ValueError, match="unscaled path 'nope' is not a parameter"):
    optax_bm.annotate(_Unused(), x, unscaled=["nope"])


def test_identity_skip_connection_is_a_residual_unit():
  specs = _by_path(optax_bm.annotate(_Residual(nnx.Rngs(0)), jnp.zeros((2, 8, 8, 3))))
  res = lambda pos: Residual(1, "main", pos, "identity", post_activation=True)  # noqa: E731
  want = {"a": (0, 64, 1.0, None), "b": (1, 64, 1.0, res(0)), "c": (2, 64, 1.0, res(1)),
          "fc": (3, 1, 64.0, None)}  # the classifier reads the sum's 8x8 positions via GAP
  for name, (block, s, c, r) in want.items():
    for leaf in ("kernel", "bias"):
      spec = specs[f"{name}/{leaf}"]
      assert (spec.block, spec.s, spec.c, spec.normalized, spec.residual) == (
          block, s, c, False, r), (name, leaf, spec)


class _TwoBranches(nnx.Module):
  """h -> a; then F(h) = c(relu(b(h))) joined with h by `join`."""

  def __init__(self, join, rngs, stride=1):
    self.join = join
    self.a = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.b = nnx.Conv(4, 4, (3, 3), strides=stride, rngs=rngs)
    self.c = nnx.Conv(4, 4, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(8 if join == "concat" else 4, 2, rngs=rngs)
    self.gain = nnx.Param(jnp.ones((4,)))

  def __call__(self, x):
    h = nnx.relu(self.a(x))
    f = self.c(nnx.relu(self.b(h)))
    if self.join == "concat":
      y = jnp.concatenate([f, h], axis=-1)
    elif self.join == "product":
      y = f * h
    elif self.join == "avg_pool_shortcut":
      y = f + nnx.avg_pool(h, (2, 2), strides=(2, 2))
    elif self.join == "gain_after_sum":
      y = (f + h) * self.gain
    else:
      raise ValueError(self.join)
    return self.fc(nnx.relu(y).mean(axis=(1, 2)))


class _ReadsInsideAUnit(nnx.Module):
  """A kernel reading the branch's middle: not a chain of units."""

  def __init__(self, rngs):
    self.a = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.b = nnx.Conv(4, 4, (3, 3), rngs=rngs)
    self.c = nnx.Conv(4, 4, (3, 3), rngs=rngs)
    self.d = nnx.Linear(4, 2, rngs=rngs)
    self.fc = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.a(x))
    mid = nnx.relu(self.b(h))
    y = nnx.relu(self.c(mid) + h)
    return self.fc(y.mean(axis=(1, 2))), self.d(mid.mean(axis=(1, 2)))


def test_what_is_not_a_residual_unit_is_refused_by_name():
  x = jnp.zeros((2, 8, 8, 3))
  with pytest.raises(ValueError, match=r"a 'concatenate' combines the activations of block "
                     r"with kernel 'c/kernel' and block with kernel 'a/kernel'.*'a/kernel'"):
    optax_bm.annotate(_TwoBranches("concat", nnx.Rngs(0)), x)
  with pytest.raises(ValueError, match=r"a 'mul' combines the activations of block with "
                     r"kernel 'c/kernel' and block with kernel 'a/kernel'"):
    optax_bm.annotate(_TwoBranches("product", nnx.Rngs(0)), x)
  with pytest.raises(ValueError, match=r"an 'add' sums .*'c/kernel'.* not a residual unit.*"
                     r"'reduce_window_sum'"):
    optax_bm.annotate(_TwoBranches("avg_pool_shortcut", nnx.Rngs(0), stride=2), x)
  with pytest.raises(ValueError, match=r"'gain'.*acts on the sum of residual unit 0, after "
                     r"the sum, outside every block.*unscaled=\['gain'\]"):
    optax_bm.annotate(_TwoBranches("gain_after_sum", nnx.Rngs(0)), x)
  with pytest.raises(ValueError, match=r"not a chain of blocks: kernel 'd/kernel'"):
    optax_bm.annotate(_ReadsInsideAUnit(nnx.Rngs(0)), x)
  with pytest.raises(ValueError, match="pooling='after' is not implemented for residual"):
    optax_bm.annotate(_Residual(nnx.Rngs(0)), x, pooling="after")


@pytest.mark.parametrize("kind", ["identity", "subsample", "projection"])
@pytest.mark.parametrize("act", [True, False])
def test_residual_units_equal_hand_computed(kind, act):
  model = nets.residual_net(kind, act=act)
  specs = optax_bm.annotate(model, jnp.zeros((2, 8, 8, 3)))
  want = nets.specs_from_table(nnx.as_pure(nnx.state(model, nnx.Param)),
                               nets.residual_expected(kind, act))
  assert jax.tree.leaves(nnx.as_pure(specs)) == jax.tree.leaves(want)


def test_not_a_flax_model():
  with pytest.raises(TypeError, match="expected a Flax"):
    optax_bm.annotate(lambda x: x, jnp.zeros((2, 3)))


class _StandardizedConv(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    w = self.conv.kernel[...]
    w = (w - w.mean()) / (w.std() + 1e-5)  # weight standardization: the kernel is computed
    h = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return self.fc(nnx.relu(h).mean(axis=(1, 2)))


class _Scanned(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (3, 4, 4)))
    self.fc = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, self.w[...])
    return self.fc(h)


def test_kernels_annotate_cannot_see_are_errors_not_silent_misplacements():
  with pytest.raises(ValueError, match=r"computed from parameters \['conv/kernel'\]"):
    optax_bm.annotate(_StandardizedConv(nnx.Rngs(0)), jnp.zeros((2, 8, 8, 3)))
  with pytest.raises(ValueError, match=r"\['w'\] enter a 'scan'.*by hand"):
    optax_bm.annotate(_Scanned(nnx.Rngs(0)), jnp.zeros((2, 4)))


class _ExplicitPadChain(nnx.Module):
  """conv -> relu -> 2×2 pool, then conv; each conv SAME, or explicit zero padding + VALID."""

  def __init__(self, explicit: bool, rngs):
    pad = "VALID" if explicit else "SAME"
    self.explicit = explicit
    self.a = nnx.Conv(3, 4, (3, 3), padding=pad, rngs=rngs)
    self.b = nnx.Conv(4, 5, (3, 3), padding=pad, rngs=rngs)
    self.fc = nnx.Linear(5 * 4 * 4, 2, rngs=rngs)

  def _pad(self, x):
    if not self.explicit:
      return x
    return jax.lax.optimization_barrier(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))

  def __call__(self, x):
    h = nnx.relu(self.a(self._pad(x)))
    h = nnx.max_pool(h, (2, 2), (2, 2))
    h = nnx.relu(self.b(self._pad(h).astype(jnp.bfloat16).astype(jnp.float32)))
    return self.fc(h.reshape(h.shape[0], -1))


def test_block_input_is_counted_before_explicit_padding():
  """c counts z_{b-1}'s positions (docs/method.md#3-scalar-local-hessians): jnp.pad + VALID
  conv annotates like SAME."""
  x = jnp.zeros((2, 8, 8, 3))
  want = optax_bm.annotate(_ExplicitPadChain(False, nnx.Rngs(0)), x)
  got = optax_bm.annotate(_ExplicitPadChain(True, nnx.Rngs(0)), x)
  assert _block_table(want) == [("conv", 64, 4.0, False), ("conv", 16, 1.0, False),
                                ("dense", 1, 1.0, False)]
  assert got == want


class _LinenDropoutNet(nn.Module):
  """Conv -> BN -> ReLU -> Dropout -> Conv -> BN -> mean -> Dense (issue 20, defect 1)."""
  dropout: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
    if self.dropout:
      x = nn.Dropout(0.5, deterministic=not train)(x)
    x = nn.BatchNorm(use_running_average=not train)(nn.Conv(16, (3, 3))(x))
    return nn.Dense(5)(x.mean(axis=(1, 2)))


_DROPOUT_EXPECTED = [("conv", 64, 1.0, True), ("conv", 64, 64.0, True), ("dense", 1, 1.0, False)]


@pytest.mark.parametrize("key", [jax.random.key(1), jax.random.PRNGKey(1)],
                         ids=["typed_key", "raw_key"])
def test_linen_dropout_rng_is_not_an_activation(key):
  x = jnp.zeros((4, 8, 8, 3))
  variables = _LinenDropoutNet().init(jax.random.key(0), x)
  specs = optax_bm.annotate(_LinenDropoutNet(), variables, x, train=True,
                            rngs={"dropout": key})
  assert _block_table(specs) == _DROPOUT_EXPECTED
  plain = optax_bm.annotate(_LinenDropoutNet(dropout=False), variables, x, train=True)
  assert specs == plain  # dropout has no parameters: same tree, same specs


class _NNXDropoutNet(nnx.Module):
  def __init__(self, rngs):
    self.conv1, self.bn1 = nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.conv2, self.bn2 = nnx.Conv(8, 16, (3, 3), rngs=rngs), nnx.BatchNorm(16, rngs=rngs)
    self.fc = nnx.Linear(16, 5, rngs=rngs)

  def __call__(self, x, rngs=None):
    x = self.drop(nnx.relu(self.bn1(self.conv1(x))), rngs=rngs)
    return self.fc(self.bn2(self.conv2(x)).mean(axis=(1, 2)))


def test_nnx_dropout_rng_is_not_an_activation():
  model = _NNXDropoutNet(nnx.Rngs(0))
  model.train()
  x = jnp.zeros((4, 8, 8, 3))
  assert _block_table(optax_bm.annotate(model, x)) == _DROPOUT_EXPECTED
  # The key passed with the call, as data: no more an activation than the module's own.
  specs = optax_bm.annotate(model, x, rngs=nnx.Rngs(dropout=jax.random.key(2)))
  assert _block_table(specs) == _DROPOUT_EXPECTED


def _resnet_by_hand(n, option="A"):
  """{block: (kind, s, c, normalized, Residual)} of a CIFAR ResNet (32x32 input), walked by
  hand: stem, 3 stages x n basic blocks (stages 2, 3 start with stride 2), GAP, dense."""
  rows = [("conv", 1024, 1.0, True, None)]  # the stem: unit 0
  hw, u = 32, 1
  for stage in range(3):
    for j in range(n):
      down = stage > 0 and j == 0
      out = hw // 2 if down else hw
      kind = ("subsample" if option == "A" else "projection") if down else "identity"
      res = lambda br, pos, kind=kind, down=down, u=u: Residual(  # noqa: E731
          u, br, pos, kind, 4.0 if down and option == "A" else 1.0, True)
      rows.append(("conv", out * out, 4.0 if down else 1.0, True, res("main", 0)))
      rows.append(("conv", out * out, 1.0, True, res("main", 1)))
      if kind == "projection":  # 1x1 stride 2: 1024 -> 256 positions, c = 4
        rows.append(("conv", out * out, 4.0, True, res("shortcut", 0)))
      hw, u = out, u + 1
  rows.append(("dense", 1, 64.0, False, None))  # reads the last sum (8x8) through the GAP
  return dict(enumerate(rows))


@pytest.mark.parametrize("name,n,option", [("resnet20", 3, "A"), ("resnet56", 9, "A"),
                                           ("resnet20b", 3, "B")])
def test_resnet_specs_equal_hand_computed(name, n, option):
  model = models.create(name, num_classes=10, width=1 / 8, rngs=nnx.Rngs(0))
  specs = optax_bm.annotate(model, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  want = _resnet_by_hand(n, option)
  by_path = _by_path(specs)
  kernels = {s.block: (s.kind, s.s, s.c, s.normalized, s.residual)
             for s in by_path.values() if s.is_kernel}
  assert kernels == want
  assert len(want) == 6 * n + 2 + (2 if option == "B" else 0)
  # Every leaf sits in the block of its module: stem, units/u/{main,shortcut}/j, classifier.
  block_of_module, b = {"stem": 0}, 1
  for u in range(3 * n):
    for j in range(2):
      block_of_module[f"units/{u}/main/{j}"] = b
      b += 1
    if option == "B" and u in (n, 2 * n):
      block_of_module[f"units/{u}/shortcut/0"] = b
      b += 1
  block_of_module["classifier"] = b
  for path, s in by_path.items():
    module = max((m for m in block_of_module if path.startswith(m + "/")), key=len)
    assert s.block == block_of_module[module], path
    assert (s.kind, s.s, s.c, s.normalized, s.residual) == want[s.block], path
    assert s.is_kernel == path.endswith("kernel"), path
  assert jax.tree.structure(specs) == jax.tree.structure(nnx.state(model, nnx.Param))
  # The transformation runs on them (a step of scale-amended SGD under jit).
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = optax_bm.scale_amended_sgd(0.1, specs)
  updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(updates))
