"""Issue 14's GPU check: gencli against plain-PyTorch peers, back to back in one run on one device.

    python scripts/gpu_check.py --out $OUT                                   # on a lent GPU (docs/gpu_check.md)
    python scripts/gpu_check.py --device cpu --tiny --out /tmp/gpu_check     # the same code end to end on a CPU
    python scripts/gpu_check.py --out $OUT --parts c,d                       # rerun some parts only

Parts (each one worker process with its own time budget; a part that fails or runs out of time records its
error and whatever it measured, and the next part runs):

(a) diffusion training, images/s after warm-up: gencli ``scripts/bench_diffusion.py``'s measurement (the real
    ``model=ddpm model/net=unet_ddpm_cifar10`` config under a bare Lightning Trainer, random 32x32x3 images, batch
    128, 10 warm-up + 100 timed steps) with ``hardware=gpu_fast`` and ``hardware=default``, against the diffusers
    peer (``scripts/peers/peer_diffusers.py``, a copy of ``../shared/bench/peer_diffusers.py``) ``fast`` and
    ``eager``; ratios gencli / peer; MFU = 3 x forward FLOPs per image (torch's FlopCounterMode, each net counted
    itself) x images/s / ``--peak-tflops`` (790: the bf16 matrix rate measured on this workplace's H200s; an H100
    SXM reaches about the same).
(b) GAN training, real images/s: gencli (``scripts/bench_gan.py``'s path: the recipe composed as
    ``experiment=dcgan_cifar10`` / ``wgan_gp_cifar10`` under a bare Lightning Trainer) against the plain loop of
    ``scripts/peers/plain_gan.py`` on the same nets and settings; ``gpu_fast`` against ``fast`` and ``default``
    against ``eager``. WGAN-GP's gradient penalty needs a double backward, which torch.compile cannot do: its fast
    rows run without compile on both sides (``hardware.compile=false``, as the recipe says).
(c) sampling: DDIM-50 on 256 images in one batch, s/image, ``hardware=gpu_fast`` against ``hardware=default``,
    through the library-level sampler as bench_diffusion.py calls it (the paper UNet, freshly built, EMA weights),
    with the profile applied as ``gencli sample``/``eval`` apply it (gencli.sampling_hardware: bf16 autocast,
    channels-last and compile of the sampling net; where gencli has no such module, the training-side
    ``HardwareSettings.apply``); warm-up at the same batch size, so compiling is not timed. The peer's DDIM-50
    (bf16 eager, diffusers' scheduler) from part (a) is shown beside it.
(d) the DDP wrapper's cost on one device: part (a)'s gencli training under ``hardware=gpu_fast`` with the
    strategy of ``trainer=ddp`` (NCCL; on a CPU ``trainer=ddp_cpu``'s gloo) on 1 device against no strategy.

Results: ``results.md`` (one Markdown table, the device and versions above it), ``results.json`` (every number,
settings, per-measurement wall times and errors with tracebacks) and ``gpu_check.log`` (everything printed) under
``--out``; both result files are rewritten after every part, so a run cut short still leaves what it measured.

Time (``--budget``, default 480 s on a GPU: the device's 540 s call in docs/gpu_check.md less the wheels' install,
start-up and a margin). Sized from issue 14's H100 run: the timed steps are short (110 diffusion steps at
~1,600-2,000 images/s are 7-9 s; a GAN step is a few ms, 220 of them a second or two), so compiling dominates:
torch.compile of the 35.7M UNet's forward and backward takes about a minute per net (gencli's and the peer's), the
EMA net's forward for sampling 20-40 s, the DCGAN nets 10-30 s. Part caps (a 270, c 90, b 150, d 170 s, run in the
order a, c, b, d, so the headline numbers come first) are caps: each part gets at most what is left of
``--budget``. Expected: a ~200 s (two UNet compiles, two eager runs, ~10 s each of start-up), c ~40-60 s (one
compile), b ~60-100 s (DCGAN compiled twice, though the second finds inductor's cache; six uncompiled runs), d ~60-120
s (gencli's UNet compiled twice more, mostly from the inductor cache that part (a) left on disk); about 400 s in
all. On a CPU (``--tiny``: the small ``unet_cpu`` net and its diffusers mirror, batch 8, 3 timed steps, DCGAN widths
16 at batch 16, DDIM-50 on 4 images, no compile) the whole run takes about 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
for _p in (ROOT / "src", SCRIPTS, SCRIPTS / "peers"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

PART_NAMES = {
    "a": "diffusion training: gencli vs the diffusers peer",
    "b": "GAN training: gencli vs a plain loop",
    "c": "DDIM-50 sampling: gpu_fast vs default",
    "d": "DDP wrapper on one device",
}
DEFAULT_PARTS = "a,c,b,d"
#: caps in seconds per part (each also gets at most what is left of --budget)
PART_BUDGET = {"cuda": {"a": 270, "c": 90, "b": 150, "d": 170}, "cpu": {"a": 120, "c": 45, "b": 80, "d": 60}}
#: issue 14's DDIM-50 s/image at batch 256 on an H100, and its goal (3x faster)
ISSUE_DDIM50 = 0.009
GANS = ("dcgan_cifar10", "wgan_gp_cifar10")


# ============================================================================= sizes
def sizes(args) -> dict:
    """What each part measures: the issue's sizes, or tiny ones (``--tiny``) for a CPU smoke run."""
    if args.tiny:
        return {"net": "unet_cpu", "size": 32, "channels": 3, "batch": 8, "steps": 3, "warmup": 2,
                "sampler": "ddim50", "sample_n": 4, "peer_samples": 2, "gan_steps": 5, "gan_warmup": 5,
                "gan_overrides": ["data.batch_size=16", "model.generator.base_channels=16",
                                  "model.discriminator.base_channels=16"]}
    return {"net": "unet_ddpm_cifar10", "size": 32, "channels": 3, "batch": 128, "steps": 100, "warmup": 10,
            "sampler": "ddim50", "sample_n": 256, "peer_samples": 256, "gan_steps": 200, "gan_warmup": 20,
            "gan_overrides": []}


def fast_overrides(args) -> list[str]:
    return ([] if args.compile else ["hardware.compile=false"]) + args.override


def gencli_overrides(args) -> list[str]:
    """--override: config overrides for every gencli measurement (recorded in the results' header)."""
    return list(args.override)


# ============================================================================= the worker side
class Recorder:
    """Results of one part, written to ``path`` after every measurement (so a killed worker leaves them)."""

    def __init__(self, path: Path, deadline: float):
        self.path, self.deadline, self.results = path, deadline, {}

    def left(self) -> float:
        return self.deadline - time.time()

    def __call__(self, name: str, fn) -> dict | None:
        import torch

        print(f"[gpu_check] {name}: start ({self.left():.0f} s left in this part)", flush=True)
        t0 = time.perf_counter()
        try:
            out = fn()
            out = dict(out) if isinstance(out, dict) else {"value": out}
        except Exception as e:  # one measurement's failure is recorded; the part goes on
            out = {"error": f"{type(e).__name__}: {e}".strip()[:2000], "traceback": traceback.format_exc()[-6000:]}
            print(f"[gpu_check] {name}: FAILED {out['error'][:300]}", flush=True)
        out["wall_s"] = round(time.perf_counter() - t0, 2)
        self.results[name] = out
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.path)
        print(f"[gpu_check] {name}: done in {out['wall_s']:.1f} s: "
              f"{ {k: v for k, v in out.items() if k != 'traceback'} }", flush=True)
        gc.collect()
        try:
            torch._dynamo.reset()
        except Exception:
            pass
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return out


def bench_ns(args, s: dict, hardware: str, **extra) -> argparse.Namespace:
    """The argument namespace bench_diffusion.py's measurements read."""
    ns = argparse.Namespace(device=args.device, hardware=hardware, size=s["size"], channels=s["channels"],
                            batch_size=s["batch"], steps=s["steps"], warmup=s["warmup"],
                            sample_n=s["sample_n"], sample_warmup_n=0, overrides=[])
    for k, v in extra.items():
        setattr(ns, k, v)
    return ns


def run_peer(args, s: dict, mode: str, n_samples: int, left: float) -> dict:
    """peer_diffusers.py in its own process (its module-level settings, e.g. TF32, stay its own); its PEER_JSON."""
    cmd = [sys.executable, str(SCRIPTS / "peers" / "peer_diffusers.py"), mode, str(n_samples), "--device",
           args.device]
    if args.tiny:
        cmd += ["--tiny", "--steps", str(s["steps"]), "--warmup", str(s["warmup"]), "--batch", str(s["batch"])]
    if not args.compile:
        cmd.append("--no-compile")
    print("[gpu_check] " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=max(5.0, left - 3))
    sys.stdout.write(proc.stdout[-20000:])
    sys.stdout.flush()
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("PEER_JSON "):
            return json.loads(line.removeprefix("PEER_JSON "))
    raise RuntimeError(f"the peer exited {proc.returncode} without its result: {proc.stdout[-600:]}")


def count_flops(args, s: dict) -> dict:
    """Forward FLOPs per image of gencli's net and of the peer's (FlopCounterMode, fp32, batch 2), and gencli's
    forward + backward, to check the 3x used for training."""
    import torch
    from hydra.utils import instantiate
    from torch.utils.flop_counter import FlopCounterMode

    from benchlib import compose_train

    cfg = compose_train(["model=ddpm", f"model/net={s['net']}", f"data.image_size={s['size']}",
                         f"data.channels={s['channels']}"])
    net = instantiate(cfg.model.net).to(args.device)
    x = torch.randn(2, s["channels"], s["size"], s["size"], device=args.device)
    t = torch.randint(0, 1000, (2,), device=args.device)
    with FlopCounterMode(display=False) as fc:
        net(x, t)
    out = {"gencli_forward_gflop_per_image": fc.get_total_flops() / 2 / 1e9,
           "gencli_params": sum(p.numel() for p in net.parameters())}
    with FlopCounterMode(display=False) as fc:
        net(x, t).pow(2).mean().backward()
    out["gencli_train_gflop_per_image_counted"] = fc.get_total_flops() / 2 / 1e9
    del net
    try:
        import peer_diffusers

        peer_diffusers.dev, peer_diffusers.TINY = args.device, args.tiny
        peer = peer_diffusers.make()
        with FlopCounterMode(display=False) as fc:
            peer(x, t)
        out["peer_forward_gflop_per_image"] = fc.get_total_flops() / 2 / 1e9
        out["peer_params"] = sum(p.numel() for p in peer.parameters())
    except Exception as e:
        out["peer_error"] = f"{type(e).__name__}: {e}"
    return out


def part_a(args, s: dict, rec: Recorder) -> None:
    from bench_diffusion import train_measure

    rec("gencli_fast", lambda: train_measure(s["net"], bench_ns(args, s, "gpu_fast", overrides=fast_overrides(args))))
    rec("peer_fast", lambda: run_peer(args, s, "fast", s["peer_samples"] if "c" in args.parts else 0, rec.left()))
    rec("gencli_eager", lambda: train_measure(s["net"], bench_ns(args, s, "default", overrides=gencli_overrides(args))))
    rec("peer_eager", lambda: run_peer(args, s, "eager", 0, rec.left()))
    rec("flops", lambda: count_flops(args, s))


def part_b(args, s: dict, rec: Recorder) -> None:
    import plain_gan

    from bench_gan import build_from, measure

    for setting, hardware, mode in (("fast", "gpu_fast", "fast"), ("eager", "default", "eager")):
        for exp in GANS:
            overrides = [f"experiment={exp}", f"hardware={hardware}", *s["gan_overrides"]]
            if hardware == "gpu_fast" and (exp.startswith("wgan_gp") or not args.compile):
                # torch.compile cannot do the penalty's double backward (gencli refuses it; the recipe says so)
                overrides.append("hardware.compile=false")
            overrides += gencli_overrides(args)
            ns = argparse.Namespace(device=args.device, batch_size=None, steps=s["gan_steps"],
                                    warmup=s["gan_warmup"])
            rec(f"{exp}_gencli_{setting}", lambda o=overrides, n=ns: {
                **measure(*build_from(o, n), n), "overrides": o})
            rec(f"{exp}_plain_{setting}", lambda e=exp, m=mode: plain_gan.bench(
                e, m, args.device, s["gan_steps"], s["gan_warmup"], s["gan_overrides"], compile_=args.compile))


def part_c(args, s: dict, rec: Recorder) -> None:
    from bench_diffusion import sampling_measure

    for setting, hardware, extra in (("fast", "gpu_fast", fast_overrides(args)),
                                     ("default", "default", gencli_overrides(args))):
        rec(f"gencli_{setting}", lambda h=hardware, o=extra: {
            **sampling_measure(s["net"], s["sampler"], bench_ns(args, s, h, overrides=o)), "hardware": h})


def part_d(args, s: dict, rec: Recorder) -> None:
    from hydra.utils import instantiate

    from bench_diffusion import train_measure
    from benchlib import compose_train

    overrides = fast_overrides(args)
    rec("no_ddp", lambda: train_measure(s["net"], bench_ns(args, s, "gpu_fast", overrides=overrides)))

    def ddp() -> dict:
        trainer = "ddp" if args.device == "cuda" else "ddp_cpu"
        strategy = instantiate(compose_train([f"trainer={trainer}"]).trainer.strategy)
        out = train_measure(s["net"], bench_ns(args, s, "gpu_fast", overrides=overrides, strategy=strategy))
        return {**out, "strategy": f"trainer={trainer}'s {type(strategy).__name__} "
                                   f"({strategy.process_group_backend}), 1 device"}

    rec("ddp", ddp)


PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}


def worker(args) -> None:
    import logging

    import lightning as L
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # Hydra's plugin scan finds gencli's Optuna sweeper (src/hydra_plugins), whose import fails where optuna is not
    # installed (the lent GPU machine): a warning per worker about a plugin no part uses
    warnings.filterwarnings("ignore", message=r"(?s).*Error importing 'hydra_plugins\.gencli_sweepers'")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    L.seed_everything(0, verbose=False)
    rec = Recorder(Path(args.result), args.deadline)
    PARTS[args.worker](args, sizes(args), rec)


# ============================================================================= the orchestrator
def git_commit() -> str:
    if os.environ.get("GENCLI_COMMIT"):
        return os.environ["GENCLI_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown (no git metadata here; set GENCLI_COMMIT)"
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def collect_meta(args) -> dict:
    from importlib import metadata

    import lightning
    import torch

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device_kind": args.device, "tiny": args.tiny,
            "compile": args.compile, "torch": torch.__version__, "lightning": lightning.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(), "host_cpus": os.cpu_count(), "gencli_commit": git_commit(),
            "peak_tflops": args.peak_tflops, "budget_s": args.budget, "parts": args.parts,
            "gencli_overrides": args.override,
            **{k: version(k) for k in ("diffusers", "hydra-core", "omegaconf", "torchmetrics", "triton")}}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta.update(device=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            meta["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:200]
        except (OSError, subprocess.SubprocessError) as e:
            meta["nvidia_smi"] = f"unavailable: {e}"
    else:
        meta["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    meta["sizes"] = sizes(args)
    return meta


def get(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def derive(report: dict) -> dict:
    """Ratios and MFU from whatever the parts measured."""
    parts, meta, d = report["parts"], report["meta"], {}
    a = get(parts, "a", "results", default={})
    fwd_g = get(a, "flops", "gencli_forward_gflop_per_image")
    fwd_p = get(a, "flops", "peer_forward_gflop_per_image", default=fwd_g)
    peak = meta.get("peak_tflops")
    for setting, peer in (("fast", "peer_fast"), ("eager", "peer_eager")):
        g, p = get(a, f"gencli_{setting}", "images_per_s"), get(a, peer, "images_per_s")
        if finite(g) and finite(p):
            d[f"a_ratio_{setting}"] = g / p
        for who, ips, fwd in (("gencli", g, fwd_g), ("peer", p, fwd_p)):
            if finite(ips) and finite(fwd) and finite(peak) and peak > 0:
                d[f"a_tflops_{who}_{setting}"] = 3 * fwd * ips / 1e3
                d[f"a_mfu_{who}_{setting}"] = 3 * fwd * 1e9 * ips / (peak * 1e12)
    b = get(parts, "b", "results", default={})
    for exp in GANS:
        for setting in ("fast", "eager"):
            g, p = get(b, f"{exp}_gencli_{setting}", "images_per_s"), get(b, f"{exp}_plain_{setting}", "images_per_s")
            if finite(g) and finite(p):
                d[f"b_ratio_{exp}_{setting}"] = g / p
    c = get(parts, "c", "results", default={})
    f, df = get(c, "gencli_fast", "s_per_image"), get(c, "gencli_default", "s_per_image")
    if finite(f) and finite(df) and f > 0:
        d["c_speedup_fast_vs_default"] = df / f
    if finite(f) and f > 0 and not meta.get("tiny") and meta.get("device_kind") == "cuda":
        d["c_speedup_fast_vs_issue_baseline"] = ISSUE_DDIM50 / f
    dd = get(parts, "d", "results", default={})
    w, wo = get(dd, "ddp", "images_per_s"), get(dd, "no_ddp", "images_per_s")
    if finite(w) and finite(wo):
        d["d_ratio_ddp_vs_none"] = w / wo
    return d


def fmt(x, spec: str = ".1f") -> str:
    return format(x, spec) if finite(x) else "–"


def err(r: dict | None) -> str:
    if r is None:
        return "not measured (the part stopped before it)"
    e = r.get("error")
    return f"error: {e.splitlines()[0][:140]}" if e else ""


def markdown(report: dict) -> str:
    """One table (a row per comparison of the parts run), the device and versions above it, part timings below."""
    m, parts, d = report["meta"], report["parts"], report["derived"]
    s, ran = m["sizes"], m["parts"]
    cuda = f"CUDA {m['cuda']}, cuDNN {m['cudnn']}, " if m.get("cuda") else ""
    lines = [
        f"GPU check (`scripts/gpu_check.py{' --device cpu' if m['device_kind'] == 'cpu' else ''}"
        f"{' --tiny' if m['tiny'] else ''}`), {m['date']}: **{m['device']}**"
        f"{' (nvidia-smi driver, max SM clock, power limit: ' + m['nvidia_smi'] + ')' if m.get('nvidia_smi') else ''}"
        f"; torch {m['torch']} ({cuda}triton {m.get('triton')}), lightning {m['lightning']}, diffusers "
        f"{m.get('diffusers')}, hydra-core {m.get('hydra-core')}, Python {m['python']}, gencli {m['gencli_commit']}. "
        f"torch.compile {'on' if m['compile'] else 'OFF'} in the fast settings. "
        + (f"gencli overrides: `{' '.join(m['gencli_overrides'])}`. " if m.get("gencli_overrides") else "")
        + (f"MFU = 3 x forward FLOPs x images/s / {m['peak_tflops']:g} TFLOP/s." if m.get("peak_tflops") else ""),
        "",
        "| part | measurement | setting (gencli vs reference) | gencli | reference | gencli / reference | notes |",
        "|---|---|---|---|---|---|---|",
    ]

    def errors(*pairs) -> list[str]:
        return [f"{who}{err(r)}" for who, r in pairs if err(r)]

    a = get(parts, "a", "results", default={})
    if "a" in ran:
        fl = a.get("flops", {})
        params = get(a, "gencli_fast", "params") or get(a, "gencli_eager", "params")
        what = (f"DDPM training, images/s ({s['net']}{f', {params / 1e6:.2f}M' if params else ''}, batch "
                f"{s['batch']}, {s['steps']} timed steps)")
        for setting, peer, label in (("fast", "peer_fast", "`hardware=gpu_fast` vs peer `fast`"),
                                     ("eager", "peer_eager", "`hardware=default` vs peer `eager`")):
            g, p = a.get(f"gencli_{setting}"), a.get(peer)
            notes = errors(("", g), ("peer ", p))
            mfu_g, mfu_p = d.get(f"a_mfu_gencli_{setting}"), d.get(f"a_mfu_peer_{setting}")
            if finite(mfu_g) or finite(mfu_p):
                notes.append(f"MFU gencli {fmt(100 * mfu_g if finite(mfu_g) else None, '.1f')}% "
                             f"({fmt(d.get(f'a_tflops_gencli_{setting}'), '.1f')} TFLOP/s), peer "
                             f"{fmt(100 * mfu_p if finite(mfu_p) else None, '.1f')}%")
            if setting == "fast" and "gencli_forward_gflop_per_image" in fl:
                notes.append(f"forward {fl['gencli_forward_gflop_per_image']:.2f} GFLOP/image (peer "
                             f"{fmt(fl.get('peer_forward_gflop_per_image'), '.2f')}), gencli fwd+bwd counted "
                             f"{fmt(fl.get('gencli_train_gflop_per_image_counted'), '.2f')}")
            lines.append(f"| a | {what} | {label} | {fmt(get(g, 'images_per_s'))} | {fmt(get(p, 'images_per_s'))} | "
                         f"{fmt(d.get(f'a_ratio_{setting}'), '.2f')} | {'; '.join(notes)} |")
    if "b" in ran:
        b = get(parts, "b", "results", default={})
        for exp in GANS:
            for setting, label in (("fast", "`gpu_fast` vs plain `fast`"), ("eager", "`default` vs plain `eager`")):
                g, p = b.get(f"{exp}_gencli_{setting}"), b.get(f"{exp}_plain_{setting}")
                notes = errors(("", g), ("plain ", p))
                if setting == "fast" and exp.startswith("wgan_gp"):
                    notes.append("no compile on either side (double backward)")
                if get(g, "n_critic"):
                    notes.append(f"n_critic {g['n_critic']}, G steps/s {fmt(get(g, 'g_steps_per_s'), '.1f')} vs "
                                 f"{fmt(get(p, 'g_steps_per_s'), '.1f')}")
                batch = get(g, "batch") or get(p, "batch")
                lines.append(f"| b | `{exp}` training, real images/s{f' (batch {batch})' if batch else ''} | {label} "
                             f"| {fmt(get(g, 'images_per_s'))} | {fmt(get(p, 'images_per_s'))} | "
                             f"{fmt(d.get(f'b_ratio_{exp}_{setting}'), '.2f')} | {'; '.join(notes)} |")
    if "c" in ran:
        c = get(parts, "c", "results", default={})
        g, r = c.get("gencli_fast"), c.get("gencli_default")
        notes = errors(("", g), ("default ", r))
        peer_s = get(a, "peer_fast", "ddim50", "s_per_image")
        if finite(peer_s):
            notes.append(f"peer DDIM-50 bf16 eager: {peer_s:.4f} s/image "
                         f"({get(a, 'peer_fast', 'ddim50', 'images')} images)")
        if get(g, "hardware_path"):
            notes.append(f"profile applied by {g['hardware_path']}")
        if finite(d.get("c_speedup_fast_vs_issue_baseline")):
            notes.append(f"{d['c_speedup_fast_vs_issue_baseline']:.2f}x issue 14's {ISSUE_DDIM50} s/image (goal 3x)")
        sampler = s["sampler"].upper().replace("DDIM", "DDIM-")
        lines.append(f"| c | {sampler} sampling, s/image (batch {s['sample_n']}, {s['net']}) | `gpu_fast` vs "
                     f"`default` | {fmt(get(g, 's_per_image'), '.4f')} | {fmt(get(r, 's_per_image'), '.4f')} | "
                     f"{fmt(d.get('c_speedup_fast_vs_default'), '.2f')} (speed-up) | {'; '.join(notes)} |")
    if "d" in ran:
        dd = get(parts, "d", "results", default={})
        w, wo = dd.get("ddp"), dd.get("no_ddp")
        notes = errors(("", w), ("no-DDP ", wo))
        if finite(d.get("d_ratio_ddp_vs_none")):
            notes.append(f"wrapper cost {100 * (1 - d['d_ratio_ddp_vs_none']):.1f}%")
        if get(w, "strategy"):
            notes.append(w["strategy"])
        lines.append(f"| d | DDPM training under DDP, images/s ({s['net']}, batch {s['batch']}) | `gpu_fast`: DDP, 1 "
                     f"device, vs no strategy | {fmt(get(w, 'images_per_s'))} | {fmt(get(wo, 'images_per_s'))} | "
                     f"{fmt(d.get('d_ratio_ddp_vs_none'), '.3f')} | {'; '.join(notes)} |")
    lines.append("")
    for p in ran:
        info = parts.get(p)
        if info:
            walls = ", ".join(f"{k} {v.get('wall_s', 0):.0f} s" for k, v in info.get("results", {}).items())
            lines.append(f"- part {p} ({PART_NAMES[p]}): {info['status']} in {info['seconds']:.0f} s of "
                         f"{info['budget_s']:.0f} s{': ' + walls if walls else ''}"
                         f"{'; ' + info['error'] if info.get('error') else ''}")
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    report["derived"] = derive(report)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "results.md").write_text(markdown(report))


def run_part(part: str, args, budget: float, out: Path, log) -> dict:
    result = out / f".part_{part}.json"
    result.unlink(missing_ok=True)
    deadline = time.time() + budget
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--worker", part, "--result", str(result),
           "--deadline", str(deadline), "--device", args.device, "--parts", ",".join(args.parts),
           "--threads", str(args.threads), "--compile" if args.compile else "--no-compile",
           *(f"--override={o}" for o in args.override)]
    if args.tiny:
        cmd.append("--tiny")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(SCRIPTS), *filter(None, [env.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    # its own process group, so that a timeout ends the worker with its compile workers and peer processes
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)

    def pump():
        for line in proc.stdout:
            log(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status, error = "ok", None
    try:
        rc = proc.wait(timeout=budget)
        if rc != 0:
            status, error = "error", f"worker exited {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status, error = "timeout", f"stopped at its {budget:.0f} s budget"
    reader.join(timeout=10)
    results = json.loads(result.read_text()) if result.exists() else {}
    result.unlink(missing_ok=True)
    if status == "ok" and any("error" in r for r in results.values()):
        status = "partial"
    return {"status": status, "error": error, "seconds": time.perf_counter() - t0, "budget_s": budget,
            "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny sizes (small nets, batches and steps): a smoke run")
    p.add_argument("--out", default="gpu_check_out", help="folder for results.md, results.json, gpu_check.log")
    p.add_argument("--parts", default=DEFAULT_PARTS, help="comma-separated, run in this order (a,b,c,d)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU (default 790 on cuda: bf16 matmul measured here on an H200; none on cpu)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 480 cuda, 240 cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile in the fast settings (default: on for cuda, off for cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in the workers (0: torch's default)")
    p.add_argument("--override", action="append", default=[],
                   help="a config override for every gencli measurement (repeatable), e.g. "
                        "hardware.optimizer_kernel=foreach; shown above the table")
    p.add_argument("--worker", choices=list(PARTS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in args.parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if args.compile is None:
        args.compile = args.device == "cuda"
    if args.worker:
        worker(args)
        return 0

    if args.peak_tflops is None:
        args.peak_tflops = 790.0 if args.device == "cuda" else None
    if args.budget is None:
        args.budget = 480.0 if args.device == "cuda" else 240.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "gpu_check.log").open("a")
    lock = threading.Lock()

    def log(line: str) -> None:
        with lock:
            print(line, flush=True)
            log_file.write(line + "\n")
            log_file.flush()

    started = time.time()
    log(f"[gpu_check] {time.strftime('%H:%M:%S')} start: parts {','.join(args.parts)}, budget {args.budget:.0f} s, "
        f"device {args.device}{' (tiny)' if args.tiny else ''}, compile {'on' if args.compile else 'off'}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            log("[gpu_check] --device cuda but torch sees no GPU")
            return 2
    report = {"meta": collect_meta(args), "parts": {}}
    log("[gpu_check] " + json.dumps({k: v for k, v in report["meta"].items() if k != "sizes"}, default=str))
    write(report, out)
    caps = PART_BUDGET[args.device]
    for part in args.parts:
        left = args.budget - (time.time() - started)
        budget = min(caps[part], left - 3)
        if budget < 10:
            report["parts"][part] = {"status": "skipped", "error": f"only {left:.0f} s of --budget left",
                                     "seconds": 0.0, "budget_s": max(budget, 0.0), "results": {}}
            log(f"[gpu_check] part {part}: skipped, {left:.0f} s left")
            write(report, out)
            continue
        log(f"[gpu_check] {time.strftime('%H:%M:%S')} part {part} ({PART_NAMES[part]}): budget {budget:.0f} s")
        report["parts"][part] = run_part(part, args, budget, out, log)
        info = report["parts"][part]
        log(f"[gpu_check] part {part}: {info['status']} in {info['seconds']:.0f} s"
            f"{' (' + info['error'] + ')' if info['error'] else ''}")
        write(report, out)
    report["meta"]["total_s"] = round(time.time() - started, 1)
    write(report, out)
    log("")
    log((out / "results.md").read_text())
    log_file.close()
    return 0 if all(v["status"] == "ok" for v in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
