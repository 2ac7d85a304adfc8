"""Benchmark ``gencli eval`` with the domain extractor on MNIST-sized images; print a table.

Everything runs through the real CLI (subprocesses), in a fresh cache folder, on gencli's split of the
real MNIST files (``data.source_split=test`` by default: 9,000 train / 1,000 val):

1. the domain classifier: training time on first use (cache miss) and its held-out accuracy;
2. the reference statistics: miss vs hit time (the hit reads no data);
3. eval throughput in images/s (sampling or reading + features + FID/KID updates; from the run's
   provenance, so start-up is excluded) from a checkpoint and from samples.npz;
4. peak resident memory (``wait4``'s ru_maxrss) of whole ``gencli eval`` processes at n = 5,000 and
   n = 50,000 (bounded memory: only the n x 128 features grow, not the images);
5. domain FID/KID of each checkpoint given with ``--ckpt NAME=PATH`` (one row per family, ``--n-family``
   generated images each, with the checkpoint's own sampler settings).

    PYTHONPATH=src python scripts/bench_eval.py --ckpt vae=outputs/.../last.ckpt --ckpt gan=...

Without ``--ckpt`` the throughput rows use an untrained VAE made by a 1-batch ``gencli train`` run
(sampling cost does not depend on training).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MNIST = ROOT.parent / "shared" / "data" / "mnist"


def gencli(args: list[str], env: dict, cwd: Path) -> tuple[float, int, subprocess.CompletedProcess | None]:
    """Run ``gencli`` and return (wall seconds, peak RSS in MiB, result)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gencli.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"gencli {' '.join(args)} failed ({proc.returncode}):\n{out[-3000:]}")
    return seconds, usage.ru_maxrss // 1024, out


def evaluate(name: str, args: list[str], env: dict, work: Path) -> tuple[dict, float, int]:
    out = work / name
    seconds, rss, _ = gencli(["eval", *args, f"hydra.run.dir={out}"], env, work)
    return json.loads((out / "metrics.json").read_text()), seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", default=str(DEFAULT_MNIST), help="folder with the MNIST IDX files")
    parser.add_argument("--source-split", default="test")
    parser.add_argument("--ckpt", action="append", default=[], help="NAME=PATH of a checkpoint trained on MNIST")
    parser.add_argument("--n", type=int, default=5000, help="images for the throughput and small-memory rows")
    parser.add_argument("--n-family", type=int, default=1000,
                        help="generated images per family row (diffusion samples slowly on a CPU)")
    parser.add_argument("--n-big", type=int, default=50000, help="images for the peak-memory run")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_eval_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GENCLI_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT / "src")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    data = ["data=mnist", f"data.root={args.mnist}", f"data.source_split={args.source_split}"]
    ckpts = dict(item.split("=", 1) for item in args.ckpt)
    if not ckpts:
        train_dir = work / "untrained_vae"
        gencli(["train", "model=vae", *data, "trainer.max_steps=1", "callbacks=minimal", "logger=none",
                f"hydra.run.dir={train_dir}"], env, work)
        ckpts = {"vae (untrained)": str(train_dir / "checkpoints" / "last.ckpt")}
    first_name, first_ckpt = next(iter(ckpts.items()))
    common = ["metric=[fid,kid]", f"batch_size={args.batch_size}"]
    rows: list[tuple[str, str]] = []

    # 1-2: a fresh cache: the classifier trains, the reference is computed; then both hit
    miss, miss_s, _ = evaluate("miss", [f"ckpt={first_ckpt}", *common, "n=1000", "save_samples=true"], env, work)
    hit, hit_s, _ = evaluate("hit", [f"ckpt={first_ckpt}", *common, "n=1000"], env, work)
    features = miss["provenance"]["fid"]["features"]
    manifest = json.loads((Path(features["cache_entry"]) / "manifest.json").read_text())
    rows += [
        ("domain classifier", f"{features['arch']}, {manifest['n_train']} train images, {args.source_split} files"),
        ("  held-out accuracy", f"{features['held_out_accuracy']:.4f} on {manifest['n_held_out']} val images"),
        ("  training on first use", f"{manifest['train_seconds']:.1f} s"),
        ("reference statistics, miss", f"{miss['provenance']['fid']['reference']['seconds']:.2f} s "
                                       f"({miss['provenance']['fid']['reference']['n_real']} val images read + features)"),
        ("reference statistics, hit", f"{hit['provenance']['fid']['reference']['seconds']:.3f} s (no data read)"),
        ("whole eval n=1000, miss / hit", f"{miss_s:.1f} s / {hit_s:.1f} s (process wall time, incl. start-up)"),
    ]
    assert hit["metrics"] == miss["metrics"], "a cache hit must give the same numbers"

    # 3: throughput from a checkpoint and from samples
    ck, _, _ = evaluate("throughput_ckpt", [f"ckpt={first_ckpt}", *common, f"n={args.n}", "save_samples=true"], env, work)
    samples = work / "throughput_ckpt" / "samples.npz"
    fs, _, _ = evaluate("throughput_samples", [f"samples={samples}", *data, *common, "n=0"], env, work)
    rows += [
        (f"throughput from ckpt ({first_name})", f"{ck['provenance']['fid']['timing']['images_per_second']:.0f} images/s "
                                                 f"(n={args.n}, sampling + features + FID/KID updates)"),
        ("throughput from samples.npz", f"{fs['provenance']['fid']['timing']['images_per_second']:.0f} images/s "
                                        f"(n={args.n}, reading + features + FID/KID updates)"),
    ]

    # 4: peak memory, small and big n
    _, _, rss_small = evaluate("rss_small", [f"ckpt={first_ckpt}", *common, f"n={args.n}"], env, work)
    big, big_s, rss_big = evaluate("rss_big", [f"ckpt={first_ckpt}", *common, f"n={args.n_big}"], env, work)
    rows += [
        (f"peak RSS, eval n={args.n}", f"{rss_small} MiB"),
        (f"peak RSS, eval n={args.n_big}", f"{rss_big} MiB ({big_s:.0f} s, "
                                           f"{big['provenance']['fid']['timing']['images_per_second']:.0f} images/s)"),
    ]

    # 5: one row per family
    for name, path in ckpts.items():
        report, seconds, _ = evaluate(f"family_{name.split()[0]}", [f"ckpt={path}", *common, f"n={args.n_family}"],
                                      env, work)
        m, prov = report["metrics"], report["provenance"]["fid"]
        rows.append((f"{name}: fid_domain / kid_domain", f"{m['fid_domain']:.2f} / {m['kid_domain']:.2f} "
                                                         f"(+- {m['kid_domain_std']:.2f}), {args.n_family} generated vs "
                                                         f"{prov['reference']['n_real']} real val, "
                                                         f"{prov['timing']['images_per_second']:.1f} images/s"))

    load = os.getloadavg()
    print(f"\ngencli eval benchmark (domain features, MNIST {args.source_split} files); threads="
          f"{env.get('OMP_NUM_THREADS', 'torch default')}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    width = max(len(k) for k, _ in rows)
    print(f"| {'what':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for key, value in rows:
        print(f"| {key:<{width}} | {value} |")
    print(f"\nwork folder: {work}")


if __name__ == "__main__":
    main()
