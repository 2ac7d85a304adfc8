"""What gencli's training machinery costs: its training step against a plain PyTorch loop, same net and data.

    PYTHONPATH=src:scripts python scripts/bench_overhead.py               # CPU defaults, under 3 minutes
    PYTHONPATH=src:scripts python scripts/bench_overhead.py --device cpu --families diffusion --rounds 5

For each family, the same model (built from the real configs), the same in-memory images (random,
32x32x1 by default, uint8 like every gencli data set) and the same optimiser settings are trained

- by **gencli**: the model's LightningModule under a Lightning Trainer with everything ``gencli train``
  adds at every step (``callbacks=default`` without the sample grid, which is periodic: checkpoint
  callback, LR monitor, Rich progress bar, non-finite guard, GAN monitor, preemption, the training
  random state, the CSV logger), fed by gencli's data module (EpochSampler, uint8 -> [-1, 1]);
- by a **plain loop**: a hand-written PyTorch loop doing the same maths (diffusion: t, noise, q_sample,
  eps MSE, backward, gradient clipping to 1, Adam, the warm-up schedule, the EMA; DCGAN: the D step and
  the non-saturating G step with Adam(0.5, 0.999) and the G EMA), over a plain shuffled DataLoader.

The two alternate in one process (``--rounds`` rounds, gencli and plain in turn, which goes first
alternating, ``--steps`` timed steps each after ``--warmup`` untimed ones), so a busy host slows both alike; the median images/s over the
rounds is compared. Both are timed from the end of the last warm-up step to the end of the last step
(so the once-per-epoch checkpoint save at a round's end is left out, as the plain loop has none). It prints a table and one line per family, ``overhead ratio: X`` (gencli / plain;
1.0 is no overhead; the goal is >= 0.95).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch.utils.data import DataLoader, TensorDataset

from benchlib import compose_train, device_name, markdown_table
from gencli.data.base import ImageDataModule

FAMILIES = {
    "diffusion": ["model=ddpm", "model/net=unet_cpu"],
    "dcgan": ["model=dcgan", "model.generator.base_channels=32", "model.discriminator.base_channels=32",
              "model.latent_dim=64"],
}


class StepClock(L.Callback):
    """Wall time from the end of batch ``warmup`` to the end of the last batch: the steps alone, as the plain loop
    is timed (the end-of-run checkpoint save is not part of a step; a real run pays it once per epoch)."""

    def __init__(self, warmup: int):
        self.warmup, self.batches, self.start, self.stop = warmup, 0, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        if self.batches == self.warmup:
            self.start = now
        self.stop = now


class RandomImages(ImageDataModule):
    """Random uint8 images held in memory, served the way every gencli data module serves its images."""

    name = "random"

    def __init__(self, images: torch.Tensor, **kwargs):
        super().__init__(image_size=images.shape[-1], channels=images.shape[1], val_fraction=0.01, **kwargs)
        self.images = images

    def load_images(self):
        return self.images, torch.zeros(len(self.images), dtype=torch.long)


def config(family: str, args) -> tuple:
    cfg = compose_train([*FAMILIES[family], f"data.image_size={args.size}", f"data.channels={args.channels}",
                         f"data.batch_size={args.batch_size}", f"hardware={args.hardware}"])
    return cfg


# ----------------------------------------------------------------------------- gencli
def gencli_round(family: str, model, images: torch.Tensor, args, cfg, folder: Path) -> float:
    from omegaconf import open_dict

    from gencli.callbacks.random_state import TrainingRandomState
    from gencli.checkpoint_io import SafeCheckpointIO

    with open_dict(cfg):
        cfg.callbacks.sample_grid = None  # periodic, not part of the step
        cfg.callbacks.sample_quality = None
        if cfg.callbacks.get("checkpoint") is not None:
            cfg.callbacks.checkpoint.dirpath = str(folder / "checkpoints")
        cfg.paths.output_dir = str(folder)
    clock = StepClock(args.warmup)
    callbacks = [TrainingRandomState(), clock,
                 *(instantiate(c) for c in cfg.callbacks.values() if c is not None)]
    loggers = [instantiate(c, save_dir=str(folder)) for c in cfg.logger.values() if c is not None]
    steps = args.warmup + args.steps
    trainer = L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                        precision=cfg.hardware.precision, max_steps=steps * (2 if family == "dcgan" else 1),
                        max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False,
                        log_every_n_steps=cfg.trainer.log_every_n_steps, callbacks=callbacks, logger=loggers,
                        plugins=[SafeCheckpointIO()], default_root_dir=str(folder))
    data = RandomImages(images, batch_size=args.batch_size, seed=0)
    trainer.fit(model, datamodule=data)
    return (clock.batches - args.warmup) * args.batch_size / (clock.stop - clock.start)


# ----------------------------------------------------------------------------- the plain loops
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_diffusion_round(model, images: torch.Tensor, args, state: dict) -> float:
    """eps-prediction DDPM training on the same net: the loop a diffusers user writes."""
    device = torch.device(args.device)
    net, schedule = model.net.to(device), model.schedule
    if "opt" not in state:
        state["opt"] = torch.optim.Adam(net.parameters(), lr=model.optimizer_factory.keywords["lr"])
        warmup = model.scheduler_factory.keywords["warmup_steps"]
        state["sched"] = torch.optim.lr_scheduler.LambdaLR(state["opt"], lambda s: min(1.0, (s + 1) / warmup))
        state["ema"] = [p.detach().clone() for p in net.parameters()]
    opt, sched, ema = state["opt"], state["sched"], state["ema"]
    alphas = schedule.alphas_cumprod.to(device=device, dtype=torch.float32)
    net.train()

    def step(x0: torch.Tensor) -> None:
        t = torch.randint(0, len(alphas), (len(x0),), device=device)
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(net(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - 0.9999)

    return timed_plain_steps(step, images, args)


def plain_dcgan_round(model, images: torch.Tensor, args, state: dict) -> float:
    """DCGAN's alternating updates with the non-saturating loss on the same nets."""
    device = torch.device(args.device)
    gen, disc = model.generator.to(device), model.discriminator.to(device)
    if "opt_g" not in state:
        state["opt_g"] = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
        state["opt_d"] = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
        state["ema"] = [p.detach().clone() for p in gen.parameters()]
    opt_g, opt_d, ema = state["opt_g"], state["opt_d"], state["ema"]
    gen.train()
    disc.train()

    def step(real: torch.Tensor) -> None:
        fake = gen(torch.randn(len(real), model.latent_dim, device=device))
        d_loss = F.softplus(-disc(real)).mean() + F.softplus(disc(fake.detach())).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        for p in disc.parameters():
            p.requires_grad_(False)
        g_loss = F.softplus(-disc(fake)).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        for p in disc.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in gen.parameters()], 1 - 0.999)

    return timed_plain_steps(step, images, args)


def timed_plain_steps(step, images: torch.Tensor, args) -> float:
    """The plain loop's driver: shuffled uint8 batches scaled to [-1, 1], ``args.warmup`` untimed steps, then
    images/s over ``args.steps`` timed ones."""
    device = torch.device(args.device)
    loader = DataLoader(TensorDataset(images), batch_size=args.batch_size, shuffle=True, drop_last=True)
    batches, start, done = iter(loader), None, 0
    while done < args.warmup + args.steps:
        try:
            (x,) = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        step(x.to(device).float() / 127.5 - 1)
        done += 1
        if done == args.warmup:
            sync(args.device)
            start = time.perf_counter()
    sync(args.device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


PLAIN = {"diffusion": plain_diffusion_round, "dcgan": plain_dcgan_round}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hardware", default="default")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=8192, help="random images held in memory")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=0, help="timed steps per round (0: 5 diffusion, 60 dcgan)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("gencli").setLevel(logging.WARNING)
    L.seed_everything(0, verbose=False)
    images = torch.randint(0, 256, (args.images, args.channels, args.size, args.size), dtype=torch.uint8)

    rows, lines = [], []
    started = time.perf_counter()
    for family in args.families:
        family_args = argparse.Namespace(**vars(args))
        family_args.steps = args.steps or {"diffusion": 5, "dcgan": 60}[family]
        cfg = config(family, args)
        gencli_model = instantiate(cfg.model)
        plain_model = instantiate(cfg.model)
        plain_model.load_state_dict(gencli_model.state_dict())
        ours, theirs, state = [], [], {}
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(args.rounds):
                # alternate which side goes first, so a host that speeds up or slows down favours neither
                gencli_first = round_ % 2 == 0
                if not gencli_first:
                    theirs.append(PLAIN[family](plain_model, images, family_args, state))
                ours.append(gencli_round(family, gencli_model, images, family_args, cfg.copy(), Path(tmp) / str(round_)))
                if gencli_first:
                    theirs.append(PLAIN[family](plain_model, images, family_args, state))
        ratio = statistics.median(ours) / statistics.median(theirs)
        rows.append([family, family_args.steps, args.rounds, f"{statistics.median(ours):.1f}",
                     f"{statistics.median(theirs):.1f}", f"{ratio:.3f}",
                     " ".join(f"{a / b:.2f}" for a, b in zip(ours, theirs))])
        lines.append(f"{family}: overhead ratio: {ratio:.3f}")
    print(f"\ngencli vs a plain PyTorch loop: {args.size}x{args.size}x{args.channels}, batch {args.batch_size}, "
          f"hardware={args.hardware}, {device_name(args.device)}, torch {torch.__version__}, lightning "
          f"{L.__version__}; {time.perf_counter() - started:.0f} s in all")
    print(markdown_table(["family", "timed steps/round", "rounds", "gencli images/s (median)",
                          "plain images/s (median)", "gencli / plain", "per round"], rows))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
