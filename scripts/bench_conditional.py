"""Class-conditional recipes on the real MNIST: class accuracy, domain FID and intra-FID; a guidance sweep.

Everything goes through the real CLI (subprocesses). For every ``--ckpt NAME=PATH`` (a conditional checkpoint,
e.g. from ``gencli train experiment=cddpm_mnist_cpu data.root=../shared/data/mnist data.source_split=test``):

1. ``gencli eval ckpt=PATH metric=fid n=N`` (which adds class accuracy and intra-FID for a conditional model),
   class-balanced labels, the checkpoint's own sampler and guidance;
2. for diffusion checkpoints, the same at every ``--guidance`` weight (w = 0 unconditional, 1 plain conditional);
3. ``gencli sample ckpt=PATH labels=all`` grids (one row per class) under ``--out``, to look at.

Prints one markdown table: checkpoint, guidance, NFE, class accuracy, FID, intra-FID, seconds per image.

    PYTHONPATH=src python scripts/bench_conditional.py --ckpt cddpm=outputs/.../last.ckpt --ckpt cgan=...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import markdown_table  # noqa: E402


def gencli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "gencli.cli", *args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if result.returncode != 0:
        raise SystemExit(f"gencli {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", action="append", required=True, help="NAME=PATH of a conditional checkpoint")
    parser.add_argument("--n", type=int, default=1000, help="generated images per eval (class-balanced)")
    parser.add_argument("--guidance", default="0,1,2,4", help="guidance weights for diffusion checkpoints")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_conditional")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in args.ckpt:
        name, _, path = item.partition("=")
        path = str(Path(path).resolve())
        import torch

        family = torch.load(path, weights_only=True, map_location="cpu")["gencli"]["family"]
        # diffusion: the sweep (the checkpoint's default guidance is one of its rows); other families: their default
        weights = [float(w) for w in args.guidance.split(",")] if "Diffusion" in family else [None]
        gencli("sample", f"ckpt={path}", "labels=all", "nrow=10", f"hydra.run.dir={args.out / name / 'grid'}",
               cwd=args.out)
        for w in weights:
            tag = "default" if w is None else f"w{w:g}"
            out = args.out / name / f"eval_{tag}"
            gencli("eval", f"ckpt={path}", "metric=fid", f"n={args.n}", *([f"guidance={w}"] if w is not None else []),
                   f"hydra.run.dir={out}", cwd=args.out)
            if w is not None:
                gencli("sample", f"ckpt={path}", "labels=all", "nrow=10", f"guidance={w}",
                       f"hydra.run.dir={args.out / name / f'grid_{tag}'}", cwd=args.out)
            report = json.loads((out / "metrics.json").read_text())
            m, sampling = report["metrics"], report["provenance"]["run"]["sampling"] or {}
            cost = report.get("sampling_cost") or {}
            rows.append([name, family, sampling.get("guidance", "-"), sampling.get("nfe", "-"),
                         f"{m['class_accuracy_domain']:.3f}", f"{m['fid_domain']:.2f}", f"{m['intra_fid_domain']:.2f}",
                         f"{cost.get('seconds_per_image', float('nan')):.4f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    print()
    print(markdown_table(["checkpoint", "family", "guidance w", "NFE", "class accuracy", "FID (domain)",
                          "intra-FID (domain)", "s / image"], rows))
    print(f"\nn = {args.n} class-balanced images per row; grids (labels=all) under {args.out}")


if __name__ == "__main__":
    main()
