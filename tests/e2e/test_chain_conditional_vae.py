"""The class-conditional chain of the vae family (tests in conditional_chain.py)."""

from conditional_chain import *  # noqa: F403 - the chain's tests, collected here
from conditional_chain import trained_fixture

trained = trained_fixture("vae")
