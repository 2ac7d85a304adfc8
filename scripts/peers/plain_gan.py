"""A plain PyTorch training loop for gencli's CIFAR-10 GAN recipes: the reference for scripts/gpu_check.py part (b).

    PYTHONPATH=src:scripts python scripts/peers/plain_gan.py dcgan_cifar10 fast           # on a GPU
    PYTHONPATH=src:scripts python scripts/peers/plain_gan.py wgan_gp_cifar10 eager --device cpu --steps 5 --warmup 5 \
        --override data.batch_size=16 --override model.generator.base_channels=16 \
        --override model.discriminator.base_channels=16

What a PyTorch user writes for these recipes, with nothing of gencli's training machinery (no Lightning, no
callbacks, no logging, no non-finite checks): the recipe's own nets from ``gencli.nets`` (``conf/experiment/<name>``
composed as ``gencli train experiment=<name>`` would, so latent size, widths, norms and init are the recipe's),
its losses, Adam settings, batch size, n_critic and gradient-penalty weight, and the same schedule as gencli's
GAN family (src/gencli/families/gan.py): every batch one discriminator step on a fresh latent batch, every
``n_critic``-th batch also one generator step against the updated discriminator on the same fakes; the fakes carry
a graph only on generator turns.

- ``dcgan_cifar10``: non-saturating BCE (D: softplus(-d_real) + softplus(d_fake); G: softplus(-d_fake)),
  Adam 2e-4 (0.5, 0.999), batch 128.
- ``wgan_gp_cifar10``: critic d_fake - d_real + 10 * mean((||grad_x D(x_hat)||_2 - 1)^2) at random points between
  real and fake images (the penalty's double backward: ``create_graph=True``), n_critic 5, Adam 1e-4 (0, 0.9),
  batch 64; G: -d_fake.

Both keep an EMA of the generator (foreach lerp at the recipe's decay after each G step, buffers copied), as gencli
does. Settings: ``fast`` = bf16 autocast + channels_last + torch.compile of G and D, TF32 matmuls (what
``hardware=gpu_fast`` does); ``eager`` = fp32, full-precision matmuls (``hardware=default``). torch.compile cannot
take a double backward, so wgan_gp's ``fast`` has no compile, like gencli's ``hardware=gpu_fast
hardware.compile=false`` (which the wgan_gp_cifar10 recipe asks for on a GPU). Optimisers are torch's default Adam
(foreach on CUDA), as a plain loop would have them. Real images are one random batch held on the device (as in
peer_diffusers.py). Prints images/s (real images consumed) after ``--warmup`` untimed batches, then a JSON line.

Why not bench_overhead.py's plain DCGAN loop: that one is the CPU overhead reference (BCE only, fp32, fed by a
DataLoader of uint8 images on the host, its optimiser settings fixed); this one needs WGAN-GP, autocast, compile
and device-resident data, and takes every setting from the recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from benchlib import compose_train
except ImportError:  # run as a file without scripts/ on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchlib import compose_train

EXPERIMENTS = ("dcgan_cifar10", "wgan_gp_cifar10")


def recipe(experiment: str, overrides: list[str] = ()) -> dict:
    """The recipe's nets (built from its config) and training settings."""
    from hydra.utils import instantiate

    cfg = compose_train([f"experiment={experiment}", *overrides])
    m = cfg.model
    if m.loss not in ("bce", "wgan_gp"):
        raise ValueError(f"plain_gan covers the bce and wgan_gp losses, not {m.loss}")
    return {
        "generator": instantiate(m.generator), "discriminator": instantiate(m.discriminator),
        "loss": str(m.loss), "latent_dim": int(m.latent_dim), "n_critic": int(m.n_critic),
        "gp_lambda": float(m.gp_lambda), "ema_decay": m.ema_decay,
        "g_lr": float(m.g_optimizer.lr), "g_betas": tuple(m.g_optimizer.betas),
        "d_lr": float(m.d_optimizer.lr), "d_betas": tuple(m.d_optimizer.betas),
        "batch": int(cfg.data.batch_size), "shape": (int(cfg.data.channels), int(cfg.data.image_size),
                                                    int(cfg.data.image_size)),
    }


def bench(experiment: str, mode: str = "fast", device: str = "cuda", steps: int = 200, warmup: int = 20,
          overrides: list[str] = (), compile_: bool = True) -> dict:
    """Train ``steps + warmup`` batches; images/s over the last ``steps``."""
    torch.manual_seed(0)
    r = recipe(experiment, list(overrides))
    fast = mode == "fast"
    torch.set_float32_matmul_precision("high" if fast else "highest")
    G, D = r["generator"].to(device), r["discriminator"].to(device)
    if fast:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    wgan = r["loss"] == "wgan_gp"
    compiled = fast and compile_ and not wgan  # torch.compile cannot do the penalty's double backward
    g_fwd, d_fwd = (torch.compile(G), torch.compile(D)) if compiled else (G, D)
    opt_g = torch.optim.Adam(G.parameters(), lr=r["g_lr"], betas=r["g_betas"])
    opt_d = torch.optim.Adam(D.parameters(), lr=r["d_lr"], betas=r["d_betas"])
    ema = None
    if r["ema_decay"]:
        import copy

        ema = copy.deepcopy(G).requires_grad_(False)
        ema_p, g_p = list(ema.parameters()), list(G.parameters())
    B, latent, n_critic, lam = r["batch"], r["latent_dim"], r["n_critic"], r["gp_lambda"]
    real = torch.rand(B, *r["shape"], device=device) * 2 - 1
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=fast)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    g_steps = 0
    for i in range(steps + warmup):
        if i == warmup:
            sync()
            t0, g_steps = time.perf_counter(), 0
        g_turn = (i + 1) % n_critic == 0
        z = torch.randn(B, latent, device=device)
        with autocast:
            with torch.set_grad_enabled(g_turn):
                fake = g_fwd(z)
            d_real, d_fake = d_fwd(real), d_fwd(fake.detach())
            if wgan:
                eps = torch.rand(B, 1, 1, 1, device=device, dtype=real.dtype)
                x_hat = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
                (grad,) = torch.autograd.grad(d_fwd(x_hat).sum(), x_hat, create_graph=True)
                gp = (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()
                d_loss = d_fake.mean() - d_real.mean() + lam * gp
            else:
                d_loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        if g_turn:
            D.requires_grad_(False)
            with autocast:
                d_fake = d_fwd(fake)
                g_loss = -d_fake.mean() if wgan else F.softplus(-d_fake).mean()
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            D.requires_grad_(True)
            if ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(ema_p, g_p, 1 - float(r["ema_decay"]))
                    for b_ema, b in zip(ema.buffers(), G.buffers()):
                        b_ema.copy_(b)
            g_steps += 1
    sync()
    dt = time.perf_counter() - t0
    return {"experiment": experiment, "mode": mode, "loss": r["loss"], "batch": B, "n_critic": n_critic,
            "compile": compiled, "timed_steps": steps, "images_per_s": steps * B / dt,
            "g_steps_per_s": g_steps / dt, "ms_per_batch": 1000 * dt / steps}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=EXPERIMENTS)
    p.add_argument("mode", nargs="?", default="fast", choices=["fast", "eager"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="fast without torch.compile (CPU smoke runs)")
    p.add_argument("--override", action="append", default=[], help="config override (repeatable), e.g. sizes")
    a = p.parse_args(argv)
    out = bench(a.experiment, a.mode, a.device, a.steps, a.warmup, a.override, compile_=not a.no_compile)
    print(f"plain {a.experiment} {a.mode}: batch {out['batch']} images/s {out['images_per_s']:.1f} "
          f"G steps/s {out['g_steps_per_s']:.2f} ms/batch {out['ms_per_batch']:.1f}", flush=True)
    print("PLAIN_JSON " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
