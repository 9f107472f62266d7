"""benchmarks/peer_pytorch.py: flag validation and the missing-torch message (no torch needed:
they run in CI), and, where torch is installed (``pip install -e '.[peer]'``), the parameter
counts of the PyTorch twins and a ``--quick`` run."""

import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import peer_pytorch as pp

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, message", [
    (["--models", "vgg99"], "--models: unknown vgg99"),
    (["--models", "resnet20b"], "--models: unknown resnet20b"),
    (["--widths", "0"], "must be positive"),
    (["--widths", "x/8"], "not a number or fraction"),
    (["--widths", "1/32"], "the trainer's minimum is 4"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--torch-threads", "0"], "--torch-threads must be at least 1"),
    (["--epoch", "--data-dir", "/nonexistent/cifar"], "--epoch: no CIFAR-10 at"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, capsys, tmp_path):
  out = tmp_path / "report.md"
  assert pp.main([*argv, "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1, err
  assert not out.exists()


def test_missing_torch_one_line(monkeypatch, capsys, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  out = tmp_path / "report.md"
  assert pp.main(["--quick", "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert "pip install -e '.[peer]'" in err and err.count("\n") == 1, err
  assert not out.exists()


def test_width_labels():
  assert [pp.width_label(pp.parse_width(w)) for w in ("1/8", "0.125", "1", "0.5")] == [
      "1/8", "1/8", "1", "1/2"]


@pytest.mark.parametrize("name", pp.DEFAULT_MODELS)
@pytest.mark.parametrize("width", [0.125, 1.0])
def test_parameter_counts_match(name, width):
  torch = pytest.importorskip("torch")
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from train import models  # pylint: disable=import-outside-toplevel
  abstract = nnx.eval_shape(lambda: models.create(name, pp.NUM_CLASSES, width, rngs=nnx.Rngs(0)))
  n_jax = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  model = pp.torch_model(torch, name, width)
  assert sum(p.numel() for p in model.parameters()) == n_jax
  x = torch.zeros(2, 3, 32, 32)
  assert model(x).shape == (2, pp.NUM_CLASSES)


def test_torch_augment_is_a_padded_crop_maybe_flipped():
  torch = pytest.importorskip("torch")
  x = (torch.arange(4 * 32 * 32 * 3) % 251 + 1).to(torch.uint8).reshape(4, 32, 32, 3)
  out = pp.torch_augment(torch, x, torch.Generator().manual_seed(0))
  padded = torch.nn.functional.pad(x, (0, 0, 4, 4, 4, 4))
  for b in range(4):
    crops = [padded[b, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
    assert any(torch.equal(out[b], c) or torch.equal(out[b], c.flip(1)) for c in crops)


def test_quick_run(tmp_path):
  pytest.importorskip("torch")
  out = tmp_path / "peer.md"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, the trainer's flags
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "peer_pytorch.py"), "--quick",
       "--sample-seconds", "0.001", "--out", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  text = out.read_text()
  assert "| vgg11 | 1/16 |" in text and "trainer SGD / PyTorch" in text
  assert "Load average" in text and "torch 2." in text
  assert "parameters: PyTorch" in proc.stdout
  assert str(ROOT) not in text  # no absolute paths in the report


# --- benchmarks/peer_profile.py ------------------------------------------------------------


def test_profile_bad_flags_and_missing_torch(monkeypatch, capsys, tmp_path):
  from benchmarks import peer_profile  # pylint: disable=import-outside-toplevel
  out = tmp_path / "profile.md"
  with pytest.raises(SystemExit) as e:
    peer_profile.main(["--models", "vgg12", "--out", str(out)])
  assert e.value.code == 2 and "unknown VGG 'vgg12'" in capsys.readouterr().err
  monkeypatch.setitem(sys.modules, "torch", None)
  assert peer_profile.main(["--out", str(out)]) == 2
  assert "PyTorch is not installed" in capsys.readouterr().err and not out.exists()


def test_profile_classifies_pytorch_kernels_like_the_trainer():
  from benchmarks import peer_profile  # pylint: disable=import-outside-toplevel
  kind = peer_profile.torch_kind
  assert kind("aten::mkldnn_convolution") == "conv, forward"
  assert kind("aten::convolution_backward") == "conv, backward (input and weight gradients)"
  assert kind("aten::native_batch_norm_backward") == "BatchNorm backward"
  assert kind("aten::max_pool2d_with_indices_backward") == "max-pool, forward and backward"
  assert kind("aten::threshold_backward") == kind("aten::relu_") == "ReLU, forward and backward"
  assert kind("aten::_foreach_add_") == "optimizer update"
  assert kind("aten::copy_").startswith("other")


def test_profile_quick_run(tmp_path):
  pytest.importorskip("torch")
  out = tmp_path / "profile.md"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "peer_profile.py"), "--widths", "1/16",
       "--batch", "8", "--steps", "1", "--out", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  text = out.read_text()
  assert "## vgg11 width 1/16" in text and "conv, weight gradient" in text
  assert "conv, backward (input and weight gradients)" in text and str(ROOT) not in text
