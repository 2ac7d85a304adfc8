"""The dcgan_cifar10 crash of issue 24 on a GPU, variant by variant: which net and which layout make Inductor's
``convolution_backward`` stride assertion fail, whether the 1x1 layers as matrix products (src/gencli/nets/dcgan.py)
fix it, and whether channels-last pays for each net once compiled.

    PYTHONPATH=src python3 scripts/check_dcgan_compile.py --out $OUT           # on a GPU, about 2-3 minutes
    PYTHONPATH=src python3 scripts/check_dcgan_compile.py --device cpu --tiny --variants cl-GD-conv,cl-GD

Every variant is the recipe's pair (latent 100, 32x32, base 64 / max 512 channels, batch norm in G and D, batch
128) trained as gencli's GAN family does (one D step on real + detached fakes, one G step against the updated D,
non-saturating BCE, fused Adam 2e-4 (0.5, 0.999), bf16 autocast, TF32), each net compiled with Inductor behind
gencli's CompileGuard, so a net that fails is named (``compile_nets``) and the run goes on. Variants run as parallel
processes (compiling is CPU work); the timed steps take turns on the GPU (a file lock), so no two time at once.

- ``cl-GD-conv``: both nets channels-last, the 1x1 layers as convolutions (gencli before the fix: the crash);
- ``cl-GD``: both channels-last, 1x1 layers as products (the fix); ``cl-G`` / ``cl-D``: one net channels-last;
  ``cl-none``: neither;
- ``cl-GD-conv-nolayout``: as ``cl-GD-conv`` with ``torch._inductor.config.layout_optimization=False``;
- ``eager-none`` / ``eager-cl-GD``: no compile (the guard's fallback speed).

Prints one table (variant, compile state per net, the first error line, images/s) and writes results.json.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    # name: (channels-last nets, 1x1 layers as convolutions, compile, inductor layout optimisation)
    "cl-GD-conv": ("GD", True, True, True),
    "cl-GD": ("GD", False, True, True),
    "cl-G": ("G", False, True, True),
    "cl-D": ("D", False, True, True),
    "cl-none": ("", False, True, True),
    "cl-GD-conv-nolayout": ("GD", True, True, False),
    "eager-none": ("", False, False, True),
    "eager-cl-GD": ("GD", False, False, True),
}


def conv_forwards(g, d):
    """The nets' forwards as they were before the fix: the 1x1 layers as convolutions."""
    import types

    def g_forward(self, z, y=None):
        return self.net(z.view(len(z), self.latent_dim, 1, 1))

    def d_forward(self, x, y=None):
        return self.net(x).flatten()

    g.forward = types.MethodType(g_forward, g)
    d.forward = types.MethodType(d_forward, d)


def run_variant(name: str, device: str, tiny: bool, warmup: int, steps: int, lock: str) -> dict:
    import torch
    import torch.nn.functional as F

    from gencli.hardware import compile_record, guard_compiled_module
    from gencli.nets.dcgan import DCGANDiscriminator, DCGANGenerator

    nets_cl, as_conv, compiled, layout_opt = VARIANTS[name]
    torch._inductor.config.layout_optimization = layout_opt
    torch.set_float32_matmul_precision("high")
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("gencli.hardware").addHandler(Keep())
    torch.manual_seed(0)
    width, batch = (8, 8) if tiny else (64, 128)
    g = DCGANGenerator(100, 3, 32, base_channels=width, max_channels=512).to(device)
    d = DCGANDiscriminator(3, 32, base_channels=width, max_channels=512, norm="batch").to(device)
    if as_conv:
        conv_forwards(g, d)
    if "G" in nets_cl:
        g.to(memory_format=torch.channels_last)
    if "D" in nets_cl:
        d.to(memory_format=torch.channels_last)
    report: dict[str, str] = {}
    if compiled:
        for net_name, net in (("generator", g), ("discriminator", d)):
            net.compile()
            guard_compiled_module(net, net_name, report, channels_last=bool(nets_cl))

    holder = torch.nn.Module()
    holder.compile_report = report
    fused = device != "cpu"
    opt_g = torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.999), fused=fused)
    opt_d = torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999), fused=fused)
    real = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    if "D" in nets_cl:
        real = real.contiguous(memory_format=torch.channels_last)

    def step():
        z = torch.randn(batch, 100, device=device)
        with torch.autocast(device_type="cuda" if device != "cpu" else "cpu", dtype=torch.bfloat16):
            fake = g(z)
            d_loss = F.softplus(-d(real)).mean() + F.softplus(d(fake.detach())).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        for p in d.parameters():
            p.requires_grad_(False)
        with torch.autocast(device_type="cuda" if device != "cpu" else "cpu", dtype=torch.bfloat16):
            g_loss = F.softplus(-d(fake)).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        for p in d.parameters():
            p.requires_grad_(True)
        return d_loss, g_loss

    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    out = {"variant": name, "channels_last": nets_cl or "-", "as_conv": as_conv, "compile": compiled,
           "layout_optimization": layout_opt}
    t0 = time.perf_counter()
    try:
        for _ in range(warmup):
            losses = step()
        sync()
        out["warmup_s"] = time.perf_counter() - t0
        out["losses_finite"] = bool(all(torch.isfinite(x).item() for x in losses))
        with open(lock, "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            sync()
            t1 = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            dt = time.perf_counter() - t1
            fcntl.flock(held, fcntl.LOCK_UN)
        out["images_per_s"] = steps * batch / dt
        out["ms_per_step"] = 1000 * dt / steps
    except Exception as err:  # recorded, not raised: the other variants go on
        import traceback

        out["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        out["traceback_tail"] = traceback.format_exc()[-2500:]
    out.update(compile_record(holder) if compiled else {"compile": False})
    out["guard_messages"] = messages
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="8-channel nets, batch 8 (a CPU check of the script)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--timeout", type=int, default=240, help="seconds each variant's process may take")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a worker: run one variant, print JSON
    parser.add_argument("--lock", default="/tmp/check_dcgan_compile.lock", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, args.device, args.tiny, args.warmup, args.steps, args.lock)))
        return
    names = [v for v in args.variants.split(",") if v]
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "2"),
           "PYTHONUNBUFFERED": "1"}
    procs = {}
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--device", args.device, "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--lock", args.lock] + (["--tiny"] if args.tiny else [])
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    results, logs = [], {}
    deadline = time.time() + args.timeout
    for name, proc in procs.items():
        try:
            text, _ = proc.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
        logs[name] = text
        line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
        results.append(json.loads(line[7:]) if line else {"variant": name, "error": f"no result (exit {proc.returncode})",
                                                          "log_tail": text[-2500:]})
    print("| variant | channels-last | 1x1 as conv | compile | compile state | error | img/s | ms/step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        rate = f"{r['images_per_s']:.0f}" if "images_per_s" in r else "-"
        ms = f"{r['ms_per_step']:.2f}" if "ms_per_step" in r else "-"
        print(f"| {r['variant']} | {r.get('channels_last')} | {r.get('as_conv')} | {r.get('compile') is not False} | "
              f"{json.dumps(r.get('compile_nets', r.get('compile')))[:200]} | {r.get('error', '')[:120]} | {rate} | {ms} |")
    for r in results:
        for m in r.get("guard_messages", []):
            print(f"[{r['variant']}] {m[:600]}")
        if "traceback_tail" in r or "log_tail" in r:
            print(f"[{r['variant']}] {(r.get('traceback_tail') or r.get('log_tail'))[-1200:]}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        import torch

        meta = {"torch": torch.__version__, "cuda": torch.version.cuda,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
        (Path(args.out) / "dcgan_compile.json").write_text(json.dumps({"meta": meta, "results": results,
                                                                       "logs": logs}, indent=1))
        print(json.dumps(meta))


if __name__ == "__main__":
    main()
