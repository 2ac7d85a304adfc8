"""Diffusion benchmarks: training throughput (images/s) and sampling time per image for each sampler.

    PYTHONPATH=src python scripts/bench_diffusion.py                     # CPU: the small UNet at 32x32x1
    PYTHONPATH=src python scripts/bench_diffusion.py --threads 1         # one core (for shared machines)
    PYTHONPATH=src python scripts/bench_diffusion.py --device cuda --hardware gpu_fast --nets unet_ddpm_cifar10 \
        --channels 3 --batch-size 128 --steps 100 --samplers ddpm,ddim50

Training rows: the real model config (model=ddpm with model/net=NET, or model=ldm with its MLP on
the latents of an untrained ae built from the configs), trained by a real Lightning Trainer on random
images held in memory, so data loading is excluded; images/s after ``--warmup`` batches.
Sampling rows: ``--sample-n`` images in one batch through each sampler (ddpm = all 1000 steps;
ddimK = DDIM with K steps, eta 0), reported as seconds per image and network evaluations per second.
"""

from __future__ import annotations

import argparse
import json
import time

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from benchlib import Clock, bench_trainer, compose_train, device_name, markdown_table
from gencli.diffusion.samplers import DDIMSampler, DDPMSampler


def build_model(net: str, args):
    data = [f"data.image_size={args.size}", f"data.channels={args.channels}", f"hardware={args.hardware}"]
    if net == "ldm":
        ae_cfg = compose_train(["model=ae", *data])
        first_stage = json.dumps({"model": OmegaConf.to_container(ae_cfg.model, resolve=True)})
        cfg = compose_train(["model=ldm", *data])
        cfg.model.first_stage_config = first_stage
    else:
        cfg = compose_train(["model=ddpm", f"model/net={net}", *data])
    hardware = instantiate(cfg.hardware)
    return hardware.apply(instantiate(cfg.model)), cfg


def train_throughput(net: str, args) -> list:
    model, cfg = build_model(net, args)
    n = args.batch_size * (args.steps + args.warmup)
    images = torch.rand(n, args.channels, args.size, args.size) * 2 - 1
    loader = DataLoader(TensorDataset(images, torch.zeros(n)), batch_size=args.batch_size, drop_last=True,
                        pin_memory=args.device == "cuda")
    clock = Clock(args.warmup)
    bench_trainer(args.device, cfg.hardware.precision, clock).fit(model, train_dataloaders=loader)
    seconds = clock.stop - clock.start
    timed = clock.batches - args.warmup
    params = sum(p.numel() for p in model.net.parameters())
    return [net, f"{params / 1e6:.2f}M", args.batch_size, f"{timed * args.batch_size / seconds:.1f}",
            f"{1000 * seconds / timed:.0f}"]


def sampling_time(net: str, name: str, args) -> list:
    model, _ = build_model(net, args)
    model = model.to(args.device).eval()
    sampler = DDPMSampler() if name == "ddpm" else DDIMSampler(steps=int(name.removeprefix("ddim")), eta=0.0)
    steps = len(sampler.timesteps(model.schedule))
    generator = torch.Generator().manual_seed(0)
    model.sample(2, generator, sampler=DDIMSampler(steps=2))  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.sample(args.sample_n, generator, sampler=sampler)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return [net, name, steps, args.sample_n, f"{seconds / args.sample_n:.3f}", f"{steps / seconds:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hardware", default="default")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--nets", default="unet_cpu,ldm", help="model/net options (or ldm) to train")
    parser.add_argument("--steps", type=int, default=20, help="timed training batches")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--samplers", default="ddpm,ddim50,ddim20,ddim10")
    parser.add_argument("--sample-net", default="unet_cpu")
    parser.add_argument("--sample-n", type=int, default=16, help="images per sampling measurement (one batch)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    header = f"{args.size}x{args.size}x{args.channels}, hardware={args.hardware}, {device_name(args.device)}, torch {torch.__version__}"
    rows = [train_throughput(net, args) for net in args.nets.split(",") if net]
    if rows:
        print(f"\nDiffusion training throughput: {header}")
        print(markdown_table(["net", "params", "batch", "images/s", "ms/batch"], rows))
    rows = [sampling_time(args.sample_net, name, args) for name in args.samplers.split(",") if name]
    if rows:
        print(f"\nDiffusion sampling time: {header}")
        print(markdown_table(["net", "sampler", "steps", "images", "s/image", "net evals/s"], rows))


if __name__ == "__main__":
    main()
