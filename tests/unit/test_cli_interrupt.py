"""Ctrl+C while gencli is still starting (imports, the pre-flight, Hydra's set-up) is one line, exit 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


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
