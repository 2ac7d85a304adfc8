"""First try per family: the wall time of `gencli train model=X` with no other argument (embedded digits, trainer=cpu).

    .venv/bin/python scripts/bench_first_try.py [--models ae vae ...]

Runs each model once, one after another, in a temporary directory, exactly as a newcomer would (the progress bar
included; its output goes to a log, which is also the non-terminal path). `ldm` needs a first stage, so it gets
`model.first_stage_ckpt=` the vae run's last.ckpt (the vae is then run first). Prints a Markdown table with the
process wall time, the CPU time, the load average before each run (other work on the machine inflates wall times)
and the last line of the run's progress; paste it into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import markdown_table  # noqa: E402
from gencli.config import group_options  # noqa: E402


def run(model: str, folder: Path, extra: list[str]) -> tuple[float, float, int, str]:
    """(wall s, CPU s of the process and its children, exit code, the last 'Epoch' line of its output)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "gencli.cli", "train", f"model={model}", *extra,
                             f"hydra.run.dir={folder / model}"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    (folder / f"{model}.log").write_text(result.stdout + result.stderr)
    epochs = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.startswith("Epoch")]
    return wall, cpu, result.returncode, epochs[-1][:90] if epochs else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[m for m in group_options("model")])
    parser.add_argument("--keep", help="keep the runs in this folder (default: a temporary one)")
    args = parser.parse_args()
    models = list(args.models)
    if "ldm" in models and "vae" not in models:
        models.insert(0, "vae")
    if "ldm" in models:  # after its first stage
        models = [m for m in models if m != "ldm"] + ["ldm"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for model in models:
            extra = [f"model.first_stage_ckpt={folder / 'vae' / 'checkpoints' / 'last.ckpt'}"] if model == "ldm" else []
            load = os.getloadavg()[0]
            wall, cpu, code, last = run(model, folder, extra)
            rows.append([f"`gencli train model={model}`" + (" model.first_stage_ckpt=<vae>" if extra else ""),
                         f"{wall:.0f} s", f"{cpu:.0f} s", f"{load:.1f}", code, last])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print()
    print(markdown_table(["command", "wall", "CPU (user+sys)", "load before", "exit", "last progress row"], rows))


if __name__ == "__main__":
    main()
