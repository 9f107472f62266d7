"""Tests of the Table 1 grid runner (train/table1.py): presets, the data check before any job,
the never-emptier results guard, Figure 1, repo-relative copies, git commits of the results.

No run is trained here: runs are fake work directories holding metrics.jsonl, and
``subprocess.Popen`` is replaced where a test must prove that no job starts.
"""

import json
import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from train import table1, table1_figures, table1_report

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fake_run(root, name, epochs, *, acc=0.5, loss=1.0, data_dir=None):
  w = root / name
  w.mkdir(parents=True, exist_ok=True)
  hist = [{"epoch": e, "train_loss": loss / e, "test_acc": acc * e / epochs, "seconds": 1.0}
          for e in range(1, epochs + 1)]
  (w / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))
  config = {"dataset": "cifar10", "epochs": epochs, "data_dir": data_dir}
  (w / "config.json").write_text(json.dumps(config))
  return w


def _grid_args(tmp_path, *extra):
  return ["--cpu-full", "--epochs", "3", "--workdir-root", str(tmp_path / "w"), "--out",
          str(tmp_path / "out"), *extra]


class _NoJobs:
  """Stands in for subprocess.Popen: records every start and fails it at once."""

  def __init__(self):
    self.calls = []
    self.popen = subprocess.Popen  # the real one, before monkeypatching

  def __call__(self, cmd, **kwargs):
    self.calls.append(cmd)
    return self.popen(["false"], **kwargs)


def test_cpu_full_preset(tmp_path):
  args = table1.parse_args(["--cpu-full"])
  assert args.preset == "cpu_full" and not args.mini
  assert (args.models, args.datasets, args.seeds) == (["vgg13"], ["cifar10"], [0, 1, 2])
  assert args.optimizers == list(table1_report.OPTIMIZERS)
  assert (args.epochs, args.width, args.batch_size, args.allow_subset) == (30, 0.125, 128,
                                                                           False)
  assert pathlib.Path(args.data_dir) == ROOT.parent / "shared/data/cifar10/cifar-10-batches-py"
  assert pathlib.Path(args.out) == ROOT / "train/results/table1_cpu_full"
  assert pathlib.Path(args.workdir_root) == ROOT / "workdirs/table1_cpu_full"
  assert len(table1_report.grid(args)) == 12
  assert table1_report.CPU_FULL_LABEL in table1_report.write_table(args, {}, tmp_path / "t.md")
  cmd = table1_report.reproduce_command(args)
  assert cmd.startswith("python train/table1.py --cpu-full --models vgg13 ")
  assert "--data-dir ../shared/data/cifar10/cifar-10-batches-py" in cmd
  # Explicit flags win over the preset; presets exclude each other.
  assert table1.parse_args(["--cpu-full", "--epochs", "5"]).epochs == 5
  with pytest.raises(SystemExit):
    table1.parse_args(["--cpu-full", "--mini"])


def test_cpu_full_cifar100_preset(tmp_path):
  args = table1.parse_args(["--cpu-full-cifar100"])
  assert args.preset == "cpu_full_cifar100"
  assert (args.models, args.datasets, args.epochs, args.width) == (["vgg13"], ["cifar100"], 30,
                                                                   0.125)
  assert pathlib.Path(args.data_dir) == ROOT.parent / "data/cifar-100-python"
  assert pathlib.Path(args.out) == ROOT / "train/results/table1_cpu_full_cifar100"
  # Every optimizer at its lr chosen in the CIFAR-100 screen, passed to each run explicitly,
  # with the per-block log; a user's flags after '--' come after the preset's.
  assert args.lrs == {"sgd": 0.1, "lars": 4.0, "lsalr": 0.03, "scale_amended": 0.1}
  cmds = {o: table1.command(args, d, m, o, s, tmp_path / "w")
          for d, m, o, s in table1_report.grid(args) if s == 0}
  assert [c[c.index("--lr") + 1] for c in cmds.values()] == ["0.1", "4", "0.03", "0.1"]
  assert all(c[-1] == "--log-blocks" and "cifar100" in c for c in cmds.values())
  args2 = table1.parse_args(["--cpu-full-cifar100", "--", "--cpu-devices", "2"])
  assert args2.extra == ["--log-blocks", "--cpu-devices", "2"]
  text = table1_report.write_table(args, {}, tmp_path / "t.md")
  assert table1_report.CPU_FULL_C100_LABEL in text
  assert "train/results/ablation_cifar100" in text
  # The reproduce line names the preset, not its implied flags twice.
  cmd = table1_report.reproduce_command(args)
  assert cmd.startswith("python train/table1.py --cpu-full-cifar100 ") and "--log-blocks" not in cmd
  assert "--data-dir ../data/cifar-100-python" in cmd
  assert table1_report.reproduce_command(args2).endswith("-- --cpu-devices 2")
  with pytest.raises(SystemExit):
    table1.parse_args(["--cpu-full", "--cpu-full-cifar100"])


def test_paths_on_the_command_line_are_relative_to_the_cwd(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  args = table1.parse_args(["--cpu-full", "--data-dir", "d", "--out", "o",
                            "--workdir-root", "w"])
  assert (args.data_dir, args.out, args.workdir_root) == tuple(
      str(tmp_path / n) for n in ("d", "o", "w"))
  assert table1.parse_args(["--data-dir", "sample"]).data_dir == "sample"


def test_dry_run_skips_finished_runs(tmp_path, capsys):
  args = table1.parse_args(_grid_args(tmp_path))
  _fake_run(tmp_path / "w", table1_report.run_name("cifar10", "vgg13", "sgd", 0), 3)
  _fake_run(tmp_path / "w", table1_report.run_name("cifar10", "vgg13", "lars", 0), 2)  # unfinished
  assert table1.main(_grid_args(tmp_path, "--dry-run")) == 0
  out = capsys.readouterr().out
  assert "skip cifar10-vgg13-sgd-s0: finished" in out
  cmds = [line for line in out.splitlines() if "train/cifar.py" in line]
  assert len(cmds) == 11  # 12 runs, one finished; the unfinished one is rerun (resumes)
  assert any("cifar10-vgg13-lars-s0" in c for c in cmds)
  assert all("--model vgg13" in c and "--epochs 3" in c and "--width 0.125" in c
             and f"--data-dir {args.data_dir}" in c for c in cmds)


def test_missing_data_stops_before_any_job_and_keeps_results(tmp_path, monkeypatch, capsys):
  """Issue 13 item 1: a grid without its data started every job, then replaced the tracked
  table with an all-'—' one. Now: one error line naming the path, no job, nothing written."""
  out = tmp_path / "out"
  out.mkdir()
  table = "# Table 1\n\n| SGD | 62.55 |\n\n12/12 runs finished; training time 18.1 min.\n"
  (out / "table1.md").write_text(table)
  (out / "curves.png").write_bytes(b"png")
  jobs = _NoJobs()
  monkeypatch.setattr(table1.subprocess, "Popen", jobs)
  missing = tmp_path / "no-shared" / "cifar10-mini"
  rc = table1.main(["--mini", "--data-dir", str(missing), "--workdir-root",
                    str(tmp_path / "w"), "--out", str(out), "--jobs", "2"])
  err = capsys.readouterr().err
  assert rc == 1
  assert jobs.calls == []
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and str(missing) in errors[0], err
  assert (out / "table1.md").read_text() == table
  assert (out / "curves.png").read_bytes() == b"png"
  assert not (tmp_path / "w" / "logs").exists()


def test_corrupt_data_stops_before_any_job(tmp_path, monkeypatch, capsys):
  bad = tmp_path / "cifar-10-batches-py"
  bad.mkdir()
  for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
               "data_batch_5", "test_batch"):
    (bad / name).write_bytes(b"not a pickle")
  jobs = _NoJobs()
  monkeypatch.setattr(table1.subprocess, "Popen", jobs)
  rc = table1.main(_grid_args(tmp_path, "--data-dir", str(bad)))
  assert rc == 1 and jobs.calls == []
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "data_batch_1" in err and err.count("\n") == 1
  assert not (tmp_path / "out").exists()


def test_results_are_never_replaced_by_emptier_ones(tmp_path, capsys):
  out = tmp_path / "out"
  root = tmp_path / "w"
  for opt in ("sgd", "lars"):
    _fake_run(root, table1_report.run_name("cifar10", "vgg13", opt, 0), 3)
  assert table1.main(_grid_args(tmp_path, "--report-only")) == 0
  text = (out / "table1.md").read_text()
  assert table1_report.finished_in_table(out / "table1.md") == 2
  assert "2/12 runs finished" in text
  assert "**CPU-scale run (VGG13-BN at width 0.125, 3 epochs); the paper trains" in text
  # A fresh clone has no work directories: the runs committed beside the table still count,
  # are not trained again, and the table is the same.
  lars = table1_report.run_name("cifar10", "vgg13", "lars", 0)
  shutil.rmtree(root / lars)
  capsys.readouterr()
  assert table1.main(_grid_args(tmp_path, "--report-only")) == 0
  assert "warning" not in capsys.readouterr().err
  assert table1_report.finished_in_table(out / "table1.md") == 2
  assert lars not in " ".join(name for name, _ in table1.pending_runs(table1.parse_args(
      _grid_args(tmp_path))))
  # Without the committed copy either, the richer results are kept.
  for f in ("config.json", "metrics.jsonl"):
    (out / "runs" / f"{lars}.{f}").unlink()
  text = (out / "table1.md").read_text()
  png = (out / "figure1.png").read_bytes()
  assert table1.main(_grid_args(tmp_path, "--report-only")) == 0
  assert "warning: kept" in capsys.readouterr().err
  assert (out / "table1.md").read_text() == text
  assert (out / "figure1.png").read_bytes() == png
  # More finished runs replace it; --force replaces it with fewer.
  for opt in ("lars", "lsalr"):
    _fake_run(root, table1_report.run_name("cifar10", "vgg13", opt, 0), 3)
  assert table1.main(_grid_args(tmp_path, "--report-only")) == 0
  assert table1_report.finished_in_table(out / "table1.md") == 3
  shutil.rmtree(root)
  shutil.rmtree(out / "runs")
  assert table1.main(_grid_args(tmp_path, "--report-only", "--force")) == 0
  assert table1_report.finished_in_table(out / "table1.md") == 0


def test_curve_band_median_and_range():
  runs = {0: [{"epoch": 1, "x": 1.0}, {"epoch": 2, "x": 4.0}],
          1: [{"epoch": 1, "x": 3.0}, {"epoch": 2, "x": float("nan")}],
          2: [{"epoch": 1, "x": 2.0}, {"epoch": 2, "x": 5.0}]}
  # Epoch 2 lacks a finite value for seed 1: only epoch 1 counts.
  assert table1_figures.curve_band(runs, "x", 10.0) == ([1], [20.0], [10.0], [30.0])
  runs[1][1]["x"] = 6.0
  assert table1_figures.curve_band(runs, "x") == ([1, 2], [2.0, 5.0], [1.0, 4.0], [3.0, 6.0])
  assert table1_figures.curve_band(runs, "missing") == ([], [], [], [])


def test_figure1_png_from_fake_metrics(tmp_path):
  import matplotlib.image
  args = table1.parse_args(_grid_args(tmp_path))
  root = tmp_path / "w"
  for i, opt in enumerate(table1_report.OPTIMIZERS):
    for s in (0, 1, 2):
      _fake_run(root, table1_report.run_name("cifar10", "vgg13", opt, s), 3, acc=0.5 + 0.1 * i,
                loss=2.0 + s)
  results = table1_report.collect(args)
  assert len(results[("cifar10", "vgg13", "sgd")]) == 3
  path = tmp_path / "figure1.png"
  table1_figures.plot_figure1(args, results, path)
  img = matplotlib.image.imread(path)
  assert img.shape[0] > 300 and img.shape[1] > 800
  # Both panels drew coloured curves: the image is not blank.
  assert np.std(img[..., :3]) > 0.05
  # No temporary files left behind.
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_blocks_figure_only_from_runs_that_logged_blocks(tmp_path):
  import matplotlib.image as mpimg
  args = table1.parse_args(["--cpu-full-cifar100", "--epochs", "3", "--optimizers", "sgd",
                            "scale_amended", "--out", str(tmp_path / "o")])
  path = tmp_path / "blocks.png"
  plain = {s: [{"epoch": e, "train_loss": 1.0, "test_acc": 0.1} for e in (1, 2, 3)]
           for s in (0, 1)}
  table1_figures.plot_blocks(args, {("cifar100", "vgg13", "sgd"): plain}, path)
  assert not path.exists()  # nothing logged: no empty figure

  def logged(scale):
    return [{"epoch": e, "blocks": {"angular_step": [scale * e, 2 * scale * e, 0.5 * scale]}}
            for e in (1, 2, 3)]
  results = {("cifar100", "vgg13", "sgd"): {0: logged(0.01), 1: logged(0.02)},
             ("cifar100", "vgg13", "scale_amended"): {0: logged(0.001)}}
  table1_figures.plot_blocks(args, results, path)
  img = mpimg.imread(path)
  assert img.shape[1] > img.shape[0] and np.std(img[..., :3]) > 0.05  # two panels, drawn
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_copied_configs_name_no_machine_path(tmp_path):
  shared_data = str(ROOT.parent / "shared" / "data" / "cifar10" / "cifar-10-batches-py")
  _fake_run(tmp_path / "w", table1_report.run_name("cifar10", "vgg13", "sgd", 0), 3,
            data_dir=shared_data)
  assert table1.main(_grid_args(tmp_path, "--report-only")) == 0
  runs = tmp_path / "out" / "runs"
  config = json.loads((runs / "cifar10-vgg13-sgd-s0.config.json").read_text())
  assert config["data_dir"] == "../shared/data/cifar10/cifar-10-batches-py"
  assert (runs / "cifar10-vgg13-sgd-s0.metrics.jsonl").read_text().count("\n") == 3
  text = (tmp_path / "out" / "table1.md").read_text()
  assert str(ROOT.parent) not in text and str(tmp_path) not in text


def test_committed_table1_results_name_no_machine_path():
  for path in (ROOT / "train" / "results").glob("table1*/**/*"):
    if path.suffix in (".md", ".json", ".jsonl"):
      assert str(ROOT.parent) + os.sep not in path.read_text(), path


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_commit_commits_only_the_results_dir(tmp_path, monkeypatch):
  repo = tmp_path / "repo"
  (repo / "results").mkdir(parents=True)
  env_cmd = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  (repo / "other.txt").write_text("not mine")
  (repo / "results" / "table1.md").write_text("table")
  for k in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
    monkeypatch.setenv(k, "t")
  for k in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
    monkeypatch.setenv(k, "t@t")
  assert table1.git_commit(str(repo / "results"), "results: run finished")
  files = subprocess.run([*env_cmd, "ls-files"], capture_output=True, text=True).stdout
  assert files.split() == ["results/table1.md"]
  # Nothing new: still a success, no empty commit.
  assert table1.git_commit(str(repo / "results"), "again")
  log = subprocess.run([*env_cmd, "log", "--oneline"], capture_output=True, text=True).stdout
  assert log.count("\n") == 1


def test_a_diverged_run_is_not_rerun_and_is_reported(tmp_path, capsys):
  root = tmp_path / "w"
  _fake_run(root, table1_report.run_name("cifar10", "vgg13", "sgd", 0), 3, acc=0.6)
  w = _fake_run(root, table1_report.run_name("cifar10", "vgg13", "sgd", 1), 2)
  hist = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
  hist[-1].update(diverged=True, train_loss=None, test_acc=None)
  (w / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))
  assert table1.main(_grid_args(tmp_path, "--dry-run", "--optimizers", "sgd")) == 0
  out = capsys.readouterr().out
  assert "skip cifar10-vgg13-sgd-s1: finished" in out
  assert table1.main(_grid_args(tmp_path, "--report-only", "--optimizers", "sgd")) == 0
  text = (tmp_path / "out" / "table1.md").read_text()
  assert "| SGD | 60.00 [60.00, diverged in epoch 2, 1 seed(s) missing] (93.90) |" in text
  assert (tmp_path / "out" / "figure1.png").exists()


def test_table_caption_names_the_scale_amended_reading(tmp_path):
  args = table1.parse_args(_grid_args(tmp_path))
  for seed in (0, 1):
    w = _fake_run(tmp_path / "w", table1_report.run_name("cifar10", "vgg13", "scale_amended", seed), 3)
    config = json.loads((w / "config.json").read_text())
    config.update(sa_pooling="before", sa_scale_others=False, sa_gamma_aware=False,
                  sa_decay_before_scaling=True)
    (w / "config.json").write_text(json.dumps(config))
  note = table1_report._sa_reading_note(args, table1_report.collect(args))
  assert "`s` before pooling, bias/BatchNorm unscaled, γ² ignored, decay before" in note
  (w / "config.json").write_text(json.dumps({"epochs": 3}))  # a run older than the fields
  assert "not recorded in every config" in table1_report._sa_reading_note(args, table1_report.collect(args))


def test_learning_rate_overrides(tmp_path, capsys):
  assert table1.main(_grid_args(tmp_path, "--dry-run")) == 0
  cmds = [c for c in capsys.readouterr().out.splitlines() if "train/cifar.py" in c]
  sa = table1_report.CPU_FULL["lrs"]["scale_amended"]
  assert all((f"--lr {sa:g}" in c) == ("--optimizer scale_amended" in c) for c in cmds)
  args = table1.parse_args(_grid_args(tmp_path, "--lr", "sgd=0.05"))
  assert args.lrs == {"scale_amended": sa, "sgd": 0.05}
  assert "--lr scale_amended=" in table1_report.reproduce_command(args)
  assert "--lr sgd=0.05" in table1_report.reproduce_command(args)
  assert table1.parse_args(["--mini"]).lrs == {}  # the paper's everywhere
  for bad in ("adam=0.1", "sgd=-1", "sgd=x"):
    with pytest.raises(SystemExit):
      table1.parse_args(["--lr", bad])
    assert f"--lr {bad!r}: expected OPTIMIZER=LR" in capsys.readouterr().err


def test_runs_as_a_script_from_any_directory(tmp_path):
  """`python train/table1.py` (not -m): its data check imports the `train` package."""
  proc = subprocess.run(
      [os.sys.executable, str(ROOT / "train" / "table1.py"), "--cpu-full", "--data-dir",
       str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--workdir-root",
       str(tmp_path / "w")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr
  assert "Traceback" not in proc.stderr and "error:" in proc.stderr
