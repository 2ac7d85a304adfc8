"""The three jobs, each a short function: compose config -> instantiate -> run -> write outputs."""

import warnings

# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates, once per run: noise to a user.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
