"""Peer: diffusers UNet2DModel in the DDPM CIFAR-10 config (google/ddpm-cifar10-32), a plain PyTorch
training step (eps loss, Adam 2e-4, grad clip 1, EMA 0.9999), batch 128 on random data on the GPU.
Reports images/s for fp32 eager and for bf16 autocast + channels_last + torch.compile, then DDIM-50 s/image.

    python scripts/peers/peer_diffusers.py [fast|eager] [N_SAMPLES]            # as measured in issue 14
    python scripts/peers/peer_diffusers.py fast 8 --device cpu --tiny --steps 3 --warmup 2 --batch 8 --no-compile

A copy of ``../shared/bench/peer_diffusers.py`` (the peer behind issue 14's table; ``../shared/bench/README.md``
says how it was run), kept in the repository because ``../shared`` does not travel to a lent GPU machine
(scripts/gpu_check.py runs this file there). The net, the step's maths and the measurement (10 warm-up steps,
then 100 timed ones, synchronised, images/s = steps * batch / seconds; DDIM-50 on N_SAMPLES images in one batch
after 2 warm-up evaluations) are the original's, unchanged. Added, for scripts/gpu_check.py only, and all off by
default: ``--device cpu`` (the CUDA synchronisations become no-ops, autocast follows the device), ``--tiny`` (a
narrow net mirroring gencli's ``unet_cpu``: channels 32/64/64, one res block per level, attention at 8x8, 8 norm
groups, no dropout), ``--steps/--warmup/--batch``, ``--no-compile`` (``fast`` without torch.compile, for CPU
smoke runs), a final JSON line (``PEER_JSON {...}``) that gpu_check.py reads, ``--profile N`` (N more steps after the
timed ones under torch.profiler, summarised by ``profsum.py``; the timed steps are not profiled), and taking turns at
the GPU after the first 3 (compiling) steps when gpu_check.py runs it beside gencli's measurement (``gpu_turns.py``;
off unless GPU_CHECK_TURN_DIR is set).
"""
# ruff: noqa: E401, E701, E702, I001 - the peer keeps the original's compact layout, so the two read side by side
import argparse, copy, json, sys, time, torch, torch.nn.functional as F
from diffusers import UNet2DModel, DDPMScheduler, DDIMScheduler

torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
dev = "cuda"
TINY = False
TURN_AT = 3  # steps run before taking a turn at the GPU (the compiling ones), when scripts/gpu_check.py shares it


def sync():
    if dev == "cuda": torch.cuda.synchronize()


def make():
    if TINY:  # gencli's unet_cpu, in diffusers' blocks (CPU smoke runs only)
        return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(32, 64, 64), dropout=0.0, norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")).to(dev)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256), dropout=0.1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")).to(dev)


sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


def bench(mode, steps=100, warm=10, B=128, compile_=True, profile_steps=0, turns=None):
    ac = sched.alphas_cumprod.to(dev)
    net = make(); ema = copy.deepcopy(net).eval().requires_grad_(False)
    if mode == "fast": net = net.to(memory_format=torch.channels_last)
    fwd = torch.compile(net) if mode == "fast" and compile_ else net
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    x0 = torch.rand(B, 3, 32, 32, device=dev) * 2 - 1
    ep, np_ = list(ema.parameters()), list(net.parameters())
    def step():
        t = torch.randint(0, 1000, (B,), device=dev); eps = torch.randn_like(x0)
        a = ac[t].view(-1, 1, 1, 1); xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=(mode == "fast")):
            loss = F.mse_loss(fwd(xt, t).sample.float(), eps)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step()
        with torch.no_grad(): torch._foreach_lerp_(ep, np_, 1 - 0.9999)
    for i in range(steps + warm):
        if turns is not None and i == min(TURN_AT, warm): sync(); turns.acquire()  # compiled: the GPU in turns
        if i == warm: sync(); t0 = time.perf_counter()
        step()
    sync(); dt = time.perf_counter() - t0
    params = sum(p.numel() for p in net.parameters())
    print(f"peer diffusers {mode}: params {params/1e6:.2f}M batch {B} images/s {steps*B/dt:.1f} ms/batch {1000*dt/steps:.1f}", flush=True)
    out = {"mode": mode, "params": params, "batch": B, "steps": steps, "warmup": warm,
           "compile": mode == "fast" and compile_, "images_per_s": steps * B / dt, "ms_per_batch": 1000 * dt / steps}
    if profile_steps > 0:  # after the timed steps, so the profiler's overhead is not in them
        try:
            from profsum import lines, step_profiler, summarize
            with step_profiler(dev) as prof:
                for _ in range(profile_steps): step()
            out["profile"] = summarize(prof, profile_steps, dev)
            print("\n".join(lines(out["profile"], f"peer {mode} profile")), flush=True)
        except Exception as e:  # a profile that fails leaves the measurement
            out["profile"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return net, out


def ddim(net, n):
    ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear"); ddim.set_timesteps(50)
    net.eval()
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
        x = torch.randn(2, 3, 32, 32, device=dev)
        for t in ddim.timesteps[:2]: net(x, t)
        sync(); t0 = time.perf_counter(); x = torch.randn(n, 3, 32, 32, device=dev)
        for t in ddim.timesteps: x = ddim.step(net(x, t).sample, t, x).prev_sample
        sync(); dt = time.perf_counter() - t0
    print(f"peer diffusers DDIM-50 bf16 eager: {n} images {dt/n:.4f} s/image", flush=True)
    return {"images": n, "steps": 50, "s_per_image": dt / n}


def main(argv=None):
    global dev, TINY
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="fast", choices=["fast", "eager"])
    p.add_argument("n_samples", nargs="?", type=int, default=0, help="DDIM-50 images after training (0: none)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--profile", type=int, default=0, help="steps to profile after the timed ones (profsum.py)")
    a = p.parse_args(argv)
    dev, TINY = a.device, a.tiny
    from gpu_turns import Turns
    turns = Turns()
    try:
        net, out = bench(a.mode, a.steps, a.warmup, a.batch, compile_=not a.no_compile, profile_steps=a.profile,
                         turns=turns if turns.on else None)
        out.update(turns.info())
        if a.n_samples > 0:
            out["ddim50"] = ddim(net, a.n_samples)
    finally:
        turns.release()
    import diffusers
    out.update(device=dev, tiny=TINY, diffusers=diffusers.__version__, torch=torch.__version__)
    print("PEER_JSON " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
