"""``gencli sample ckpt=PATH``: images from a checkpoint, with nothing but the checkpoint.

Modes: ``grid`` (n samples -> PNG grid + uint8 npz), ``interpolate`` (slerp between prior draws,
one strip per row), ``reconstruct`` (validation inputs beside their reconstructions).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gencli.config import CONF_DIR
from gencli.errors import ConfigError
from gencli.io import auto_scale, restore_model, save_image_grid, save_npz, to_uint8, write_json
from gencli.jobs.common import datamodule_for, generator_for, pick_device, run_job, sample_options
from gencli.progress import track_batches
from gencli.provenance import environment

log = logging.getLogger(__name__)
MODES = ("grid", "interpolate", "reconstruct")


def sample(cfg: DictConfig) -> Path:
    if not cfg.get("ckpt"):
        raise ConfigError("gencli sample needs ckpt=PATH, the .ckpt file a 'gencli train' run wrote.")
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode} is not a sampling mode; use one of {', '.join(MODES)}.")
    if cfg.n < 1 or cfg.batch_size < 1:
        raise ConfigError(f"n={cfg.n} and batch_size={cfg.batch_size} must be positive integers.")
    model, checkpoint = restore_model(cfg.ckpt)
    model = model.to(pick_device(cfg.device))
    options = sample_options(cfg, model)
    out = Path(cfg.paths.output_dir)
    scale = auto_scale(model.image_shape[-1])
    generator = generator_for(cfg.seed)

    if cfg.mode == "grid":
        images = torch.cat([model.sample(b, generator=generator, **options).cpu()
                            for b in track_batches(cfg.n, cfg.batch_size, "sampling")])
        save_npz(out / "samples.npz", to_uint8(images))
        written = save_image_grid(out / "samples.png", images, nrow=cfg.nrow, scale=scale)
    elif cfg.mode == "interpolate":
        written = save_image_grid(out / "interpolation.png", interpolate(model, cfg, generator, options),
                                  nrow=cfg.interpolation_steps, scale=scale)
    else:
        written = save_image_grid(out / "reconstructions.png", reconstruct(model, cfg, checkpoint), nrow=16, scale=scale)

    write_json(out / "sample.json", {
        "ckpt": str(cfg.ckpt), "mode": cfg.mode, "n": cfg.n, "seed": cfg.seed,
        "sampling": model.sampling_info(mode="decode" if cfg.mode == "interpolate" else "sample", **options),
        "files": sorted(p.name for p in out.iterdir() if p.is_file()),
        **environment(),
    })
    log.info("wrote %s", written)
    return written


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between flattened latents (what Gaussian latents want, White 2016)."""
    af, bf = a.flatten(1), b.flatten(1)
    cos = (af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1)).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))[:, None]
    so = torch.sin(omega)
    t = t[None, :, None]
    linear = (1 - t) * af[:, None] + t * bf[:, None]
    spherical = (torch.sin((1 - t) * omega[:, None]) * af[:, None] + torch.sin(t * omega[:, None]) * bf[:, None]) / so[:, None].clamp_min(1e-12)
    out = torch.where((so.abs() < 1e-6)[:, None], linear, spherical)
    return out.reshape(len(a), len(t[0]), *a.shape[1:])


@torch.no_grad()
def interpolate(model, cfg: DictConfig, generator: torch.Generator, options: dict) -> torch.Tensor:
    if not model.has_latent:
        raise ConfigError(f"mode=interpolate needs a family with a latent prior; {type(model).__name__} has none.")
    rows = max(1, min(cfg.n, 16))
    a, b = model.prior(rows, generator), model.prior(rows, generator)
    t = torch.linspace(0, 1, cfg.interpolation_steps, device=a.device)
    z = slerp(a, b, t).flatten(0, 1)
    return torch.cat([model.decode(chunk, **options).cpu() for chunk in z.split(cfg.batch_size)])


@torch.no_grad()
def reconstruct(model, cfg: DictConfig, checkpoint: dict) -> torch.Tensor:
    if not model.has_encoder:
        raise ConfigError(f"mode=reconstruct needs a family with an encoder (ae, vae); {type(model).__name__} has none.")
    data = datamodule_for(cfg, checkpoint, batch_size=min(cfg.n, 64), image_shape=model.image_shape)
    x = next(iter(data.val_dataloader()))[0][: min(cfg.n, 64)].to(model.device)
    return torch.stack([x, model.reconstruct(x)], 1).flatten(0, 1).cpu()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def main(cfg: DictConfig) -> Path:
    return run_job(sample, cfg)


if __name__ == "__main__":
    main()
