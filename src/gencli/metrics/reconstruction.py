"""Reconstruction metrics for families with an encoder, and per-sample anomaly scores.

Over the evaluation split, on pixels in [0, 1]: MSE, PSNR and SSIM (torchmetrics), and optionally
LPIPS (torchmetrics, ``recon.lpips=true``; needs the ImageNet weights of its backbone in the torch hub
cache, and says so clearly, offline, when they are missing), plus whatever per-sample terms the
family reports from ``score_batch`` (the VAE's ELBO and bits/dim). Each image's scores go to
``anomaly_scores.csv``: reconstruction error (or -ELBO) is the classic anomaly score of an
autoencoder trained on normal data.

With ``optional: true`` (``metric=all``) a model without an encoder (GAN, diffusion) or a
``samples=`` run is skipped, with the reason in the provenance, instead of failing.
"""

from __future__ import annotations

import csv

import torch
import torch.nn.functional as F
from torchmetrics import MeanSquaredError
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from gencli.errors import ConfigError
from gencli.io import atomic_write
from gencli.metrics.base import EvalContext, EvalMetric, MetricResult
from gencli.metrics.timing import timed
from gencli.progress import track_batches

#: LPIPS backbones (torchmetrics net_type) and the torchvision weights they load from the torch hub cache.
LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}
LPIPS_MIN_SIZE = 64


def lpips_metric(net: str, device: torch.device):
    """torchmetrics' LPIPS, after checking (offline-safe) that its backbone's weights are present."""
    import torchvision.models
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    from gencli.metrics.features import locate_weights

    if net not in LPIPS_BACKBONES:
        raise ConfigError(f"recon.lpips_net={net!r} is not an LPIPS backbone; use one of {', '.join(LPIPS_BACKBONES)}.")
    url = getattr(torchvision.models, LPIPS_BACKBONES[net]).DEFAULT.url
    filename = url.rsplit("/", 1)[-1]
    path = locate_weights(f"LPIPS (recon.lpips_net={net}, the ImageNet {net} backbone)", filename, url, None,
                          "TORCH_HOME (a folder whose hub/checkpoints holds the file)")
    return LearnedPerceptualImagePatchSimilarity(net_type=net, sync_on_compute=False).to(device), path


class ReconstructionMetrics(EvalMetric):
    name = "recon"

    def __init__(self, anomaly_csv: bool = True, lpips: bool = False, lpips_net: str = "alex", optional: bool = False):
        self.anomaly_csv = anomaly_csv
        self.lpips = bool(lpips)
        self.lpips_net = lpips_net
        self.optional = bool(optional)

    @torch.no_grad()
    def __call__(self, ctx: EvalContext) -> MetricResult:
        if self.optional and (ctx.samples or not ctx.has_encoder()):
            why = ("samples= gives images without their inputs" if ctx.samples else
                   f"{type(ctx.model).__name__ if ctx.model is not None else 'no model'} has no encoder")
            return MetricResult(values={}, provenance={"skipped": f"reconstruction metrics skipped: {why}"})
        model = ctx.require_encoder(self.name)
        lpips, lpips_path = lpips_metric(self.lpips_net, ctx.device) if self.lpips else (None, None)
        dataset = ctx.require_data(self.name).split(ctx.split)
        n = min(ctx.n, len(dataset)) if ctx.n > 0 else len(dataset)
        torch.manual_seed(ctx.seed)  # the VAE's ELBO uses one posterior sample per image
        psnr = PeakSignalNoiseRatio(data_range=1.0, sync_on_compute=False).to(ctx.device)
        mse = MeanSquaredError(sync_on_compute=False).to(ctx.device)
        size = min(dataset.images.shape[-2:])
        kernel = min(11, size if size % 2 else size - 1)  # SSIM's Gaussian window must fit in the image
        ssim = StructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=kernel, sync_on_compute=False).to(ctx.device)
        scores: dict[str, list[torch.Tensor]] = {}
        labels = []
        start = 0
        for b in track_batches(n, ctx.batch_size, "reconstruction"):
            with timed("io"):
                x, y = zip(*(dataset[i] for i in range(start, start + b)))
                x = torch.stack(x).to(ctx.device)
            start += b
            # a conditional model encodes and decodes each real image with its own class
            own = {"labels": torch.as_tensor(y).to(ctx.device)} if getattr(model, "conditional", False) else {}
            for key, value in model.score_batch(x, **own).items():
                scores.setdefault(key, []).append(value.double().cpu())
            with timed("generation", images=b):
                x_hat = model.reconstruct(x, **own).clamp(-1, 1)
            psnr.update((x_hat + 1) / 2, (x + 1) / 2)
            mse.update((x_hat + 1) / 2, (x + 1) / 2)
            ssim.update((x_hat + 1) / 2, (x + 1) / 2)
            if lpips is not None:
                with timed("features"):
                    lpips.update(*(lpips_input(t) for t in (x_hat, x)))
            labels.append(torch.as_tensor(y))
        per_sample = {k: torch.cat(v) for k, v in scores.items()}
        values = {k: float(v.mean()) for k, v in per_sample.items()}
        values["recon_mse"] = float(mse.compute())
        values["psnr"] = float(psnr.compute())
        values["ssim"] = float(ssim.compute())
        if lpips is not None:
            values["lpips"] = float(lpips.compute())
        files = []
        if self.anomaly_csv:
            path = ctx.out_dir / "anomaly_scores.csv"
            self.write_csv(path, per_sample, torch.cat(labels))
            files.append(path.name)
        provenance = {"split": ctx.split, "n": n, "scale": "pixels in [0, 1], reconstructions clamped to it",
                      "implementation": "torchmetrics MeanSquaredError, PeakSignalNoiseRatio, "
                                        f"StructuralSimilarityIndexMeasure (Gaussian window {kernel}, sigma 1.5)",
                      "anomaly_score": "-elbo" if "elbo" in per_sample else "recon_mse"}
        if lpips is not None:
            provenance["lpips"] = {"net": self.lpips_net, "weights": str(lpips_path),
                                   "input": f"[-1, 1], grayscale replicated to RGB, upsampled (bilinear) to at least "
                                            f"{LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE}"}
        notes = model.score_notes()  # e.g. which kind of bits/dim these are
        if notes:
            provenance["notes"] = notes
        return MetricResult(values=values, provenance=provenance, files=files, notes=notes,
                            rows=dict.fromkeys(values, f"reconstructions of {n} real {ctx.split} images"))

    @staticmethod
    def write_csv(path, per_sample: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        keys = sorted(per_sample)
        anomaly = -per_sample["elbo"] if "elbo" in per_sample else per_sample["recon_mse"]
        with atomic_write(path, "w") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "label", "anomaly_score", *keys])
            for i in range(len(anomaly)):
                writer.writerow([i, int(labels[i]), f"{anomaly[i]:.6g}", *(f"{per_sample[k][i]:.6g}" for k in keys)])


def lpips_input(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images as LPIPS's backbones need them: 3 channels, at least 64x64."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if min(x.shape[-2:]) < LPIPS_MIN_SIZE:
        scale = LPIPS_MIN_SIZE / min(x.shape[-2:])
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    return x
