"""Lightning callbacks: checkpoints, preemption, the training random state, sample grids, in-training sample
quality, the GAN diversity monitor, the non-finite guard and the progress bar."""

from gencli.callbacks.checkpoint import ModelCheckpoint
from gencli.callbacks.gan_monitor import GANMonitor
from gencli.callbacks.lr_monitor import LearningRateMonitor
from gencli.callbacks.model_summary import ModelSummary
from gencli.callbacks.non_finite import NonFiniteGuard
from gencli.callbacks.optuna_pruning import OptunaPruning
from gencli.callbacks.preemption import Preemption
from gencli.callbacks.progress_bar import TrainingProgressBar
from gencli.callbacks.random_state import TrainingRandomState
from gencli.callbacks.sample_grid import SampleGrid
from gencli.callbacks.sample_quality import SampleQuality
from gencli.callbacks.throughput import Throughput

__all__ = ["GANMonitor", "LearningRateMonitor", "ModelCheckpoint", "ModelSummary", "NonFiniteGuard", "OptunaPruning", "Preemption", "SampleGrid", "SampleQuality",
           "Throughput", "TrainingProgressBar", "TrainingRandomState"]
