"""Write tests/fixtures/checkpoints/: one tiny checkpoint of each model config (and each conditional family), and the
exact outputs of `gencli sample` on each, so that tests/unit/test_old_checkpoints.py can check that checkpoints written
by an older gencli keep loading and sampling bitwise-identically after code moves (issue 23, item 6).

Run it only to regenerate the fixtures on purpose (then the test compares against the new outputs):

    python scripts/make_fixture_checkpoints.py            # train, copy the checkpoints, record the outputs
    python scripts/make_fixture_checkpoints.py --record   # keep the checkpoints, re-record the expected outputs

The nets are a few channels wide on the embedded 8x8 digits (no download) and train for two steps on CPU; the whole
folder stays near 1 MB. The expected outputs are the sha256 of every file a sample run writes under its run folder
(samples.npz and the PNGs), in expected/<case>.json; the sample commands themselves are CASES below, which the test
imports.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "checkpoints"
EXPECTED = FIXTURES / "expected"

TINY = ["data=digits", "data.image_size=8", "data.batch_size=32", "trainer.max_steps=2", "trainer.max_epochs=1",
        "trainer.limit_val_batches=1", "callbacks=minimal", "callbacks.sample_grid=null", "logger=csv", "seed=0"]
AE_NETS = ["model.latent_dim=4", "model.encoder.base_channels=4", "model.encoder.max_channels=8",
           "model.encoder.out_features=16", "model.decoder.base_channels=4", "model.decoder.max_channels=8"]
GAN_NETS = ["model.latent_dim=4", "model.generator.base_channels=4", "model.generator.max_channels=8",
            "model.discriminator.base_channels=4", "model.discriminator.max_channels=8"]
UNET = ["model.net.ch=4", "model.net.ch_mult=[1,2]", "model.net.attn_resolutions=[4]", "model.net.norm_groups=2",
        "model.schedule.timesteps=50", "model.sampler.steps=5"]

# name -> the train overrides of its checkpoint
MODELS: dict[str, list[str]] = {
    "ae": ["model=ae", *AE_NETS],
    "vae": ["model=vae", *AE_NETS],
    "cvae": ["model=vae", "model.conditional=true", *AE_NETS],
    "dcgan": ["model=dcgan", *GAN_NETS],
    "sngan": ["model=sngan", *GAN_NETS],
    "wgan_gp": ["model=wgan_gp", *GAN_NETS],
    "cgan": ["model=gan", "model.conditional=true", *GAN_NETS],
    "ddpm": ["model=ddpm", *UNET],
    "cddpm": ["model=ddpm", "model.conditional=true", *UNET],
    "ldm": ["model=ldm", "model.first_stage_ckpt={ae}", "model.net.hidden=16", "model.net.depth=2",
            "model.net.time_dim=8", "model.schedule.timesteps=50", "model.sampler.steps=5"],
    "classifier": ["model=classifier", "model.net.width=2", "model.net.feature_dim=8"],
}

# case -> (checkpoint, sample overrides); every case writes into its own run folder
CASES: dict[str, tuple[str, list[str]]] = {
    "ae_grid": ("ae", ["n=6", "batch_size=4"]),
    "ae_reconstruct": ("ae", ["mode=reconstruct", "n=4"]),
    "ae_interpolate": ("ae", ["mode=interpolate", "n=2", "interpolation_steps=3"]),
    "vae_grid": ("vae", ["n=6", "format=both"]),
    "vae_reconstruct": ("vae", ["mode=reconstruct", "n=4"]),
    "vae_variation": ("vae", ["mode=variation", "n=4", "strength=0.5"]),
    "cvae_grid": ("cvae", ["n=6", "labels=[3,7]"]),
    "dcgan_grid": ("dcgan", ["n=6"]),
    "sngan_grid": ("sngan", ["n=6"]),
    "wgan_gp_grid": ("wgan_gp", ["n=6", "use_ema=false"]),
    "cgan_grid": ("cgan", ["n=6", "labels=all", "nrow=2"]),
    "ddpm_ddim": ("ddpm", ["n=4", "sampler=ddim", "sampler.steps=4"]),
    "ddpm_ddpm": ("ddpm", ["n=3", "sampler=ddpm"]),
    "ddpm_inpaint": ("ddpm", ["mode=inpaint", "n=2", "inpaint.method=replace", "sampler=ddim", "sampler.steps=3"]),
    "cddpm_guided": ("cddpm", ["n=4", "guidance=2.0", "sampler=ddim", "sampler.steps=3"]),
    "ldm_grid": ("ldm", ["n=4", "sampler=ddim", "sampler.steps=3"]),
}


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
            "PYTHONUNBUFFERED": "1"}


def gencli(*args: str, cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "gencli.cli", *args], cwd=cwd, env=env(), capture_output=True,
                            text=True, timeout=900)
    if result.returncode:
        sys.exit(f"gencli {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                 f"{result.stderr[-4000:]}")


def train_all(work: Path, only: list[str]) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name, overrides in MODELS.items():
        if only and name not in only:
            continue
        run_dir = work / "train" / name
        # the LDM's first stage from a temporary copy, so sampling shows it needs only what its checkpoint holds
        first_stage = work / "first_stage_ae.ckpt"
        if "{ae}" in " ".join(overrides):
            shutil.copyfile(FIXTURES / "ae.ckpt", first_stage)
        overrides = [o.format(ae=first_stage) for o in overrides]
        gencli("train", *TINY, *overrides, f"hydra.run.dir={run_dir}", cwd=work)
        shutil.copyfile(run_dir / "checkpoints" / "last.ckpt", FIXTURES / f"{name}.ckpt")
        print(f"{name}: {(FIXTURES / f'{name}.ckpt').stat().st_size // 1024} KiB", flush=True)


def sample_outputs(case: str, work: Path) -> dict[str, str]:
    """Run one case's `gencli sample` in ``work`` and return {relative path: sha256} of the files it wrote."""
    ckpt, overrides = CASES[case]
    run_dir = work / case
    gencli("sample", f"ckpt={FIXTURES / f'{ckpt}.ckpt'}", "device=cpu", "seed=0", *overrides,
           f"hydra.run.dir={run_dir}", cwd=work)
    return {path.relative_to(run_dir).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(run_dir.rglob("*")) if path.is_file() and path.suffix in (".npz", ".png")}


def record(work: Path) -> None:
    EXPECTED.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        outputs = sample_outputs(case, work)
        if not outputs:
            sys.exit(f"{case}: the sample run wrote no .npz or .png")
        (EXPECTED / f"{case}.json").write_text(json.dumps(outputs, indent=1, sort_keys=True) + "\n")
        print(f"{case}: {len(outputs)} files", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="keep the checkpoints, re-record the outputs")
    parser.add_argument("--only", nargs="*", default=[], choices=sorted(MODELS), help="retrain only these")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.record:
            train_all(Path(tmp), args.only)
        record(Path(tmp))


if __name__ == "__main__":
    main()
