"""Two-process DDP on CPU (trainer=ddp_cpu, gloo) when something goes wrong on one rank or a signal arrives.

A NaN that only rank 1 sees (injected by a hook module on the subprocess's PYTHONPATH, patching the
VAE's training step) must stop both ranks with one paragraph, within a timeout instead of hanging at
the next all-reduce; a SIGTERM to the launching process must save one checkpoint and stop both ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import describe

COMMAND = ["train", "trainer=ddp_cpu", "model=vae", "data.image_size=8", "data.batch_size=16", "trainer.max_epochs=3",
           "callbacks=minimal", "callbacks.sample_grid.n=4", "callbacks.checkpoint.every_n_steps=10", "run_name=ddp"]

HOOK = '''
import os, time
step = os.environ.get("GENCLI_TEST_NAN_ON_RANK1_AT")
if step:
    import torch
    from gencli.families.vae import VAE
    original = VAE.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        if self.global_rank == 1 and self.global_step == int(step):
            open(os.environ["GENCLI_TEST_NAN_MARKER"], "w").write(repr(time.time()))
            return loss * torch.tensor(float("nan"))
        return loss

    VAE.training_step = training_step
'''


def start(tmp_path: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(HOOK)
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(hooks), full_env.get("PYTHONPATH", "")]),
                    **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "gencli.cli", *COMMAND, *extra], cwd=tmp_path, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: rank 1 too
        out, err = proc.communicate()
        raise AssertionError(f"gencli hung (killed after {timeout} s)\n{out[-2000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def no_rank_left(proc: subprocess.Popen) -> bool:
    """No process of the run's session is alive (rank 1 exited too)."""
    result = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True)
    return result.stdout.strip() == ""


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_both_ranks(tmp_path):
    marker = tmp_path / "nan_injected"
    proc = start(tmp_path, env={"GENCLI_TEST_NAN_ON_RANK1_AT": "5", "GENCLI_TEST_NAN_MARKER": str(marker)})
    result = finish(proc, timeout=240)
    rank0_ended = time.time()
    deadline = time.monotonic() + 30
    while not no_rank_left(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    ended = time.time()
    assert no_rank_left(proc), "rank 1 is still running"
    assert result.returncode == 1, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    assert result.stderr.count("gencli error:") == 1, describe(result)  # rank 0 speaks for both
    assert "training stopped at step 5" in result.stderr and "on rank 1 of 2" in result.stderr, describe(result)
    run = tmp_path / "outputs" / "train" / "runs" / "ddp"
    report = json.loads((run / "metrics.json").read_text())
    assert report["status"] == "failed" and "rank 1" in report["reason"]
    # nothing finite was saved over: the only checkpoint is the last finite state, saved once
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    injected = float(marker.read_text())
    seconds = ended - injected
    print(f"NaN on rank 1 -> rank 0 (the command) exited after {rank0_ended - injected:.2f} s, both ranks after "
          f"{seconds:.2f} s")
    assert seconds < 60


@pytest.mark.slow
def test_sigterm_stops_both_ranks_with_one_checkpoint(tmp_path):
    run = tmp_path / "outputs" / "train" / "runs" / "ddp"
    proc = start(tmp_path, "resume=auto")
    deadline = time.monotonic() + 180
    while not (run / "checkpoints" / "last.ckpt").is_file():
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to rank 0 only, as `kill PID` would; it forwards to rank 1
    result = finish(proc, timeout=120)
    assert result.returncode == 128 + signal.SIGTERM, describe(result)
    assert result.stderr.count("gencli error:") == 1 and "training stopped by SIGTERM" in result.stderr, describe(result)
    report = json.loads((run / "metrics.json").read_text())
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert report["status"] == "interrupted" and report["steps"] == step
    # the same command finishes the run: one directory, with the right step count
    result = finish(start(tmp_path, "resume=auto"), timeout=240)
    assert result.returncode == 0, describe(result)
    report = json.loads((run / "metrics.json").read_text())
    assert report["status"] == "completed" and report["resumed_from"]["step"] == step
    runs = list((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert runs == [run]
