"""A real ``gencli train`` killed, preempted and starved of disk, then re-run with the same command.

The command always carries ``run_name=... resume=auto``, as a restart script would: re-running it picks
up where the killed run stopped. A small hook module (``sitecustomize.py`` on the subprocess's
PYTHONPATH, written here) sets gencli's test hooks in gencli.checkpoints to slow one checkpoint save
down (so the test can SIGKILL the process in the middle of it) or to fail one with ENOSPC; nothing in
gencli reads test-only settings itself.
"""

from __future__ import annotations

import contextlib
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
from gencli.checkpoints import WRITTEN_RECORD

# 8x8 digits, batch 32: 50 steps per epoch, 6 epochs = 300 steps; last.ckpt every 20 steps.
TOTAL_STEPS = 300
COMMAND = ["train", "model=vae", "data.image_size=8", "data.batch_size=32", "trainer.max_epochs=6",
           "callbacks=minimal", "callbacks.sample_grid.n=4", "callbacks.checkpoint.every_n_steps=20",
           "run_name=killed", "resume=auto"]

HOOK = '''
import os, time
spec = os.environ.get("GENCLI_TEST_SAVE_HOOK")
if spec:
    import gencli.checkpoints as checkpoints
    mode, nth, arg = spec.split(":", 2)
    nth, state = int(nth), {"saves": 0}

    def on_save_start(path):
        state["saves"] += 1
        if state["saves"] == nth and mode == "slow":
            open(arg, "w").write(str(path))  # the test kills the process once this file appears

    def before_write(nbytes):
        if state["saves"] != nth:
            return
        if mode == "slow":
            time.sleep(0.2)
        elif mode == "enospc":
            raise OSError(28, "No space left on device")

    checkpoints.on_save_start, checkpoints.before_write = on_save_start, before_write
'''


@pytest.fixture
def start(tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOOK)
    procs = []

    def _start(*extra: str, env: dict | None = None) -> subprocess.Popen:
        full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        full_env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(hooks), full_env.get("PYTHONPATH", "")]),
                        **(env or {}))
        proc = subprocess.Popen([sys.executable, "-m", "gencli.cli", *COMMAND, *extra], cwd=tmp_path, env=full_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield _start
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "outputs" / "train" / "runs" / "killed"


def step_of(path: Path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])


def leftovers(folder: Path) -> list[str]:
    """Hidden files in the checkpoints folder, but the record of the checkpoints the run wrote (WRITTEN_RECORD)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != WRITTEN_RECORD)


@pytest.mark.slow
def test_killed_preempted_interrupted_then_the_same_command_finishes(tmp_path, start):
    folder = run_dir(tmp_path) / "checkpoints"
    kills = []

    # 1. killed before the first checkpoint: resume=auto then starts fresh
    proc = start()
    wait_for(lambda: (run_dir(tmp_path) / ".hydra").is_dir(), what="the run directory")
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    kills.append(("before any checkpoint", sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []))

    # 2. killed between two saves: last.ckpt holds step 20 or later
    proc = start()
    wait_for(lambda: (folder / "last.ckpt").is_file(), what="last.ckpt")
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    kept = step_of(folder / "last.ckpt")
    kills.append(("between saves", kept))
    assert kept >= 20 and kept % 10 == 0

    # 3. killed in the middle of writing a checkpoint (the 2nd save of this run, slowed down)
    marker = tmp_path / "saving"
    proc = start(env={"GENCLI_TEST_SAVE_HOOK": f"slow:2:{marker}"})
    wait_for(marker.is_file, what="the slowed save")
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    intact = step_of(folder / "last.ckpt")  # loads: the name never holds a partial file
    kills.append(("during a checkpoint save", intact, leftovers(folder)))
    assert intact >= kept
    # a partial file can only be a hidden .partial from the killed process; the next run removes it
    assert all(name.endswith(".partial") for name in leftovers(folder)), leftovers(folder)

    # 4. SIGTERM (preemption): the step it stops at is saved, exit 143, metrics.json says interrupted
    proc = start()
    wait_for(lambda: step_of(folder / "last.ckpt") > intact, what="a checkpoint of the resumed run")
    proc.send_signal(signal.SIGTERM)
    result = finish(proc)
    assert result.returncode == 128 + signal.SIGTERM, describe(result)
    assert "Traceback" not in result.stderr and "training stopped by SIGTERM" in result.stderr, describe(result)
    report = json.loads((run_dir(tmp_path) / "metrics.json").read_text())
    assert report["status"] == "interrupted" and "resume=auto" in report["reason"]
    stopped = step_of(folder / "last.ckpt")
    assert stopped == report["steps"] > intact  # the state after the very last step, not the last every_n_steps
    kills.append(("SIGTERM", stopped))

    # 5. Ctrl+C: the same, exit 130
    proc = start()
    wait_for(lambda: step_of(folder / "last.ckpt") > stopped, what="a checkpoint after the SIGTERM")
    proc.send_signal(signal.SIGINT)
    result = finish(proc)
    assert result.returncode == 128 + signal.SIGINT, describe(result)
    assert "training stopped by SIGINT (Ctrl+C)" in result.stderr, describe(result)
    interrupted = step_of(folder / "last.ckpt")
    kills.append(("Ctrl+C", interrupted))

    # 6. the same command again finishes the run, with the right step count
    result = finish(start())
    assert result.returncode == 0, describe(result)
    report = json.loads((run_dir(tmp_path) / "metrics.json").read_text())
    assert report["status"] == "completed" and report["steps"] == TOTAL_STEPS, report
    assert report["resumed_from"]["step"] == interrupted
    assert step_of(folder / "last.ckpt") == TOTAL_STEPS
    assert leftovers(folder) == []
    # and once more: a finished run is left as it is, exit 0
    assert finish(start()).returncode == 0
    assert json.loads((run_dir(tmp_path) / "metrics.json").read_text()) == report
    print("kill points:", kills)


def mount_tmpfs(path: Path, size_bytes: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                                capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@pytest.mark.slow
def test_a_full_disk_during_a_save_keeps_the_last_good_checkpoint(tmp_path, start):
    # How big is one checkpoint? Train to the first save once, elsewhere.
    probe = finish(start("run_name=probe", "trainer.max_epochs=1"))
    assert probe.returncode == 0, describe(probe)
    size = (tmp_path / "outputs/train/runs/probe/checkpoints/last.ckpt").stat().st_size
    folder = tmp_path / "small_disk"
    # room for one checkpoint and a half: the first save fits, the second runs out of space mid-write
    mounted = mount_tmpfs(folder, int(size * 1.6) // 4096 * 4096 + 4096)
    try:
        extra = [f"callbacks.checkpoint.dirpath={folder}", "callbacks.checkpoint.save_top_k=0"]
        env = None if mounted else {"GENCLI_TEST_SAVE_HOOK": "enospc:2:-"}
        result = finish(start(*extra, env=env))
        assert result.returncode == 1, describe(result)
        assert "Traceback" not in result.stderr, describe(result)
        assert "could not write the checkpoint" in result.stderr and "No space left on device" in result.stderr
        assert "the last good one is intact" in result.stderr, describe(result)
        assert step_of(folder / "last.ckpt") == 20  # the first save, untouched and loadable
        assert sorted(p.name for p in folder.iterdir()) == sorted([WRITTEN_RECORD, "last.ckpt"])  # nothing partial
        report = json.loads((run_dir(tmp_path) / "metrics.json").read_text())
        assert report["status"] == "failed" and "No space left" in report["reason"]
        print("full disk:", "a real tmpfs" if mounted else "simulated ENOSPC")
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], capture_output=True, timeout=30)
