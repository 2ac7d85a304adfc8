"""Progress output: real rates in logs, the run's ETA, and the steps of a sample grid shown while training.

Every time here comes from a fake clock: the numbers are checked, never how long anything takes."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from rich.progress import Progress

from gencli.callbacks.progress_bar import RunTimeLeft, StepsPerSecond, TrainingProgressBar, run_fractions
from gencli.progress import ImagesPerSecond, RunETA, StepLog, format_duration, rate, show_steps, track_steps


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def console(terminal: bool) -> Console:
    return Console(file=io.StringIO(), force_terminal=terminal, width=120)


def sampling_task(total: int) -> tuple[Clock, Progress, int]:
    """A Rich progress task on a clock the test moves."""
    clock = Clock()
    progress = Progress(get_time=clock, console=console(False))
    return clock, progress, progress.add_task("sampling", total=total)


def test_a_task_done_in_one_update_shows_its_real_rate():
    """A single batch (or updates further apart than Rich's 30 s window) left Rich's speed at None: '0.0 img/s'."""
    clock, progress, task_id = sampling_task(64)
    clock.now += 4.0
    progress.advance(task_id, 64)
    task = progress.tasks[0]
    assert task.speed is None  # what the old column showed as 0.0
    assert rate(task) == pytest.approx(16.0)
    assert "16.0 img/s" in ImagesPerSecond().render(task).plain
    assert "16.00it/s" in StepsPerSecond("none").render(task).plain


def test_the_rate_of_slow_batches_is_their_mean():
    clock, progress, task_id = sampling_task(300)
    for _ in range(3):  # batches 40 s apart: Rich's window holds one at a time
        clock.now += 40.0
        progress.advance(task_id, 100)
    assert rate(progress.tasks[0]) == pytest.approx(300 / 120)


def test_a_running_task_shows_a_rate_before_rich_has_an_estimate():
    clock, progress, task_id = sampling_task(100)
    clock.now += 2.0
    progress.advance(task_id, 10)
    assert rate(progress.tasks[0]) == pytest.approx(5.0)


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (65.4, "0:01:05"), (3 * 3600 + 62, "3:01:02"),
                                           (None, "-:--:--"), (math.inf, "-:--:--"), (-3, "0:00:00")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_eta_of_a_max_steps_run_follows_the_pace():
    eta = RunETA(window_s=60)
    eta.update(0.0, {"steps": 0.0})
    assert eta.remaining(0.0) is None  # no pace yet
    eta.update(10.0, {"steps": 0.1})  # 10% in 10 s
    assert eta.remaining(10.0) == pytest.approx(90.0)
    assert eta.remaining(15.0) == pytest.approx(85.0)  # counts down between updates


def test_eta_is_the_limit_that_ends_the_run_first():
    eta = RunETA()
    eta.update(0.0, {"steps": 0.0, "epochs": 0.0})
    eta.update(10.0, {"steps": 0.5, "epochs": 0.1})
    assert eta.remaining(10.0) == pytest.approx(10.0)  # max_steps first
    assert eta.remaining(10.0, time_left=4.0) == pytest.approx(4.0)  # max_time first
    assert RunETA().remaining(0.0, time_left=30.0) == 30.0  # a max_time run before its pace is known


def test_eta_uses_the_recent_pace():
    eta = RunETA(window_s=60)
    eta.update(0.0, {"steps": 0.0})
    eta.update(100.0, {"steps": 0.1})  # a slow start (first batches, compilation)
    for t in range(110, 210, 10):
        eta.update(float(t), {"steps": 0.1 + (t - 100) / 1000})  # then 1% per 10 s
    assert eta.remaining(200.0) == pytest.approx(800.0)


def test_run_fractions():
    assert run_fractions(250, 1000, 3, 5, 10, -1) == {"steps": 0.25}
    assert run_fractions(250, -1, 3, 5, 10, 10) == {"epochs": pytest.approx(0.35)}
    assert run_fractions(250, -1, 3, 5, math.inf, -1) == {}


def test_the_time_left_column_shows_on_the_training_row_only():
    column = RunTimeLeft()
    column.text, column.task_id = "ETA 0:01:00", 1
    assert column.render(SimpleNamespace(id=1)).plain == "ETA 0:01:00"
    assert column.render(SimpleNamespace(id=2)).plain == ""


def test_open_ended_runs_read_epoch_n():
    bar = TrainingProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)
    assert bar._get_train_description(14).strip() == "Epoch 14"


def test_step_log_writes_k_of_n_lines_for_a_slow_pass_only():
    clock, lines = Clock(0.0), []
    step_log = StepLog(lines.append, every_s=10, clock=clock)
    step_log.start("final grid: ddim steps", 50)
    for k in range(1, 51):
        clock.now += 1.0  # one step a second: a line every 10 steps
        step_log.update(k)
    step_log.finish()
    assert lines[0] == "final grid: ddim steps 10/50 (0:00:10 elapsed, about 0:00:40 left)"
    assert [line.split()[4] for line in lines[:-1]] == ["10/50", "20/50", "30/50", "40/50"]
    assert lines[-1] == "final grid: ddim steps 50/50 in 0:00:50"

    quick = []
    step_log = StepLog(quick.append, every_s=10, clock=Clock(0.0))
    step_log.start("grid", 5)
    for k in range(1, 6):
        step_log.update(k)
    step_log.finish()
    assert quick == []


class RecordingStepLog(StepLog):
    def __init__(self):
        super().__init__(lambda line: None, every_s=math.inf)
        self.events = []

    def start(self, name, total):
        super().start(name, total)
        self.events.append(("start", name, total))

    def update(self, done):
        super().update(done)
        self.events.append(("update", done, self.total))


def test_steps_without_a_terminal_go_to_the_step_log():
    step_log = RecordingStepLog()
    progress = Progress(console=console(False))
    with progress, show_steps("final grid", progress, step_log):
        assert list(track_steps(range(3), 3, "ddim steps")) == [0, 1, 2]
    assert step_log.events == [("start", "final grid: ddim steps", 3), ("update", 1, 3), ("update", 2, 3),
                               ("update", 3, 3)]
    assert progress.tasks == []  # no row in a display that a log prints only at its end


def test_steps_on_a_terminal_are_a_row_under_the_training_bar():
    progress = Progress(console=console(True))
    seen = []
    with progress, show_steps("final grid", progress, RecordingStepLog()):
        for _ in track_steps(range(4), 4, "ddim steps"):
            (task,) = progress.tasks
            seen.append((task.description.strip(), task.completed, task.total))
        assert progress.tasks == []  # transient
    assert seen == [("final grid: ddim steps", k, 4) for k in range(4)]


def test_steps_outside_show_steps_are_silent():
    assert list(track_steps(range(3), 3, "ddim steps")) == [0, 1, 2]


def test_the_final_grid_of_a_diffusion_model_reports_its_sampler_steps(tmp_path, monkeypatch):
    from gencli.callbacks import sample_grid
    from gencli.diffusion.samplers import DDIMSampler
    from gencli.diffusion.schedule import NoiseSchedule
    from gencli.families.diffusion import Diffusion
    from gencli.nets.unet import UNet

    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], norm_groups=4)
    model = Diffusion(net=net, image_shape=[1, 8, 8], schedule=NoiseSchedule(timesteps=50),
                      sampler=DDIMSampler(steps=5))
    step_log = RecordingStepLog()
    monkeypatch.setattr(sample_grid, "show_steps", lambda label, live: show_steps(label, live, step_log))
    trainer = SimpleNamespace(is_global_zero=True, progress_bar_callback=None, global_step=7, loggers=[],
                              datamodule=None)
    callback = sample_grid.SampleGrid(str(tmp_path), n=4, seed=0)
    callback.on_train_end(trainer, model)
    assert callback.last_written == tmp_path / "final.png" and callback.last_written.is_file()
    assert step_log.events[0] == ("start", "final grid: ddim steps", 5)
    assert [e[1:] for e in step_log.events[1:]] == [(k, 5) for k in range(1, 6)]
