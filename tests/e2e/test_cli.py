"""The gencli command line: help, clear errors with the right exit codes, multirun, 2-process DDP."""

from __future__ import annotations

import json

import pytest

from conftest import FAST_TRAIN, describe


def assert_clear_error(result, code: int, *needles: str) -> None:
    """Exit ``code``, one 'gencli error:' paragraph naming the bad value, and no traceback."""
    assert result.returncode == code, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    assert "gencli error:" in result.stderr, describe(result)
    for needle in needles:
        assert needle in result.stderr, describe(result)


def test_help_lists_the_verbs(run_gencli):
    result = run_gencli("--help")
    assert result.returncode == 0
    for verb in ("train", "sample", "eval"):
        assert verb in result.stdout


def test_unknown_verb(run_gencli):
    assert_clear_error(run_gencli("trian"), 2, "'trian' is not a verb")


def test_train_help_and_cfg_job_behave_as_hydra(run_gencli):
    result = run_gencli("train", "--help")
    assert result.returncode == 0, describe(result)
    # gencli's own help (gencli/shell.py): '  model=   ae, ..., [vae]', the current choice in brackets
    groups = {line.split("=", 1)[0].strip(): line.split("=", 1)[1].split("(")[0].strip().replace("[", "").replace("]", "")
              for line in result.stdout.splitlines() if line.startswith(("  model=", "  data="))}
    assert {"ae", "vae"} <= set(groups["model"].split(", "))
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "folder"} <= set(groups["data"].split(", "))
    assert "[vae]" in result.stdout and "[digits]" in result.stdout
    result = run_gencli("train", "model=ae", "data=mnist", "trainer=gpu", "--cfg", "job")
    assert result.returncode == 0, describe(result)
    assert "gencli.families.autoencoder.Autoencoder" in result.stdout
    assert "accelerator: gpu" in result.stdout and "noise_std" in result.stdout


def test_unknown_model(run_gencli):
    assert_clear_error(run_gencli("train", "model=vea"), 2, "model=vea is not a known model", "vae")


def test_missing_data_root_offline(run_gencli, tmp_path):
    result = run_gencli("train", "data=mnist", f"data.root={tmp_path / 'no_mnist'}", "trainer.max_epochs=1")
    assert_clear_error(result, 1, "train-images-idx3-ubyte", str(tmp_path / "no_mnist"), "data.download=true")


def test_checkpoint_that_does_not_exist(run_gencli, tmp_path):
    missing = tmp_path / "nope" / "last.ckpt"
    for verb in ("sample", "eval"):
        assert_clear_error(run_gencli(verb, f"ckpt={missing}"), 2, f"ckpt={missing} does not exist")


def test_file_that_is_not_a_checkpoint(run_gencli, tmp_path):
    fake = tmp_path / "notes.ckpt"
    fake.write_text("these are my notes, not weights")
    assert_clear_error(run_gencli("sample", f"ckpt={fake}"), 2, f"ckpt={fake} is not a readable PyTorch checkpoint")


def test_missing_ckpt_argument(run_gencli):
    assert_clear_error(run_gencli("sample"), 2, "needs ckpt=PATH")


def test_bad_value_inside_a_constructor(run_gencli):
    assert_clear_error(run_gencli("train", "data.image_size=12"), 2, "image size 12", "data.image_size")


def test_full_traceback_on_request(run_gencli):
    result = run_gencli("train", "data.image_size=12", env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
def test_multirun_one_directory_per_job(run_gencli, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_gencli("train", "-m", "model=ae,vae", *FAST_TRAIN, "trainer.max_epochs=1", "data.image_size=8",
                        f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, describe(result)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    targets = set()
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        report = json.loads((job / "metrics.json").read_text())
        targets.add(report["provenance"]["model"])
    assert targets == {"gencli.families.autoencoder.Autoencoder", "gencli.families.vae.VAE"}


@pytest.mark.slow
def test_ddp_cpu_two_processes_one_run_directory(run_gencli, tmp_path):
    result = run_gencli("train", "trainer=ddp_cpu", *FAST_TRAIN, "trainer.max_epochs=1", "data.image_size=8")
    assert result.returncode == 0, describe(result)
    runs = list((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # the second rank shares the first rank's directory
    run = runs[0]
    assert (run / "train_ddp_process_1.log").exists()  # rank 1 really ran, in this directory
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and len([c for c in checkpoints if c.startswith("best")]) == 1
    report = json.loads((run / "metrics.json").read_text())
    assert report["steps"] > 0


@pytest.mark.slow
def test_ddp_with_torch_compile_and_a_global_batch(run_gencli, tmp_path):
    """trainer=ddp_cpu with hardware.compile=true (each rank compiles its nets inside the DDP wrapper) and a global
    batch of 16 over 2 ranks x 2 accumulated micro-batches: 4 images per device and step, the paper-style split."""
    from gencli.io import load_checkpoint

    result = run_gencli("train", "trainer=ddp_cpu", "model=vae", "data.image_size=8", "callbacks=minimal",
                        "callbacks.sample_grid.n=4", "hardware.compile=true", "data.global_batch_size=16",
                        "trainer.accumulate_grad_batches=2", "trainer.max_steps=3", "trainer.max_epochs=-1",
                        "trainer.limit_val_batches=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, describe(result)
    assert "global batch 16 (4 per device x 2 device(s) x 2 accumulated)" in result.stdout + result.stderr
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3
    assert not [k for k in checkpoint["state_dict"] if "_orig_mod" in k]  # loads without compile
    stored = checkpoint["gencli"]["config"]
    assert stored["data"]["batch_size"] == 4 and stored["batch"]["world_size"] == 2
    result = run_gencli("sample", f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "n=4",
                        f"hydra.run.dir={tmp_path / 'sample'}")
    assert result.returncode == 0, describe(result)


@pytest.mark.slow
def test_sample_and_eval_against_another_data_set(run_gencli, tmp_path, mnist_root):
    run_dir = tmp_path / "train"
    result = run_gencli("train", "model=ae", *FAST_TRAIN, "trainer.max_epochs=1", "data.image_size=8",
                        f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, describe(result)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    mnist = ["data=mnist", f"data.root={mnist_root}", "data.image_size=8"]
    result = run_gencli("eval", f"ckpt={ckpt}", *mnist, f"hydra.run.dir={tmp_path / 'eval'}")
    assert result.returncode == 0, describe(result)
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["provenance"]["run"]["data"]["name"] == "mnist"
    # RGB images (the run's own PNGs) for a grayscale model: refused before any convolution runs.
    assert_clear_error(run_gencli("sample", f"ckpt={ckpt}", "mode=reconstruct", "data=folder",
                                  f"data.root={tmp_path}", "data.image_size=8"), 2, "data.channels=1")
