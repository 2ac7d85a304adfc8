"""data=folder on a large folder: start-up time, memory and images/s, eager against lazy (and lazy with a cache).

    .venv/bin/python scripts/bench_folder_loading.py [--root /tmp/bench_folder50k] [--repeats 5] [--workers 2]

Builds ``--root`` when it is absent: ``--repeats`` copies, as symlinks, of the CIFAR-10 test JPEGs in
``../shared/data/cifar10-test-jpg`` (10 class folders, 10k images), i.e. 50k images by default. Then each
mode runs in its own fresh Python process, so that its memory numbers are its own:

* set-up: constructing ``FolderDataModule`` and ``setup("fit")``;
* RSS: the process's resident memory after importing torch and gencli, and its peak (VmHWM) after set-up;
* the training loader: time to the first batch (starting the workers), then images/s over the rest of one
  epoch with ``--workers`` loader processes, and the workers' memory at the end (PSS: shared pages split
  between the processes that map them, so the sum is honest);
* modes: ``eager`` (lazy=false, the old loader), ``lazy``, ``lazy+cache cold`` (an empty cache_dir, filled
  during the epoch) and ``lazy+cache warm`` (the same cache_dir again).

Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def make_folder(root: Path, repeats: int) -> int:
    source = SHARED / "cifar10-test-jpg"
    if not source.is_dir():
        raise SystemExit(f"{source} is not present: give --root a folder of images")
    count = 0
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        (root / class_dir.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(class_dir.iterdir()):
            for k in range(repeats):
                link = root / class_dir.name / f"r{k}_{image.name}"
                if not link.exists():
                    link.symlink_to(image.resolve())
                count += 1
    return count


def proc_status(pid: int | str, key: str) -> float:
    """A /proc/<pid>/status (or smaps_rollup, for Pss) value in MiB."""
    name = "smaps_rollup" if key == "Pss" else "status"
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> None:
    """One mode, in this fresh process: print one JSON line of measurements."""
    import torch

    from gencli.data import FolderDataModule

    torch.set_num_threads(1)
    rss_imports = proc_status("self", "VmRSS")
    start = time.perf_counter()
    dm = FolderDataModule(root=args.root, image_size=args.image_size, batch_size=args.batch_size,
                          num_workers=args.workers, lazy=args.mode != "eager", cache_dir=args.cache_dir or None, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup("fit")
    setup_s = time.perf_counter() - start
    peak_after_setup = proc_status("self", "VmHWM")
    loader = dm.train_dataloader()
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first_batch_s = time.perf_counter() - start
    start, images = time.perf_counter(), 0
    for x, _ in batches:
        images += len(x)
    seconds = time.perf_counter() - start
    workers = getattr(batches, "_workers", [])
    print(json.dumps({
        "images": len(dm.train_set) + len(dm.val_set), "setup_s": setup_s, "rss_imports": rss_imports,
        "peak_after_setup": peak_after_setup, "first_batch_s": first_batch_s, "images_per_s": images / seconds,
        "epoch_images": images, "peak_end": proc_status("self", "VmHWM"),
        "workers_pss": sum(proc_status(w.pid, "Pss") for w in workers),
    }))


def run_mode(args, mode: str, cache_dir: str | None) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--root", args.root, "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--cache-dir", cache_dir or ""]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/bench_folder50k")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default="eager,lazy,cache-cold,cache-warm")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        return child(args)

    root = Path(args.root)
    if not root.is_dir():
        print(f"making {root}: {make_folder(root, args.repeats)} symlinks", file=sys.stderr)
    import lightning
    import numpy as np
    import PIL
    import torch

    from benchlib import markdown_table

    modes = args.modes.split(",")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_folder_cache_") as cache_dir:
        for mode in modes:
            print(f"running {mode} ...", file=sys.stderr)
            results[mode] = run_mode(args, "eager" if mode == "eager" else "lazy",
                                     cache_dir if mode.startswith("cache") else None)
        cache_mib = sum(f.stat().st_blocks * 512 for f in Path(cache_dir).rglob("*") if f.is_file()) / 2**20
    names = {"eager": "eager (lazy=false)", "lazy": "lazy", "cache-cold": "lazy + cache_dir, first epoch",
             "cache-warm": "lazy + cache_dir, warm"}
    rows = [[names.get(mode, mode), r["images"], f"{r['setup_s']:.2f}", f"{r['rss_imports']:.0f}",
             f"{r['peak_after_setup']:.0f}", f"{r['peak_after_setup'] - r['rss_imports']:+.0f}",
             f"{r['first_batch_s']:.2f}", f"{r['images_per_s']:.0f}", f"{r['workers_pss']:.0f}"]
            for mode, r in results.items()]
    print(f"data=folder on {args.root} ({rows[0][1]} images), image_size={args.image_size}, batch_size="
          f"{args.batch_size}, {args.workers} loader workers; {os.cpu_count()} CPUs; python {platform.python_version()}, "
          f"torch {torch.__version__}, lightning {lightning.__version__}, numpy {np.__version__}, Pillow "
          f"{PIL.__version__}; decoded cache on disk: {cache_mib:.0f} MiB")
    print(markdown_table(["mode", "images", "set-up s", "RSS after imports MiB", "peak RSS after set-up MiB",
                          "set-up adds MiB", "first batch s", "images/s (rest of epoch)", "workers PSS MiB"], rows))


if __name__ == "__main__":
    main()
