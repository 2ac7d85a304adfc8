"""gencli report: the HTML is parsed, every embedded image is decoded, and the sections hold what the folder holds.

The run and sweep folders are made here, tiny and by hand, in the layout gencli writes (the e2e test
``tests/e2e/test_report.py`` uses real ones); they carry the things a stranger's folder may carry: markup in
config values, a resolver call that would read the environment, a corrupt CSV, JSON and PNG.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import gencli
from gencli.errors import ConfigError
from gencli.reports import Options, build_report, kind_of
from gencli.reports.read import TooLarge, resolve_references
from gencli.reports.run import spread
from report_html import Parsed


# ----------------------------------------------------------------------------- tiny folders in gencli's layout
def png(path: Path, seed: int = 0, size: tuple[int, int] = (20, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


SCRIPT = "<script>alert('x')</script>"


def make_run(folder: Path, monitor_value: float = 1.5) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    config = {"task_name": "train", "optimized_metric": "${model.monitor}",
              "model": {"_target_": "gencli.families.vae.VAE", "monitor": "val/loss", "monitor_mode": "min",
                        "latent_dim": 4, "note": SCRIPT, "secret": "${oc.env:GENCLI_REPORT_SECRET}",
                        "shape": ["${data.channels}", "${data.image_size}"]},
              "data": {"_target_": "gencli.data.DigitsDataModule", "channels": 1, "image_size": 16}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=vae", f"+tag={SCRIPT}"]))
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    metrics = {"status": "completed", "metrics": {"train/loss": 1.6, "val/loss": monitor_value, "val/kl": 0.25},
               "optimized_metric": "val/loss", "epochs": 2, "steps": 20, "resumed_from": None,
               "files": {"last_checkpoint": "/elsewhere/" + folder.name + "/checkpoints/last.ckpt"},
               "provenance": {"seed": 0, "torch": "2.x", "device": "cpu"}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "job.json").write_text(json.dumps({"status": "completed", "value": monitor_value, "seconds": 3.0,
                                                 "optimized_metric": "val/loss", "overrides": ["model=vae"],
                                                 "metrics": metrics["metrics"], "steps": 20}))
    (folder / "csv").mkdir()
    (folder / "csv" / "metrics.csv").write_text(
        "epoch,lr-Adam,step,train/loss,val/loss,val/loss_t0,val/loss_t1,val/kl\n"
        ",0.002,9,,,,,\n0,,9,2.0,,,,\n0,,9,,1.9,0.5,0.4,inf\n"
        ",0.002,19,,,,,\n1,,19,1.6,,,,\n1,,19,,1.5,0.3,0.2,0.25\n")
    for step in (10, 20):
        png(folder / "samples" / f"step_{step:07d}.png", step)
    png(folder / "samples" / "final.png", 99)
    png(folder / "samples" / "final_reconstructions.png", 98)
    return folder


def make_sweep(folder: Path) -> Path:
    """Four jobs: model=ae|vae x model.beta; job 3 failed. val/loss: job 1 best, job 2 worst."""
    folder.mkdir(parents=True)
    (folder / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
                   "overrides": {"task": ["model=ae,vae", "model.beta=0.5,4", "trainer.max_steps=20"]}}}))
    jobs = [("ae", "0.5", 3.0, 0.9), ("vae", "0.5", 1.0, 0.7), ("ae", "4", 5.0, 0.5), ("vae", "4", None, None)]
    for i, (model, beta, loss, bpd) in enumerate(jobs):
        job = make_run(folder / str(i), loss or 0.0)
        overrides = [f"model={model}", f"model.beta={beta}", "trainer.max_steps=20"]
        record = {"status": "completed" if loss else "failed", "value": loss, "optimized_metric": "val/loss",
                  "reason": None if loss else f"diverged {SCRIPT}", "seconds": 2.0, "overrides": overrides,
                  "metrics": {"val/loss": loss, "val/bpd": bpd} if loss else {}, "steps": 20}
        (job / "job.json").write_text(json.dumps(record))
    return folder


@pytest.fixture
def run_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GENCLI_REPORT_SECRET", "hunter2-do-not-leak")
    return make_run(tmp_path / "myrun")


def report(path: Path, **options) -> tuple[Parsed, list[str], str]:
    page, _, notes = build_report(path, Options(**options))
    return Parsed(page), notes, page


# ----------------------------------------------------------------------------- run reports
def test_run_report_has_every_section_and_every_image_decodes(run_dir):
    parsed, notes, _ = report(run_dir)
    assert notes == []
    for heading in ("Training curves", "Sample grids during training", "Final metrics and provenance",
                    "Evaluations and samples of this run's checkpoints", "Config"):
        assert heading in parsed.headings
    captions = [alt for _, alt in parsed.images]
    # one plot per family: loss (train+val), loss_t* (t0, t1), kl, learning rate; then the grids in step order
    assert sum(alt.startswith(("loss:", "loss_t*:", "kl:", "learning rate:")) for alt in captions) == 4
    grids = [alt for alt in captions if "step " in alt or alt.startswith("final")]
    assert grids == ["step 10: samples (step_0000010.png)", "step 20: samples (step_0000020.png)",
                     "final: samples (final.png)", "final: inputs beside their reconstructions (final_reconstructions.png)"]
    assert parsed.row("val/loss")[1] == "1.5" and parsed.row("steps")[1] == "20"
    assert parsed.row("seed")[1] == "0"  # provenance
    # the checkpoint named by a record written elsewhere is found in this folder and hashed
    assert parsed.row("last_checkpoint")[3] == hashlib.sha256(b"weights").hexdigest()
    assert "val/kl (1 value(s))" in parsed.text  # the inf left out of the plot, and said so


def test_config_values_are_text_references_resolved_resolvers_never_run(run_dir):
    parsed, _, page = report(run_dir)
    assert "script" not in parsed.tags and "<script>" not in page
    assert SCRIPT in parsed.text  # shown, as text, in the config and on the command line
    assert "optimized_metric: val/loss" in parsed.text  # ${model.monitor} resolved
    assert "shape: [1, 16]" in parsed.text
    assert "${oc.env:GENCLI_REPORT_SECRET}" in parsed.text and "hunter2" not in page


def test_corrupt_files_become_notes_not_failures(run_dir):
    (run_dir / "csv" / "metrics.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff garbage \x00" * 50)
    (run_dir / "metrics.json").write_text('{"metrics": {"val/loss": 1.')
    (run_dir / "samples" / "step_0000020.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    parsed, notes, _ = report(run_dir)
    text = "\n".join(notes)
    assert "csv/metrics.csv" in text and "metrics.json: is not valid JSON" in text
    assert "step_0000020.png: is not a readable image" in text
    assert "Not everything could be read" in parsed.text
    assert "step 10: samples (step_0000010.png)" in [alt for _, alt in parsed.images]  # the rest stands


def test_a_csv_the_csv_module_cannot_read_keeps_the_rows_before(run_dir):
    path = run_dir / "csv" / "metrics.csv"
    path.write_text(path.read_text() + '2,,29,"' + "x" * 200_000 + '",,,,\n')
    parsed, notes, _ = report(run_dir)
    assert any("could not be read as CSV" in note and "partial" in note for note in notes)
    assert any(alt.startswith("loss:") for _, alt in parsed.images)


def test_missing_pieces_are_said_so(tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "job.json").write_text(json.dumps({"status": "failed", "reason": "no data"}))
    parsed, notes, _ = report(folder)
    assert "No csv/metrics.csv" in parsed.text and "No sample grids" in parsed.text
    assert "No readable metrics.json" in parsed.text and parsed.row("status")[1] == "failed"
    assert parsed.images == []


def test_eval_and_sample_runs_of_the_checkpoint_are_included(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ev = tmp_path / "outputs" / "eval" / "runs" / "e1"
    ev.mkdir(parents=True)
    (ev / "job.json").write_text(json.dumps({"status": "completed", "overrides": [f"ckpt={ckpt}", "metric=fid"]}))
    (ev / "metrics.json").write_text(json.dumps({"metrics": {"fid_domain": 12.5}, "sampling_cost": {"nfe": 50},
                                                 "provenance": {"fid": {"features": {"name": "domain"}}}}))
    sample = tmp_path / "outputs" / "sample" / "runs" / "s1"
    (sample / "x").mkdir(parents=True)
    (sample / "job.json").write_text(json.dumps({"status": "completed", "overrides": [f"ckpt={ckpt}", "n=4"]}))
    png(sample / "samples.png", 5)
    other = tmp_path / "outputs" / "eval" / "runs" / "other"
    other.mkdir()
    (other / "job.json").write_text(json.dumps({"overrides": ["ckpt=/some/other/run/last.ckpt"]}))
    (other / "metrics.json").write_text(json.dumps({"metrics": {"fid_domain": 99.0}}))
    parsed, _, _ = report(run_dir, related=[str(tmp_path / "outputs" / "eval"), str(tmp_path / "outputs" / "sample")])
    assert parsed.row("e1")[1:] == ["metric=fid", "completed", "12.5", "50", "-"]
    assert not any(r and r[0] == "other" for r in parsed.rows)
    assert "fid.features.name" in parsed.text
    assert "s1: n=4" in [alt for _, alt in parsed.images]


def test_max_grids_spreads_over_training(tmp_path):
    folder = make_run(tmp_path / "long")
    for step in range(30, 200, 10):
        png(folder / "samples" / f"step_{step:07d}.png", step)
    parsed, _, _ = report(folder, max_grids=6)
    steps = [alt for _, alt in parsed.images if alt.startswith("step ")]
    assert len(steps) == 4 and steps[0].startswith("step 10:") and steps[-1].startswith("step 190:")
    assert spread(list(range(10)), 4) == [0, 3, 6, 9]


def test_resolve_references_leaves_calls_cycles_and_dangling_references():
    tree = {"a": "${b}", "b": "${a}", "c": "${nowhere.x}", "d": "x-${e.f}-y", "e": {"f": 3}, "g": "${now:%H}"}
    out = resolve_references(tree)
    assert out["d"] == "x-3-y" and out["c"] == "${nowhere.x}" and out["g"] == "${now:%H}"
    assert out["a"].startswith("${")  # a circle ends as written
    bomb = yaml.safe_load("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)))
    with pytest.raises(TooLarge):
        resolve_references(bomb)


# ----------------------------------------------------------------------------- sweep reports
def test_sweep_report_ranks_tables_plots_and_shows_best_and_worst(tmp_path):
    folder = make_sweep(tmp_path / "sweep")
    parsed, notes, page = report(folder)
    assert notes == []
    header = next(r for r in parsed.rows if r and r[0] == "rank")
    assert header[:5] == ["rank", "job", "model", "model.beta", "status"] and "val/loss" in header
    body = [r for r, c in zip(parsed.rows, parsed.row_classes) if r and r[0] != "rank" and len(r) == len(header)]
    assert [r[1] for r in body] == ["1", "0", "2", "3"]  # best first, the failed job last
    classes = dict(zip((r[1] for r in body), (c for r, c in zip(parsed.rows, parsed.row_classes)
                                             if r and r[0] != "rank" and len(r) == len(header))))
    assert classes == {"1": "best", "0": "", "2": "worst", "3": "failed"}
    failed = next(r for r in body if r[1] == "3")
    assert failed[4] == "failed" and failed[-1] == f"diverged {SCRIPT}" and "<script>" not in page
    captions = [alt for _, alt in parsed.images]
    assert "val/loss against model (3 completed job(s))" in captions  # categorical
    assert "val/loss against model.beta (3 completed job(s))" in captions  # numeric
    assert any(alt.startswith("best: job 1, model=vae model.beta=0.5, val/loss = 1 ") for alt in captions)
    assert any(alt.startswith("worst: job 2, model=ae model.beta=4, val/loss = 5 ") for alt in captions)
    assert "1 job(s) without a finite val/loss are not plotted." in parsed.text


def test_sweep_ranked_by_another_metric_needs_its_direction(tmp_path):
    folder = make_sweep(tmp_path / "sweep")
    with pytest.raises(ConfigError, match="rank_by=val/bpd .*direction=minimize or direction=maximize"):
        report(folder, metric="val/bpd")
    parsed, _, _ = report(folder, metric="val/bpd", direction="maximize")
    assert any(alt.startswith("best: job 0, model=ae model.beta=0.5, val/bpd = 0.9 ") for _, alt in parsed.images)


def test_a_job_without_a_record_is_unfinished_and_a_corrupt_record_a_note(tmp_path):
    folder = make_sweep(tmp_path / "sweep")
    (folder / "0" / "job.json").write_text("{not json")
    parsed, notes, _ = report(folder)
    assert any("0/job.json: is not valid JSON" in note for note in notes)
    assert any(r[1:2] == ["0"] and "unfinished" in r for r in parsed.rows)


# ----------------------------------------------------------------------------- what path= may be
def test_a_path_that_is_neither_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        kind_of(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is neither a gencli run nor a sweep"):
        kind_of(tmp_path / "empty")
    ckpt = make_run(tmp_path / "r") / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=f"is a file.*path={tmp_path / 'r'}"):
        kind_of(ckpt)
    assert kind_of(tmp_path / "r") == "run" and kind_of(make_sweep(tmp_path / "s")) == "sweep"


def test_cli_writes_the_report_and_refuses_a_bad_path(tmp_path):
    make_run(tmp_path / "run")
    ok = gencli("report", f"path={tmp_path / 'run'}", f"out={tmp_path / 'r.html'}", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert len(Parsed((tmp_path / "r.html").read_text()).images) >= 8
    (tmp_path / "empty").mkdir()
    bad = gencli("report", f"path={tmp_path / 'empty'}", cwd=tmp_path)
    assert bad.returncode == 2
    assert f"path={tmp_path / 'empty'} is neither a gencli run nor a sweep" in " ".join(bad.stderr.split())
    assert "Traceback" not in bad.stderr and not (tmp_path / "empty" / "report.html").exists()


def test_curve_families_group_one_quantity_per_plot():
    from gencli.reports.plots import family_of

    assert {family_of(c) for c in ("train/loss", "val/loss")} == {"loss"}
    assert {family_of(c) for c in ("val/loss_t0", "val/loss_t3")} == {"loss_t*"}
    assert {family_of(c) for c in ("lr", "lr-Adam", "lr-Adam-1", "lr/generator", "lr/discriminator")} == {
        "learning rate"}
    assert family_of("train/d_loss") == "d_loss" and family_of("fid") == "fid"


# ----------------------------------------------------------------------------- only the folder's own files
SECRET = "SECRET-7f3a-not-for-reports"


def outside_files(where: Path) -> dict[str, Path]:
    """Files outside the reported folder, each holding SECRET, as a stranger's links would reach for them."""
    where.mkdir(parents=True, exist_ok=True)
    files = {"config.yaml": where / "config.yaml", "metrics.json": where / "metrics.json",
             "metrics.csv": where / "metrics.csv", "grid.png": where / "grid.png"}
    files["config.yaml"].write_text(yaml.safe_dump({"task_name": "train", "password": SECRET}))
    files["metrics.json"].write_text(json.dumps({"metrics": {SECRET: 1.0}, "status": SECRET}))
    files["metrics.csv"].write_text(f"step,{SECRET}\n1,2.0\n2,3.0\n")
    png(files["grid.png"], 7, (31, 17))
    return files


def relink(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


def test_links_out_of_the_folder_are_not_read_and_each_is_a_note(run_dir, tmp_path):
    outside = outside_files(tmp_path / "elsewhere")
    relink(run_dir / ".hydra" / "config.yaml", outside["config.yaml"])
    relink(run_dir / "metrics.json", outside["metrics.json"])
    relink(run_dir / "csv" / "metrics.csv", outside["metrics.csv"])
    relink(run_dir / "samples" / "step_0000020.png", outside["grid.png"])
    parsed, notes, page = report(run_dir)
    assert SECRET not in page
    assert all((image.width, image.height) != (31, 17) for image, _ in parsed.images)  # the outside PNG
    for name in (".hydra/config.yaml", "metrics.json", "csv/metrics.csv", "samples/step_0000020.png"):
        assert any(note.startswith(f"{run_dir / name}: is a symbolic link") and "leads outside" in note
                   for note in notes), (name, notes)
    assert "leads outside" in parsed.text and "Not everything could be read" in parsed.text
    assert "step 10: samples (step_0000010.png)" in [alt for _, alt in parsed.images]  # the rest stands


def test_a_linked_folder_out_is_not_read_and_links_that_stay_inside_are(run_dir, tmp_path):
    outside = outside_files(tmp_path / "elsewhere" / ".hydra")
    (run_dir / ".hydra" / "config.yaml").unlink()
    (run_dir / ".hydra" / "overrides.yaml").unlink()
    (run_dir / ".hydra").rmdir()
    (run_dir / ".hydra").symlink_to(outside["config.yaml"].parent, target_is_directory=True)
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "last.ckpt").rename(checkpoints / "epoch_1.ckpt")
    (checkpoints / "last.ckpt").symlink_to("epoch_1.ckpt")  # Lightning's save_last="link": inside, so followed
    (tmp_path / "elsewhere" / "secret.ckpt").write_bytes(SECRET.encode())
    (checkpoints / "best.ckpt").symlink_to(tmp_path / "elsewhere" / "secret.ckpt")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["files"]["best_checkpoint"] = str(checkpoints / "best.ckpt")
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    parsed, notes, page = report(run_dir)
    assert SECRET not in page and "password" not in page
    assert any(note.startswith(f"{run_dir / '.hydra' / 'config.yaml'}: is a symbolic link") for note in notes)
    assert parsed.row("last_checkpoint")[3] == hashlib.sha256(b"weights").hexdigest()  # through the inside link
    assert parsed.row("best_checkpoint")[2:] == ["-", "not in this folder"]  # never hashed, never read
    assert hashlib.sha256(SECRET.encode()).hexdigest() not in page
    # samples/ itself a link out: not even listed (the names of another folder's files stay out of the page)
    elsewhere = tmp_path / "elsewhere" / "photos"
    png(elsewhere / "step_0000077.png", 3)
    for grid in (run_dir / "samples").iterdir():
        grid.unlink()
    (run_dir / "samples").rmdir()
    (run_dir / "samples").symlink_to(elsewhere, target_is_directory=True)
    parsed, notes, page = report(run_dir)
    assert "step_0000077" not in page and "No sample grids" in parsed.text
    assert any(note.startswith(f"{run_dir / 'samples'}: is a symbolic link") and "not listed" in note for note in notes)


def test_a_file_over_its_cap_is_left_out_with_a_note(run_dir, monkeypatch):
    from gencli.reports import read

    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    config["padding"] = "PADDING-MARKER " * 200
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr(read, "MAX_TEXT_BYTES", 2000)
    monkeypatch.setattr(read, "MAX_IMAGE_BYTES", 100)
    parsed, notes, page = report(run_dir)
    assert "PADDING-MARKER" not in page
    assert any(note.startswith(f"{run_dir / '.hydra' / 'config.yaml'}: is ") and "more than the 2000 bytes a report "
               "reads" in note for note in notes), notes
    assert any("final.png: is " in note and "more than the 100 bytes" in note for note in notes)
    assert not [alt for _, alt in parsed.images if "step " in alt or alt.startswith("final")]  # every grid over 100 B
    assert parsed.row("val/loss")[1] == "1.5"  # the small files are read as ever


def test_a_pipe_in_the_folder_is_a_note_not_a_hang(run_dir):
    (run_dir / "metrics.json").unlink()
    os.mkfifo(run_dir / "metrics.json")  # nobody writes it: opening it for reading would block
    _, notes, _ = report(run_dir)
    assert any(note == f"{run_dir / 'metrics.json'}: is a device, pipe or socket, not a regular file; not read"
               for note in notes), notes


def test_a_sweep_s_job_folder_linked_out_and_a_related_run_s_grid_linked_out_are_not_read(tmp_path, run_dir):
    folder = make_sweep(tmp_path / "sweep")
    stranger = make_run(tmp_path / "elsewhere" / "stranger")
    record = {"status": "completed", "value": 0.1, "optimized_metric": "val/loss", "overrides": [f"model.note={SECRET}"],
              "metrics": {"val/loss": 0.1}}
    (stranger / "job.json").write_text(json.dumps(record))
    (folder / "4").symlink_to(stranger, target_is_directory=True)
    parsed, notes, page = report(folder)
    assert SECRET not in page
    assert any(note.startswith(f"{folder / '4' / 'job.json'}: is a symbolic link") for note in notes), notes
    # a sample run of the run's checkpoint whose samples.png is a link out of that sample run
    outside = outside_files(tmp_path / "elsewhere2")
    sample = tmp_path / "outputs" / "sample" / "runs" / "s1"
    sample.mkdir(parents=True)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    (sample / "job.json").write_text(json.dumps({"status": "completed", "overrides": [f"ckpt={ckpt}", "n=4"]}))
    (sample / "samples.png").symlink_to(outside["grid.png"])
    parsed, notes, _ = report(run_dir, related=[str(tmp_path / "outputs" / "sample")])
    assert "s1: n=4" not in [alt for _, alt in parsed.images]
    assert any(note.startswith(f"{sample / 'samples.png'}: is a symbolic link") for note in notes), notes
