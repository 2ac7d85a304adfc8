"""Ctrl+C while gencli is still starting (imports, the pre-flight, Hydra's set-up) is one line, exit 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest


def test_ctrl_c_before_the_job_starts_is_one_line_and_exit_130(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", "from gencli.cli import main; main()", "train", "run_name=early"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # inside the imports of torch/Hydra: no job handler is installed yet
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert "gencli: stopped by Ctrl+C (SIGINT)" in err
    if "before the job started" in err:
        assert not (tmp_path / "outputs" / "train" / "runs" / "early").exists()


def test_an_in_process_call_leaves_the_callers_signal_handlers_as_they_were(tmp_path, monkeypatch):
    """A job's StopOnSignal handlers exit the process (os._exit) on a signal once the job is over: after
    ``main([...])`` returns in a notebook or a test, its next Ctrl+C must be the caller's again."""
    import gencli.jobs.report as report_job
    from gencli.cli import main

    seen = {}

    def job(cfg):
        seen["during"] = signal.getsignal(signal.SIGINT)
        (tmp_path / "out").mkdir(exist_ok=True)
        return tmp_path / "out"

    def mine(signum, frame):
        raise RuntimeError("the caller's handler")

    before = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGTERM", "SIGUSR1", "SIGPIPE")}
    previous = signal.signal(signal.SIGINT, mine)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(report_job, "report", job)
    try:
        (tmp_path / "run").mkdir()
        main(["report", f"path={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'job'}"])
        assert getattr(seen["during"], "__self__", None).__class__.__name__ == "StopOnSignal"  # it was installed
        assert signal.getsignal(signal.SIGINT) is mine
        assert {name: signal.getsignal(getattr(signal, name)) for name in before} == before
        with pytest.raises(RuntimeError, match="the caller's handler"):  # not os._exit(130) of this test process
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, previous)
