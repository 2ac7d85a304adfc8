"""Preemption: a signal to stop saves the state after the current training step, then the run exits.

Clusters preempt jobs with SIGTERM (SLURM sends SIGUSR1 first when asked with ``--signal``), people
press Ctrl+C, and a script that restarts a killed run expects to lose nothing. During training this
callback replaces the handlers of ``signals`` (SIGTERM, SIGUSR1 and SIGINT by default): a signal only
sets a flag, the current step finishes (weights are never saved half-updated), and at the step
boundary the run

1. writes ``last.ckpt`` (the model, optimiser, schedules, EMA, counters, random state and data
   position: ``gencli train ... resume=auto`` continues from exactly this step),
2. on SLURM, for the requeue signal, requeues the job (``scontrol requeue``) as Lightning's
   auto-requeue does (``requeue_on_slurm``),
3. stops with :class:`gencli.errors.Interrupted`: one paragraph saying where the checkpoint is and how
   to continue, and exit code 128 + the signal number (143 for SIGTERM, 130 for Ctrl+C, 138 for
   SIGUSR1), so a wrapper script knows the run did not finish. ``metrics.json`` says
   ``"status": "interrupted"``.

A second Ctrl+C stops at once (Lightning's KeyboardInterrupt handling; nothing more is saved).
Under DDP every rank agrees at every step on whether any rank was signalled (one all-reduce of a
flag), so all ranks save together and stop at the same step; rank 0 forwards SIGTERM/SIGUSR1 to the
ranks it launched, as Lightning does. A SIGTERM that arrives before training starts (while data
loads) is honoured at the first step.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L

from gencli.errors import ConfigError, Interrupted

log = logging.getLogger(__name__)

#: What each signal usually means, for the message.
MEANING = {"SIGTERM": "a termination request (a scheduler preempting the job, or kill)",
           "SIGUSR1": "the cluster's warning before preemption", "SIGINT": "Ctrl+C"}


class Preemption(L.Callback):
    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGINT"),
                 requeue_on_slurm: bool = True):
        known = {name for name in dir(signal) if name.startswith("SIG") and not name.startswith("SIG_")}
        for name in signals:
            if name not in known or name in ("SIGKILL", "SIGSTOP"):
                raise ConfigError(f"callbacks.preemption.signals holds {name!r}, which is not a signal that can be "
                                  "handled; use names such as SIGTERM, SIGUSR1, SIGUSR2, SIGINT.")
        self.signals = [getattr(signal, name) for name in signals]
        self.requeue_on_slurm = bool(requeue_on_slurm)
        self.requested: int | None = None
        self._previous: dict[int, object] = {}
        self._trainer = None

    # ----------------------------------------------------------------- handlers
    def on_train_start(self, trainer, pl_module) -> None:
        self._trainer = trainer
        if threading.current_thread() is not threading.main_thread():
            log.warning("training runs outside the main thread: signals cannot be handled, so a SIGTERM will not "
                        "save a checkpoint first")
            return
        connector = getattr(trainer, "_signal_connector", None)
        if getattr(connector, "received_sigterm", False):  # Lightning's own handler caught one during set-up
            self.requested = signal.SIGTERM
            connector.received_sigterm = False  # from here on this callback stops the run, with a checkpoint
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt  # the second Ctrl+C: stop now
        first = self.requested is None
        self.requested = signum
        name = signal.Signals(signum).name
        if first:
            log.warning("received %s: finishing the current step, saving a checkpoint, then stopping%s", name,
                        " (Ctrl+C again stops at once, without saving)" if signum == signal.SIGINT else "")
        trainer = self._trainer
        launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
        if signum != signal.SIGINT and trainer is not None and trainer.global_rank == 0 and hasattr(launcher, "kill"):
            launcher.kill(signum)  # the ranks this process started (Ctrl+C reaches them from the terminal)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    # ----------------------------------------------------------------- the stop
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        requested = self.requested is not None
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            self.stop(trainer)

    def stop(self, trainer) -> None:
        signum = self.requested or signal.SIGTERM  # another rank was signalled: report it as a SIGTERM
        name = signal.Signals(signum).name
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and hasattr(checkpoint, "save_last_now"):
            path = checkpoint.save_last_now(trainer)
        else:
            path = str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")
            trainer.save_checkpoint(path)
        requeued = self.requeue(signum) if trainer.is_global_zero else None
        raise Interrupted(
            f"training stopped by {name} ({MEANING.get(name, 'a signal')}) at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}). Everything up to that step is saved in {path}: continue with the same "
            f"command plus resume=auto (the same run directory) or resume={path}.{requeued or ''}",
            signum=signum,
        )

    def requeue(self, signum: int) -> str | None:
        """On SLURM, requeue the job after the requeue signal (SIGUSR1), as Lightning's auto-requeue does."""
        job = os.environ.get("SLURM_JOB_ID")
        if not (self.requeue_on_slurm and job and signum == getattr(signal, "SIGUSR1", None)):
            return None
        array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job = f"{array_job}_{array_task}" if array_job and array_task else job
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            log.warning("could not requeue SLURM job %s: %s", job, err)
            return f" Requeuing SLURM job {job} failed ({err}): resubmit it."
        if result.returncode != 0:
            log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
            return f" Requeuing SLURM job {job} failed ({result.stderr.strip()[:160]}): resubmit it."
        log.info("requeued SLURM job %s", job)
        return f" SLURM job {job} is requeued; its command must include resume=auto and a fixed run_name."
