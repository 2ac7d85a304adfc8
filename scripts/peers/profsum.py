"""A torch.profiler summary per training step, the same for gencli and the peer (scripts/gpu_check.py --profile).

    with step_profiler(device) as prof:      # around N training steps, the device synchronised at both ends
        ... N steps ...
    summary = summarize(prof, N, device)

On a GPU: the top kernels by GPU time (total and per step, share of the GPU's busy time), the GPU's idle share of the
profiled window (1 - the union of every kernel/memcpy/memset interval / the window from the first to the last event),
device kernels per step and kernel-launch API calls per step (cudaLaunchKernel, cuLaunchKernel, ...; a CUDA graph
replays many kernels with one cudaGraphLaunch), step time under the profiler. On a CPU (no device activity): the top
operators by self CPU time and aten operator calls per step, with no idle share. The profiler's own overhead makes the
step time here longer than the timed measurement's; the counts and shares are what to compare.
"""

from __future__ import annotations

import contextlib
import time

LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel", "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def step_profiler(device: str):
    """torch.profiler over the enclosed steps (CPU activity, plus CUDA on a GPU), synchronised at both ends."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    _sync(device)
    with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
        prof.wall_start = time.perf_counter()
        yield prof
        _sync(device)
        prof.wall_s = time.perf_counter() - prof.wall_start


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(prof, steps: int, device: str, top: int = 10) -> dict:
    """The numbers of one profiled window of ``steps`` training steps (see the module's docstring)."""
    steps = max(int(steps), 1)
    events = list(prof.events())
    cpu, dev = [], []
    for e in events:
        kind = str(getattr(e, "device_type", "CPU")).rsplit(".", 1)[-1]
        (cpu if kind == "CPU" else dev).append(e)
    out: dict = {"steps": steps, "profiler_wall_s": round(getattr(prof, "wall_s", 0.0), 4)}
    if events:
        t0 = min(e.time_range.start for e in events)
        t1 = max(e.time_range.end for e in events)
        out["window_ms"] = (t1 - t0) / 1e3
        out["step_ms_under_profiler"] = (t1 - t0) / 1e3 / steps
    if device == "cuda":
        busy = _union_us([(e.time_range.start, e.time_range.end) for e in dev])
        by_name: dict[str, list[float]] = {}
        for e in dev:
            agg = by_name.setdefault(e.name, [0.0, 0])
            agg[0] += e.time_range.end - e.time_range.start
            agg[1] += 1
        kernels = [e for e in dev if not e.name.lower().startswith(("memcpy", "memset"))]
        launches = sum(1 for e in cpu if e.name in LAUNCH_CALLS)
        graph_launches = sum(1 for e in cpu if e.name == "cudaGraphLaunch")
        window = out.get("window_ms", 0.0) * 1e3
        out.update(
            gpu_busy_ms_per_step=busy / 1e3 / steps,
            gpu_idle_share=(1 - busy / window) if window > 0 else None,
            kernels_per_step=len(kernels) / steps,
            device_ops_per_step=len(dev) / steps,
            launch_calls_per_step=launches / steps,
            cuda_graph_launches_per_step=graph_launches / steps,
            top=[{"name": name[:120], "ms_per_step": us / 1e3 / steps, "calls_per_step": n / steps,
                  "share_of_busy": us / busy if busy else None}
                 for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
        )
        if not dev:
            out["note"] = "the profiler recorded no GPU activity (CUPTI unavailable?)"
    else:
        ops = [e for e in cpu if e.name.startswith("aten::")]
        by_name = {}
        for e in cpu:
            agg = by_name.setdefault(e.name, [0.0, 0])
            agg[0] += float(getattr(e, "self_cpu_time_total", 0.0))
            agg[1] += 1
        total = sum(v[0] for v in by_name.values())
        out.update(
            gpu_idle_share=None,
            aten_ops_per_step=len(ops) / steps,
            cpu_events_per_step=len(cpu) / steps,
            top=[{"name": name[:120], "ms_per_step": us / 1e3 / steps, "calls_per_step": n / steps,
                  "share_of_cpu": us / total if total else None}
                 for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
        )
    return out


def lines(summary: dict, who: str) -> list[str]:
    """A few printable lines of a summary."""
    if not summary:
        return [f"{who}: no profile"]
    if summary.get("error"):
        return [f"{who}: profile failed: {summary['error']}"]
    head = f"{who}: {summary.get('step_ms_under_profiler', float('nan')):.2f} ms/step under the profiler"
    if "kernels_per_step" in summary:
        idle = summary.get("gpu_idle_share")
        head += (f", GPU idle {100 * idle:.1f}%" if idle is not None else "") + (
            f", {summary['kernels_per_step']:.0f} kernels/step, {summary['launch_calls_per_step']:.0f} launch "
            f"calls/step ({summary.get('cuda_graph_launches_per_step', 0):.0f} CUDA graph launches)")
    else:
        head += f", {summary.get('aten_ops_per_step', 0):.0f} aten ops/step (CPU: no GPU idle share)"
    out = [head]
    for t in summary.get("top", [])[:8]:
        share = t.get("share_of_busy", t.get("share_of_cpu"))
        out.append(f"    {t['ms_per_step']:8.3f} ms/step {t['calls_per_step']:7.1f} calls/step "
                   f"{'' if share is None else f'{100 * share:5.1f}%'}  {t['name']}")
    return out
