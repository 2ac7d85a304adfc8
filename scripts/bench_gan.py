"""Training throughput of the GAN family, one row per loss preset: images per second.

    PYTHONPATH=src python scripts/bench_gan.py                      # CPU, 32x32x1 (MNIST-sized)
    PYTHONPATH=src python scripts/bench_gan.py --device cuda --channels 3 --batch-size 128 \
        --base-channels 64 --steps 200 --hardware gpu_fast           # CIFAR-sized on a GPU

Each preset (model=dcgan -> bce, model=wgan_gp, model=sngan -> hinge) is built from the real configs
and trained by a real Lightning Trainer on random images held in memory (no data loading cost),
so the number is the cost of the training step itself: one discriminator step per batch and one
generator step every n_critic batches (wgan_gp: 5). "images/s" counts real images consumed per
second after ``--warmup`` batches; "G steps/s" counts generator updates.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, TensorDataset

from benchlib import Clock, bench_trainer, compose_train, device_name

PRESETS = {"bce": "dcgan", "wgan_gp": "wgan_gp", "hinge": "sngan"}


def build(loss: str, args) -> tuple[L.LightningModule, L.Trainer, Clock, DataLoader]:
    overrides = [
        f"model={PRESETS[loss]}", f"hardware={args.hardware}", f"data.image_size={args.size}",
        f"data.channels={args.channels}", f"model.generator.base_channels={args.base_channels}",
        f"model.discriminator.base_channels={args.base_channels}", f"model.latent_dim={args.latent_dim}",
    ]
    return build_from(overrides, args)


def build_from(overrides: list[str], args) -> tuple[L.LightningModule, L.Trainer, Clock, DataLoader]:
    """The model of ``conf/train.yaml`` with ``overrides`` (a preset as above, or a recipe such as
    ``experiment=dcgan_cifar10``, whose batch size then comes from its data config), its Trainer, clock and data."""
    cfg = compose_train(overrides)
    hardware = instantiate(cfg.hardware)
    model = hardware.apply(instantiate(cfg.model))
    batch_size = args.batch_size or int(cfg.data.batch_size)
    size, channels = int(cfg.data.image_size), int(cfg.data.channels)
    n = batch_size * (args.steps + args.warmup)
    images = torch.rand(n, channels, size, size) * 2 - 1
    loader = DataLoader(TensorDataset(images, torch.zeros(n)), batch_size=batch_size, shuffle=False,
                        drop_last=True, pin_memory=args.device == "cuda")
    clock = Clock(args.warmup)
    trainer = bench_trainer(args.device, cfg.hardware.precision, clock)
    return model, trainer, clock, loader


def measure(model, trainer: L.Trainer, clock: Clock, loader: DataLoader, args) -> dict:
    """Train over ``loader`` and return the rates: real images/s, generator steps/s, ms per batch."""
    trainer.fit(model, train_dataloaders=loader)
    seconds = clock.stop - clock.start
    timed = clock.batches - args.warmup
    g_steps = sum(1 for b in range(args.warmup, clock.batches) if (b + 1) % model.n_critic == 0)
    return {"n_critic": model.n_critic, "batch": loader.batch_size, "timed_steps": timed,
            "images_per_s": timed * loader.batch_size / seconds, "g_steps_per_s": g_steps / seconds,
            "ms_per_batch": 1000 * seconds / timed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hardware", default="default", help="conf/hardware option (default, cpu_fast, gpu_fast)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--latent-dim", type=int, default=100)
    parser.add_argument("--steps", type=int, default=40, help="timed batches per loss")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--losses", default="bce,wgan_gp,hinge")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)

    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rows = []
    for loss in args.losses.split(","):
        m = measure(*build(loss, args), args)
        rows.append((loss, PRESETS[loss], m["n_critic"], m["images_per_s"], m["g_steps_per_s"], m["ms_per_batch"]))

    device = device_name(args.device)
    print(f"\nGAN training throughput: {args.size}x{args.size}x{args.channels}, batch {args.batch_size}, "
          f"base_channels {args.base_channels}, hardware={args.hardware}, {device}, torch {torch.__version__}")
    print("| loss | preset | n_critic | images/s | G steps/s | ms/batch |\n|---|---|---|---|---|---|")
    for loss, preset, n_critic, ips, gps, ms in rows:
        print(f"| {loss} | model={preset} | {n_critic} | {ips:.0f} | {gps:.2f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
