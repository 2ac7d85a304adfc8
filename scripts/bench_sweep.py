"""Wall time of one 4-job sweep, run serially (Hydra's basic launcher) and in parallel (hydra/launcher=joblib).

    PYTHONPATH=src:scripts python scripts/bench_sweep.py                 # 4 VAE jobs on digits, 10 epochs each
    PYTHONPATH=src:scripts python scripts/bench_sweep.py --epochs 3 --n-jobs 2 4 --rounds 2

Each configuration is the real command (``gencli train -m model=vae model.beta=0.5,1,2,4 ...``) in a fresh
subprocess and sweep folder, timed from start to exit (start-up, every job, the summary); the rounds
alternate the configurations so that a busy host slows them alike. joblib's loky workers limit each job's
torch threads to (cores / n_jobs), so the parallel jobs share the cores rather than oversubscribe them.
Prints a table: min / median / max seconds per configuration and the speed-up of the median over serial.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import markdown_table


def run_sweep(launcher: list[str], epochs: int, folder: Path) -> tuple[float, list[str]]:
    command = [sys.executable, "-m", "gencli.cli", "train", "-m", "model=vae", "model.beta=0.5,1,2,4",
               f"trainer.max_epochs={epochs}", f"hydra.sweep.dir={folder}", *launcher]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=folder.parent)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    statuses = [json.loads(p.read_text())["status"] for p in sorted(folder.glob("*/job.json"))]
    return seconds, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n-jobs", type=int, nargs="+", default=[2], help="joblib parallel jobs to compare")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    configs = {"serial (basic launcher)": []} | {
        f"joblib n_jobs={n}": ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={n}"] for n in args.n_jobs}
    times: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(configs) if r % 2 == 0 else list(reversed(configs))
            for name in order:
                seconds, statuses = run_sweep(configs[name], args.epochs, Path(tmp) / f"{r}-{len(times[name])}-{name[:6]}")
                assert statuses == ["completed"] * 4, statuses
                times[name].append(seconds)
                print(f"round {r + 1}: {name}: {seconds:.1f} s", flush=True)
    serial = statistics.median(times["serial (basic launcher)"])
    rows = [[name, f"{min(t):.1f}", f"{statistics.median(t):.1f}", f"{max(t):.1f}", f"{serial / statistics.median(t):.2f}x"]
            for name, t in times.items()]
    print(f"\n4-job sweep (model=vae model.beta=0.5,1,2,4 trainer.max_epochs={args.epochs}, digits), "
          f"{os.cpu_count()} CPU cores, {args.rounds} round(s)\n")
    print(markdown_table(["launcher", "min s", "median s", "max s", "speed-up"], rows))


if __name__ == "__main__":
    main()
