"""train/block_pace.py: phases of a step schedule and the per-phase pace from run records."""

import json

import pytest

from train import block_pace


def _write(runs_dir, name, lrs, steps, val_split=0, epochs=None):
  cfg = {"epochs": epochs or len(lrs), "batch_size": 100, "val_split": val_split,
         "train_subset": None, "lr": lrs[0], "data": {"train_images": 1000}}
  (runs_dir / f"{name}.config.json").write_text(json.dumps(cfg))
  with open(runs_dir / f"{name}.metrics.jsonl", "w") as f:
    for e, (lr, s) in enumerate(zip(lrs, steps), 1):
      f.write(json.dumps({"epoch": e, "lr": lr, "train_loss": 1.0 / e, "val_acc": 0.1 * e,
                          "blocks": {"angular_step": s}}) + "\n")


def test_phases_and_pace(tmp_path):
  lrs = [0.1, 0.1, 0.01, 0.01, 0.001]
  steps = [[1e-2, 2e-2, 4e-2], [1e-2, 1e-2, 1e-2], [1e-3, 2e-3, 3e-3], [2e-3, 2e-3, 2e-3],
           [2e-4, 2e-4, 8e-4]]
  _write(tmp_path, "sgd-lr0.1-e5-s0", lrs, steps, val_split=200)
  run = block_pace.read_run(tmp_path, "sgd-lr0.1-e5-s0")
  assert run.steps_per_epoch == 8  # (1000 - 200) // 100
  assert block_pace.phases(run.history) == [(1, 2, 0.1), (3, 4, 0.01), (5, 5, 0.001)]
  rows = block_pace.pace(run)
  assert [r["epochs"] for r in rows] == [(1, 2), (3, 4), (5, 5)]
  assert rows[0]["first"] == pytest.approx(2e-2) and rows[0]["last"] == pytest.approx(1e-2)
  assert rows[2]["spread"] == pytest.approx(4.0)
  assert rows[1]["travel"] == pytest.approx((2e-3 + 2e-3) * 8)
  assert rows[1]["train_loss"] == pytest.approx(0.25) and rows[1]["val_acc"] == pytest.approx(0.4)


def test_unfinished_or_unlogged_runs_are_skipped_and_report_compares(tmp_path):
  _write(tmp_path, "a-s0", [0.1, 0.01], [[1e-2], [1e-3]], epochs=3)  # unfinished
  assert block_pace.read_run(tmp_path, "a-s0") is None
  _write(tmp_path, "sgd-s0", [0.1, 0.01], [[1e-2, 1e-2], [2e-3, 2e-3]])
  _write(tmp_path, "sa-s0", [0.1, 0.01], [[5e-3, 5e-3], [5e-4, 5e-4]])
  _write(tmp_path, "sa-s1", [0.1, 0.01], [[7e-3, 7e-3], [7e-4, 7e-4]])
  collected = block_pace.collect([("toy", tmp_path, [("SGD", "sgd"), ("SA", "sa")])])
  assert [len(runs) for _, runs in collected[0][1]] == [1, 2]
  text = block_pace.write_report(collected, tmp_path / "out" / "block_pace.md")
  assert "| SGD | 1 | 5.0× | 5.0× |" in text and "| SA | 1 | 10.0× | 10.0× |" in text
  # Relative pace, phase 2: median over seeds of SA (6e-4) against SGD's 2e-3.
  assert "| SA | 0.60 | 0.30 |" in text


def test_runs_without_a_validation_split_report_test_accuracy(tmp_path):
  # Table 1's runs train on the whole training set: their records hold test_acc only.
  cfg = {"epochs": 2, "batch_size": 100, "val_split": 0, "train_subset": None, "lr": 0.1,
         "data": {"train_images": 1000}}
  (tmp_path / "t-s0.config.json").write_text(json.dumps(cfg))
  (tmp_path / "t-s0.metrics.jsonl").write_text("".join(
      json.dumps({"epoch": e, "lr": lr, "train_loss": 1.0, "test_acc": 0.25 * e,
                  "blocks": {"angular_step": [1e-2 / e]}}) + "\n"
      for e, lr in ((1, 0.1), (2, 0.01))))
  collected = block_pace.collect([("t1", tmp_path, [("SGD", "t")])])
  text = block_pace.write_report(collected, tmp_path / "out" / "block_pace.md")
  assert "| (test 25.00) |" in text and "| (test 50.00) |" in text
