"""``gencli VERB [overrides...]``: pick the verb's Hydra app and hand it the rest. Nothing else."""

from __future__ import annotations

import sys

from gencli.errors import GencliError

# verb -> (job module, its primary config in conf/, one line of help)
VERBS = {
    "train": ("gencli.jobs.train", "train", "train a model: gencli train model=vae data=digits trainer=cpu"),
    "sample": ("gencli.jobs.sample", "sample", "images from a checkpoint: gencli sample ckpt=PATH n=64 [mode=interpolate]"),
    "eval": ("gencli.jobs.evaluate", "eval", "metrics for a checkpoint: gencli eval ckpt=PATH [metric=recon]"),
    "export": ("gencli.jobs.export", "export", "weights out: gencli export ckpt=PATH format=safetensors|diffusers"),
}

USAGE = "usage: gencli {" + ",".join(VERBS) + "} [hydra overrides...] [--help] [--cfg job] [-m]\n\n" + "\n".join(
    f"  {verb:<7} {text}" for verb, (_, _, text) in VERBS.items()
) + "\n\n'gencli VERB --help' lists that verb's config groups and options."


def main(argv: list[str] | None = None) -> None:
    import importlib
    import signal

    if hasattr(signal, "SIGPIPE"):  # 'gencli train --help | head' should end quietly, like any CLI
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    verb, overrides = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"gencli error: '{verb}' is not a verb; use one of {', '.join(VERBS)}.\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    from gencli.config import precheck

    try:  # composition, types, ranges, keys, the output folder: one paragraph before anything runs
        overrides = precheck(verb, VERBS[verb][1], overrides)
    except GencliError as err:
        print(f"gencli error: {err.message}", file=sys.stderr)
        sys.exit(err.exit_code)
    module = importlib.import_module(VERBS[verb][0])
    # Hydra reads its overrides from sys.argv; argv[0] becomes the job's own file so that
    # Lightning's DDP launcher, which re-runs sys.argv once per extra rank, re-runs this job.
    sys.argv = [module.__file__, *overrides]
    main_module = sys.modules["__main__"]
    if getattr(main_module, "__spec__", None) is not None:
        # Run as 'python -m gencli.cli': the launcher re-runs 'python -m <__main__'s spec>', so
        # make that the job module (which has its own __main__ block), not the verb dispatcher.
        main_module.__spec__ = module.__spec__
    module.main()


if __name__ == "__main__":
    main()
