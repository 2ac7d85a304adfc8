"""gencli's Hydra plugins. Hydra instantiates sweepers only from the ``hydra_plugins`` namespace, so the
resumable Optuna sweeper (implemented in :mod:`gencli.optuna_search`) is declared here."""

from gencli.optuna_search import ResumableOptunaSweeper


class GencliOptunaSweeper(ResumableOptunaSweeper):
    """``hydra.sweeper._target_`` of ``conf/hydra/sweeper/gencli_optuna.yaml``."""
