"""resume=: a run stopped at step k and continued to step N ends with the weights of an uninterrupted run to N.

The stop is the real one a preempted run takes: a SIGTERM raised inside the process at step k, which
the Preemption callback turns into a checkpoint at the step boundary and an Interrupted error; the
same configuration is then run again with resume=auto in the same directory. Equality is bitwise:
weights, buffers (EMA, BatchNorm statistics, the autoencoder's latent Gaussian, counters) and the
optimiser's moments, for every family, mid-epoch and at an epoch's last batch.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from gencli.callbacks.preemption import Preemption
from gencli.errors import ConfigError, Interrupted, RuntimeFailure
from gencli.jobs.train import train

FAMILIES = {
    "vae": ["model=vae"],
    "ae": ["model=ae"],
    "gan": ["model=dcgan", "model.generator.base_channels=8", "model.discriminator.base_channels=8"],
    "ddpm": ["model=ddpm", "model/net=unet_cpu", "model.net.ch=8", "model.net.attn_resolutions=[]",
             "model.schedule.timesteps=50", "model.sampler.steps=5", "model.ema_decay=0.9"],
}
# 8x8 digits in batches of 32: 50 steps per epoch, 2 epochs; side activities at odd moments.
COMMON = ["data.image_size=8", "data.batch_size=32", "trainer.max_epochs=2", "data.random_flip=true",
          "callbacks.sample_grid.every_n_steps=7", "callbacks.sample_grid.n=4", "callbacks.checkpoint.every_n_steps=0",
          "callbacks.gan_monitor.every_n_steps=5", "callbacks.gan_monitor.n=4", "callbacks.progress_bar=null"]


def run(out: Path, overrides: list[str]):
    return train(compose_config("train", overrides, out))


def last(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), f"{key} differs"
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        for param, state in opt_a["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][param][name])), name


@pytest.mark.slow
@pytest.mark.parametrize("family,k", [("vae", 30), ("ae", 50), ("gan", 40), ("ddpm", 23)])
def test_stopped_and_resumed_equals_uninterrupted(tmp_path, stop_at, family, k):
    overrides = FAMILIES[family] + COMMON + ["resume=auto"]
    run(tmp_path / "straight", overrides)

    stop_at["step"] = k
    with pytest.raises(Interrupted) as err:
        run(tmp_path / "stopped", overrides)
    assert err.value.exit_code == 128 + signal.SIGTERM and "resume=auto" in err.value.message
    report = json.loads((tmp_path / "stopped" / "metrics.json").read_text())
    assert report["status"] == "interrupted" and report["steps"] == k
    assert last(tmp_path / "stopped")["global_step"] == k

    stop_at["step"] = None
    run(tmp_path / "stopped", overrides)
    report = json.loads((tmp_path / "stopped" / "metrics.json").read_text())
    assert report["status"] == "completed" and report["resumed_from"]["step"] == k
    assert_same_training_state(last(tmp_path / "straight"), last(tmp_path / "stopped"))


FAST = ["model=ae", "data.image_size=8", "data.batch_size=64", "trainer.max_epochs=1", "callbacks=minimal",
        "callbacks.sample_grid.n=4", "callbacks.checkpoint.every_n_steps=0"]


def test_resume_rules(tmp_path, stop_at):
    out = tmp_path / "run"
    run(out, FAST)
    # a second run into the same directory without resume= would overwrite the first one's checkpoints
    with pytest.raises(ConfigError, match="already holds checkpoints .* resume=auto"):
        run(out, FAST)
    # the same command with resume=auto, already finished: nothing is trained, metrics.json stays the run's
    before = (out / "metrics.json").read_text()
    run(out, [*FAST, "resume=auto"])
    assert (out / "metrics.json").read_text() == before
    # an explicit resume= of a finished checkpoint is a usage error naming the limit
    with pytest.raises(ConfigError, match=r"already reached trainer.max_epochs=1 .*Raise that limit"):
        run(tmp_path / "other", [*FAST, f"resume={out / 'checkpoints' / 'last.ckpt'}"])
    # ...and continuing it with a higher limit trains the extra epoch, in the new run's directory
    run(tmp_path / "longer", [*FAST, "trainer.max_epochs=2", f"resume={out / 'checkpoints' / 'last.ckpt'}"])
    report = json.loads((tmp_path / "longer" / "metrics.json").read_text())
    assert report["epochs"] == 2 and report["steps"] == 2 * last(out)["global_step"]
    # another model than the checkpoint's
    with pytest.raises(ConfigError, match="holds a Autoencoder, but this command builds a VAE"):
        run(tmp_path / "vae", [*FAST, "model=vae", "trainer.max_epochs=3", f"resume={out / 'checkpoints' / 'last.ckpt'}"])
    with pytest.raises(ConfigError, match="does not fit the model this command builds"):
        run(tmp_path / "wider", [*FAST, "model.latent_dim=5", "trainer.max_epochs=3",
                                 f"resume={out / 'checkpoints' / 'last.ckpt'}"])


def test_resume_auto_skips_a_truncated_checkpoint(tmp_path, stop_at):
    out = tmp_path / "run"
    overrides = [*FAST, "trainer.max_epochs=3", "resume=auto"]
    stop_at["step"] = 40  # epoch 1 (25 steps per epoch): best-*.ckpt from epoch 0 exists too
    with pytest.raises(Interrupted):
        run(out, overrides)
    folder = out / "checkpoints"
    best = next(folder.glob("best-*.ckpt"))
    data = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) // 2])  # e.g. an incomplete copy
    stop_at["step"] = None
    run(out, overrides)  # warns, continues from best-*.ckpt, finishes
    report = json.loads((out / "metrics.json").read_text())
    assert report["status"] == "completed" and report["resumed_from"]["checkpoint"] == str(best)
    # nothing readable at all: one paragraph, nothing overwritten
    for path in folder.glob("*.ckpt"):
        path.write_bytes(b"garbage")
    with pytest.raises(RuntimeFailure, match="none of them loads"):
        run(out, overrides)


def test_resume_of_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(ConfigError, match="resume=.*does not exist"):
        run(tmp_path / "a", [*FAST, f"resume={tmp_path / 'nope.ckpt'}"])
    notes = tmp_path / "notes.ckpt"
    notes.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="is not a readable PyTorch checkpoint"):
        run(tmp_path / "b", [*FAST, f"resume={notes}"])
    with pytest.raises(ConfigError, match="URL"):
        run(tmp_path / "c", [*FAST, "resume=https://example.com/last.ckpt"])


def test_sigusr1_on_slurm_requeues_the_job(tmp_path, monkeypatch):
    """After saving, the requeue signal on SLURM runs `scontrol requeue <job>` (a stand-in scontrol here)."""
    calls = tmp_path / "calls"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    preemption = Preemption()
    assert "requeued" in preemption.requeue(signal.SIGUSR1)
    assert calls.read_text().split() == ["requeue", "4242"]
    assert preemption.requeue(signal.SIGTERM) is None  # SIGTERM: the job ends; the scheduler decides
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    preemption.requeue(signal.SIGUSR1)
    assert calls.read_text().split()[-1] == "7_3"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "failed" in preemption.requeue(signal.SIGUSR1)


def test_a_step_save_does_not_replace_the_validation_save_of_the_same_step(tmp_path):
    """every_n_steps landing on an epoch's last step: validation still updates best-*.ckpt and rewrites last.ckpt
    with the finished epoch, so the final last.ckpt is the finished run (and resume=auto sees it as complete)."""
    from gencli.jobs.resume import epochs_finished

    out = tmp_path / "run"
    steps_per_epoch = 1617 // 64  # digits' train split in batches of 64 (drop_last)
    run(out, [*FAST, "trainer.max_epochs=2", f"callbacks.checkpoint.every_n_steps={steps_per_epoch}"])
    final = last(out)
    assert final["global_step"] == 2 * steps_per_epoch and epochs_finished(final) == 2
    assert "val/loss" in final["gencli"]["metrics"]
    # before the fix the step save marked both validations as done: no best-*.ckpt was ever written
    best = [p.name for p in (out / "checkpoints").glob("best-*.ckpt")]
    assert len(best) == 1 and int(best[0][-11:-5]) % steps_per_epoch == 0, best


@pytest.mark.parametrize("family", ["ae", "gan", "ddpm"])
def test_the_preflight_compares_shapes_without_training(tmp_path, family):
    """The pre-flight (before Hydra writes into the run folder) builds the command's model on the meta device, or on
    the CPU for a family that computes its noise schedule while it is built, and refuses other tensor shapes."""
    from hydra.utils import instantiate

    from gencli.jobs.resume import ResumePoint, model_outline

    overrides = [*FAMILIES[family], "data.image_size=8"]
    model = instantiate(compose_config("train", overrides, tmp_path).model)
    point = ResumePoint(path=tmp_path / "last.ckpt", checkpoint={
        "gencli": {"family": type(model).__name__, "config": {}}, "state_dict": model.state_dict()})
    outline = model_outline(compose_config("train", overrides, tmp_path), point)
    assert outline is not None
    point.check_matches(outline)
    wider = {"ae": "model.latent_dim=5", "gan": "model.generator.base_channels=16", "ddpm": "model.net.ch=16"}[family]
    outline = model_outline(compose_config("train", [*overrides, wider], tmp_path), point)
    with pytest.raises(ConfigError, match="does not fit the model this command builds"):
        point.check_matches(outline)
