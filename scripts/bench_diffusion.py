"""Diffusion benchmarks: training throughput (images/s) and sampling time per image for each sampler.

    PYTHONPATH=src python scripts/bench_diffusion.py                     # CPU: the small UNet at 32x32x1
    PYTHONPATH=src python scripts/bench_diffusion.py --threads 1         # one core (for shared machines)
    PYTHONPATH=src python scripts/bench_diffusion.py --device cuda --hardware gpu_fast --nets unet_ddpm_cifar10 \
        --channels 3 --batch-size 128 --steps 100 --samplers ddpm,ddim50

Training rows: the real model config (model=ddpm with model/net=NET, or model=ldm with its MLP on
the latents of an untrained ae built from the configs), trained by a real Lightning Trainer on random
images held in memory, so data loading is excluded; images/s after ``--warmup`` batches.
Sampling rows: ``--sample-n`` images in one batch through each sampler (ddpm = all 1000 steps;
ddimK = DDIM with K steps, eta 0), reported as seconds per image and network evaluations per second; ``--hardware``
reaches sampling as ``gencli sample`` applies it (gencli.sampling_hardware, where this gencli has it), and a 2-step
warm-up at the same batch size comes first, so a compiled denoiser is not timed compiling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from benchlib import Clock, bench_trainer, compose_train, device_name, markdown_table
from gencli.diffusion.samplers import DDIMSampler, DDPMSampler


def build_model(net: str, args, apply: bool = True):
    """The model and its config; ``apply``: with the hardware profile applied for training (layout, compile)."""
    data = [f"data.image_size={args.size}", f"data.channels={args.channels}", f"hardware={args.hardware}",
            *getattr(args, "overrides", [])]  # more config overrides (scripts/gpu_check.py: hardware.compile=false)
    if net == "ldm":
        ae_cfg = compose_train(["model=ae", *data])
        first_stage = json.dumps({"model": OmegaConf.to_container(ae_cfg.model, resolve=True)})
        cfg = compose_train(["model=ldm", *data])
        cfg.model.first_stage_config = first_stage
    else:
        cfg = compose_train(["model=ddpm", f"model/net={net}", *data])
    model = instantiate(cfg.model)
    return (instantiate(cfg.hardware).apply(model) if apply else model), cfg


def sampling_context(model, cfg, args):
    """Where ``hardware=`` reaches sampling the way ``gencli sample``/``eval`` apply it (gencli.sampling_hardware:
    the sampling net alone, autocast, layout, compile), else nothing (a gencli without it: the profile was applied
    for training instead, as before). Returns (context, how)."""
    try:
        from gencli.sampling_hardware import sampling_hardware
    except ImportError:
        return contextlib.nullcontext(), "hardware.apply (training-side; no gencli.sampling_hardware)"
    return (sampling_hardware(instantiate(cfg.hardware), model, args.device, profile=args.hardware),
            "gencli.sampling_hardware")


class WindowClock(Clock):
    """Clock's measurement (batches ``warmup``+1 .. ``warmup``+``steps``, synchronised at both ends), then
    ``profile_steps`` more batches under torch.profiler (scripts/peers/profsum.py), so the timed ones carry no
    profiler overhead; with ``turns`` (scripts/peers/gpu_turns.py) the GPU is taken in turns after the first
    ``turn_at`` (compiling) batches, when scripts/gpu_check.py runs the peer beside it."""

    def __init__(self, warmup: int, steps: int, profile_steps: int = 0, turns=None, turn_at: int = 3):
        super().__init__(warmup)
        self.steps, self.profile_steps, self.turns, self.turn_at = steps, profile_steps, turns, min(turn_at, warmup)
        self.timed, self._profile, self._prof, self.profile = 0, None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.turns is not None and self.batches == self.turn_at:
            self._sync(pl_module)
            self.turns.acquire()
            if self.start is not None:  # warm-up shorter than the compiling steps: the window starts after the wait
                self.start = time.perf_counter()
        if self.profile_steps and self.batches == self.warmup + self.steps and self._profile is None:
            from profsum import step_profiler

            self._profile = step_profiler(pl_module.device.type)
            self._prof = self._profile.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.batches == self.warmup + self.steps:
            self._sync(pl_module)
            self.stop, self.timed = time.perf_counter(), self.steps
        elif self._profile is not None and self.batches == self.warmup + self.steps + self.profile_steps:
            self._end_profile(pl_module)

    def _end_profile(self, pl_module):
        from profsum import summarize

        profile, self._profile = self._profile, None
        profile.__exit__(None, None, None)
        try:
            self.profile = summarize(self._prof, self.batches - self.warmup - self.steps, pl_module.device.type)
        except Exception as e:  # a profile that fails leaves the measurement
            self.profile = {"error": f"{type(e).__name__}: {e}"[:500]}

    def on_train_end(self, trainer, pl_module):
        if self._profile is not None:
            self._end_profile(pl_module)
        if self.stop is None:
            super().on_train_end(trainer, pl_module)
            self.timed = self.batches - self.warmup


def train_measure(net: str, args) -> dict:
    """One training throughput measurement as numbers (scripts/gpu_check.py reads these); ``args.strategy``, when
    present, is handed to the Trainer (e.g. a one-device DDPStrategy, to measure the wrapper's cost);
    ``args.profile_steps`` profiles that many more steps after the timed ones (the result's ``profile``);
    ``args.turns`` shares the GPU with another measuring process (scripts/peers/gpu_turns.py)."""
    model, cfg = build_model(net, args)
    profile_steps = getattr(args, "profile_steps", 0) or 0
    n = args.batch_size * (args.steps + args.warmup + profile_steps)
    images = torch.rand(n, args.channels, args.size, args.size) * 2 - 1
    loader = DataLoader(TensorDataset(images, torch.zeros(n)), batch_size=args.batch_size, drop_last=True,
                        pin_memory=args.device == "cuda")
    turns = getattr(args, "turns", None)
    clock = WindowClock(args.warmup, args.steps, profile_steps, turns)
    bench_trainer(args.device, cfg.hardware.precision, clock, strategy=getattr(args, "strategy", None)).fit(
        model, train_dataloaders=loader)
    seconds = clock.stop - clock.start
    timed = clock.timed
    params = sum(p.numel() for p in model.net.parameters())
    out = {"net": net, "params": params, "batch": args.batch_size, "timed_steps": timed,
           "images_per_s": timed * args.batch_size / seconds, "ms_per_batch": 1000 * seconds / timed}
    if clock.profile is not None:
        out["profile"] = clock.profile
    if turns is not None:
        out.update(turns.info())
    return out


def train_throughput(net: str, args) -> list:
    m = train_measure(net, args)
    return [net, f"{m['params'] / 1e6:.2f}M", args.batch_size, f"{m['images_per_s']:.1f}", f"{m['ms_per_batch']:.0f}"]


def sampling_measure(net: str, name: str, args) -> dict:
    """One sampling measurement as numbers: ``args.sample_n`` images in one batch, after a 2-step warm-up at the same
    batch size (``args.sample_warmup_n`` if set), so that a compiled or graphed denoiser is not timed compiling."""
    try:
        import gencli.sampling_hardware  # noqa: F401
        model, cfg = build_model(net, args, apply=False)
    except ImportError:
        model, cfg = build_model(net, args)
    model = model.to(args.device).eval()
    sampler = DDPMSampler() if name == "ddpm" else DDIMSampler(steps=int(name.removeprefix("ddim")), eta=0.0)
    steps = len(sampler.timesteps(model.schedule))
    generator = torch.Generator().manual_seed(0)
    context, how = sampling_context(model, cfg, args)
    with context:
        model.sample(getattr(args, "sample_warmup_n", 0) or args.sample_n, generator, sampler=DDIMSampler(steps=2))
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.sample(args.sample_n, generator, sampler=sampler)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"net": net, "sampler": name, "steps": steps, "images": args.sample_n, "seconds": seconds,
            "s_per_image": seconds / args.sample_n, "net_evals_per_s": steps / seconds, "hardware_path": how}


def sampling_time(net: str, name: str, args) -> list:
    m = sampling_measure(net, name, args)
    return [net, name, m["steps"], args.sample_n, f"{m['s_per_image']:.3f}", f"{m['net_evals_per_s']:.1f}"]


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
    parser.add_argument("--sample-warmup-n", type=int, default=0,
                        help="images in the 2-step warm-up before each sampling measurement (0: --sample-n)")
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
