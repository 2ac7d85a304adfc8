"""Foundation benchmark: data-module set-up times and the default run's wall time and ELBO.

    .venv/bin/python scripts/bench_foundation.py [--skip-train] [--mnist-minutes 5]

Prints a table; paste the numbers into docs/benchmarks.md. Real data is read from ../shared/data
when present (rows for absent data are skipped). With --mnist-minutes M it also runs
`gencli train model=vae data=mnist` on the real MNIST test split for M minutes and reports what it
reaches.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def time_setup(factory) -> tuple[float, int]:
    start = time.perf_counter()
    dm = factory()
    dm.setup()
    return time.perf_counter() - start, len(dm.train_set) + len(dm.val_set)


def run_train(args: list[str]) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "gencli.cli", "train", *args, f"hydra.run.dir={tmp}/run",
                                 "callbacks.progress_bar=null"], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(result.stderr[-3000:])
        return wall, json.loads(Path(tmp, "run", "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--mnist-minutes", type=float, default=0)
    args = parser.parse_args()

    from gencli.data import DigitsDataModule, FolderDataModule, MNISTDataModule

    table = Table(title="gencli foundation benchmark (CPU)")
    for col in ("what", "images", "seconds", "result"):
        table.add_column(col)
    seconds, n = time_setup(DigitsDataModule)
    table.add_row("setup data=digits (16x16)", str(n), f"{seconds:.2f}", "")
    if (SHARED / "mnist").is_dir():
        seconds, n = time_setup(lambda: MNISTDataModule(root=str(SHARED / "mnist"), source_split="test"))
        table.add_row("setup data=mnist test split (IDX .gz -> 32x32)", str(n), f"{seconds:.2f}", "")
    if (SHARED / "cifar10-test-jpg").is_dir():
        seconds, n = time_setup(lambda: FolderDataModule(root=str(SHARED / "cifar10-test-jpg"), image_size=32))
        table.add_row("setup data=folder cifar10-test-jpg (10k JPEGs)", str(n), f"{seconds:.2f}", "")
    if not args.skip_train:
        wall, report = run_train([])
        m = report["metrics"]
        table.add_row("gencli train (default: VAE on digits, 40 epochs)", "1617 train", f"{wall:.1f}",
                      f"val/elbo {m['val/elbo']:.2f} nats, val/bpd {m['val/bpd']:.3f}, val/recon_mse {m['val/recon_mse']:.4f}")
    if args.mnist_minutes > 0 and (SHARED / "mnist").is_dir():
        limit = f"00:00:{int(args.mnist_minutes):02d}:{int(args.mnist_minutes % 1 * 60):02d}"
        wall, report = run_train(["model=vae", "data=mnist", f"data.root={SHARED / 'mnist'}", "data.source_split=test",
                                  "trainer.max_epochs=-1", f"trainer.max_time={limit}"])
        m = report["metrics"]
        table.add_row(f"gencli train model=vae data=mnist ({args.mnist_minutes:g} min, test split 9k/1k)",
                      f"{report['epochs']} epochs", f"{wall:.1f}",
                      f"val/elbo {m['val/elbo']:.2f} nats, val/bpd {m['val/bpd']:.3f}, val/recon_mse {m['val/recon_mse']:.4f}")
    Console().print(table)


if __name__ == "__main__":
    main()
