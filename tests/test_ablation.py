"""The ablation's trainer features (--val-split, --log-blocks, the divergence stop, the
scale-amended reading flags) and train/ablation.py's grid and report (issue 11)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import ablation, ablation_report, cifar, pipeline
from train import config as config_lib


def _config(**kw):
  base = dict(data_dir="sample", width=0.0625, batch_size=64, train_subset=256,
              test_subset=64, epochs=1)
  base.update(kw)
  return config_lib.Config(**base)


def test_val_split_block_logging_and_reading_flags(tmp_path, monkeypatch):
  cfg = _config(optimizer="scale_amended", val_split=100, sa_pooling="after",
                sa_scale_others=False)
  seen = {}
  real = pipeline.load_data

  def spy(config, mesh, eval_batch_size):
    data = real(config, mesh, eval_batch_size)
    seen["data"] = data
    return data

  monkeypatch.setattr(cifar, "load_data", spy)
  (rec,) = cifar.train_and_evaluate(cfg, str(tmp_path / "w"), progress=False, log_blocks=True)
  data = seen["data"]
  # The held-out images are the last 100 of the training set and are not trained on.
  from train import data as data_lib
  full = data_lib.load_cifar("cifar10", "sample", allow_subset=True)
  np.testing.assert_array_equal(np.asarray(data.val_images)[:100], full.train_images[-100:])
  train = np.asarray(data.train_images)
  assert data.num_val == 100 and data.num_train == 256
  np.testing.assert_array_equal(train, full.train_images[:256])
  assert 0 <= rec["val_acc"] <= 1 and np.isfinite(rec["val_loss"])
  blocks = rec["blocks"]
  assert set(blocks) == {"angular_step", "factor", "w_norm", "gamma2"}
  assert all(len(v) == 9 for v in blocks.values())  # 8 convs + classifier
  assert all(x > 0 for x in blocks["angular_step"]) and blocks["factor"][-1] == pytest.approx(1)
  assert blocks["gamma2"][-1] is None and all(g > 0 for g in blocks["gamma2"][:-1])
  stored = json.loads((tmp_path / "w" / "config.json").read_text())
  assert (stored["sa_pooling"], stored["sa_scale_others"]) == ("after", False)
  assert stored["sa_gamma_aware"] is False and stored["sa_decay_before_scaling"] is True
  # A non-scale-amended run records no reading.
  assert _config(optimizer="sgd").resolved().sa_pooling is None


def test_non_finite_loss_stops_the_run_with_valid_json(tmp_path):
  cfg = _config(optimizer="sgd", lr=1e6, epochs=3)
  with pytest.raises(cifar.Diverged, match="not finite in epoch 1"):
    cifar.train_and_evaluate(cfg, str(tmp_path / "w"), progress=False)
  lines = (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()
  (rec,) = [json.loads(l) for l in lines]  # strict JSON: no NaN tokens
  assert rec["diverged"] is True and rec["train_loss"] is None
  assert "NaN" not in "".join(lines)
  with pytest.raises(cifar.Diverged, match="nothing to resume"):  # a rerun does not retrain
    cifar.train_and_evaluate(cfg, str(tmp_path / "w"), progress=False)


def test_non_finite_parameters_stop_the_run_even_with_a_finite_loss(tmp_path, monkeypatch):
  """A γ²-aware scale-amended ResNet turned every parameter NaN while its logged loss stayed
  at ln 10; such a run must stop as diverged, not finish at chance accuracy."""
  real = cifar._compiled_runner

  def poisoned(*args, **kwargs):
    runner = real(*args, **kwargs)
    train_epoch = runner.train_epoch

    def nan_params(state, epoch):
      state, sums = train_epoch(state, epoch)  # the loss of these steps is finite
      return {**state, "params": jax.tree.map(lambda x: x * jnp.nan, state["params"])}, sums

    runner.train_epoch = nan_params
    return runner

  monkeypatch.setattr(cifar, "_compiled_runner", poisoned)
  with pytest.raises(cifar.Diverged, match="parameters are not finite in epoch 1"):
    cifar.train_and_evaluate(_config(epochs=2), str(tmp_path / "w"), progress=False,
                             log_blocks=True)
  lines = (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()
  (rec,) = [json.loads(line) for line in lines]
  assert rec["diverged"] is True and rec["train_loss"] is not None
  assert "NaN" not in "".join(lines) and rec["blocks"]["w_norm"][0] is None


def test_ablation_grid_and_report(tmp_path, monkeypatch):
  screen = ablation.screen_runs()
  names = {r.name for r in screen}
  assert len(screen) == len(names) == 7 * 4 + 3
  assert screen[0].lr == 0.1 and {r.reading for r in screen[:8]} == set(ablation.READINGS)
  confirm = ablation.confirm_runs(["sgd@0.1", "sa_unscaled@0.03"])
  assert len(confirm) == 6 and {r.epochs for r in confirm} == {30}
  cmd = " ".join(ablation.command(screen[2]))
  assert "--val-split 5000" in cmd and "--log-blocks" in cmd and "--sa-others scaled" in cmd
  assert "/work" not in cmd.split("--data-dir")[1].split()[0]  # repo-relative data path
  # Report from fake finished runs: best lr on validation, diverged runs marked.
  monkeypatch.setattr(ablation, "OUT", tmp_path / "out")
  monkeypatch.setattr(ablation, "WORKDIRS", tmp_path / "workdirs")

  def fake(run, val, diverged=False):
    w = tmp_path / "workdirs" / run.name
    w.mkdir(parents=True)
    (w / "config.json").write_text("{}")
    blocks = {"angular_step": [0.01] * 9, "w_norm": [1.0] * 9, "gamma2": [0.5] * 8 + [None]}
    hist = [{"epoch": e, "train_loss": 1.0, "val_acc": val, "test_acc": val - 0.01,
             "blocks": blocks} for e in range(1, run.epochs + 1)]
    if diverged:
      hist = [{"epoch": 1, "train_loss": None, "val_acc": 0.1, "test_acc": 0.1,
               "blocks": blocks, "diverged": True}]
    (w / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))

  fake(ablation.Run("sgd", 0.1, 10, 0), 0.77)
  fake(ablation.Run("sgd", 0.03, 10, 0), 0.76)
  fake(ablation.Run("sa_gamma", 0.1, 10, 0), 0.0, diverged=True)
  # The confirmation: a seed that diverged is counted, and kept out of the medians.
  fake(ablation.Run("sgd", 0.1, 30, 0), 0.80)
  fake(ablation.Run("sgd", 0.1, 30, 1), 0.82)
  fake(ablation.Run("sgd", 0.1, 30, 2), 0.0, diverged=True)
  ablation.report()
  text = (tmp_path / "out" / "ablation.md").read_text()
  assert "**77.00 (76.00)**" in text and "76.00 (75.00)" in text and "div (ep 1)" in text
  assert "| SGD (wd 1e-3) | 0.1 | 3 (1 diverged) | 81.00 [80.00–82.00] | 80.00 [79.00–81.00] |" \
      in text, text
  assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
  assert (tmp_path / "out" / "blocks.png").stat().st_size > 1000  # per-block steps
  assert ablation.best_lrs(ablation.collect(), 10) == {"sgd": (0.1, 0.77)}
  # A fresh checkout has runs/ but no workdirs/: committed runs are not trained again.
  shutil.rmtree(tmp_path / "workdirs")
  monkeypatch.setattr(ablation.subprocess, "run", lambda *a, **k: pytest.fail("retrained"))
  assert ablation.execute(ablation.Run("sgd", 0.1, 10, 0), git_commit=False) == "finished"
  assert ablation.execute(ablation.Run("sa_gamma", 0.1, 10, 0), git_commit=False) == "diverged"


def test_a_record_with_non_finite_kernel_norms_is_a_diverged_run():
  """Records from before the trainer checked its parameters: every epoch logged, loss ln 10,
  chance accuracy, but the kernels' norms NaN from epoch 2 (or null, as the trainer now writes
  a non-finite statistic). The report calls such a run diverged, at its first such epoch."""
  def hist(bad):
    return [{"epoch": e, "train_loss": 2.3026, "val_acc": 0.095,
             "blocks": {"w_norm": [1.0, bad if e >= 2 else 1.0]}} for e in range(1, 11)]

  for bad in (float("nan"), float("inf"), None):
    assert ablation_report.status(hist(bad), 10) == "diverged", bad
    assert ablation_report.diverged_at(hist(bad)) == 2
  assert ablation_report.status(hist(1.0), 10) == "finished"
  assert ablation_report.status(hist(1.0)[:4], 10) == "unfinished"
  no_blocks = [{"epoch": 1, "train_loss": None, "diverged": True}]
  assert ablation_report.status(no_blocks, 10) == "diverged"
  assert ablation_report.diverged_at(no_blocks) == 1


def test_screen_extends_a_sweep_whose_best_is_at_an_end():
  def row(reading, lr, val, st="finished"):
    return ablation.Run(reading, lr, 10, 0), [{"epoch": 10, "val_acc": val}], st
  base = {r.name for r in ablation.screen_runs()}
  extra = lambda rows: sorted(r.name for r in ablation.screen_runs(rows) if r.name not in base)
  rows = [row("sgd", 0.1, 0.77), row("sgd", 0.03, 0.76),  # best inside: nothing added
          row("sa_pool_after", 0.1, 0.65), row("sa_pool_after", 0.03, 0.73)]
  assert extra(rows) == []  # best at 0.03, but 0.01 not run yet
  rows.append(row("sa_pool_after", 0.01, 0.77))
  assert extra(rows) == ["sa_pool_after-lr0.003-e10-s0"]
  rows.append(row("sa_pool_after", 0.003, 0.78))  # still the lowest: one more below
  assert extra(rows) == ["sa_pool_after-lr0.001-e10-s0"]
  rows[-1] = row("sa_pool_after", 0.003, 0.76)  # now inside
  assert extra(rows) == []
  # The top end: LARS's best at 4 (after 1 and 2) gets 8; a diverged best is no best.
  lars = [row("lars", 1.0, 0.70), row("lars", 2.0, 0.72), row("lars", 4.0, 0.74)]
  assert extra(lars) == ["lars-lr8-e10-s0"]
  assert extra(lars[:2] + [row("lars", 4.0, 0.1, "diverged")]) == []


def test_readme_tables_come_from_the_report(tmp_path, monkeypatch):
  monkeypatch.setattr(ablation, "OUT", tmp_path)
  (tmp_path / "ablation.md").write_text(
      "# title\n\n## Screen: one seed, 10 epochs\n\n| a |\n|---|\n| 1 |\n\n"
      "## Confirmation: 3 seeds, 30 epochs\n\n| b |\n\n## Per block, ...\n\nnot this\n")
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{ablation.README_MARKERS[0]}\nold\n{ablation.README_MARKERS[1]}\nend\n")
  assert ablation.update_readme(readme)
  text = readme.read_text()
  assert "old" not in text and "not this" not in text and text.startswith("intro\n")
  assert "**Screen: one seed, 10 epochs (full CIFAR-10, VGG11-BN width 1/8).**" in text
  assert "| 1 |" in text and "| b |" in text and text.endswith(f"{ablation.README_MARKERS[1]}\nend\n")
  assert not ablation.update_readme(readme)  # idempotent


@pytest.fixture
def resnet_study():
  yield ablation.use_study("cifar10-resnet20")
  ablation.use_study("cifar10")


def test_resnet_study_runs_and_report(resnet_study, tmp_path, monkeypatch):
  assert resnet_study.width == 0.25 and ablation.MODEL == "resnet20"
  screen = ablation.screen_runs()
  assert len(screen) == 4 * 4 and {r.reading for r in screen} == {
      "sgd_he", "sa_propagated", "sa_unit", "sa_propagated_gamma"}
  cmds = {r.reading: " ".join(ablation.command(r)) for r in screen if r.lr == 0.1}
  for cmd in cmds.values():
    assert "--model resnet20 --width 0.25" in cmd and "--dataset cifar10" in cmd
    assert "workdirs/ablation_cifar10_resnet20/" in cmd
  assert "--sa-input-scale unit" in cmds["sa_unit"]
  assert "--sa-input-scale propagated" in cmds["sa_propagated"]
  assert "--sa-input-scale" not in cmds["sgd_he"]
  assert "--sa-gamma aware --sa-decay before --sa-input-scale propagated" in \
      cmds["sa_propagated_gamma"]
  assert ablation.OUT.name == "ablation_cifar10_resnet20"
  assert ablation.README_MARKERS != ablation.readme_markers()  # its own place in the docs
  # The report says the width and weight decays the runs recorded.
  monkeypatch.setattr(ablation, "OUT", tmp_path / "out")
  runs = tmp_path / "out" / "runs"
  runs.mkdir(parents=True)
  for run, opt, wd, val in ((ablation.Run("sgd_he", 0.1, 10, 0), "sgd", 1e-4, 0.8),
                            (ablation.Run("sa_unit", 0.1, 10, 0), "scale_amended", 5e-3, 0.7)):
    (runs / f"{run.name}.config.json").write_text(
        json.dumps({"optimizer": opt, "weight_decay": wd, "width": 0.25}))
    (runs / f"{run.name}.metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "train_loss": 1.0, "val_acc": val, "test_acc": val})
        + "\n" for e in range(1, 11)))
  ablation.report()
  text = (tmp_path / "out" / "ablation.md").read_text()
  assert "ResNet-20 width 0.25" in text and "Weight decay: SGD 1e-4, scale-amended 5e-3" in text
  readme = tmp_path / "results.md"
  start, end = ablation.readme_markers()
  readme.write_text(f"{start}\n{end}\n")
  assert ablation.update_readme(readme)
  assert "(full CIFAR-10, ResNet-20 width 1/4).**" in readme.read_text()
  (runs / "x-lr1-e10-s0.config.json").write_text(json.dumps({"width": 0.5}))
  with pytest.raises(ValueError, match="several widths"):
    ablation.report()


def test_resnet_study_is_cifar10_only(capsys):
  with pytest.raises(SystemExit):
    ablation.main(["--dataset", "cifar100", "--model", "resnet20", "--dry-run"])
  assert "studied on cifar10 only" in capsys.readouterr().err
