"""gencli's Hydra plugins. Hydra instantiates sweepers only from the ``hydra_plugins`` namespace, so the
resumable Optuna sweeper (implemented in :mod:`gencli.optuna_search`) is declared here.

Hydra imports every module of this namespace on every command (``gencli train``, ``gencli report``...), so this
one imports nothing optional: optuna and hydra-optuna-sweeper are loaded only when a sweep builds the sweeper.
Without them, those commands run as usual, and a search (``hparams_search=...``) is refused in one paragraph
naming the pip install (:func:`gencli.sweep.require_optuna`; the CLI checks it before Hydra starts).
"""

from typing import Any

from hydra.plugins.sweeper import Sweeper


class GencliOptunaSweeper(Sweeper):
    """``hydra.sweeper._target_`` of ``conf/hydra/sweeper/gencli_optuna.yaml``: builds
    :class:`gencli.optuna_search.ResumableOptunaSweeper` when a sweep asks for it, and hands it the work."""

    def __init__(self, **settings: Any) -> None:
        from gencli.sweep import require_optuna

        require_optuna("hydra.sweeper._target_=hydra_plugins.gencli_sweepers.GencliOptunaSweeper")
        from gencli.optuna_search import ResumableOptunaSweeper

        self.search = ResumableOptunaSweeper(**settings)

    @property
    def sweeper(self) -> Any:
        """The plugin's implementation (as on hydra-optuna-sweeper's own ``OptunaSweeper``)."""
        return self.search.sweeper

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.search.sweep(arguments)
