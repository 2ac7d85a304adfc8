"""The three jobs, each a short function: compose config -> instantiate -> run -> write outputs."""

import warnings

# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per run: noise to a user.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# conf/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml give Hydra's launcher plugins gencli's
# defaults under the plugins' own names, completed by the plugins' schemas of the same name. Hydra 1.3
# does that (its tests rely on it) but warns once per composition that it is deprecated: noise to a user.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")
