"""``gencli VERB [overrides...]``: pick the verb's Hydra app and hand it the rest. Nothing else."""

from __future__ import annotations

import contextlib
import sys

from gencli.errors import GencliError

# verb -> (job module, its primary config in conf/, one line of help)
VERBS = {
    "train": ("gencli.jobs.train", "train", "train a model: gencli train model=vae data=digits trainer=cpu"),
    "sample": ("gencli.jobs.sample", "sample", "images from a checkpoint: gencli sample ckpt=PATH n=64 [mode=interpolate]"),
    "eval": ("gencli.jobs.evaluate", "eval", "metrics for a checkpoint: gencli eval ckpt=PATH [metric=recon]"),
    "export": ("gencli.jobs.export", "export", "weights out: gencli export ckpt=PATH format=safetensors|diffusers"),
    "report": ("gencli.jobs.report", "report", "one self-contained report.html: gencli report path=RUN_DIR|SWEEP_DIR"),
}

USAGE = "usage: gencli {" + ",".join(VERBS) + "} [hydra overrides...] [--help] [--cfg job] [-m]\n\n" + "\n".join(
    f"  {verb:<7} {text}" for verb, (_, _, text) in VERBS.items()
) + "\n\n'gencli VERB --help' lists that verb's config groups and options.\n" \
  "  --version                  versions of gencli and its stack\n" \
  "  --install-completion SHELL tab completion of verbs, groups, options and keys (bash, zsh, fish)"


def main(argv: list[str] | None = None) -> None:
    """The entry point. A Ctrl+C before a job installs its own handlers (imports, the pre-flight, Hydra's set-up
    take seconds) is one line and exit 130, not a KeyboardInterrupt traceback; nothing has been written then.

    Called in-process with a list (a notebook, a test), it leaves the process's signal handlers as it found them.
    Called as the program (no ``argv``: the ``gencli`` command), a signal while the process winds down after the job
    (seconds once torch is loaded) exits at once with 128 + the signal, as during the job's own end."""
    stage = {"job": False}
    try:
        dispatch(argv, stage)
    except KeyboardInterrupt:
        where = "while the job was starting" if stage["job"] else "before the job started; nothing was written"
        print(f"gencli: stopped by Ctrl+C (SIGINT) {where}.", file=sys.stderr)
        sys.exit(130)
    finally:
        if argv is None and stage["job"]:
            exit_at_once_on_signals()
        elif argv is not None and stage.get("sigpipe") is not None:
            import signal

            with contextlib.suppress(ValueError, OSError):
                signal.signal(signal.SIGPIPE, stage["sigpipe"])


def exit_at_once_on_signals() -> None:
    """The gencli process after its job: SIGINT/SIGTERM exit at once (the job's end is reported, nothing is left
    to clean up), not a KeyboardInterrupt traceback from the interpreter's finalisation."""
    import os
    import signal

    def leave(signum, frame):
        os._exit(128 + int(signum))

    for name in ("SIGINT", "SIGTERM"):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(getattr(signal, name), leave)


def dispatch(argv: list[str] | None, stage: dict) -> None:
    import importlib
    import signal

    if hasattr(signal, "SIGPIPE"):  # 'gencli train --help | head' should end quietly, like any CLI
        stage["sigpipe"] = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    if argv[0].startswith("--") or argv[0] == "completion" or (len(argv) > 1 and argv[1] in SHELL_FLAGS):
        sys.exit(shell_citizen(argv))
    verb, overrides = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"gencli error: '{verb}' is not a verb; use one of {', '.join(VERBS)}.\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    if "--help" in overrides or "-h" in overrides:  # only the groups this verb composes (see gencli/shell.py)
        from gencli.shell import verb_help

        print(verb_help(verb, [o for o in overrides if o not in ("--help", "-h")]))
        sys.exit(0)
    from gencli.config import NothingToTrain, precheck

    try:  # composition, types, ranges, keys, the classes it builds, the run folder: before anything runs or is written
        overrides = precheck(verb, VERBS[verb][1], overrides)
    except GencliError as err:
        print(f"gencli error: {err.message}", file=sys.stderr)
        sys.exit(err.exit_code)
    except NothingToTrain as done:  # resume=auto of a finished run: nothing to do, nothing written
        print(f"gencli: {done.note}")
        sys.exit(0)
    # gencli train holds its run folder's lock from here to the end of the process (gencli.runlock)
    module = importlib.import_module(VERBS[verb][0])
    # Hydra reads its overrides from sys.argv; argv[0] becomes the job's own file so that
    # Lightning's DDP launcher, which re-runs sys.argv once per extra rank, re-runs this job.
    sys.argv = [module.__file__, *overrides]
    main_module = sys.modules["__main__"]
    if getattr(main_module, "__spec__", None) is not None:
        # Run as 'python -m gencli.cli': the launcher re-runs 'python -m <__main__'s spec>', so
        # make that the job module (which has its own __main__ block), not the verb dispatcher.
        main_module.__spec__ = module.__spec__
    stage["job"] = True
    try:
        module.main()
    finally:  # the run is over: its folder is free and the signal handlers are the caller's again (the OS would free
        # the folder at exit; main() may be called in-process: a notebook, a test)
        from gencli.jobs.common import restore_signal_handlers
        from gencli.runlock import release_all

        release_all()
        restore_signal_handlers()


#: Hydra's completion flags, routed to gencli's own (Hydra's would complete 'python', not 'gencli VERB').
SHELL_FLAGS = ("-sc", "--shell-completion")


def shell_citizen(argv: list[str]) -> int:
    """``--version``, ``--complete WORDS``, ``--install-completion SHELL``, ``completion SHELL`` (print the script)."""
    from gencli import shell

    flag = argv[0]
    try:
        if flag == "--version":
            print(shell.version_text())
        elif flag == "--complete":
            print("\n".join(shell.complete(argv[1:])))
        elif flag == "--install-completion":
            print(shell.install(argv[1] if len(argv) > 1 else ""))
        elif flag == "completion":
            if len(argv) < 2 or argv[1] not in shell.SCRIPTS:
                raise GencliError(f"gencli completion SHELL prints the completion script; SHELL is one of "
                                  f"{', '.join(shell.SHELLS)} (e.g. eval \"$(gencli completion bash)\").", 2)
            print(shell.SCRIPTS[argv[1]], end="")
        elif len(argv) > 1 and argv[1] in SHELL_FLAGS:
            raise GencliError(f"'{' '.join(argv)}': Hydra's shell completion would complete 'python', not gencli; "
                              "use gencli's own: gencli --install-completion bash|zsh|fish (or eval \"$(gencli "
                              "completion bash)\" for this shell only).", 2)
        else:
            raise GencliError(f"{flag} is not a gencli flag; use --help, --version or --install-completion SHELL, or "
                              f"a verb ({', '.join(VERBS)}).", 2)
    except GencliError as err:
        print(f"gencli error: {err.message}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    main()
