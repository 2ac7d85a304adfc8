"""The compile guard (gencli.hardware.CompileGuard, issue 24 item 1): a net that torch.compile fails on, while
compiling or in its first compiled step's forward or backward pass, runs that call again eagerly and trains on
eagerly, with one paragraph printed and the fallback recorded; the weights are those of an eager run.

Inductor's real failure (a stride assertion in a channels-last convolution_backward on a GPU, pytorch/pytorch#171622)
has no CPU stand-in, so the backends here fail on purpose: one while compiling (the forward never runs compiled), one
whose compiled backward raises the same kind of AssertionError at run time (the forward ran compiled, so the guard
must put the batch-norm statistics back)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

from gencli import hardware
from gencli.hardware import (
    GUARDED_CALLS,
    CompileGuard,
    HardwareSettings,
    compile_record,
    failure_reason,
    is_compile_failure,
)
from gencli.nets.dcgan import DCGANDiscriminator, DCGANGenerator

STRIDE_ERROR = "expected size 256==256, stride 16==1 at dim=1; expected size 4==4, stride 4==1024 at dim=2"


def fails_to_compile(gm, example_inputs):
    raise RuntimeError("this backend cannot compile\nsecond line")


def _failing_backward(gm, example_inputs):
    def run(args):
        raise AssertionError(f"{STRIDE_ERROR}\nError in op: torch.ops.aten.convolution_backward.default")

    run._boxed_call = True  # AOTAutograd's calling convention (functorch.compile.make_boxed_func)
    return run


#: forward compiled as traced (runs), backward "compiled" into a function that raises at run time, as Inductor's
#: generated backward does when its stride assertion fails
fails_in_backward = aot_autograd(fw_compiler=lambda gm, example_inputs: gm, bw_compiler=_failing_backward)


class Pair(torch.nn.Module):
    """A tiny DCGAN pair with batch norm on both sides (buffers a half-run compiled call would have updated)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.generator = DCGANGenerator(8, 3, 8, base_channels=4)
        self.discriminator = DCGANDiscriminator(3, 8, base_channels=4, norm="batch")


def train_steps(model: torch.nn.Module, steps: int = 3) -> dict[str, torch.Tensor]:
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model.discriminator(model.generator(torch.randn(4, 8, generator=g))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


@pytest.fixture
def backend(monkeypatch):
    def use(fn):
        monkeypatch.setattr(hardware, "compile_backend", fn)
        torch._dynamo.reset()

    yield use
    torch._dynamo.reset()


@pytest.mark.parametrize("failing, where", [(fails_to_compile, "its first compiled call"),
                                            (fails_in_backward, "the backward pass of its first compiled call")])
def test_a_net_that_fails_to_compile_trains_on_eagerly(backend, caplog, failing, where):
    backend(failing)
    eager = train_steps(Pair())
    model = HardwareSettings(compile=True, channels_last=False).apply(Pair())
    keys = list(model.state_dict())
    with caplog.at_level(logging.WARNING, logger="gencli.hardware"):
        got = train_steps(model)
    # the same weights and batch-norm statistics as the eager run, bit for bit, under the same state_dict keys
    assert list(got) == keys == list(eager)
    for key in eager:
        assert torch.equal(got[key], eager[key]), key
    # each net eager from here on (nn.Module's own eager path: no guard left in front of it)
    assert model.generator._compiled_call_impl is None and model.discriminator._compiled_call_impl is None
    # one paragraph per net, naming the net, where it failed, the error's first line and the setting that silences it
    messages = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(messages) == 2
    for name, message in zip(("generator", "discriminator"), messages):
        assert f"'{name}'" in message and where in message and "hardware.compile=false" in message
        assert "\n" not in message
    reason = "RuntimeError: this backend cannot compile" if failing is fails_to_compile else \
        f"AssertionError: {STRIDE_ERROR}"
    assert reason in messages[0] and "second line" not in messages[0] and "Error in op" not in messages[0]
    record = compile_record(model)
    assert record["compile"].startswith("fell back (generator: ") and "; discriminator: " in record["compile"]
    assert record["compile_nets"]["generator"].startswith(f"fell back ({reason}")
    json.dumps(record)  # goes into metrics.json as it is


def test_the_stride_assertion_under_channels_last_names_the_torch_issue(backend, caplog):
    backend(fails_in_backward)
    model = HardwareSettings(compile=True, channels_last=True).apply(Pair())
    with caplog.at_level(logging.WARNING, logger="gencli.hardware"):
        train_steps(model, steps=1)
    assert "pytorch/pytorch#171622" in caplog.text and "hardware.channels_last=false" in caplog.text


def test_a_net_that_compiles_keeps_compiling(backend, caplog):
    backend("eager")  # Dynamo's capture without a compiler: works, fast
    model = HardwareSettings(compile=True).apply(Pair())
    with caplog.at_level(logging.WARNING, logger="gencli.hardware"):
        got = train_steps(model, steps=GUARDED_CALLS + 1)
    assert "torch.compile failed" not in caplog.text
    # the guard's trials (a forward and backward before each new kind of call) leave no trace: batch-norm statistics
    # and weights are those of an eager run
    eager = train_steps(Pair(), steps=GUARDED_CALLS + 1)
    for key in eager:
        torch.testing.assert_close(got[key], eager[key], rtol=1e-5, atol=1e-6, msg=key)
    assert compile_record(model) == {"compile": "compiled",
                                     "compile_nets": {"generator": "compiled", "discriminator": "compiled"}}
    for net in (model.generator, model.discriminator):  # after the watched calls: still guarded, trials over
        assert isinstance(net._compiled_call_impl, CompileGuard) and net._compiled_call_impl.calls_left <= 0
    assert compile_record(torch.nn.Linear(2, 2)) == {"compile": False}
    model.compile_report["discriminator"] = "eager (model.loss=wgan_gp)"  # what the GAN family records for WGAN-GP
    assert compile_record(model)["compile"] == "compiled (except discriminator: eager (model.loss=wgan_gp))"


def test_the_nets_own_errors_are_not_swallowed(backend):
    """An error the eager net raises too (here: labels given to an unconditional generator) propagates as it is."""
    backend("eager")
    model = HardwareSettings(compile=True).apply(Pair())
    with pytest.raises(ValueError, match="unconditional generator"):
        model.generator(torch.randn(2, 8), torch.zeros(2, dtype=torch.long))


def test_what_counts_as_a_compile_failure(backend):
    from torch._dynamo.exc import BackendCompilerFailed

    def raises_stride_error(gm, example_inputs):
        raise AssertionError(f"{STRIDE_ERROR}\nError in op: torch.ops.aten.convolution_backward.default")

    try:
        raise AssertionError("plain code")
    except AssertionError as err:  # raised outside torch's compiler: the net's own
        assert not is_compile_failure(err)
    assert not is_compile_failure(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_compile_failure(KeyboardInterrupt())
    with pytest.raises(BackendCompilerFailed) as failed:
        torch.compile(torch.sin, backend=raises_stride_error)(torch.ones(2))
    assert is_compile_failure(failed.value)
    assert failure_reason(failed.value) == (f"AssertionError: {STRIDE_ERROR} (in torch.compile's backend "
                                            "raises_stride_error)")
    assert failure_reason(RuntimeError("heading:\n  the cause\nmore")) == "RuntimeError: heading: the cause"
    assert len(failure_reason(RuntimeError("x" * 1000))) == 300


def test_sampling_with_a_net_that_fails_to_compile(backend, caplog):
    """gencli sample / eval: the sampling net falls back too, and sample.json's hardware says so."""
    from gencli.sampling_hardware import sampling_hardware

    backend(fails_to_compile)

    class Sampler(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.decoder = DCGANGenerator(8, 3, 8, base_channels=4)

    model = Sampler().eval()
    z = torch.randn(3, 8)
    with torch.no_grad():
        eager = model.decoder(z)
        with caplog.at_level(logging.WARNING, logger="gencli.hardware"), \
                sampling_hardware(HardwareSettings(compile=True), model, "cpu") as info:
            first, second = model.decoder(z), model.decoder(z)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert info["compile"] == "fell back (RuntimeError: this backend cannot compile (in torch.compile's backend " \
                              "fails_to_compile))"
    assert info["compile_nets"] == {"decoder": info["compile"]}
    assert caplog.text.count("torch.compile failed") == 1 and "'decoder'" in caplog.text
    assert "forward" not in model.decoder.__dict__  # undone


def _eager_paragraphs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]


def test_a_nets_own_error_under_compile_stays_its_own_and_the_net_stays_compiled(backend, caplog):
    """A ValueError of the net's own (labels given to an unconditional generator) passes through Dynamo's frames, so
    it looks like a compile failure; the eager retry raises it too, so it is the net's: it propagates as the eager net
    raises it, nothing is recorded, and the net stays compiled (it used to be switched to eager for good while
    compile_report still said 'compiled'). The same after the watched calls."""
    backend("eager")
    model = HardwareSettings(compile=True).apply(Pair())
    labels = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError) as eager_error:
        Pair().generator(torch.randn(2, 8), labels)
    with caplog.at_level(logging.WARNING, logger="gencli.hardware"):
        with pytest.raises(ValueError) as compiled_error:
            model.generator(torch.randn(2, 8), labels)
        assert str(compiled_error.value) == str(eager_error.value)
        assert isinstance(model.generator._compiled_call_impl, CompileGuard)
        train_steps(model, steps=GUARDED_CALLS + 1)  # past the watched calls
        with pytest.raises(ValueError, match="unconditional generator"):
            model.generator(torch.randn(2, 8), labels)
    assert isinstance(model.generator._compiled_call_impl, CompileGuard)
    assert model.generator._compiled_call_impl.fell_back is None
    assert _eager_paragraphs(caplog) == []
    assert compile_record(model)["compile"] == "compiled"


def test_a_backend_that_fails_on_a_later_new_graph_falls_back(backend, caplog):
    """New graphs are compiled after the watched calls too (validation's eval-mode graph after the first epoch, a
    partial last batch's new shape, sampling through a compiled generator): a compile failure there falls back with
    the paragraph instead of ending the run."""
    armed = [False]

    def fails_later(gm, example_inputs):
        if armed[0]:
            raise RuntimeError("this backend cannot compile the later graph")
        return gm.forward

    backend(fails_later)
    model = HardwareSettings(compile=True).apply(Pair())
    train_steps(model, steps=GUARDED_CALLS + 1)
    armed[0] = True
    with caplog.at_level(logging.WARNING, logger="gencli.hardware"), torch.no_grad():
        model.eval()
        z = torch.randn(3, 8)  # eval mode and a new batch size: new graphs
        first = model.generator(z)
        second = model.generator(z)  # eager from here on
        score = model.discriminator(second)
    assert torch.equal(first, second) and score.shape[0] == 3
    messages = _eager_paragraphs(caplog)
    assert len(messages) == 2 and "'generator'" in messages[0] and "'discriminator'" in messages[1]
    assert "a later compiled call" in messages[0] and "cannot compile the later graph" in messages[0]
    assert model.generator._compiled_call_impl is None
    assert compile_record(model)["compile"].startswith("fell back (generator: RuntimeError: this backend cannot")


def test_the_guard_stays_in_front_of_the_net_cheaply(backend):
    """After the watched calls the guard stays, as a bare try/except around the compiled call: no trial, no copy."""
    backend("eager")
    model = HardwareSettings(compile=True).apply(Pair())
    train_steps(model, steps=GUARDED_CALLS + 1)
    guard = model.discriminator._compiled_call_impl
    assert isinstance(guard, CompileGuard) and guard.calls_left <= 0
    calls = []
    guard._trial = lambda *a: calls.append(a)  # would be a trial
    train_steps(model, steps=2)
    assert calls == []
