"""What ``hardware=`` does to sampling (``gencli sample``, ``gencli eval``): the sampling side of
:class:`gencli.hardware.HardwareSettings`.

Training applies a profile to the whole LightningModule (:meth:`HardwareSettings.apply`). Sampling applies it
only to the nets that sample (:func:`sampling_nets`: the EMA denoiser of a diffusion model, the EMA generator of
a GAN, an autoencoder's decoder and encoder), and only while :func:`sampling_hardware` is entered:

- ``precision``: ``bf16-mixed`` (and ``bf16-true``) runs each call of the net under ``torch.autocast`` in
  bfloat16, ``16-mixed``/``16-true`` in float16; ``32``/``64`` leave it in float32. Only the net: its output is
  cast back to float32, so the sampler's arithmetic (x_t, the schedule, the noise of every step) stays float32,
  images stay float32 in [-1, 1], and image i's noise is drawn exactly as before (:mod:`gencli.seeds`).
- ``matmul_precision``: set while the net runs, not for the process, so that feature extraction for FID
  (``gencli eval``) keeps float32 matmuls whatever the profile.
- ``channels_last``: the net's 4-d weights, and the 4-d inputs of each call, in channels-last layout.
- ``compile`` / ``compile_mode``: the net's ``forward`` compiled by ``torch.compile`` (an instance attribute:
  ``state_dict`` keys are unchanged). Under the CUDA-graph modes (``reduce-overhead``, ``max-autotune``) the output
  is copied out of the graph's buffers, which the next step would overwrite while the sampler still holds it.

Everything is undone when the context ends. The ``default`` profile (float32, highest matmul precision, no
channels-last, no compile) changes nothing: the nets are not wrapped at all.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from gencli.metrics.timing import timed

#: precision -> the autocast dtype the sampling nets run in (None: float32 as they are).
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "transformer-engine": torch.bfloat16,
                   "16-mixed": torch.float16, "16-true": torch.float16}
#: torch.compile modes that capture CUDA graphs (whose output buffers are reused by the next replay).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def sampling_nets(model: nn.Module, use_ema: bool | None = None) -> dict[str, nn.Module]:
    """The nets ``model`` samples with, by attribute name: ``sampling_net(use_ema)`` where the family has one
    (diffusion: the EMA net by default; GAN: the EMA generator), else the decoder and encoder (ae, vae)."""
    names = {id(module): name for name, module in model.named_children()}
    chosen = getattr(model, "sampling_net", None)
    if callable(chosen):
        nets = [chosen(use_ema)]
    else:
        nets = [getattr(model, name) for name in ("decoder", "encoder") if isinstance(getattr(model, name, None),
                                                                                   nn.Module)]
        if not nets:  # any other family: its nets with weights, as HardwareSettings.apply compiles them
            nets = [child for name, child in model.named_children() if name != "first_stage"
                    and next(child.parameters(), None) is not None]
    return {names.get(id(net), type(net).__name__): net for net in nets}


def autocast_dtype(precision: str) -> torch.dtype | None:
    return AUTOCAST_DTYPES.get(str(precision))


def changes_anything(settings) -> bool:
    """Whether sampling with ``settings`` differs from plain float32 eager sampling."""
    return (autocast_dtype(settings.precision) is not None or settings.matmul_precision != "highest"
            or bool(settings.channels_last) or bool(settings.compile))


def mismatch(settings, device: torch.device | str, profile: str | None = None) -> str | None:
    """A warning when a GPU profile samples on a CPU (``hardware=gpu_fast`` without a GPU), else None: sampling
    works, but slower or with other numbers than the profile promises (as :meth:`HardwareSettings.mismatch` warns a
    CPU trainer). Only the settings that sampling uses are named."""
    device = torch.device(device)
    if device.type != "cpu":
        return None
    found = []
    dtype = autocast_dtype(settings.precision)
    if dtype is not None:
        found.append(f"precision={settings.precision} ({str(dtype).removeprefix('torch.')} autocast on a CPU is rarely "
                     "faster and changes the numbers)")
    if settings.compile:
        found.append("compile=true (torch.compile on a CPU spends its first batch compiling C++ kernels and gains "
                     "little for small nets)")
    if not found:
        return None
    name = f"hardware={profile}" if profile else "the hardware settings"
    return (f"{name} is made for a GPU but sampling runs on the CPU: {'; '.join(found)}. On a CPU use "
            "hardware=cpu_fast (or hardware=default); on a GPU machine device=auto picks the GPU.")


def _to_float32(out: Any, copy: bool) -> Any:
    """The net's output as float32 (a copy when ``copy``: out of a CUDA graph's reused buffers)."""
    if isinstance(out, Tensor):
        if out.is_floating_point() and out.dtype != torch.float32:
            return out.float()
        return out.clone() if copy else out
    if isinstance(out, tuple | list):
        return type(out)(_to_float32(o, copy) for o in out)
    return out


def _channels_last(arg: Any) -> Any:
    if isinstance(arg, Tensor) and arg.dim() == 4 and arg.is_floating_point():
        return arg.contiguous(memory_format=torch.channels_last)
    return arg


def wrap_forward(net: nn.Module, device: torch.device, dtype: torch.dtype | None, matmul_precision: str,
                 channels_last: bool, compile_mode: str | None, name: str | None = None,
                 report: dict[str, str] | None = None) -> None:
    """Replace ``net.forward`` (an instance attribute; undone by :func:`unwrap_forward`) with one that runs the
    original, compiled when ``compile_mode`` is given, under the profile's autocast and matmul precision.

    A compiled forward goes through :class:`gencli.hardware.CompileGuard`: if torch.compile fails on it, the call
    runs again eagerly, the net samples eagerly from then on and ``report[name]`` says ``fell back (reason)``. Its
    first call (where it compiles) counts as setup in the job's time split, not as generation."""
    from gencli.hardware import CompileGuard, compile_backend

    original = net.forward
    inner: Any = original
    first_call = [False]
    if compile_mode is not None:
        compiled = torch.compile(original, mode=None if compile_mode == "default" else compile_mode,
                                 **({"backend": compile_backend} if compile_backend is not None else {}))
        current = [compiled]

        def install(fn: Any) -> None:
            current[0] = fn if fn is not None else original

        guard = CompileGuard(net, name or type(net).__name__, compiled, original, install,
                             report if report is not None else {}, channels_last, probe_backward=False)
        current[0] = guard
        first_call[0] = True

        def inner(*args: Any, **kwargs: Any) -> Any:
            return current[0](*args, **kwargs)
    copy = compile_mode in CUDA_GRAPH_MODES and device.type == "cuda"
    autocast = (functools.partial(torch.autocast, device_type=device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext)

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if channels_last:
            args = tuple(_channels_last(a) for a in args)
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(matmul_precision)
        compiling = first_call[0]
        first_call[0] = False
        try:
            with timed("setup") if compiling else contextlib.nullcontext(), autocast():
                out = inner(*args, **kwargs)
        finally:
            torch.set_float32_matmul_precision(previous)
        return _to_float32(out, copy)

    forward.gencli_sampling = True  # what unwrap_forward looks for
    net.forward = forward


def unwrap_forward(net: nn.Module) -> None:
    if getattr(net.__dict__.get("forward"), "gencli_sampling", False):
        del net.forward


@contextlib.contextmanager
def sampling_hardware(settings, model: nn.Module, device: torch.device | str | None = None,
                      use_ema: bool | None = None, profile: str | None = None) -> Iterator[dict[str, Any]]:
    """Sample from ``model`` with the ``settings`` of a hardware profile while the context lasts; yields what it
    applied (for sample.json / metrics.json). ``settings`` is a :class:`gencli.hardware.HardwareSettings` or None
    (nothing applied)."""
    from gencli.hardware import HardwareSettings, fallback_summary

    settings = settings if settings is not None else HardwareSettings()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = autocast_dtype(settings.precision)
    nets = sampling_nets(model, use_ema) if changes_anything(settings) else {}
    compile_mode = settings.compile_mode if settings.compile else None
    info = {
        "profile": profile, "device": str(device), "precision": settings.precision,
        "autocast": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "matmul_precision": settings.matmul_precision, "channels_last": bool(settings.channels_last),
        "compile": bool(settings.compile), "compile_mode": compile_mode, "nets": sorted(nets),
        "outputs": "float32 (the nets' outputs are cast back; the sampler's arithmetic and noise stay float32)",
    }
    wrapped: list[nn.Module] = []
    report: dict[str, str] = {}
    try:
        with timed("setup"):
            for name, net in nets.items():
                if settings.channels_last:
                    net.to(memory_format=torch.channels_last)
                wrap_forward(net, device, dtype, settings.matmul_precision, bool(settings.channels_last), compile_mode,
                             name, report)
                wrapped.append(net)
        yield info
    finally:
        fell_back = fallback_summary(report)
        if fell_back:  # "fell back (reason)": the net samples eagerly, and why
            info["compile"] = fell_back
            info["compile_nets"] = dict(report)
        for net in wrapped:
            unwrap_forward(net)
            if settings.channels_last:
                net.to(memory_format=torch.contiguous_format)
