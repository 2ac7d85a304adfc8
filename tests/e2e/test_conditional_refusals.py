"""Conditional generation refused where it cannot work: labels=/guidance= on an unconditional checkpoint, and a
conditional model on a folder without class subfolders (exit 2, one paragraph, no traceback)."""

from __future__ import annotations

import numpy as np
import pytest
from conditional_chain import run

from conftest import describe

pytestmark = pytest.mark.slow


def test_unconditional_checkpoint_refuses_labels(tmp_path):
    run_dir, result = run(tmp_path, "train", "plain", "model=ae", "trainer.max_steps=2", "callbacks=minimal")
    assert result.returncode == 0, describe(result)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    _, result = run(tmp_path, "sample", "refused", f"ckpt={ckpt}", "labels=[3,3,7]")
    assert result.returncode == 2, describe(result)
    message = result.stderr.strip().splitlines()[-1]
    assert "labels=[3,3,7]" in message and "unconditional" in message and "model.conditional=true" in message
    assert "Traceback" not in result.stderr
    _, result = run(tmp_path, "sample", "refused_guidance", f"ckpt={ckpt}", "guidance=2")
    assert result.returncode == 2 and "guidance" in result.stderr, describe(result)


def test_conditional_model_on_unlabelled_folder_is_a_config_error(tmp_path):
    from PIL import Image

    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(folder / f"{i}.png")
    _, result = run(tmp_path, "train", "refused", "model=vae", "model.conditional=true", "data=folder",
                    f"data.root={folder}", "data.image_size=8", "data.channels=1", "trainer.max_steps=1")
    assert result.returncode == 2, describe(result)
    assert "needs labelled data" in result.stderr and "subfolder" in result.stderr
    assert "Traceback" not in result.stderr
