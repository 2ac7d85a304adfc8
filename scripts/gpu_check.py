"""Issues 14 and 24's GPU check: gencli against plain-PyTorch peers and the real CLI, in one run on one device.

    bash scripts/gpu_check.sh $OUT --profile                                 # on a lent GPU (docs/gpu_check.md)
    python scripts/gpu_check.py --device cpu --tiny --profile --out /tmp/g   # the same code end to end on a CPU
    python scripts/gpu_check.py --out $OUT --parts c,f --budget 150          # rerun some parts only

Parts, run in the order of their value for issue 24 (a, e, b, c, f, d); each is one worker process with its own
time budget, and a part that fails or runs out of time records its error and whatever it measured:

(a) diffusion training, images/s after warm-up, and MFU: gencli ``scripts/bench_diffusion.py``'s measurement (the
    real ``model=ddpm model/net=unet_ddpm_cifar10`` config under a bare Lightning Trainer, random 32x32x3 images,
    batch 128, 10 warm-up + 100 timed steps) with ``hardware=gpu_fast`` against the diffusers peer's ``fast`` loop
    (``scripts/peers/peer_diffusers.py``: bf16 + channels_last + compile). The two compile side by side (the peer in
    a background process) and then take the GPU in turns for the rest of their warm-up, their timed steps and their
    profile (``scripts/peers/gpu_turns.py``), so no timed step shares the GPU, while the two 1-2 minute compiles
    overlap. Then the FLOPs (torch's FlopCounterMode; MFU = 3 x forward FLOPs x images/s / ``--peak-tflops``, 790:
    the bf16 matrix rate measured on this workplace's H200s), then, while the part's time allows, the fp32 eager pair
    (``hardware=default`` vs the peer's ``eager``).
(e) the real CLI: ``gencli train experiment=ddpm_cifar10 trainer=gpu hardware=gpu_fast`` and ``experiment=
    dcgan_cifar10`` for 220 batches on a CIFAR-10-shaped set of random bytes in the release's own format (the lent GPU
    has no data sets; only speed is measured), images/s after 20 warm-up batches as the run itself measured them
    (metrics.json's ``throughput``, gencli.callbacks.Throughput). Compared with part a's harness and part b's plain
    loop. If the DCGAN run fails (issue 24's channels-last + compile crash), it is measured again with
    ``hardware.channels_last=false``.
(b) GAN training, real images/s: gencli (``scripts/bench_gan.py``'s path on ``experiment=dcgan_cifar10`` /
    ``wgan_gp_cifar10``) against ``scripts/peers/plain_gan.py`` on the same nets and settings: ``gpu_fast`` vs
    ``fast`` first, then ``default`` vs ``eager`` while time allows. WGAN-GP's fast rows run without compile on both
    sides (the penalty's double backward).
(c) sampling: DDIM-50 on 256 images in one batch, s/image, ``hardware=gpu_fast`` (then ``default`` while time
    allows), the profile applied as ``gencli sample``/``eval`` apply it (gencli.sampling_hardware); warm-up at the same
    batch size, so compiling is not timed. The peer's DDIM-50 (bf16 eager) from part a is shown beside it.
(f) the real CLI: ``gencli eval`` of part e's DDPM checkpoint, FID in the domain feature space on 10,240 DDIM-50
    samples (40 batches of 256: the shape part c compiled), ``hardware=gpu_fast``; s/image and the time split from the
    run's metrics.json ``timing`` (generation, features, I/O, setup, metrics, other).
(d) the DDP wrapper's cost on one device: part a's gencli training under ``trainer=ddp``'s strategy against none.

``--profile``: torch.profiler over 5 more steps after the timed ones of gencli's gpu_fast and the peer's fast run
(part a): top kernels by GPU time, the GPU's idle share, kernels and launch calls per step (``scripts/peers/
profsum.py``), in results.json, results.md and the log; on a CPU the same as CPU activity (top operators, aten ops
per step).

Time (``--budget``, default 490 s on a GPU: the lead's 560 s ``run`` call less the wheels' install, the import check
and a margin). Compiling dominates: issue 24 saw 100 s for gencli's UNet and 134 s for the peer's on the H200's host,
while 110 diffusion steps take 7 s. So: (1) every worker and every process it starts share one inductor cache
(FX graph + AOTAutograd + Triton, under ``--work``): a graph compiled in one part is loaded in the next (gencli's
training UNet in a, e, d; the sampling UNet in c, f; the DCGAN nets in e, b); (2) part a compiles its two UNets at
once; (3) each part gets at most its cap and what is left after the later parts' reserves (``PART_BUDGET``,
``plan_budget``); a measurement that no longer fits in its part is skipped and recorded (``NEED``), and so is a part.
Expected on the H200, cold cache: a ~170-200 s, e ~100 s, b ~80 s, c ~50 s, f ~50-80 s, d on what is left. On a CPU
(``--tiny``: the small ``unet_cpu`` net and its diffusers mirror, batch 8, 3 timed steps, DCGAN widths 16, DDIM-50
on 4 images, the CLI for 6 batches, eval of 64 DDIM-10 samples, no compile) the whole run takes about 5 minutes on
2 cores. ``--fake-compile-s`` makes every compiling measurement sleep first (tests of the budget logic).

Results: ``results.md`` (the table, the profile table, the device and versions above them, part timings below),
``results.json`` (every number, settings, wall times, errors with tracebacks) and ``gpu_check.log`` under ``--out``;
both result files are rewritten after every part. Everything else (the random data, the CLI runs' folders and
checkpoints, the compile cache) goes under ``--work`` (default: a fresh folder in the temporary directory, removed at
the end), so a lent GPU's $OUT brings back just those three files.
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
    "e": "the real CLI: gencli train, throughput from its own metrics.json",
    "f": "the real CLI: gencli eval on 10k samples, its time split",
}
#: the issue's goals first (a: the 1.5x goal and MFU, e: the real CLI, b: the GAN gap, c: the DDIM-50 goal), then f, d
DEFAULT_PARTS = "a,e,b,c,f,d"
#: per part, seconds: (cap, least worth starting, reserved for it while earlier parts run). Each part gets at most its
#: cap and at most what is left of --budget after the reserves of the later parts (plan_budget), so an early part
#: that runs long squeezes the later ones down to their least instead of starving them; a part whose least no
#: longer fits is skipped and recorded. d (the DDP wrapper) reserves nothing: it runs on what is left.
PART_BUDGET = {
    "cuda": {"a": (200, 110, 110), "e": (120, 60, 60), "b": (90, 30, 30), "c": (60, 30, 30), "f": (80, 40, 40),
             "d": (80, 40, 0)},
    "cpu": {"a": (200, 60, 60), "e": (200, 60, 60), "b": (120, 40, 40), "c": (60, 20, 20), "f": (150, 40, 40),
            "d": (90, 30, 0)},
}
#: what a compiled-free measurement needs to be worth starting inside a part (cuda, cpu), seconds
NEED = {"eager_unet": (35, 20), "gan_row": (12, 8), "cli_train": (45, 25), "default_sampling": (15, 8)}
#: issue 14's DDIM-50 s/image at batch 256 on an H100, and its goal (3x faster)
ISSUE_DDIM50 = 0.009
GANS = ("dcgan_cifar10", "wgan_gp_cifar10")
#: --fake-compile-s (tests): seconds every compiling measurement sleeps first, as a slow compile would take
FAKE_COMPILE_S = 0.0
#: the worker's Recorder (its part's deadline)
RECORDER = None


# ============================================================================= sizes
def sizes(args) -> dict:
    """What each part measures: the issue's sizes, or tiny ones (``--tiny``) for a CPU smoke run."""
    if args.tiny:
        return {"net": "unet_cpu", "size": 32, "channels": 3, "batch": 8, "steps": 3, "warmup": 2,
                "sampler": "ddim50", "sample_n": 4, "peer_samples": 2, "gan_steps": 5, "gan_warmup": 5,
                "gan_overrides": ["data.batch_size=16", "model.generator.base_channels=16",
                                  "model.discriminator.base_channels=16"],
                "profile_steps": 2,
                # e: the CLI on a CIFAR-10-shaped set of random bytes (5 x 200 train images, 200 test)
                "cifar_per_batch": 200, "cli_warmup": 2, "cli_batches": 6,
                "cli_ddpm": ["model/net=unet_cpu", "data.global_batch_size=8", "data.num_workers=0"],
                "cli_dcgan": ["data.global_batch_size=16", "model.generator.base_channels=16",
                              "model.discriminator.base_channels=16", "data.num_workers=0"],
                # f: gencli eval, fewer samples
                "eval_n": 64, "eval_batch": 32, "eval_steps": 10}
    return {"net": "unet_ddpm_cifar10", "size": 32, "channels": 3, "batch": 128, "steps": 100, "warmup": 10,
            "sampler": "ddim50", "sample_n": 256, "peer_samples": 256, "gan_steps": 200, "gan_warmup": 20,
            "gan_overrides": [], "profile_steps": 5,
            # e: 5 x 2,000 random train images (9,000 train / 1,000 val, like issue 24's run), 20 warm-up + 200 timed
            "cifar_per_batch": 2000, "cli_warmup": 20, "cli_batches": 220, "cli_ddpm": [], "cli_dcgan": [],
            # f: 10k samples (40 batches of 256: the one shape part c compiled, so f loads it from the cache)
            "eval_n": 10240, "eval_batch": 256, "eval_steps": 50}


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

    def __call__(self, name: str, fn, need: float = 0.0, compiles: bool = False) -> dict | None:
        """Run one measurement and record it; ``need``: seconds it takes at least, below which it is skipped and
        recorded as such; ``compiles``: it compiles (``--fake-compile-s`` sleeps that long first, to test the
        budget logic on a CPU)."""
        import torch

        left = self.left()
        if left < need:
            self.results[name] = {"skipped": f"needs ~{need:.0f} s, {max(left, 0):.0f} s left in the part",
                                  "wall_s": 0.0}
            self._write()
            print(f"[gpu_check] {name}: skipped ({self.results[name]['skipped']})", flush=True)
            return None
        print(f"[gpu_check] {name}: start ({left:.0f} s left in this part)", flush=True)
        t0 = time.perf_counter()
        try:
            if compiles and FAKE_COMPILE_S:
                time.sleep(FAKE_COMPILE_S)
            out = fn()
            out = dict(out) if isinstance(out, dict) else {"value": out}
        except Exception as e:  # one measurement's failure is recorded; the part goes on
            out = {"error": f"{type(e).__name__}: {e}".strip()[:2000], "traceback": traceback.format_exc()[-6000:]}
            print(f"[gpu_check] {name}: FAILED {out['error'][:300]}", flush=True)
        out["wall_s"] = round(time.perf_counter() - t0, 2)
        self.results[name] = out
        self._write()
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

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.path)


def bench_ns(args, s: dict, hardware: str, **extra) -> argparse.Namespace:
    """The argument namespace bench_diffusion.py's measurements read."""
    ns = argparse.Namespace(device=args.device, hardware=hardware, size=s["size"], channels=s["channels"],
                            batch_size=s["batch"], steps=s["steps"], warmup=s["warmup"],
                            sample_n=s["sample_n"], sample_warmup_n=0, overrides=[])
    for k, v in extra.items():
        setattr(ns, k, v)
    return ns


def work_dir(args) -> Path:
    """Where the parts keep what is not a result (the random CIFAR-10, the CLI runs' folders and checkpoints, the
    turn files): ``--work``, outside ``--out`` so that a lent GPU's $OUT brings back only the three result files."""
    return Path(getattr(args, "work", None) or Path(args.result).parent / ".work")


def need(args, key: str) -> float:
    return NEED[key][0 if args.device == "cuda" else 1]


def peer_cmd(args, s: dict, mode: str, n_samples: int, profile: bool = False) -> list[str]:
    cmd = [sys.executable, str(SCRIPTS / "peers" / "peer_diffusers.py"), mode, str(n_samples), "--device",
           args.device]
    if args.tiny:
        cmd += ["--tiny", "--steps", str(s["steps"]), "--warmup", str(s["warmup"]), "--batch", str(s["batch"])]
    if not args.compile:
        cmd.append("--no-compile")
    if profile:
        cmd += ["--profile", str(s["profile_steps"])]
    return cmd


def peer_result(output: str, rc: int) -> dict:
    for line in output.splitlines()[::-1]:
        if line.startswith("PEER_JSON "):
            return json.loads(line.removeprefix("PEER_JSON "))
    raise RuntimeError(f"the peer exited {rc} without its result: {output[-600:]}")


def run_peer(args, s: dict, mode: str, n_samples: int, left: float) -> dict:
    """peer_diffusers.py in its own process (its module-level settings, e.g. TF32, stay its own); its PEER_JSON."""
    cmd = peer_cmd(args, s, mode, n_samples)
    print("[gpu_check] " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=max(5.0, left - 3))
    sys.stdout.write(proc.stdout[-20000:])
    sys.stdout.flush()
    return peer_result(proc.stdout, proc.returncode)


class BackgroundPeer:
    """The peer's ``fast`` run started at once in its own process, compiling while gencli's measurement compiles;
    both then take the GPU in turns for their timed steps (scripts/peers/gpu_turns.py)."""

    def __init__(self, args, s: dict, n_samples: int, turn_dir: Path, wait_s: float):
        from gpu_turns import mark_exited

        cmd = peer_cmd(args, s, "fast", n_samples, profile=args.profile)
        env = dict(os.environ, GPU_CHECK_TURN_DIR=str(turn_dir), GPU_CHECK_TURN_NAME="peer",
                   GPU_CHECK_TURN_PARTIES="2", GPU_CHECK_TURN_WAIT=f"{wait_s:.0f}")
        self.log = turn_dir / "peer.log"
        turn_dir.mkdir(parents=True, exist_ok=True)
        print("[gpu_check] (in the background) " + " ".join(cmd), flush=True)
        self.started = time.perf_counter()
        with self.log.open("w") as f:  # same process group as this worker: a part's timeout ends it too
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)

        def reap():  # however it ends (a crash while compiling included), nobody waits for it at the barrier
            self.proc.wait()
            mark_exited(turn_dir, "peer")

        threading.Thread(target=reap, daemon=True).start()

    def result(self, left: float) -> dict:
        try:
            rc = self.proc.wait(timeout=max(1.0, left - 3))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = "killed (the part's time ran out)"
        output = self.log.read_text(errors="replace")
        sys.stdout.write("[gpu_check] the peer's output:\n" + output[-20000:])
        sys.stdout.flush()
        out = peer_result(output, rc)
        out["process_wall_s"] = round(time.perf_counter() - self.started, 2)
        return out


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
    """gencli gpu_fast and the peer's fast run compile side by side, then take the GPU in turns; then the FLOPs; then
    the fp32 eager pair, when the part's time still allows."""
    import shutil

    from gpu_turns import Turns

    from bench_diffusion import train_measure

    turn_dir = work_dir(args) / "turns_a"
    shutil.rmtree(turn_dir, ignore_errors=True)
    wait_s = max(rec.left() - 45, 10)  # stop waiting for a party that never gets ready, with time left to measure
    peer = BackgroundPeer(args, s, s["peer_samples"] if "c" in args.parts else 0, turn_dir, wait_s)
    turns = Turns(str(turn_dir), "gencli", 2, wait_s=wait_s)
    profile = s["profile_steps"] if args.profile else 0
    try:
        rec("gencli_fast", lambda: train_measure(s["net"], bench_ns(
            args, s, "gpu_fast", overrides=fast_overrides(args), profile_steps=profile, turns=turns)),
            compiles=args.compile)
    finally:
        turns.release()
    rec("peer_fast", lambda: peer.result(rec.left()))
    rec("flops", lambda: count_flops(args, s))
    rec("gencli_eager", lambda: train_measure(s["net"], bench_ns(args, s, "default", overrides=gencli_overrides(args))),
        need=need(args, "eager_unet"))
    rec("peer_eager", lambda: run_peer(args, s, "eager", 0, rec.left()), need=need(args, "eager_unet"))


def part_b(args, s: dict, rec: Recorder) -> None:
    """The fast rows first (the issue's gpu_fast comparisons), then the eager ones while time allows."""
    import plain_gan

    from bench_gan import build_from, measure

    for setting, hardware, mode in (("fast", "gpu_fast", "fast"), ("eager", "default", "eager")):
        for exp in GANS:
            overrides = [f"experiment={exp}", f"hardware={hardware}", *s["gan_overrides"]]
            compiles = hardware == "gpu_fast" and args.compile and not exp.startswith("wgan_gp")
            if hardware == "gpu_fast" and not compiles:
                # torch.compile cannot do the penalty's double backward (gencli refuses it; the recipe says so)
                overrides.append("hardware.compile=false")
            overrides += gencli_overrides(args)
            ns = argparse.Namespace(device=args.device, batch_size=None, steps=s["gan_steps"],
                                    warmup=s["gan_warmup"])
            row = need(args, "gan_row") * (3 if compiles else 1)
            rec(f"{exp}_gencli_{setting}", lambda o=overrides, n=ns: {
                **measure(*build_from(o, n), n), "overrides": o}, need=row, compiles=compiles)
            rec(f"{exp}_plain_{setting}", lambda e=exp, m=mode: plain_gan.bench(
                e, m, args.device, s["gan_steps"], s["gan_warmup"], s["gan_overrides"], compile_=args.compile),
                need=row, compiles=compiles)


def part_c(args, s: dict, rec: Recorder) -> None:
    from bench_diffusion import sampling_measure

    for setting, hardware, extra in (("fast", "gpu_fast", fast_overrides(args)),
                                     ("default", "default", gencli_overrides(args))):
        rec(f"gencli_{setting}", lambda h=hardware, o=extra: {
            **sampling_measure(s["net"], s["sampler"], bench_ns(args, s, h, overrides=o)), "hardware": h},
            need=0 if setting == "fast" else need(args, "default_sampling"), compiles=setting == "fast" and args.compile)


def part_d(args, s: dict, rec: Recorder) -> None:
    from hydra.utils import instantiate

    from bench_diffusion import train_measure
    from benchlib import compose_train

    overrides = fast_overrides(args)
    rec("no_ddp", lambda: train_measure(s["net"], bench_ns(args, s, "gpu_fast", overrides=overrides)),
        compiles=args.compile)

    def ddp() -> dict:
        trainer = "ddp" if args.device == "cuda" else "ddp_cpu"
        strategy = instantiate(compose_train([f"trainer={trainer}"]).trainer.strategy)
        out = train_measure(s["net"], bench_ns(args, s, "gpu_fast", overrides=overrides, strategy=strategy))
        return {**out, "strategy": f"trainer={trainer}'s {type(strategy).__name__} "
                                   f"({strategy.process_group_backend}), 1 device"}

    rec("ddp", ddp, need=need(args, "eager_unet"), compiles=args.compile)


def fake_cifar10(root: Path, per_batch: int) -> Path:
    """A CIFAR-10-shaped data set of random bytes in the release's own format (``cifar-10-batches-py``: pickled dicts
    of uint8 rows and labels), so ``gencli train experiment=..._cifar10`` runs unchanged where CIFAR-10 is not (the
    lent GPU has no data sets); only speed is measured on it. Returns ``data.root``."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    if (folder / "test_batch").is_file():
        return root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist(),
                 "filenames": [f"{i}.png" for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    return root


def cli(args, verb: str, overrides: list[str], left: float) -> tuple[Path, str]:
    """``gencli VERB overrides...`` as a user runs it (its own process, its Hydra run directory under the check's
    work folder); returns the run directory and what it printed."""
    work = work_dir(args) / "cli"
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("run_name="))
    run_dir = work / verb / "runs" / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-c", "import sys; from gencli.cli import main; sys.argv[0] = 'gencli'; main()", verb,
           *overrides, f"paths.log_dir={work}"]
    env = dict(os.environ, GENCLI_CACHE=str(work / "cache"), PYTHONWARNINGS="ignore")
    print("[gpu_check] gencli " + " ".join([verb, *overrides]), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                          timeout=max(5.0, left - 3))
    sys.stdout.write(proc.stdout[-8000:])
    sys.stdout.flush()
    if proc.returncode != 0:
        raise RuntimeError(f"gencli {verb} exited {proc.returncode}: {proc.stdout[-1500:]}")
    return run_dir, proc.stdout


def cli_train(args, s: dict, exp: str, extra: list[str], name: str, hardware: str = "gpu_fast",
              batches: int | None = None, warmup: int | None = None) -> dict:
    """``gencli train experiment=EXP trainer=gpu hardware=gpu_fast`` for a fixed number of batches on the random
    CIFAR-10; images/s as the run itself measured them (metrics.json's ``throughput``, callbacks.throughput)."""
    root = fake_cifar10(work_dir(args) / "data", s["cifar_per_batch"])
    batches = s["cli_batches"] if batches is None else batches
    per_batch = 2 if exp.startswith("dcgan") else 1  # a DCGAN batch is a D and a G optimiser step
    overrides = [f"experiment={exp}", f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}", f"hardware={hardware}",
                 f"data.root={root}", f"run_name={name}", f"trainer.max_steps={batches * per_batch}",
                 f"callbacks.throughput.warmup_steps={s['cli_warmup'] if warmup is None else warmup}",
                 # the recipe's end-of-training grid is 64 x 1000 DDPM steps: not training, and not timed anyway
                 "callbacks.sample_grid=null", *extra]
    if hardware == "gpu_fast" and not args.compile:
        overrides.append("hardware.compile=false")
    overrides += gencli_overrides(args)
    t0 = time.perf_counter()
    run_dir, output = cli(args, "train", overrides, RECORDER.left())
    report = json.loads((run_dir / "metrics.json").read_text())
    tp = report.get("throughput") or {}
    line = next((ln[ln.index("training throughput:"):].strip() for ln in output.splitlines()[::-1]
                 if "training throughput:" in ln), None)
    if report.get("status") != "completed" or not tp.get("images_per_s"):
        raise RuntimeError(f"the run's metrics.json says status {report.get('status')!r}, throughput {tp}: "
                           f"{report.get('reason') or output[-800:]}")
    return {"images_per_s": tp["images_per_s"], "optimizer_steps_per_s": tp.get("optimizer_steps_per_s"),
            "batches_per_s": tp.get("batches_per_s"), "throughput": tp, "log_line": line,
            "steps": report.get("steps"), "batch": round(tp["images"] / max(tp["timed_batches"], 1)),
            "command": "gencli train " + " ".join(overrides), "process_wall_s": round(time.perf_counter() - t0, 1),
            "checkpoint": (report.get("files") or {}).get("last_checkpoint"),
            "compile": report.get("compile") or (report.get("provenance") or {}).get("compile")}


def part_e(args, s: dict, rec: Recorder) -> None:
    """The real CLI, as a user trains: DDPM and DCGAN under trainer=gpu hardware=gpu_fast."""
    rec("ddpm_cli", lambda: cli_train(args, s, "ddpm_cifar10", s["cli_ddpm"], "ddpm"),
        need=need(args, "cli_train"), compiles=args.compile)
    dcgan = rec("dcgan_cli", lambda: cli_train(args, s, "dcgan_cifar10", s["cli_dcgan"], "dcgan"),
                need=need(args, "cli_train"), compiles=args.compile)
    if dcgan is not None and "error" in dcgan and args.compile:
        # issue 24's crash (channels-last + compile in the convolution's backward): measure the path that trains
        rec("dcgan_cli_channels_last_off", lambda: cli_train(
            args, s, "dcgan_cifar10", [*s["cli_dcgan"], "hardware.channels_last=false"], "dcgan_cl_off"),
            need=need(args, "cli_train"), compiles=True)


def part_f(args, s: dict, rec: Recorder) -> None:
    """``gencli eval`` of part e's DDPM checkpoint (or of a 2-step one made here when e did not leave one): FID in
    the domain feature space on ``eval_n`` DDIM-50 samples, hardware=gpu_fast, with metrics.json's time split."""
    ckpt = work_dir(args) / "cli" / "train" / "runs" / "ddpm" / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        made = rec("train_for_eval", lambda: cli_train(args, s, "ddpm_cifar10", s["cli_ddpm"], "ddpm", "default",
                                                        batches=2, warmup=0), need=need(args, "cli_train"))
        if not made or not ckpt.is_file():
            return

    def run() -> dict:
        overrides = [f"ckpt={ckpt}", "metric=fid", f"n={s['eval_n']}", f"batch_size={s['eval_batch']}",
                     "sampler=ddim", f"sampler.steps={s['eval_steps']}", "hardware=gpu_fast", "run_name=eval",
                     # random bytes have no classes to learn: the domain classifier is trained one epoch and kept
                     "features.epochs=1", "features.min_accuracy=0"]
        if not args.compile:
            overrides.append("hardware.compile=false")
        overrides += [o for o in gencli_overrides(args) if o.startswith("hardware.")]
        t0 = time.perf_counter()
        run_dir, output = cli(args, "eval", overrides, rec.left())
        report = json.loads((run_dir / "metrics.json").read_text())
        timing = report.get("timing") or {}
        if not timing:
            raise RuntimeError(f"gencli eval's metrics.json has no timing: {sorted(report)}")
        line = next((ln.strip() for ln in output.splitlines()[::-1] if ln.strip().startswith("time:")), None)
        return {"n": s["eval_n"], "timing": timing, "line": line, "metrics": report.get("metrics"),
                "s_per_image": timing.get("total_seconds", 0) / s["eval_n"],
                "generation_images_per_s": timing.get("generation_images_per_second"),
                "command": "gencli eval " + " ".join(overrides), "process_wall_s": round(time.perf_counter() - t0, 1)}

    rec("eval", run, compiles=args.compile)


PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e, "f": part_f}


def worker(args) -> None:
    import logging

    import lightning as L
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    L.seed_everything(0, verbose=False)
    global RECORDER, FAKE_COMPILE_S
    FAKE_COMPILE_S = args.fake_compile_s
    rec = RECORDER = Recorder(Path(args.result), args.deadline)
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
            "peak_tflops": args.peak_tflops, "budget_s": args.budget, "parts": args.parts, "profile": args.profile,
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
    e = get(parts, "e", "results", default={})
    ddpm = get(e, "ddpm_cli", "images_per_s")
    for key, ref in (("harness", get(a, "gencli_fast", "images_per_s")), ("peer", get(a, "peer_fast", "images_per_s"))):
        if finite(ddpm) and finite(ref) and ref > 0:
            d[f"e_ratio_ddpm_cli_vs_{key}"] = ddpm / ref
    plain = get(b, "dcgan_cifar10_plain_fast", "images_per_s")
    for key in ("dcgan_cli", "dcgan_cli_channels_last_off"):
        g = get(e, key, "images_per_s")
        if finite(g) and finite(plain) and plain > 0:
            d[f"e_ratio_{key}_vs_plain_fast"] = g / plain
    return d


def fmt(x, spec: str = ".1f") -> str:
    return format(x, spec) if finite(x) else "–"


def err(r: dict | None) -> str:
    if r is None:
        return "not measured (the part stopped before it)"
    if r.get("skipped"):
        return f"skipped: {r['skipped']}"
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
            if setting == "fast" and (get(g, "wait_timed_out") or get(p, "wait_timed_out")):
                notes.append("a side stopped waiting for the other's compile: its timed steps may have shared the "
                             "host's CPUs with that compile")
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
    if "e" in ran:
        e = get(parts, "e", "results", default={})
        tr = "gpu" if m["device_kind"] == "cuda" else "cpu"
        rows = [("ddpm_cli", "ddpm_cifar10", f"`trainer={tr} hardware=gpu_fast` vs part a's harness (gencli gpu_fast)",
                 get(a, "gencli_fast", "images_per_s"), d.get("e_ratio_ddpm_cli_vs_harness")),
                ("dcgan_cli", "dcgan_cifar10", f"`trainer={tr} hardware=gpu_fast` vs part b's plain `fast`",
                 get(parts, "b", "results", "dcgan_cifar10_plain_fast", "images_per_s"),
                 d.get("e_ratio_dcgan_cli_vs_plain_fast"))]
        if "dcgan_cli_channels_last_off" in e:
            rows.append(("dcgan_cli_channels_last_off", "dcgan_cifar10",
                         "`... hardware=gpu_fast hardware.channels_last=false` vs plain `fast`",
                         get(parts, "b", "results", "dcgan_cifar10_plain_fast", "images_per_s"),
                         d.get("e_ratio_dcgan_cli_channels_last_off_vs_plain_fast")))
        for key, exp, label, ref, ratio in rows:
            r = e.get(key)
            notes = errors(("", r))
            if key == "ddpm_cli" and finite(d.get("e_ratio_ddpm_cli_vs_peer")):
                notes.append(f"{d['e_ratio_ddpm_cli_vs_peer']:.2f} of the peer's fast loop")
            if get(r, "optimizer_steps_per_s"):
                notes.append(f"{r['optimizer_steps_per_s']:.1f} optimiser steps/s")
            if get(r, "compile") and not isinstance(r["compile"], bool):
                notes.append(f"metrics.json compile: {str(r['compile'])[:120]}")
            tp = get(r, "throughput") or {}
            if tp.get("timed_batches"):
                notes.append(f"batches {tp['warmup_batches'] + 1}-{tp['warmup_batches'] + tp['timed_batches']}, from "
                             "the run's metrics.json")
            batch = f" (batch {r['batch']})" if get(r, "batch") else ""
            lines.append(f"| e | the real CLI: `gencli train experiment={exp}`, images/s{batch} "
                         f"| {label} | {fmt(get(r, 'images_per_s'))} | {fmt(ref)} | {fmt(ratio, '.2f')} | "
                         f"{'; '.join(notes)} |")
    if "f" in ran:
        f_ = get(parts, "f", "results", "eval")
        t = get(f_, "timing") or {}
        notes = errors(("", f_))
        if t:
            total = t.get("total_seconds") or 0
            split = ", ".join(f"{k} {t.get(k + '_seconds', 0):.1f} s ({100 * v:.0f}%)"
                              for k, v in (t.get("shares") or {}).items() if isinstance(v, int | float))
            notes.append(f"total {total:.1f} s = {split}")
            if finite(t.get("generation_images_per_second_after_first_batch")):
                notes.append(f"{t['generation_images_per_second_after_first_batch']:.0f} images/s after the first batch")
        lines.append(f"| f | the real CLI: `gencli eval` FID (domain features), {s.get('eval_n')} samples, DDIM-"
                     f"{s.get('eval_steps')}, batch {s.get('eval_batch')}, s/image (all of eval's time) | "
                     f"`hardware=gpu_fast` | {fmt(get(f_, 's_per_image'), '.5f')} | – | – | {'; '.join(notes)} |")
    profiles = [(who, get(a, key, "profile")) for who, key in (("gencli gpu_fast", "gencli_fast"),
                                                                ("peer fast", "peer_fast"))]
    if any(p for _, p in profiles):
        lines += ["", "Profile (`--profile`: torch.profiler over a few steps after the timed ones, per training step):",
                  "", "| who | ms/step (under the profiler) | GPU idle | kernels/step | launch calls/step | top kernels "
                  "(ms/step, share of GPU busy time) |", "|---|---|---|---|---|---|"]
        for who, prof in profiles:
            if not prof:
                continue
            if prof.get("error"):
                lines.append(f"| {who} | error: {prof['error'][:120]} | | | | |")
                continue
            idle = prof.get("gpu_idle_share")
            tops = "; ".join(f"{t['name'][:60]} {t['ms_per_step']:.2f}"
                             + (f" ({100 * t['share_of_busy']:.0f}%)" if t.get("share_of_busy") else "")
                             for t in prof.get("top", [])[:5])
            lines.append(f"| {who} | {fmt(prof.get('step_ms_under_profiler'), '.2f')} | "
                         f"{fmt(100 * idle, '.1f') + '%' if finite(idle) else 'n/a (CPU)'} | "
                         f"{fmt(prof.get('kernels_per_step', prof.get('aten_ops_per_step')), '.0f')}"
                         f"{'' if 'kernels_per_step' in prof else ' aten ops'} | "
                         f"{fmt(prof.get('launch_calls_per_step'), '.0f')} | {tops} |")
    lines.append("")
    for p in ran:
        info = parts.get(p)
        if info:
            walls = ", ".join(f"{k} {v.get('process_wall_s', v.get('wall_s', 0)):.0f} s"
                              + (" (skipped)" if v.get("skipped") else "")
                              + (" (alongside)" if k == "peer_fast" and "process_wall_s" in v else "")
                              for k, v in info.get("results", {}).items())
            lines.append(f"- part {p} ({PART_NAMES[p]}): {info['status']} in {info['seconds']:.0f} s of "
                         f"{info['budget_s']:.0f} s{': ' + walls if walls else ''}"
                         f"{'; ' + info['error'] if info.get('error') else ''}")
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    report["derived"] = derive(report)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "results.md").write_text(markdown(report))


def compile_cache_env(work: Path) -> dict:
    """One inductor cache for every worker and every process they start (the CLI runs, the peer): a net compiled in
    one part is loaded, not compiled, in the next (FX graph cache: inductor's generated code; AOTAutograd cache: the
    traced forward/backward graphs; Triton's kernels beside them). Set here unless the caller set them; the folder
    is the check's own (under ``--work``, or GPU_CHECK_CACHE_DIR), so what an earlier check left is reused when it is
    kept."""
    cache = Path(os.environ.get("GPU_CHECK_CACHE_DIR") or work / "inductor_cache").resolve()
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "1", "TRITON_CACHE_DIR": str(cache / "triton")}
    return {k: os.environ.get(k, v) for k, v in env.items()}


def plan_budget(part: str, later: list[str], left: float, table: dict) -> float:
    """Seconds for ``part``: its cap (none for the last part), and no more than what is left after the reserves of
    the later parts (but never less than its own least while that fits in what is left). Below its least: 0 (skip)."""
    cap, least, _ = table[part]
    if not later:  # the last part (or one rerun alone) has nobody to leave time for: all that is left
        cap = float("inf")
    reserve = sum(table[p][2] for p in later)
    budget = min(cap, max(left - reserve, least), left - 3)
    return budget if budget >= least else 0.0


def run_part(part: str, args, budget: float, out: Path, log) -> dict:
    result = out / f".part_{part}.json"
    result.unlink(missing_ok=True)
    deadline = time.time() + budget
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--worker", part, "--result", str(result),
           "--deadline", str(deadline), "--device", args.device, "--parts", ",".join(args.parts),
           "--threads", str(args.threads), "--compile" if args.compile else "--no-compile",
           "--fake-compile-s", str(args.fake_compile_s), "--work", str(args.work),
           *(f"--override={o}" for o in args.override)]
    if args.tiny:
        cmd.append("--tiny")
    if args.profile:
        cmd.append("--profile")
    env = dict(os.environ, PYTHONUNBUFFERED="1", **compile_cache_env(Path(args.work)))
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
    p.add_argument("--parts", default=DEFAULT_PARTS, help="comma-separated, run in this order (default a,e,b,c,f,d)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU (default 790 on cuda: bf16 matmul measured here on an H200; none on cpu)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 490 cuda, 600 cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile in the fast settings (default: on for cuda, off for cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in the workers (0: torch's default)")
    p.add_argument("--override", action="append", default=[],
                   help="a config override for every gencli measurement (repeatable), e.g. "
                        "hardware.optimizer_kernel=foreach; shown above the table")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler summary per training step for gencli's and the peer's gpu_fast/fast runs of "
                        "part a (top kernels, GPU idle share, kernel launches per step), after their timed steps")
    p.add_argument("--fake-compile-s", type=float, default=0.0,
                   help="tests only: every compiling measurement first sleeps this long (the budget logic on a CPU)")
    p.add_argument("--work", default=None,
                   help="folder for the parts' working files: the random CIFAR-10, the CLI runs, inductor's cache "
                        "(default: a gpu_check_work folder in the temporary directory, emptied first)")
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
        args.budget = 490.0 if args.device == "cuda" else 600.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    own_work = args.work is None
    if own_work:
        import tempfile

        args.work = str(Path(tempfile.gettempdir()) / f"gpu_check_work_{os.getpid()}")
    Path(args.work).mkdir(parents=True, exist_ok=True)
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
    table = PART_BUDGET[args.device]
    for i, part in enumerate(args.parts):
        left = args.budget - (time.time() - started)
        budget = plan_budget(part, args.parts[i + 1:], left, table)
        if budget <= 0:
            report["parts"][part] = {"status": "skipped", "error": f"only {left:.0f} s of --budget left (needs "
                                     f"{table[part][1]} s)", "seconds": 0.0, "budget_s": 0.0, "results": {}}
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
    if own_work:  # the CLI runs' checkpoints, the random data set, the compile cache
        import shutil

        shutil.rmtree(args.work, ignore_errors=True)
    return 0 if all(v["status"] == "ok" for v in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
