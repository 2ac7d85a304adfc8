"""The three jobs, each a short function: compose config -> instantiate -> run -> write outputs."""

import logging
import warnings

# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per run: noise to a user.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# conf/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml give Hydra's launcher plugins gencli's
# defaults under the plugins' own names, completed by the plugins' schemas of the same name. Hydra 1.3
# does that (its tests rely on it) but warns once per composition that it is deprecated: noise to a user.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")
# GANs have no validation loss: the data module's val split feeds their monitors and in-training FID instead, so
# Lightning's "val_dataloader but no validation_step. Skipping val loop" is noise (every other family validates).
warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no `validation_step`")


class _NoAdverts(logging.Filter):
    """Drop Lightning's tips that advertise services ("Tip: ... try installing litlogger"), and its note that our own
    ModelSummary callback replaces its default one: neither applies to a gencli user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("\N{ELECTRIC LIGHT BULB} Tip:",
                                               "Trainer already configured with model summary callbacks"))


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())
