"""The trainer on the CIFAR ResNets (train/models.py): build, train, validate, log, resume."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from train import cifar, models, records
from train import config as config_lib, state as state_lib, steps as steps_lib

WIDTH = 0.25  # the narrowest a ResNet allows: 16 · 0.25 = 4 channels in the first stage


def _config(**kw):
  kw = {"model": "resnet20", "width": WIDTH, "epochs": 1, **kw}
  return config_lib.Config(**kw).resolved()


def _batch(n=32, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
          rng.integers(0, 10, n).astype(np.int32))


@pytest.mark.parametrize("optimizer", config_lib.OPTIMIZERS)
def test_resnet_steps_lower_loss_on_fixed_batch(optimizer):
  config = _config(optimizer=optimizer)
  config_lib.validate_config(config)
  setup, state = state_lib.create_train_state(config, 10, steps_per_epoch=100)
  x, y = _batch()
  step = jax.jit(lambda s: steps_lib.train_step(s, x, y, setup=setup))
  losses = []
  for _ in range(6):
    state, m = step(state)
    losses.append(float(m["loss"] / m["count"]))
  assert np.all(np.isfinite(losses))
  if optimizer == "lars":  # its default lr 4 (screened on VGG) overshoots this fixed batch
    return
  assert losses[-1] < 0.8 * losses[0], losses


def test_weight_decay_defaults_per_model_family():
  for optimizer in config_lib.OPTIMIZERS:
    vgg_wd = config_lib.DEFAULT_SETTINGS[optimizer][1]
    assert config_lib.Config(optimizer=optimizer).resolved().weight_decay == vgg_wd
    expected = 1e-4 if optimizer == "sgd" else vgg_wd  # He et al. 2016; none published else
    for model in ("resnet20", "resnet56b"):
      assert _config(model=model, optimizer=optimizer).weight_decay == expected
  assert _config(optimizer="sgd", weight_decay=5e-4).weight_decay == 5e-4


def test_learning_rate_defaults_per_model_family():
  for optimizer in config_lib.OPTIMIZERS:
    vgg_lr = config_lib.DEFAULT_SETTINGS[optimizer][0]
    assert config_lib.Config(optimizer=optimizer).resolved().lr == vgg_lr
    # Scale-amended SGD: validated on ResNet-20 (0.1); the others keep theirs (SGD: He et al.).
    expected = 0.1 if optimizer == "scale_amended" else vgg_lr
    assert _config(optimizer=optimizer).lr == expected
  assert _config(optimizer="scale_amended", lr=0.03).lr == 0.03


def test_sa_input_scale_reaches_the_optimizer():
  assert _config(optimizer="scale_amended").sa_input_scale == "unit"  # library default
  assert _config(optimizer="sgd").sa_input_scale is None
  assert config_lib.Config(optimizer="scale_amended").resolved().sa_input_scale is None  # VGG
  factors = {}
  for reading in ("propagated", "unit"):
    config = _config(optimizer="scale_amended", sa_input_scale=reading)
    setup, state = state_lib.create_train_state(config, 10, steps_per_epoch=100,
                                                log_blocks=True)
    factors[reading] = np.asarray(setup.block_factors(state["params"]))
  assert factors["propagated"].shape == factors["unit"].shape
  assert not np.allclose(factors["propagated"], factors["unit"])
  args = cifar.parse_args(["--workdir", "w", "--model", "resnet20", "--optimizer",
                           "scale_amended", "--sa-input-scale", "propagated"])
  assert config_lib.config_from_args(args).sa_input_scale == "propagated"


def _vgg_run(tmp_path):
  config = config_lib.Config(model="vgg11", width=0.0625, epochs=1, batch_size=32,
                             train_subset=32, test_subset=32, data_dir="sample",
                             allow_subset=True, schedule="constant").resolved()
  cifar.train_and_evaluate(config, str(tmp_path / "vgg"), progress=False)
  return tmp_path / "vgg"


def test_resnet_one_epoch_with_block_logging(tmp_path):
  config = _config(optimizer="scale_amended", batch_size=64, train_subset=128, test_subset=64,
                   data_dir="sample", allow_subset=True, schedule="constant")
  (rec,) = cifar.train_and_evaluate(config, str(tmp_path / "w"), progress=False,
                                    log_blocks=True)
  assert np.isfinite(rec["train_loss"]) and np.isfinite(rec["test_loss"])
  blocks = rec["blocks"]
  units = len(models.RESNET_STAGES) * models.RESNET_DEPTHS["resnet20"]
  convs = 1 + 2 * units  # the stem and two per unit, then the classifier
  assert all(len(v) == convs + 1 for v in blocks.values())
  # stem/bn/scale and units/u/main/j/bn/scale resolve: every conv has its E[gamma^2].
  assert blocks["gamma2"][-1] is None and all(g > 0 for g in blocks["gamma2"][:-1])
  assert blocks["factor"][-1] == pytest.approx(1) and all(x > 0 for x in blocks["w_norm"])
  stored = json.loads((tmp_path / "w" / "config.json").read_text())
  assert stored["model"] == "resnet20" and stored["sa_input_scale"] == "unit"
  # The §7 measurement reads the trained checkpoint: γ, β as trained, not 1 and 0.
  from train import local_hessian_resnet as lhr  # pylint: disable=import-outside-toplevel
  lhr.main(["--checkpoint", str(tmp_path / "w"), "--out", str(tmp_path / "lh"),
            "--data-dir", "sample", "--batch-size", "4", "--probes", "2", "--max-units", "2"])
  (result,) = json.loads((tmp_path / "lh" / "resnet_trained.json").read_text()).values()
  assert (result["optimizer"], result["epoch"], len(result["rows"])) == ("scale_amended", 1, 2)
  assert all(np.isfinite(r["relu_sum"]) and r["relu_sum"] > 0 for r in result["rows"])
  text = (tmp_path / "lh" / "resnet_trained.md").read_text()
  assert "after training (scale_amended, epoch 1)" in text and "(γ, β as trained)" in text
  assert "constant, input scale unit), 1 epochs" in text  # which reading trained it
  assert all(r["m_uz_propagated_gamma"] > 0 for r in result["rows"])
  assert "m_uz `propagated`, γ²-aware" in text
  assert str(tmp_path) not in text  # the run is named, not its machine path
  with pytest.raises(SystemExit, match="holds vgg11"):
    lhr.main(["--checkpoint", str(_vgg_run(tmp_path)), "--out", str(tmp_path / "lh"),
              "--data-dir", "sample"])


@pytest.mark.parametrize("flags, needle", [
    (["--model", "resnet21"], "argument --model: invalid choice 'resnet21'"),
    (["--model", "resnet20", "--width", "0.125"],
     "--width 0.125 leaves resnet20's narrowest convolution 2 channel(s) (of 16); at least 4 "
     "are needed for a network that can learn: use --width 0.219 or more"),
    (["--model", "resnet20", "--optimizer", "scale_amended", "--sa-pooling", "after"],
     "--sa-pooling after is not implemented for ResNets (resnet20); use --sa-pooling before"),
])
def test_resnet_bad_input_is_one_line(flags, needle, tmp_path, capsys):
  workdir = tmp_path / "w"
  try:
    code = cifar.main(["--data-dir", "sample", "--epochs", "1", "--no-progress",
                       "--no-compilation-cache", "--workdir", str(workdir)] + flags)
  except SystemExit as e:  # argparse's own refusals
    code = e.code
  assert code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and needle in err, err
  assert not workdir.exists()


def test_model_unknown_to_validation_is_one_line():
  with pytest.raises(config_lib.UsageError, match="unknown model 'resnet21'; choose from "
                     "vgg11, .*resnet20, .*resnet110b"):
    config_lib.validate_config(dataclasses.replace(_config(), model="resnet21"))


def test_resume_of_a_config_stored_without_sa_input_scale(tmp_path):
  for model in ("resnet20", "vgg11"):
    config = _config(model=model, optimizer="scale_amended",
                     width=WIDTH if model == "resnet20" else 0.0625)
    workdir = tmp_path / model
    workdir.mkdir()
    old = config.to_json()
    del old["sa_input_scale"]
    (workdir / "config.json").write_text(json.dumps(old))
    if model == "vgg11":  # no input scale then or now
      assert records.check_config(config, str(workdir))[0] == config
      continue
    # It ran with the default of its time, "propagated": that resumes it; today's default,
    # "unit", is another reading and is refused, naming the field.
    then = dataclasses.replace(config, sa_input_scale="propagated")
    assert records.check_config(then, str(workdir))[0] == then
    assert config.sa_input_scale == "unit"
    with pytest.raises(config_lib.UsageError,
                       match="sa_input_scale: 'propagated' there, 'unit' here"):
      records.check_config(config, str(workdir))
