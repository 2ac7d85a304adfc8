"""scripts/gpu_check.py, the one prepared GPU check of issue 14, runs end to end on a CPU at tiny sizes, and its table
and ratios are computed from whatever the parts measured (a failed or missing measurement is a cell, not a crash)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def load_gpu_check():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return gpu_check


def finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_tiny_cpu_run_writes_the_table_and_json(tmp_path):
    """Every part (a-f, in the default order) and --profile, each part in its worker, within the budget logic: the
    peer beside gencli taking turns (a), the real gencli train / eval on a random CIFAR-10 (e, f), the GAN and
    sampling measurements (b, c), the DDP wrapper (d), and a profile of gencli's and the peer's steps."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--profile", "--out",
                           str(tmp_path), "--work", str(tmp_path / "work")], capture_output=True, text=True,
                          timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    meta = report["meta"]
    for key in ("device", "torch", "lightning", "python", "gencli_commit", "sizes", "date"):
        assert meta.get(key), key
    assert meta["tiny"] is True and meta["device_kind"] == "cpu" and meta["parts"] == list("aebcfd")
    assert all(p["status"] == "ok" for p in report["parts"].values()), report["parts"]
    assert sum(p["seconds"] for p in report["parts"].values()) <= meta["budget_s"]
    derived = report["derived"]

    a = report["parts"]["a"]["results"]
    for key in ("gencli_fast", "peer_fast", "gencli_eager", "peer_eager"):
        assert finite(a[key]["images_per_s"]), key
    assert a["gencli_fast"]["timed_steps"] == a["peer_fast"]["steps"] == 3
    for key in ("gencli_fast", "peer_fast"):  # compiled side by side, then the GPU in turns; profiled after timing
        assert a[key]["waited_ready_s"] >= 0 and a[key]["wait_timed_out"] is False, a[key]
        prof = a[key]["profile"]
        assert prof["steps"] == 2 and prof["aten_ops_per_step"] > 100 and prof["gpu_idle_share"] is None
        assert prof["top"][0]["ms_per_step"] > 0 and prof["top"][0]["name"]
    assert finite(derived["a_ratio_fast"]) and finite(derived["a_ratio_eager"])

    e = report["parts"]["e"]["results"]
    for key, batch in (("ddpm_cli", 8), ("dcgan_cli", 16)):
        tp = e[key]["throughput"]  # the run's own metrics.json
        assert finite(e[key]["images_per_s"]) and e[key]["images_per_s"] == tp["images_per_s"]
        assert tp["warmup_batches"] == 2 and tp["timed_batches"] == 4 and e[key]["batch"] == batch
        assert e[key]["log_line"].startswith("training throughput:")
        assert "hardware=gpu_fast" in e[key]["command"]
    assert e["dcgan_cli"]["throughput"]["optimizer_steps"] == 8  # a D and a G step per batch
    assert finite(derived["e_ratio_ddpm_cli_vs_harness"]) and finite(derived["e_ratio_dcgan_cli_vs_plain_fast"])

    f = report["parts"]["f"]["results"]["eval"]
    assert f["n"] == 64 and f["timing"]["images_generated"] == 64 and finite(f["s_per_image"])
    assert {"generation", "features", "io", "other"} <= set(f["timing"]["shares"])
    assert f["line"].startswith("time:") and "fid_domain" in f["metrics"]

    c = report["parts"]["c"]["results"]
    for setting in ("gencli_fast", "gencli_default"):
        assert c[setting]["sampler"] == "ddim50" and c[setting]["steps"] == 50
        assert finite(c[setting]["s_per_image"]) and finite(c[setting]["net_evals_per_s"])
    b = report["parts"]["b"]["results"]
    for exp in ("dcgan_cifar10", "wgan_gp_cifar10"):
        for setting in ("fast", "eager"):
            gencli, plain = b[f"{exp}_gencli_{setting}"], b[f"{exp}_plain_{setting}"]
            assert finite(gencli["images_per_s"]) and finite(plain["images_per_s"])
            assert gencli["batch"] == plain["batch"] == 16 and gencli["n_critic"] == plain["n_critic"]
            assert finite(derived[f"b_ratio_{exp}_{setting}"])
    assert b["wgan_gp_cifar10_plain_fast"]["n_critic"] == 5
    assert finite(derived["c_speedup_fast_vs_default"]) and finite(derived["d_ratio_ddp_vs_none"])

    table = (tmp_path / "results.md").read_text()
    assert "| part | measurement |" in table and "| c | DDIM-50 sampling" in table and "error:" not in table
    assert table.count("| a |") == 2 and table.count("| b | `") == 4 and table.count("| e |") == 2
    assert table.count("| f |") == 1 and table.count("| d |") == 1
    assert "| gencli gpu_fast |" in table and "| peer fast |" in table and "n/a (CPU)" in table
    assert (tmp_path / "gpu_check.log").read_text().count("[gpu_check]") > 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "results.json", "results.md", "work"]


def test_ratios_mfu_and_table_from_partial_results():
    gpu_check = load_gpu_check()
    args = type("A", (), {"tiny": False})()
    report = {
        "meta": {"device": "NVIDIA H100 80GB HBM3", "device_kind": "cuda", "tiny": False, "compile": True,
                 "torch": "2.11.0", "lightning": "2.6.6", "cuda": "13.0", "cudnn": 91000, "python": "3.12.3",
                 "gencli_commit": "abc", "date": "today", "peak_tflops": 790.0, "parts": ["a", "c", "d"],
                 "sizes": gpu_check.sizes(args)},
        "parts": {
            "a": {"status": "timeout", "error": "stopped", "seconds": 270.0, "budget_s": 270.0, "results": {
                "gencli_fast": {"images_per_s": 1897.5, "params": 35_746_307, "wall_s": 80},
                "peer_fast": {"images_per_s": 1967.8, "ddim50": {"s_per_image": 0.004, "images": 256}, "wall_s": 90},
                "gencli_eager": {"error": "RuntimeError: boom", "traceback": "...", "wall_s": 3},
                "flops": {"gencli_forward_gflop_per_image": 12.4, "peer_forward_gflop_per_image": 12.4},
            }},
            "c": {"status": "ok", "error": None, "seconds": 20.0, "budget_s": 60.0, "results": {
                "gencli_fast": {"s_per_image": 0.003, "wall_s": 5}, "gencli_default": {"s_per_image": 0.009}}},
            "d": {"status": "ok", "error": None, "seconds": 90.0, "budget_s": 150.0, "results": {
                "no_ddp": {"images_per_s": 2000.0}, "ddp": {"images_per_s": 1900.0, "strategy": "DDPStrategy"}}},
        },
    }
    report["derived"] = d = gpu_check.derive(report)
    assert d["a_ratio_fast"] == pytest.approx(1897.5 / 1967.8)
    assert d["a_mfu_gencli_fast"] == pytest.approx(3 * 12.4e9 * 1897.5 / 790e12)  # ~8.9%, issue 14's 9%
    assert "a_ratio_eager" not in d  # one side failed, the other was never measured
    assert d["c_speedup_fast_vs_default"] == pytest.approx(3.0)
    assert d["c_speedup_fast_vs_issue_baseline"] == pytest.approx(3.0)
    assert d["d_ratio_ddp_vs_none"] == pytest.approx(0.95)
    table = gpu_check.markdown(report)
    rows = [line for line in table.splitlines() if line.startswith("| a |")]
    assert len(rows) == 2 and "| 1897.5 | 1967.8 | 0.96 |" in rows[0] and "MFU gencli 8.9%" in rows[0]
    assert "error: RuntimeError: boom" in rows[1] and "peer not measured" in rows[1]
    assert "wrapper cost 5.0%" in table and "peer DDIM-50 bf16 eager: 0.0040" in table
    assert "| b |" not in table and "NVIDIA H100 80GB HBM3" in table and "torch 2.11.0" in table
    assert "part a (diffusion training: gencli vs the diffusers peer): timeout" in table


def test_plan_budget_keeps_the_later_parts_reserves_and_skips_what_no_longer_fits():
    gpu_check = load_gpu_check()
    table = {"a": (200, 100, 100), "e": (100, 50, 50), "d": (80, 40, 0)}
    assert gpu_check.plan_budget("a", ["e", "d"], 500, table) == 200  # its cap
    assert gpu_check.plan_budget("a", ["e", "d"], 220, table) == 170  # leaves e's reserve; d reserves nothing
    assert gpu_check.plan_budget("a", ["e", "d"], 120, table) == 100  # squeezed to its least, e pays
    assert gpu_check.plan_budget("a", ["e", "d"], 90, table) == 0  # its least no longer fits: skip
    assert gpu_check.plan_budget("d", [], 60, table) == 57
    assert gpu_check.plan_budget("a", [], 400, table) == 397  # alone (a rerun): no cap, all that is left
    assert gpu_check.plan_budget("e", ["d"], 400, table) == 100  # d reserves nothing, but e keeps its cap


def test_a_slow_compile_squeezes_later_parts_which_are_skipped_and_recorded(tmp_path, monkeypatch):
    """The orchestrator with a fake worker whose compiling takes longer than planned: each part stays inside its
    budget, later parts get less or are skipped, every part is in results.json, and the run ends inside --budget."""
    gpu_check = load_gpu_check()
    monkeypatch.setitem(gpu_check.PART_BUDGET, "cpu", {"a": (3.0, 1.0, 1.0), "e": (2.0, 1.0, 1.0),
                                                       "b": (2.0, 1.0, 1.0), "c": (2.0, 1.5, 1.5)})
    budgets = {}

    def fake_run_part(part, args, budget, out, log):
        budgets[part] = budget
        compile_s = 5.0  # a compile slower than any cap: the part is stopped at its budget
        import time as _time

        _time.sleep(min(compile_s, budget))
        return {"status": "timeout", "error": f"stopped at its {budget:.0f} s budget", "seconds": budget,
                "budget_s": budget, "results": {"x": {"images_per_s": 1.0, "wall_s": budget}}}

    monkeypatch.setattr(gpu_check, "run_part", fake_run_part)
    monkeypatch.setattr(gpu_check, "collect_meta", lambda args: {
        "device": "cpu", "device_kind": "cpu", "tiny": True, "compile": False, "torch": "x", "lightning": "x",
        "python": "x", "gencli_commit": "x", "date": "x", "parts": args.parts, "sizes": gpu_check.sizes(args)})
    import time

    t0 = time.perf_counter()
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--parts", "a,e,b,c", "--budget", "9.5", "--out",
                         str(tmp_path), "--work", str(tmp_path / "work")])
    wall = time.perf_counter() - t0
    report = json.loads((tmp_path / "results.json").read_text())
    assert rc == 1 and wall < 9.5 + 1.5
    assert budgets["a"] == pytest.approx(3.0, abs=0.05)  # its cap: 9.5 - reserves 3.5 = 6 > 3
    assert budgets["e"] <= 2.0 and budgets["b"] <= budgets["e"]
    assert report["parts"]["c"]["status"] == "skipped" and "s of --budget left" in report["parts"]["c"]["error"]
    assert {p["status"] for k, p in report["parts"].items() if k != "c"} == {"timeout"}
    table = (tmp_path / "results.md").read_text()
    assert "part c (DDIM-50 sampling: gpu_fast vs default): skipped" in table


def test_recorder_skips_a_measurement_that_no_longer_fits(tmp_path):
    gpu_check = load_gpu_check()
    import time

    rec = gpu_check.Recorder(tmp_path / "r.json", time.time() + 120)
    assert rec("big", lambda: {"v": 1}, need=300) is None
    assert rec("small", lambda: {"v": 2}, need=1)["v"] == 2
    saved = json.loads((tmp_path / "r.json").read_text())
    assert "needs ~300 s" in saved["big"]["skipped"] and saved["small"]["v"] == 2
    assert gpu_check.err(saved["big"]).startswith("skipped: needs ~300 s")


def test_the_timed_window_starts_after_the_wait_for_the_gpu():
    """gencli's measurement beside the peer's waits for its turn at the GPU after its compiling steps: that wait is
    never timed, even when the warm-up is as short as the compiling steps (the tiny run's)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    sys.path.insert(0, str(ROOT / "scripts" / "peers"))
    try:
        import lightning as L
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        from bench_diffusion import WindowClock
        from benchlib import bench_trainer
    finally:
        sys.path.remove(str(ROOT / "scripts"))
        sys.path.remove(str(ROOT / "scripts" / "peers"))
    import time

    class SlowTurns:
        def acquire(self):
            time.sleep(1.0)

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    for warmup in (2, 5):
        clock = WindowClock(warmup, steps=3, profile_steps=2, turns=SlowTurns(), turn_at=3)
        loader = DataLoader(TensorDataset(torch.randn(40, 2), torch.zeros(40)), batch_size=4)
        bench_trainer("cpu", "32-true", clock).fit(Tiny(), train_dataloaders=loader)
        assert clock.timed == 3 and clock.stop - clock.start < 0.5, warmup
        assert clock.profile["steps"] == 2 and clock.profile["aten_ops_per_step"] > 0


def test_profile_summary_on_a_gpu_counts_kernels_launches_and_idle_time():
    """profsum.summarize's GPU branch, fed the profiler's own event type (FunctionEvent with CUDA device events), so
    its arithmetic is checked here before a GPU runs it: 2 steps over a 10 ms window, kernels busy 6 ms of it
    (overlapping kernels counted once), a memcpy that is device time but not a kernel, and the launch calls."""
    sys.path.insert(0, str(ROOT / "scripts" / "peers"))
    try:
        import profsum
    finally:
        sys.path.remove(str(ROOT / "scripts" / "peers"))
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def ev(name, start_ms, end_ms, device=DeviceType.CPU):
        return FunctionEvent(id=0, name=name, thread=0, start_us=start_ms * 1e3, end_us=end_ms * 1e3,
                             device_type=device)

    gpu = DeviceType.CUDA
    events = [ev("aten::conv2d", 0, 10), ev("cudaLaunchKernel", 0.1, 0.2), ev("cudaLaunchKernel", 0.3, 0.4),
              ev("cuLaunchKernel", 0.5, 0.6), ev("cudaGraphLaunch", 0.7, 0.8),
              ev("sm90_xmma_gemm", 1, 4, gpu), ev("triton_poi_fused_add_0", 3, 5, gpu),  # overlap: 1..5 busy
              ev("sm90_xmma_gemm", 6, 7, gpu), ev("Memcpy HtoD (Pageable -> Device)", 8, 9, gpu)]

    class Prof:
        wall_s = 0.01

        def events(self):
            return events

    s = profsum.summarize(Prof(), 2, "cuda")
    assert s["window_ms"] == pytest.approx(10) and s["step_ms_under_profiler"] == pytest.approx(5)
    assert s["gpu_busy_ms_per_step"] == pytest.approx(3)  # (4 + 1 + 1) ms / 2 steps
    assert s["gpu_idle_share"] == pytest.approx(0.4)
    assert s["kernels_per_step"] == 1.5 and s["device_ops_per_step"] == 2
    assert s["launch_calls_per_step"] == 2 and s["cuda_graph_launches_per_step"] == 0.5
    assert s["top"][0]["name"] == "sm90_xmma_gemm" and s["top"][0]["ms_per_step"] == pytest.approx(2)
    assert s["top"][0]["share_of_busy"] == pytest.approx(4 / 6)
    text = "\n".join(profsum.lines(s, "gencli"))
    assert "GPU idle 40.0%" in text and "sm90_xmma_gemm" in text
