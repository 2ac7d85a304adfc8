"""SIGTERM and Ctrl+C during ``gencli sample`` and ``gencli eval``, as a user or a scheduler sends them.

Every verb other than train stops at once (gencli.jobs.common.StopOnSignal): exit 143 / 130, one paragraph naming the
signal and what was removed and kept, no traceback, gone within seconds however many PNGs were written, its
unfinished outputs renamed to trash and deleted (in the background when large), nothing that looks complete (no
sample.json / metrics.json; job.json says interrupted). A second Ctrl+C exits at once. The next run of any verb in
that folder (or beside it, under outputs/<verb>/runs/) removes what stopped or killed runs left, never the temp files
of a run that is still going.

A small hook module (``sitecustomize.py`` on the subprocess's PYTHONPATH, written here) slows the deletion of the
trash down for the second-Ctrl+C test, so the second signal arrives while the first is still being handled, and holds
an export's weights file before its rename, so the signal arrives mid-export; nothing in gencli reads test-only
settings itself.
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

from conftest import describe, gencli

#: Exit within this many seconds of the signal (measured here: well under one second; the machine may be busy).
PROMPT_S = 5.0

HOOK = '''
import os, time
if os.environ.get("GENCLI_TEST_SLOW_TRASH"):
    import gencli.io as io
    real = io.remove_tree

    def slow_remove_tree(path, deadline=None):
        time.sleep(float(os.environ["GENCLI_TEST_SLOW_TRASH"]))
        return real(path, deadline)

    io.remove_tree = slow_remove_tree

if os.environ.get("GENCLI_TEST_SLOW_EXPORT"):
    import contextlib
    import gencli.io as io
    real_write = io.atomic_write

    @contextlib.contextmanager
    def slow_write(path, mode="wb"):
        with real_write(path, mode) as f:
            yield f
            if str(path).endswith(".safetensors"):  # written, not yet renamed into place: the test signals now
                f.flush()
                open(os.environ["GENCLI_TEST_SLOW_EXPORT"], "w").close()
                time.sleep(60)

    io.atomic_write = slow_write
'''


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("signals_ckpt")
    result = gencli("train", "model=vae", "data.image_size=8", "data.batch_size=64", "trainer.max_epochs=1",
                    "callbacks=minimal", "callbacks.sample_grid.n=4", f"hydra.run.dir={root / 'run'}", cwd=root)
    assert result.returncode == 0, describe(result)
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture
def start(tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOOK)
    procs = []

    def _start(*args: str, env: dict | None = None) -> subprocess.Popen:
        full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        full_env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(hooks), full_env.get("PYTHONPATH", "")]),
                        **(env or {}))
        proc = subprocess.Popen([sys.executable, "-m", "gencli.cli", *args], cwd=tmp_path, env=full_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield _start
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.communicate(timeout=30)


def wait_for(condition, proc: subprocess.Popen | None = None, timeout: float = 240, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}\n{out[-2000:]}\n"
                                 f"{err[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def signal_and_finish(proc: subprocess.Popen, signum: int, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    sent = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - sent


def hidden(folder: Path) -> list[str]:
    """gencli's temp files and trash in ``folder`` (Hydra's .hydra/ aside)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".hydra")


def png_temp_count(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return max([len(os.listdir(p)) for p in folder.glob(".images.*.tmp") if p.is_dir()] or [0])


def assert_stopped(result: subprocess.CompletedProcess, seconds: float, code: int, name: str, *needles: str) -> str:
    assert result.returncode == code, describe(result)
    assert seconds < PROMPT_S, f"took {seconds:.2f} s to exit\n{describe(result)}"
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, describe(result)
    paragraphs = [line for line in result.stderr.splitlines() if line.startswith("gencli error:")]
    assert len(paragraphs) == 1, describe(result)
    message = paragraphs[0]
    assert f"stopped by {name}" in message, message
    for needle in needles:
        assert needle in message, message
    return message


def job_record(folder: Path) -> dict:
    return json.loads((folder / "job.json").read_text())


def sample_args(ckpt: Path, *extra: str) -> list[str]:
    return ["sample", f"ckpt={ckpt}", "device=cpu", "batch_size=200", "grid_n=0", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, name, fmt", [(signal.SIGTERM, 143, "SIGTERM", "both"),
                                                     (signal.SIGINT, 130, "SIGINT", "png")])
def test_a_signal_during_sample_stops_it_at_once_and_leaves_nothing_that_looks_complete(
        tiny_ckpt, start, tmp_path, signum, code, name, fmt):
    folder = tmp_path / "outputs" / "sample" / "runs" / "stopped"
    proc = start(*sample_args(tiny_ckpt, "n=200000", f"format={fmt}", "run_name=stopped"))
    wait_for(lambda: png_temp_count(folder) >= 1000, proc, what="1000 PNGs in the temp folder")
    result, seconds = signal_and_finish(proc, signum)
    message = assert_stopped(result, seconds, code, name, "images/", "of 200,000 images", "sample.json was not written",
                             *(["samples.npz"] if fmt == "both" else []))
    print(f"{name} during sample (format={fmt}): exit {result.returncode} after {seconds:.2f} s")
    assert not (folder / "sample.json").exists() and not (folder / "images").exists()
    assert not (folder / "samples.npz").exists()
    assert job_record(folder)["status"] == "interrupted" and job_record(folder)["exit_code"] == code
    assert job_record(folder)["reason"] == message.removeprefix("gencli error: ")
    assert not [n for n in hidden(folder) if not n.startswith(".trash.")], hidden(folder)  # temp names are gone at once

    # the next run in the same folder (any verb) leaves no temp file or trash behind
    again = gencli(*sample_args(tiny_ckpt, "n=4", "run_name=stopped"), cwd=tmp_path)
    assert again.returncode == 0, describe(again)
    assert hidden(folder) == [] and (folder / "sample.json").is_file()


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_and_the_next_run_removes_what_it_left(tiny_ckpt, start, tmp_path):
    folder = tmp_path / "outputs" / "sample" / "runs" / "twice"
    # the first Ctrl+C's clean-up is made to hang (30 s) in the deletion of the trash
    proc = start(*sample_args(tiny_ckpt, "n=200000", "format=png", "run_name=twice"),
                 env={"GENCLI_TEST_SLOW_TRASH": "30"})
    wait_for(lambda: png_temp_count(folder) >= 200, proc, what="PNGs in the temp folder")
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: any(n.startswith(".trash.") for n in hidden(folder)), proc, timeout=30,
             what="the temp folder renamed to trash")
    result, seconds = signal_and_finish(proc, signal.SIGINT)
    assert result.returncode == 130, describe(result)
    assert seconds < PROMPT_S, f"took {seconds:.2f} s after the second Ctrl+C\n{describe(result)}"
    assert "SIGINT again: exiting at once" in result.stderr, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    assert not (folder / "images").exists() and not (folder / "sample.json").exists()
    assert [n for n in hidden(folder) if n.startswith(".trash.")], hidden(folder)  # left for the next run

    # the next run of another verb into the same folder removes the dead process's trash
    again = gencli("eval", f"ckpt={tiny_ckpt}", "device=cpu", "metric=recon", "n=16", f"hydra.run.dir={folder}",
                   cwd=tmp_path)
    assert again.returncode == 0, describe(again)
    assert hidden(folder) == []


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_a_signal_during_eval_stops_it_at_once_without_metrics(tiny_ckpt, start, tmp_path, signum, code, name):
    folder = tmp_path / "outputs" / "eval" / "runs" / "stopped"
    proc = start("eval", f"ckpt={tiny_ckpt}", "device=cpu", "metric=fid", "n=2000000", "batch_size=250",
                 "save_samples=true", "run_name=stopped")
    log = folder / "eval.log"
    wait_for(lambda: log.is_file() and "reference statistics" in log.read_text(), proc,
             what="the sample pass of eval")
    time.sleep(1.0)  # inside the pass over 2,000,000 generated images
    result, seconds = signal_and_finish(proc, signum)
    assert_stopped(result, seconds, code, name, "metrics.json was not written")
    print(f"{name} during eval: exit {result.returncode} after {seconds:.2f} s")
    assert not (folder / "metrics.json").exists() and not (folder / "samples.npz").exists()
    assert job_record(folder)["status"] == "interrupted" and job_record(folder)["exit_code"] == code
    assert hidden(folder) == []


@pytest.mark.slow
def test_leftovers_of_a_killed_run_are_removed_by_the_next_run_beside_it_but_a_live_runs_are_not(
        tiny_ckpt, start, tmp_path):
    runs = tmp_path / "outputs" / "sample" / "runs"
    live = start(*sample_args(tiny_ckpt, "n=200000", "format=both", "run_name=live"))
    killed = start(*sample_args(tiny_ckpt, "n=200000", "format=both", "run_name=killed"))
    wait_for(lambda: png_temp_count(runs / "killed") >= 100, killed, what="the run to be killed writing PNGs")
    killed.send_signal(signal.SIGKILL)  # no handler runs: its temp files stay
    killed.communicate(timeout=60)
    left = hidden(runs / "killed")
    assert any(n.startswith(".images.") for n in left) and any(n.startswith(".samples.npz.") for n in left), left
    wait_for(lambda: png_temp_count(runs / "live") >= 100, live, what="the live run writing PNGs")
    live_temps = hidden(runs / "live")

    # a new run in a new folder beside them cleans the killed run's folder and leaves the live one alone
    other = gencli(*sample_args(tiny_ckpt, "n=4", "run_name=other"), cwd=tmp_path)
    assert other.returncode == 0, describe(other)
    assert "unfinished output(s) left by stopped or killed runs" in other.stdout + other.stderr, describe(other)
    assert hidden(runs / "killed") == [] and hidden(runs / "other") == []
    assert live.poll() is None and set(live_temps) <= set(hidden(runs / "live"))  # still writing, untouched

    result, seconds = signal_and_finish(live, signal.SIGTERM)
    assert_stopped(result, seconds, 143, "SIGTERM", "images/", "samples.npz")
    assert not [n for n in hidden(runs / "live") if not n.startswith(".trash.")]


@pytest.mark.slow
def test_a_signal_during_export_leaves_no_weights_and_the_next_export_cleans_its_out_folder(tiny_ckpt, start,
                                                                                           tmp_path):
    from gencli.io import HOST_TAG, leftover_owner

    weights = tmp_path / "weights" / "model.safetensors"
    folder = tmp_path / "outputs" / "export" / "runs" / "stopped"
    marker = tmp_path / "export_is_writing"
    proc = start("export", f"ckpt={tiny_ckpt}", f"out={weights}", "run_name=stopped",
                 env={"GENCLI_TEST_SLOW_EXPORT": str(marker)})
    wait_for(marker.exists, proc, what="the export writing its weights")
    result, seconds = signal_and_finish(proc, signal.SIGTERM)
    assert_stopped(result, seconds, 143, "SIGTERM", "model.safetensors", "export.json was not written")
    assert sorted(p.name for p in weights.parent.iterdir()) == []  # no weights, no temp file
    assert job_record(folder)["status"] == "interrupted"

    # what a killed export left in out='s folder goes with the next export there; a live process's stays
    dead = subprocess.Popen([sys.executable, "-S", "-c", "pass"])
    dead.wait()
    killed = weights.parent / f".model.safetensors.{dead.pid}@{HOST_TAG}.abcd1234.tmp"
    live = weights.parent / f".model.json.{os.getpid()}@{HOST_TAG}.abcd1234.tmp"
    for path in (killed, live):
        path.write_bytes(b"partial")
        assert leftover_owner(path.name)[0] == "temp"
    again = gencli("export", f"ckpt={tiny_ckpt}", f"out={weights}", "run_name=again", cwd=tmp_path)
    assert again.returncode == 0, describe(again)
    assert sorted(p.name for p in weights.parent.iterdir()) == sorted([live.name, "model.json", "model.safetensors"])
