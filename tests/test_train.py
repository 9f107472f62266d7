"""Tests of the CIFAR trainer (train/models.py, train/cifar.py, train/table1.py).

Tiny widths throughout; conftest.py gives this process 4 simulated CPU devices. The CLI tests
run ``train/cifar.py`` in subprocesses on the shipped sample (``--data-dir sample``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import cifar, cli, models, pipeline, records, table1, table1_report
from train import config as config_lib, state as state_lib, steps as steps_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
CIFAR_PY = str(REPO / "train" / "cifar.py")
TINY = ["--width", "0.0625", "--batch-size", "64", "--train-subset", "256", "--test-subset",
        "64", "--data-dir", "sample", "--no-progress"]
RESULT_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr")


_CACHE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for this module's subprocesses (saves ~10 s each)."""
  _CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
  yield
  _CACHE.clear()


def _env(devices: int = 1) -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  if "dir" in _CACHE:
    env["JAX_COMPILATION_CACHE_DIR"] = _CACHE["dir"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


def _cli(args, devices: int = 1, **kw) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, CIFAR_PY, *args], cwd=REPO, env=_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _results(workdir) -> list:
  """metrics.jsonl without the timing fields."""
  return [{k: h[k] for k in RESULT_KEYS} for h in records.read_metrics(str(workdir))]


def _batch(n=32, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, n), jnp.int32)
  return x, y


def _out_shape(model, x):
  """The model's output (shape, dtype), traced once instead of run op by op."""
  graphdef, state = nnx.split(model)
  return jax.eval_shape(lambda st, x: nnx.merge(graphdef, st)(x), state, x)


def _setup(optimizer, width=1 / 16, **kw):
  config = config_lib.Config(optimizer=optimizer, width=width, epochs=1, **kw).resolved()
  return state_lib.create_train_state(config, 10, steps_per_epoch=100)


# ----------------------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("name,convs", [("vgg11", 8), ("vgg13", 10), ("vgg16", 13),
                                        ("vgg19", 16)])
def test_vgg_structure(name, convs):
  model = nnx.eval_shape(lambda: models.vgg(name, 100, width=1 / 16, rngs=nnx.Rngs(0)))
  assert len(model.blocks) == convs
  assert model.classifier.in_features == 32  # 512 / 16, 1×1 final map
  params = nnx.state(model, nnx.Param)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out = _out_shape(model, jnp.zeros((2, 32, 32, 3)))
  assert out.shape == (2, 100) and out.dtype == jnp.float32


def test_vgg_width_and_bf16():
  assert models.scaled_channels(64, 1 / 128) == 1 and models.scaled_channels(64, 0.3) == 19
  model = nnx.eval_shape(
      lambda: models.vgg("vgg11", 10, width=1 / 16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert _out_shape(model, jnp.zeros((2, 32, 32, 3))).dtype == jnp.float32  # fp32 logits
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda st, x: nnx.merge(graphdef, st)(x))(state,
                                                                  jnp.zeros((2, 32, 32, 3)))
  convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert convs and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in convs)
  with pytest.raises(ValueError, match="unknown model"):
    models.vgg("vgg12", 10, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------
# Steps


@pytest.mark.parametrize("optimizer", config_lib.OPTIMIZERS)
def test_steps_lower_loss_on_fixed_batch(optimizer):
  setup, state = _setup(optimizer)
  x, y = _batch()
  step = jax.jit(lambda s: steps_lib.train_step(s, x, y, setup=setup))
  losses = []
  for _ in range(6):
    state, m = step(state)
    losses.append(float(m["loss"] / m["count"]))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses
  assert int(state["step"]) == 6


def test_eval_uses_running_statistics():
  setup, state = _setup("sgd")
  x, y = _batch()
  step = jax.jit(lambda s: steps_lib.train_step(s, x, y, setup=setup))
  for _ in range(3):
    state, _ = step(state)
  bn = state["batch_stats"]["blocks"][0]["bn"]
  assert not np.allclose(bn["mean"], 0.0)  # the running averages were updated

  @jax.jit
  def logits_train(stats, xs):
    return nnx.merge(setup.graphdef, state["params"], stats)(xs)

  @jax.jit
  def logits_eval(stats, xs):
    return nnx.merge(setup.eval_graphdef, state["params"], stats)(xs)

  def logits(graphdef, stats, xs):
    return (logits_eval if graphdef is setup.eval_graphdef else logits_train)(stats, xs)

  full = logits(setup.eval_graphdef, state["batch_stats"], x)
  # Eval mode: an example's output does not depend on the rest of the batch...
  np.testing.assert_allclose(logits(setup.eval_graphdef, state["batch_stats"], x[:4]),
                             full[:4], rtol=1e-5, atol=1e-5)
  # ...but on the running statistics; train mode uses the batch's.
  fresh = jax.tree.map(jnp.zeros_like, state["batch_stats"])
  assert not np.allclose(logits(setup.eval_graphdef, fresh, x[:4]), full[:4], atol=1e-3)
  train_out = logits(setup.graphdef, state["batch_stats"], x[:4])
  assert not np.allclose(train_out, full[:4], atol=1e-3)
  # eval_step sums over the masked examples only.
  mask = jnp.arange(32) < 20
  sums = steps_lib.eval_step(state, x, y, mask, setup=setup)
  assert float(sums["count"]) == 20
  np.testing.assert_allclose(
      float(sums["loss"]), float(steps_lib.cross_entropy(full, y)[:20].sum()), rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["scale_amended"])
def test_sharded_step_matches_single_device(optimizer):
  """One jitted step: batch sharded over 4 devices == 1 device, same global batch.

  Compared one step at a time (from the initial state and from a trained one): over several
  steps of this tiny, random-label problem float noise grows chaotically (max-pool/ReLU
  switches), which says nothing about the step.
  """
  assert jax.device_count() == 4
  setup, state0 = _setup(optimizer)
  x, y = _batch(32)
  meshes = [pipeline.make_mesh(jax.devices()[:1]), pipeline.make_mesh(jax.devices())]
  steps = [steps_lib.make_train_step(setup, mesh) for mesh in meshes]
  trained = state0
  for _ in range(3):
    trained, _ = steps[0](pipeline.replicate(trained, meshes[0]), x, y)
  for start in (state0, jax.device_get(trained)):
    results = []
    for mesh, step in zip(meshes, steps):
      state, m = step(pipeline.replicate(start, mesh), x, y)
      leaf = jax.tree.leaves(state["params"])[0]
      assert leaf.sharding.mesh.devices.size == mesh.devices.size
      assert leaf.sharding.is_fully_replicated
      results.append(jax.device_get((state, m)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 *results)


def test_epoch_pipeline_independent_of_devices_and_scan():
  """The epoch pipeline (on-device shuffle, augment, shard, metric sums, padded eval) gives the
  same result on 1 and 4 devices, and as one ``lax.scan`` (GPU/TPU default) or one call per
  step (CPU default).

  At lr 0 the parameters stay put, so the float noise of the sharded reductions cannot grow
  chaotically (over several steps of this tiny network it does, at any lr > 0, which says
  nothing about the pipeline); the loss sums and BatchNorm running averages still depend on
  which images every step saw and how they were augmented.
  """
  config = config_lib.Config(width=1 / 16, epochs=2, batch_size=32, seed=3, lr=0.0).resolved()
  rng = np.random.default_rng(0)
  arrays = (rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, 96).astype(np.int32),
            rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, 40).astype(np.int32), np.arange(40) < 36)
  outs = []
  for devices, per_call in ((jax.devices()[:1], 1), (jax.devices(), 1),
                            (jax.devices()[:1], 0)):
    mesh = pipeline.make_mesh(devices)
    data = pipeline.DeviceData(*pipeline.replicate(arrays, mesh), 96, 36, 10, "random")
    setup, state = state_lib.create_train_state(config, 10, 3)
    runner = steps_lib.EpochRunner(setup, mesh, config, data, 3, 20, steps_per_call=per_call)
    assert len(runner.train_plan) == (3 if per_call == 1 else 1)
    assert len(runner.eval_plan) == (2 if per_call == 1 else 1)
    state = pipeline.replicate(state, mesh)
    state, train_sums = runner.train_epoch(state, 0)
    state, train_sums = runner.train_epoch(state, 1)
    assert int(state["step"]) == 6
    outs.append(jax.device_get((train_sums, runner.evaluate(state), state["batch_stats"])))
  for other in outs[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 outs[0], other)
  assert float(outs[0][0]["count"]) == 96 and float(outs[0][1]["count"]) == 36


def test_schedules():
  cfg = config_lib.Config(epochs=8).resolved()
  sched = state_lib.create_schedule(cfg, 10)
  np.testing.assert_allclose([sched(0), sched(39), sched(40), sched(59), sched(60)],
                             [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)
  cos = state_lib.create_schedule(config_lib.Config(epochs=8, schedule="cosine").resolved(), 10)
  np.testing.assert_allclose([cos(0), cos(40), cos(80)], [0.1, 0.05, 0.0], atol=1e-7)
  assert config_lib.Config(optimizer="lars").resolved().lr == 4.0  # chosen on validation
  assert config_lib.PAPER_SETTINGS["lars"] == (2.0, 1e-3)  # the paper's stays named
  assert config_lib.Config(optimizer="scale_amended").resolved().weight_decay == 5e-3


def test_cpu_xla_flags_added_without_overriding_the_users():
  env = {}
  cli.set_cpu_xla_flags(env)
  assert env["XLA_FLAGS"].split() == list(cli.CPU_XLA_FLAGS)
  cli.set_cpu_xla_flags(env)  # idempotent
  assert env["XLA_FLAGS"].split() == list(cli.CPU_XLA_FLAGS)
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  cli.set_cpu_xla_flags(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4",
                                      *cli.CPU_XLA_FLAGS]
  mine = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
  env = {"XLA_FLAGS": mine}
  cli.set_cpu_xla_flags(env)
  assert env["XLA_FLAGS"] == mine  # the user's own value wins


# ----------------------------------------------------------------------------------------
# Command line: multi-process, crash and resume, bad input


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _checkpoint_dirs_complete(workdir: pathlib.Path, allow_tmp: bool) -> list:
  ckpts = workdir / "checkpoints"
  names = sorted(os.listdir(ckpts)) if ckpts.exists() else []
  tmp = [n for n in names if "tmp" in n]
  if not allow_tmp:
    assert not tmp, f"temporary checkpoint dirs left: {tmp}"
  if not allow_tmp:
    assert records.CHECKPOINT_TRASH not in names, "deleted checkpoints left in the trash"
  done = [n for n in names if n.isdigit()]
  for n in done:
    assert (ckpts / n / "_CHECKPOINT_METADATA").exists(), f"incomplete checkpoint {n}"
    assert (ckpts / n / "state" / "_METADATA").exists(), f"incomplete checkpoint {n}"
  leftovers = [f for f in os.listdir(workdir) if ".tmp" in f]
  if not allow_tmp:
    assert not leftovers, leftovers
  return sorted(int(n) for n in done)


def test_checkpoints_past_keep_leave_through_the_trash(tmp_path):
  """Orbax deletes a step's files in place; a kill during that left a half-deleted step that
  orbax lists. Ours are renamed into the trash (atomic) and emptied after each save and on
  the next start, so every listed step is complete."""
  workdir = str(tmp_path)
  trash = tmp_path / "checkpoints" / records.CHECKPOINT_TRASH
  state = {"w": jnp.arange(4.0)}
  mngr = records.checkpoint_manager(workdir, keep=2)
  for epoch in (1, 2, 3):
    records.save_checkpoint(mngr, epoch, state, [{"epoch": epoch}])
  assert mngr.all_steps() == [2, 3] and not trash.exists()
  mngr.close()
  (trash / "1" / "state").mkdir(parents=True)  # as a kill while emptying the trash leaves it
  (trash / "1" / "state" / "leftover").write_text("x")
  mngr = records.checkpoint_manager(workdir, keep=2)
  assert not trash.exists() and mngr.all_steps() == [2, 3]
  restored, history = records.restore_checkpoint(mngr, state)
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert history == [{"epoch": 3}]
  mngr.close()


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
  epochs = 8  # an epoch and its checkpoint take about 0.15 s here: kills land well before the end
  args = TINY + ["--epochs", str(epochs), "--optimizer", "scale_amended"]
  ref = _cli(args + ["--workdir", str(tmp_path / "ref")])
  workdir = tmp_path / "killed"
  kills = 0
  for kill_after in (1, 4):  # kill once epoch 1 and once epoch 4 is in metrics.jsonl
    p = _cli(args + ["--workdir", str(workdir)])
    deadline = time.time() + 180
    while p.poll() is None and time.time() < deadline:
      if len(records.read_metrics(str(workdir))) >= kill_after:
        time.sleep(0.07 * kill_after)  # land somewhere inside the next epoch/checkpoint
        os.kill(p.pid, signal.SIGKILL)
        kills += 1
        break
      time.sleep(0.02)
    p.communicate(timeout=60)
    # After the crash: metrics hold epochs 1..k exactly, none past the last checkpoint.
    history = records.read_metrics(str(workdir))
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    done = _checkpoint_dirs_complete(workdir, allow_tmp=True)
    assert len(history) <= (done[-1] if done else 0)
  assert kills >= 1 and len(history) < epochs, (kills, len(history))
  p = _cli(args + ["--workdir", str(workdir)])
  out, err = p.communicate(timeout=240)
  assert p.returncode == 0, err[-3000:]
  ref_out, ref_err = ref.communicate(timeout=240)
  assert ref.returncode == 0, ref_err[-3000:]
  assert "resuming after epoch" in out
  assert _results(workdir) == _results(tmp_path / "ref")  # bitwise: same compiled program
  assert [h["epoch"] for h in _results(workdir)] == list(range(1, epochs + 1))
  _checkpoint_dirs_complete(workdir, allow_tmp=False)
  # --eval-only reproduces the last epoch's test accuracy from the checkpoint.
  p = _cli(["--workdir", str(workdir), "--eval-only"])
  out, err = p.communicate(timeout=120)
  assert p.returncode == 0, err[-3000:]
  assert f"{100 * _results(workdir)[-1]['test_acc']:.2f}%" in out


def test_two_process_distributed_run(tmp_path):
  """2 processes × 2 CPU devices on 127.0.0.1 (jax.distributed, gloo) train like 1 × 4."""
  port = _free_port()
  common = TINY + ["--epochs", "2", "--workdir", str(tmp_path / "dist"),
                   "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
  procs = [_cli(common + ["--process-id", str(i)], devices=2) for i in range(2)]
  # Meanwhile the reference in this process (4 devices, the same global batches).
  config = config_lib.Config(width=0.0625, batch_size=64, train_subset=256, test_subset=64,
                             data_dir="sample", epochs=2)
  ref = cifar.train_and_evaluate(config, str(tmp_path / "single"), progress=False)
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "4 device(s) on 2 process(es)" in outs[0][0]
  assert "summary:" in outs[0][0] and "epoch" not in outs[1][0]  # only process 0 logs
  dist = _results(tmp_path / "dist")
  assert [h["epoch"] for h in dist] == [1, 2]
  for a, b in zip(dist, ref):
    np.testing.assert_allclose([a[k] for k in RESULT_KEYS], [b[k] for k in RESULT_KEYS],
                               rtol=1e-4, atol=1e-4)


def test_bad_input_clear_errors(tmp_path):
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b not really a tarball")
  other = tmp_path / "other"
  other.mkdir()
  stored = config_lib.Config(width=0.0625, seed=7, data_dir="sample").resolved()
  (other / "config.json").write_text(json.dumps(stored.to_json()))
  cases = {
      "missing": (TINY[:-3] + ["--data-dir", str(tmp_path / "nowhere"), "--no-progress",
                               "--workdir", str(tmp_path / "w1")], 1, 1, "nowhere"),
      "corrupt": (TINY[:-3] + ["--data-dir", str(corrupt), "--no-progress",
                               "--workdir", str(tmp_path / "w2")], 1, 1, "cifar-10-python"),
      "model": (["--model", "vgg12", "--workdir", str(tmp_path / "w3")], 1, 2, "vgg12"),
      "optimizer": (["--optimizer", "adam", "--workdir", str(tmp_path / "w4")], 1, 2, "adam"),
      "batch": (TINY + ["--batch-size", "30", "--workdir", str(tmp_path / "w5")], 4, 2,
                "not divisible by the device count 4"),
      "config": (TINY[:2] + ["--data-dir", "sample", "--workdir", str(other)], 1, 2,
                 "different config"),
  }
  procs = {k: _cli(a, devices=d) for k, (a, d, _, _) in cases.items()}
  for name, p in procs.items():
    out, err = p.communicate(timeout=120)
    _, _, code, needle = cases[name]
    assert p.returncode == code, (name, p.returncode, err)
    assert "Traceback" not in err and "Traceback" not in out, (name, err)
    assert needle in err, (name, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") or "error: argument" in last, (name, err)
    assert len(last) < 1000
  # Nothing was written for the failed runs; the other run's config is untouched.
  assert not (tmp_path / "w1" / "config.json").exists()
  assert json.loads((other / "config.json").read_text())["seed"] == 7


# ----------------------------------------------------------------------------------------
# Table 1 grid


def test_table1_report_from_finished_runs(tmp_path):
  args = table1.parse_args(["--mini", "--optimizers", "sgd", "scale_amended", "--seeds", "0",
                            "1", "--epochs", "2", "--workdir-root", str(tmp_path / "runs"),
                            "--out", str(tmp_path / "out")])
  assert args.width == 0.125 and args.models == ["vgg11"] and args.allow_subset
  assert args.data_dir.endswith("shared/data/cifar10-mini")
  for i, (seed, opt) in enumerate([(0, "sgd"), (1, "sgd"), (0, "scale_amended")]):
    w = tmp_path / "runs" / table1_report.run_name("cifar10", "vgg11", opt, seed)
    w.mkdir(parents=True)
    lines = [{"epoch": e, "test_acc": 0.1 * (e + i), "seconds": 1.0} for e in (1, 2)]
    (w / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in lines))
  unfinished = tmp_path / "runs" / table1_report.run_name("cifar10", "vgg11", "scale_amended", 1)
  unfinished.mkdir()
  (unfinished / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": 0.9}) + "\n")
  assert table1.main(["--mini", "--optimizers", "sgd", "scale_amended", "--seeds", "0", "1",
                      "--epochs", "2", "--workdir-root", str(tmp_path / "runs"), "--out",
                      str(tmp_path / "out"), "--report-only"]) == 0
  text = (tmp_path / "out" / "table1.md").read_text()
  assert table1_report.MINI_LABEL in text
  assert "| SGD | 25.00 [20.00, 30.00] (92.34) |" in text
  assert "| scale-amended | 40.00 [40.00, 1 seed(s) missing] (92.45) |" in text
  assert (tmp_path / "out" / "curves.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------
# Issue 13: reliability of the command line (workdir, numeric flags, resume, cache)


def _strict_json(text):
  """json.loads that refuses NaN/Infinity (which Python's json writes and reads by default)."""
  return json.loads(text, parse_constant=lambda c: pytest.fail(f"not valid JSON: {c}"))


def test_bad_flags_and_workdirs_fail_before_the_data(tmp_path, capsys):
  afile = tmp_path / "f"
  afile.write_text("x\n")
  cases = {  # name: (extra args, workdir, text in the error line)
      "workdir file": ([], afile, "exists and is not a directory"),
      "workdir under a file": ([], afile / "sub", "cannot create or write it"),
      "workdir in /sys": ([], pathlib.Path("/sys/optax_bm_x"), "cannot create or write it"),
      "keep 0": (["--keep-checkpoints", "0"], tmp_path / "k", "--keep-checkpoints must be at least 1"),
      "lr nan": (["--lr", "nan"], tmp_path / "a", "--lr must be a positive number (got nan)"),
      "lr negative": (["--lr", "-0.1"], tmp_path / "b", "--lr must be a positive number"),
      "lr inf": (["--lr", "inf"], tmp_path / "c", "--lr must be a positive number"),
      "wd nan": (["--weight-decay", "nan"], tmp_path / "d", "--weight-decay must be a number"),
      "momentum": (["--momentum", "1.5"], tmp_path / "e", "--momentum must be in [0, 1)"),
      "width nan": (["--width", "nan"], tmp_path / "g", "--width must be a positive number"),
      "negative subset": (["--train-subset", "-5"], tmp_path / "h",
                          "--train-subset must be at least 1 (got -5"),
  }
  args = lambda name: TINY + ["--epochs", "1", *cases[name][0], "--workdir", str(cases[name][1])]
  # Two through the real command line (one error: line, no traceback, exit 2) ...
  procs = {k: _cli(args(k)) for k in ("workdir file", "lr nan")}
  # ... and every case in this process (the same main(); nothing loads before the checks).
  for name, (_, _, needle) in cases.items():
    assert cifar.main(args(name) + ["--no-compilation-cache"]) == 2, name
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1].startswith("error: ") and needle in err, (name, err)
    assert "data:" not in out, name  # refused before the data was loaded
  for name, p in procs.items():
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, (name, p.returncode, err[-2000:])
    assert "Traceback" not in err + out, (name, err)
    assert err.strip().splitlines()[-1].startswith("error: ") and cases[name][2] in err
  assert afile.read_text() == "x\n"
  assert not (tmp_path / "a").exists() and not (tmp_path / "k").exists()


def test_diverging_run_stops_with_valid_json(tmp_path):
  p = _cli(TINY + ["--epochs", "3", "--lr", "1e30", "--train-subset", "128", "--workdir",
                   str(tmp_path / "w")])
  out, err = p.communicate(timeout=180)
  assert p.returncode == 3, err[-2000:]
  assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
  lines = (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()
  records = [_strict_json(line) for line in lines]
  assert len(records) == 1 and records[0]["diverged"] and records[0]["train_loss"] is None
  config = _strict_json((tmp_path / "w" / "config.json").read_text())
  assert config["lr"] == 1e30


def test_resume_by_data_identity_extension_and_compilation_cache(tmp_path):
  workdir, cache = tmp_path / "w", tmp_path / "cache"
  common = ["--width", "0.0625", "--batch-size", "64", "--train-subset", "128", "--test-subset",
            "64", "--no-progress", "--schedule", "constant", "--workdir", str(workdir),
            "--compilation-cache-dir", str(cache)]
  p = _cli(common + ["--data-dir", "train/sample", "--epochs", "1"])  # relative to the repo
  out, err = p.communicate(timeout=180)
  assert p.returncode == 0, err[-2000:]
  assert any(cache.iterdir()), "nothing in the persistent compilation cache"
  config = _strict_json((workdir / "config.json").read_text())
  assert config["data_dir"] == "train/sample"  # no absolute path of this machine
  assert config["data"]["kind"] == "sample" and len(config["data"]["checksum"]) == 32
  assert "BatchNorm's running statistics" in out  # the early test loss is explained
  # The same data by another path string, and two more epochs of a constant schedule.
  p = _cli(common + ["--data-dir", str(REPO / "train" / "sample"), "--epochs", "2"])
  out, err = p.communicate(timeout=180)
  assert p.returncode == 0, err[-2000:]
  assert "epochs 1 -> 2: the constant schedule of the 1 trained epochs is unchanged" in out
  assert "resuming after epoch 1" in out
  assert [h["epoch"] for h in _results(workdir)] == [1, 2]
  assert _strict_json((workdir / "config.json").read_text())["epochs"] == 2
  # Finished: said so, nothing trained, not "resuming".
  p = _cli(common + ["--data-dir", "sample", "--epochs", "2", "--no-compilation-cache"])
  out, err = p.communicate(timeout=180)
  assert p.returncode == 0, err[-2000:]
  assert "already finished: 2/2 epochs" in out and "resuming" not in out


def test_resume_checks_data_identity_and_schedule(tmp_path):
  config = config_lib.Config(width=0.0625, epochs=10, data_dir="sample").resolved()
  ident = {"dataset": "cifar10", "kind": "sample", "checksum": "a" * 32, "train_images": 1000,
           "test_images": 200}
  stored = {**config.to_json(), "data": ident}
  records.check_data(stored, config, dict(ident), "w")  # same checksum, any path: accepted
  with pytest.raises(config_lib.UsageError, match="other data"):
    records.check_data(stored, config, {**ident, "checksum": "b" * 32}, "w")
  # Step decay: the boundaries move with the total, so only epochs before both may be kept.
  longer = config_lib.Config(width=0.0625, epochs=20, data_dir="sample").resolved()
  assert "epochs 10 -> 20" in records.check_epochs(stored, longer, 4, 7, "w")
  with pytest.raises(config_lib.UsageError, match="learning rate of trained epoch 6 would be 0.1 "
                     "instead of 0.01"):
    records.check_epochs(stored, longer, 10, 7, "w")
  cosine = {**stored, "schedule": "cosine"}
  with pytest.raises(config_lib.UsageError, match="cannot be extended"):
    records.check_epochs(cosine, dataclasses.replace(longer, schedule="cosine"), 1, 7, "w")
  with pytest.raises(config_lib.UsageError, match="already trained 10 epochs"):
    records.check_epochs(stored, dataclasses.replace(longer, epochs=5), 10, 7, "w")


def test_help_shows_defaults():
  text = subprocess.run(
      [sys.executable, CIFAR_PY, "--help"], cwd=REPO, env=_env(), capture_output=True,
      text=True, timeout=120).stdout
  options, current = {}, None  # help text of each option: its line and the indented ones after
  for line in text.splitlines():
    if line.startswith("  -"):
      current = line.split()[0].rstrip(",")
      options[current] = line
    elif current and line.startswith("     "):
      options[current] += " " + line.strip()
  for flag, default in [("--epochs", "200"), ("--optimizer", "sgd"), ("--model", "vgg11"),
                        ("--dataset", "cifar10"), ("--keep-checkpoints", "3")]:
    assert f"(default: {default})" in " ".join(options[flag].split()), (flag, options[flag])


def test_spec_tree_of_another_model_fails_at_init():
  import optax_bm  # pylint: disable=import-outside-toplevel
  shapes = {}
  for name in ("vgg11", "vgg13"):
    model = nnx.eval_shape(lambda: models.vgg(name, 10, width=1 / 16, rngs=nnx.Rngs(0)))
    shapes[name] = (model, nnx.state(model, nnx.Param))
  specs = optax_bm.annotate(shapes["vgg11"][0], jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  tx = optax_bm.scale_amended_sgd(0.1, specs)
  tx.init(shapes["vgg11"][1])  # its own model: fine (abstract params)
  with pytest.raises(ValueError, match="the spec tree does not match the params"):
    tx.init(shapes["vgg13"][1])


# ----------------------------------------------------------------------------------------
# Issue 20: a newcomer's first hour


def _decays(config, steps_per_epoch):
  """The steps where the learning rate drops, and the final learning rate."""
  sched = state_lib.create_schedule(config, steps_per_epoch)
  lrs = np.asarray(sched(np.arange(config.epochs * steps_per_epoch)))
  return [int(i) + 1 for i in np.flatnonzero(np.diff(lrs))], float(lrs[-1])


def test_step_decays_pinned_on_epochs_and_two_for_short_runs(tmp_path):
  # Every committed and resumable run keeps its epoch-aligned decays (and its config).
  for epochs, at in ((10, (5, 8)), (30, (15, 22)), (200, (100, 150)), (40, (20, 30))):
    config = config_lib.Config(epochs=epochs).resolved()
    assert config.decay_boundaries is None
    decays, last = _decays(config, 391)
    assert decays == [e * 391 for e in at], epochs
    np.testing.assert_allclose(last, 1e-3, rtol=1e-5)
  # 3 epochs: both epochs round to 2, so the decays fall at 50 % and 75 % of the steps.
  short = config_lib.Config(epochs=3, data_dir="sample").resolved()
  assert short.decay_boundaries == "steps"
  decays, last = _decays(short, 7)
  assert decays == [10, 15]
  np.testing.assert_allclose(last, 1e-3, rtol=1e-5)
  # A 3-epoch run stored before the field existed resumes with the schedule it started with.
  workdir = tmp_path / "old"
  workdir.mkdir()
  stored = {k: v for k, v in short.to_json().items() if k != "decay_boundaries"}
  (workdir / "config.json").write_text(json.dumps(stored))
  resumed, _ = records.check_config(short, str(workdir))
  assert resumed.decay_boundaries is None and _decays(resumed, 7)[0] == [14]


def test_default_lrs_are_the_validated_ones_and_table1_keeps_the_papers(tmp_path):
  defaults = {o: config_lib.Config(optimizer=o).resolved().lr for o in config_lib.OPTIMIZERS}
  assert defaults == {"sgd": 0.1, "lars": 4.0, "lsalr": 0.1, "scale_amended": 0.03}
  # The committed Table 1 runs stay resumable: the command table1.py gives each one yields a
  # config its stored config.json accepts (the paper's lr passed explicitly).
  runs = sorted((REPO / "train" / "results" / "table1_cpu_full" / "runs").glob("*.config.json"))
  assert runs
  args = table1.parse_args(["--cpu-full", "--workdir-root", str(tmp_path)])
  for path in runs:
    dataset, model, optimizer, seed = path.name.split(".")[0].split("-")
    workdir = tmp_path / path.name.split(".")[0]
    workdir.mkdir()
    (workdir / "config.json").write_text(path.read_text())
    cmd = table1.command(args, dataset, model, optimizer, int(seed[1:]), workdir)
    config = config_lib.config_from_args(cifar.parse_args(cmd[2:])).resolved()
    records.check_config(config, str(workdir))  # raises UsageError on any difference
    assert config.lr == json.loads(path.read_text())["lr"]


@pytest.mark.parametrize("flags, needle", [
    (["--model", "vgg12"], "argument --model: invalid choice 'vgg12'; choose from vgg11, vgg13, "
                           "vgg16, vgg19, resnet20, "),  # as near vgg11 as vgg13: no guess
    (["--optimizer", "scale_ammended"], "did you mean 'scale_amended'?"),
    (["--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'"),
    (None, "the following arguments are required: --workdir"),
])
def test_a_typo_is_one_line(flags, needle, capsys):
  argv = ["--workdir", "w"] + flags if flags else []
  with pytest.raises(SystemExit) as e:
    cifar.parse_args(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2
  assert err.count("\n") == 1 and err.startswith("train/cifar.py: error: "), err
  assert needle in err and err.rstrip().endswith("see train/cifar.py --help")


def test_help_shows_only_real_defaults(capsys):
  with pytest.raises(SystemExit):
    cifar.parse_args(["--help"])
  out = " ".join(capsys.readouterr().out.split())
  assert "default: None" not in out and "(default: False)" not in out
  assert out.count("default: tensorflow-datasets") == 1
  assert "sgd 0.1, lars 4, lsalr 0.1, scale_amended 0.03" in out  # chosen on validation
  assert "sgd 0.1, lars 2, lsalr 0.1, scale_amended 0.1" in out  # the paper's
  assert "(default: 200)" in out


def test_a_width_below_4_channels_is_refused(tmp_path, capsys):
  workdir = tmp_path / "w"
  assert cifar.main(["--data-dir", "sample", "--width", "0.001", "--epochs", "1",
                     "--no-progress", "--no-compilation-cache", "--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err
  assert ("error: --width 0.001 leaves vgg11's narrowest convolution 1 channel(s) (of 64); at "
          "least 4") in err and "--width 0.0547 or more" in err
  assert not workdir.exists()
  config_lib.validate_config(config_lib.Config(width=1 / 16).resolved())  # 4 channels: fine


def test_a_failed_first_run_leaves_no_workdir(tmp_path, capsys):
  workdir = tmp_path / "w"
  argv = ["--data-dir", str(tmp_path / "no-such-data"), "--epochs", "1", "--no-progress",
          "--no-compilation-cache", "--workdir", str(workdir)]
  assert cifar.main(argv) == 1  # the data fails after the workdir was made
  assert "no-such-data" in capsys.readouterr().err
  assert not workdir.exists()
  workdir.mkdir()  # one that existed before the run is the user's: left as it was
  (workdir / "notes").write_text("x")
  assert cifar.main(argv) == 1
  assert [p.name for p in workdir.iterdir()] == ["notes"]


def test_ctrl_c_while_importing_is_one_line_and_exit_130(tmp_path):
  p = _cli(TINY + ["--epochs", "1", "--workdir", str(tmp_path / "w")])
  time.sleep(0.5)  # inside the imports (JAX takes seconds to load)
  p.send_signal(signal.SIGINT)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 130, (p.returncode, err[-2000:])
  assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted"), err

