"""Evaluation metrics: each is an EvalMetric that ``gencli eval`` instantiates from ``conf/metric/``."""

from gencli.metrics.base import EvalContext, EvalMetric

__all__ = ["EvalContext", "EvalMetric"]
