"""Sampling memory benchmark: peak RSS and wall time of `gencli sample` as n grows.

    .venv/bin/python scripts/bench_sample_memory.py [--ckpt PATH] [--n 1000 50000] [--formats npz]
        [--batch-size 64] [--src DIR]

Without --ckpt it first trains the default VAE (`gencli train trainer.max_epochs=1`, ~20 s; the weights do
not matter for memory). Each `gencli sample` runs in a fresh subprocess; its peak resident set size is the
``ru_maxrss`` that ``os.wait4`` reports for that child alone, and its wall time covers the whole process
(Python start-up and model loading included, about 5 s here). Every run's samples.npz is checked to hold n
images. With --src DIR the runs use the gencli source tree in DIR instead (PYTHONPATH=DIR), e.g. a copy of
an older commit made with `git archive <commit> src | tar -x -C /tmp/old`, for a before/after table.

Prints a Markdown table; paste it into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import markdown_table  # noqa: E402


def gencli(args: list[str], cwd: Path, src: Path | None = None) -> tuple[int, float, int, str]:
    """Run ``python -m gencli.cli ARGS``; return (exit code, wall seconds, peak RSS in bytes, log tail)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if src is not None:
        env["PYTHONPATH"] = str(src)
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "gencli.cli", *args], cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not every child's so far
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-3000:]
    return proc.returncode, wall, usage.ru_maxrss * 1024, tail  # Linux reports ru_maxrss in KiB


def npz_images(path: Path) -> int:
    """How many images samples.npz holds, read from its .npy header (without loading the pixels)."""
    import numpy as np

    with zipfile.ZipFile(path) as archive, archive.open("images.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(f)
    return shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="a gencli checkpoint (default: train the default VAE for one epoch)")
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 50000])
    parser.add_argument("--formats", nargs="+", default=["npz"], help="format= values to run (npz, png, both)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--src", type=Path, help="run another gencli source tree (PYTHONPATH=SRC)")
    parser.add_argument("--label", default=None, help="what to call this tree in the table (default: this checkout)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs per setting: the table shows the fastest wall time and the largest peak RSS "
                             "(on a shared host wall times vary by 2x or more; peak RSS barely moves)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = args.ckpt
        if ckpt is None:
            code, wall, _, tail = gencli(["train", "trainer.max_epochs=1", "callbacks=minimal",
                                          f"hydra.run.dir={tmp / 'train'}"], cwd=tmp)
            if code != 0:
                raise SystemExit(f"training failed:\n{tail}")
            ckpt = tmp / "train" / "checkpoints" / "last.ckpt"
            print(f"trained the default VAE (1 epoch) in {wall:.1f} s: {ckpt}", flush=True)
        label = args.label or (str(args.src) if args.src else "this checkout")
        rows = []
        for fmt in args.formats:
            for n in args.n:
                walls, rsss = [], []
                for attempt in range(args.repeat):
                    out = tmp / f"sample_{fmt}_{n}_{attempt}"
                    extra = [] if args.src else [f"format={fmt}"]  # an older tree may not know format=
                    code, wall, rss, tail = gencli(["sample", f"ckpt={ckpt}", f"n={n}", f"batch_size={args.batch_size}",
                                                    *extra, f"hydra.run.dir={out}"], cwd=tmp, src=args.src)
                    if code != 0:
                        raise SystemExit(f"gencli sample n={n} failed:\n{tail}")
                    npz = out / "samples.npz"
                    if npz.exists() and npz_images(npz) != n:
                        raise SystemExit(f"{npz} does not hold {n} images")
                    size = sum(p.stat().st_size for p in out.rglob("*")
                               if p.is_file() and p.name.startswith(("samples", "0")))
                    walls.append(wall)
                    rsss.append(rss)
                    print(f"n={n} format={fmt}: peak RSS {rss / 2**20:.0f} MiB, {wall:.1f} s", flush=True)
                    shutil.rmtree(out)  # free the disk before the next run
                rows.append([label, fmt if not args.src else "npz", f"{n:,}", args.batch_size,
                             f"{max(rsss) / 2**20:,.0f}", f"{min(walls):.1f}", f"{size / 2**20:.1f}"])
    print()
    print(markdown_table(["code", "format", "n", "batch_size", "peak RSS (MiB)", f"wall (s, best of {args.repeat})",
                          "output (MiB)"], rows))


if __name__ == "__main__":
    main()
