"""Reconstruction metrics for families with an encoder, and per-sample anomaly scores.

Over the evaluation split: mean per-pixel MSE on the [0, 1] scale and PSNR (torchmetrics), plus
whatever per-sample terms the family reports from ``score_batch`` (the VAE's ELBO and bits/dim).
Each image's scores go to ``anomaly_scores.csv``: reconstruction error (or -ELBO) is the classic
anomaly score of an autoencoder trained on normal data.
"""

from __future__ import annotations

import csv

import torch
from torchmetrics.image import PeakSignalNoiseRatio

from gencli.io import atomic_write
from gencli.metrics.base import EvalContext, EvalMetric, MetricResult
from gencli.progress import track_batches


class ReconstructionMetrics(EvalMetric):
    name = "recon"

    def __init__(self, anomaly_csv: bool = True):
        self.anomaly_csv = anomaly_csv

    @torch.no_grad()
    def __call__(self, ctx: EvalContext) -> MetricResult:
        model = ctx.require_encoder(self.name)
        dataset = ctx.require_data(self.name).split(ctx.split)
        n = min(ctx.n, len(dataset)) if ctx.n > 0 else len(dataset)
        torch.manual_seed(ctx.seed)  # the VAE's ELBO uses one posterior sample per image
        psnr = PeakSignalNoiseRatio(data_range=1.0).to(ctx.device)
        scores: dict[str, list[torch.Tensor]] = {}
        labels = []
        start = 0
        for b in track_batches(n, ctx.batch_size, "reconstruction"):
            x, y = zip(*(dataset[i] for i in range(start, start + b)))
            x = torch.stack(x).to(ctx.device)
            start += b
            for key, value in model.score_batch(x).items():
                scores.setdefault(key, []).append(value.double().cpu())
            psnr.update((model.reconstruct(x) + 1) / 2, (x + 1) / 2)
            labels.append(torch.as_tensor(y))
        per_sample = {k: torch.cat(v) for k, v in scores.items()}
        values = {k: float(v.mean()) for k, v in per_sample.items()}
        values["psnr"] = float(psnr.compute())
        files = []
        if self.anomaly_csv:
            path = ctx.out_dir / "anomaly_scores.csv"
            self.write_csv(path, per_sample, torch.cat(labels))
            files.append(path.name)
        provenance = {"split": ctx.split, "n": n, "scale": "pixels in [0, 1]",
                      "anomaly_score": "-elbo" if "elbo" in per_sample else "recon_mse"}
        return MetricResult(values=values, provenance=provenance, files=files)

    @staticmethod
    def write_csv(path, per_sample: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        keys = sorted(per_sample)
        anomaly = -per_sample["elbo"] if "elbo" in per_sample else per_sample["recon_mse"]
        with atomic_write(path, "w") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "label", "anomaly_score", *keys])
            for i in range(len(anomaly)):
                writer.writerow([i, int(labels[i]), f"{anomaly[i]:.6g}", *(f"{per_sample[k][i]:.6g}" for k in keys)])
