"""Metrics for editing and for latent spaces: inpainting quality and perceptual path length.

- :class:`InpaintingQuality` (``metric=inpaint``): the first n images of the evaluation split are masked
  (``mask``, :mod:`gencli.masks`), filled by the model (``gencli sample mode=inpaint`` does the same), and
  compared with the originals **inside the filled region**: PSNR and SSIM on pixels in [0, 1] (SSIM's map,
  averaged over the filled pixels), and LPIPS on the whole images when its backbone's weights are present.
  The known pixels are pasted back, so a whole-image score would mostly measure the mask's size.
- :class:`PerceptualPathLength` (``metric=ppl``, Karras et al. 2019): for latent pairs (z0, z1) from the
  prior and t ~ U(0, 1), d = dist(G(slerp(z0, z1, t)), G(slerp(z0, z1, t + eps))) / eps^2, averaged
  after dropping the values below the 1st and above the 99th percentile, as StyleGAN's code does. dist
  is the squared distance of domain features (offline; gencli's own classifier, so the numbers compare
  gencli models with each other, not with papers) or LPIPS when its weights are present. Images are
  compared in float, never rounded to uint8 (a step of eps = 1e-4 is far below one grey level). For
  diffusion, G is the deterministic decoder of x_T (DDIM, eta = 0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

from gencli.errors import ConfigError, GencliError
from gencli.latents import slerp_rows
from gencli.masks import describe as describe_mask
from gencli.masks import make_masks
from gencli.metrics.base import EvalContext, EvalMetric, MetricResult
from gencli.metrics.timing import timed
from gencli.progress import track_batches
from gencli.seeds import PerImageGenerator

LPIPS_CHOICES = ("auto", True, False)


def optional_lpips(setting: Any, net: str, device: torch.device, key: str) -> tuple[Any, dict]:
    """LPIPS if asked for (``true``: fail clearly without its weights) or present (``auto``); else None and why."""
    from gencli.metrics.reconstruction import lpips_metric

    if setting not in LPIPS_CHOICES:
        raise ConfigError(f"{key}={setting!r}: use auto (LPIPS when its backbone's weights are present), true or false.")
    if setting is False:
        return None, {"lpips": "off"}
    try:
        metric, path = lpips_metric(net, device)
    except GencliError as err:  # the weights are missing (a clear paragraph says where to put them)
        if setting is True:
            raise
        return None, {"lpips": f"skipped: {str(err).splitlines()[0][:300]}"}
    return metric, {"lpips": {"net": net, "weights": str(path)}}


def masked_scores(result: Tensor, original: Tensor, mask: Tensor, kernel: int) -> dict[str, Tensor]:
    """Per image, inside the filled region (mask 0): MSE, PSNR (dB) and the mean of SSIM's map, on [0, 1] pixels."""
    a, b = (result.clamp(-1, 1) + 1) / 2, (original.clamp(-1, 1) + 1) / 2
    filled = (1 - mask).expand_as(a)
    count = filled.flatten(1).sum(1).clamp_min(1)
    mse = ((a - b).pow(2) * filled).flatten(1).sum(1) / count
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))  # capped at 100 dB for a perfect fill
    _, ssim_map = structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=kernel, reduction="none",
                                                      return_full_image=True)
    ssim = (ssim_map * filled).flatten(1).sum(1) / count
    return {"mse": mse, "psnr": psnr, "ssim": ssim}


class InpaintingQuality(EvalMetric):
    name = "inpaint"

    def __init__(self, mask: str = "center", method: str = "repaint", jump_length: int = 10, jump_n_sample: int = 10,
                 lpips: Any = "auto", lpips_net: str = "alex", examples: int = 16):
        self.mask, self.lpips, self.lpips_net, self.examples = str(mask), lpips, lpips_net, int(examples)
        self.options = {"method": method, "jump_length": int(jump_length), "jump_n_sample": int(jump_n_sample)}

    @torch.no_grad()
    def __call__(self, ctx: EvalContext) -> MetricResult:
        if ctx.model is None:
            raise ConfigError("metric=inpaint needs ckpt=PATH: it masks real images and asks the model to fill them.")
        model = ctx.model
        options = {k: v for k, v in self.options.items() if k in model.inpaint_options}
        info = model.editing_info("inpaint", **ctx.sample_options, **options)  # bad settings fail before any work
        dataset = ctx.require_data(self.name).split(ctx.split)
        n = min(ctx.n, len(dataset)) if ctx.n > 0 else len(dataset)
        size = tuple(dataset.images.shape[-2:])
        kernel = min(11, min(size) if min(size) % 2 else min(size) - 1)
        lpips, lpips_note = optional_lpips(self.lpips, self.lpips_net, ctx.device, "inpaint.lpips")
        scores: dict[str, list[Tensor]] = {}
        shown: list[Tensor] = []
        start = 0
        for b in track_batches(n, ctx.batch_size, "inpainting"):
            with timed("io"):
                x = torch.stack([dataset[i][0] for i in range(start, start + b)]).to(ctx.device)
            # a conditional model fills each image as its own class
            own = {"labels": dataset.labels[start: start + b].to(ctx.device)} if getattr(model, "conditional", False) \
                else {}
            mask = make_masks(self.mask, b, size, ctx.seed, start).to(ctx.device)
            generator = PerImageGenerator.for_range(ctx.seed, start, b)
            with timed("generation", images=b):
                y = model.inpaint(x, mask, generator, **own, **ctx.sample_options, **options).clamp(-1, 1)
            for key, value in masked_scores(y, x, mask, kernel).items():
                scores.setdefault(key, []).append(value.double().cpu())
            if lpips is not None:
                from gencli.metrics.reconstruction import lpips_input

                with timed("features"):
                    lpips.update(lpips_input(y), lpips_input(x))
            if start < self.examples:
                keep = min(b, self.examples - start)
                shown.append(torch.stack([x[:keep], (1 - 2 * mask[:keep]).expand_as(x[:keep]), y[:keep]], 1).cpu())
            start += b
        per_image = {k: torch.cat(v) for k, v in scores.items()}
        values = {"inpaint_psnr": float(per_image["psnr"].mean()), "inpaint_ssim": float(per_image["ssim"].mean()),
                  "inpaint_mse": float(per_image["mse"].mean())}
        if lpips is not None:
            values["inpaint_lpips"] = float(lpips.compute())
        files = []
        if shown:
            from gencli.io import auto_scale, save_image_grid

            path = save_image_grid(ctx.out_dir / "inpaint_examples.png", torch.cat(shown).flatten(0, 1), nrow=3,
                                   scale=auto_scale(size[-1]))
            files.append(path.name)
        provenance = {
            "split": ctx.split, "n": n, "seed": ctx.seed, **describe_mask(self.mask, size), "model": info,
            "scores": "inside the filled region only, pixels in [0, 1]: PSNR per image then averaged (capped at 100 dB); "
                      f"SSIM (torchmetrics, Gaussian window {kernel}, sigma 1.5) map averaged over the filled pixels",
            "psnr_std": float(per_image["psnr"].std()) if n > 1 else 0.0,
            "measured_on": f"filled region ({self.mask} mask) of {n} {ctx.split} images",
            **lpips_note,
        }
        return MetricResult(values=values, provenance=provenance, files=files)


class PerceptualPathLength(EvalMetric):
    name = "ppl"

    def __init__(self, epsilon: float = 1e-4, sampling: str = "full", distance: str = "domain",
                 lpips_net: str = "vgg", crop: bool = False, percentiles: tuple[float, float] = (1.0, 99.0)):
        if not 0 < float(epsilon) < 0.1:
            raise ConfigError(f"ppl.epsilon={epsilon} must be small and positive (Karras et al. 2019: 1e-4).")
        if sampling not in ("full", "end"):
            raise ConfigError(f"ppl.sampling={sampling!r}: use full (t ~ U(0, 1)) or end (t in {{0, 1}}).")
        if distance not in ("domain", "lpips"):
            raise ConfigError(f"ppl.distance={distance!r}: use domain (offline, gencli's classifier features) or lpips "
                              "(needs the backbone's ImageNet weights).")
        lo, hi = (float(p) for p in percentiles)
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"ppl.percentiles={list(percentiles)} must be two numbers 0 <= low < high <= 100.")
        self.epsilon, self.sampling, self.distance, self.lpips_net = float(epsilon), sampling, distance, lpips_net
        self.crop, self.percentiles = bool(crop), (lo, hi)

    @torch.no_grad()
    def __call__(self, ctx: EvalContext) -> MetricResult:
        model = ctx.model
        if model is None or not getattr(model, "has_latent", False):
            what = type(model).__name__ if model is not None else "no model (samples= files)"
            raise ConfigError(f"metric=ppl needs ckpt=PATH of a family with a latent prior (vae, ae, gan, ddpm, ldm); "
                              f"got {what}.")
        if ctx.n < 2:
            raise ConfigError(f"n={ctx.n}: perceptual path length needs at least 2 latent pairs (e.g. n=1000).")
        decode_info = model.sampling_info(mode="decode", **ctx.sample_options)
        dist = self.distance_fn(ctx)
        values: list[Tensor] = []
        start = 0
        for b in track_batches(ctx.n, ctx.batch_size, "path length"):
            generator = PerImageGenerator.for_range(ctx.seed, start, b)
            # a conditional model holds each pair's class fixed: the path moves the latent only
            held = {"labels": ctx.labels.labels_for(start, b, model.device)} if ctx.labels is not None else {}
            z0, z1 = model.prior(b, generator, **held), model.prior(b, generator, **held)
            g = torch.Generator().manual_seed(ctx.seed * 1_000_003 + start + 1)
            t = torch.rand(b, generator=g, dtype=torch.float64)
            if self.sampling == "end":
                t = (t > 0.5).double()
            t = t * (1 - self.epsilon)  # t + eps stays on the path
            za, zb = slerp_rows(z0, z1, t.to(z0.device)), slerp_rows(z0, z1, (t + self.epsilon).to(z0.device))
            both = {"labels": held["labels"].repeat(2)} if held else {}
            with timed("generation", images=2 * b):
                images = model.decode(torch.cat([za, zb]), **both, **ctx.sample_options).float()
            if self.crop:
                h, w = images.shape[-2:]
                images = images[..., h // 8: h - h // 8, w // 8: w - w // 8]
            with timed("features"):
                values.append((dist(images[:b], images[b:]) / self.epsilon**2).double().cpu())
            start += b
        d = torch.cat(values)
        lo, hi = torch.quantile(d, self.percentiles[0] / 100), torch.quantile(d, self.percentiles[1] / 100)
        kept = d[(d >= lo) & (d <= hi)]
        suffix = "_domain" if self.distance == "domain" else ""
        provenance = {
            "n_pairs": ctx.n, "epsilon": self.epsilon, "space": "the family's prior latent (z; x_T for diffusion), slerp",
            "sampling": self.sampling, "crop": "central 75% (1/8 off each side)" if self.crop else "none",
            "percentiles_kept": list(self.percentiles), "kept": int(len(kept)), "seed": ctx.seed,
            "distance": ("squared L2 of gencli's domain-classifier features (comparable between gencli models on "
                         "the same classifier only, not with LPIPS PPL in papers)" if self.distance == "domain"
                         else f"LPIPS ({self.lpips_net})"),
            "decoder": decode_info,
            "measured_on": f"{ctx.n} latent pairs, eps {self.epsilon:g}, "
                           + ("domain features" if self.distance == "domain" else f"LPIPS {self.lpips_net}"),
            **({"features": ctx.features.describe()} if self.distance == "domain" else {}),
        }
        return MetricResult(values={f"ppl{suffix}": float(kept.mean()),
                                    f"ppl{suffix}_median": float(d.median())}, provenance=provenance)

    def distance_fn(self, ctx: EvalContext):
        if self.distance == "lpips":
            from gencli.metrics.reconstruction import lpips_input, lpips_metric

            metric, _ = lpips_metric(self.lpips_net, ctx.device)
            net = metric.net

            def lpips_distance(a: Tensor, b: Tensor) -> Tensor:
                return net(lpips_input(a), lpips_input(b)).flatten()

            return lpips_distance
        if self.crop:
            raise ConfigError("ppl.crop=true cuts the images below the size the domain classifier reads; crop with "
                              "ppl.distance=lpips only (Karras et al. crop faces for LPIPS), or leave ppl.crop=false.")
        if ctx.features is None:
            raise ConfigError("metric=ppl with ppl.distance=domain needs features=domain.")
        extractor = ctx.features
        with timed("setup"):
            extractor.prepare(ctx.require_data(self.name), ctx.device)

        def domain_distance(a: Tensor, b: Tensor) -> Tensor:
            fa, _ = extractor.extract(a)
            fb, _ = extractor.extract(b)
            return (fa.double() - fb.double()).pow(2).sum(1)

        return domain_distance
