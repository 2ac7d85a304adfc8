"""The report's plots, drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
backend switch) and returned as PNG bytes.

- :func:`curve_families` groups logged columns into one small plot per quantity: ``train/loss`` and
  ``val/loss`` together, ``val/loss_t0..t3`` together, every ``lr-*`` together.
- :func:`curves_png` draws one such plot against the optimiser step (a log axis when the values span a decade).
- :func:`metric_vs_param_png` draws a sweep's metric against one swept parameter: a numeric axis (log when the
  values span two decades or more) when every value is a number, else one category per value.
"""

from __future__ import annotations

import io
import math
import re

from gencli.reports.read import Curves

SPLITS = ("train", "val", "test")
#: ``loss_t0``, ``loss_t1``...: one quantity at several timesteps (diffusion) or indices: one plot
INDEXED = re.compile(r"^(.*?)_(t?)\d+$")


def family_of(column: str) -> str:
    if column == "lr" or column.startswith(("lr-", "lr/")):  # Lightning's lr-Adam, gencli's lr/generator
        return "learning rate"
    split, _, base = column.partition("/")
    if split not in SPLITS or not base:
        base = column
    indexed = INDEXED.match(base)
    return f"{indexed.group(1)}_{indexed.group(2)}*" if indexed else base


def curve_families(curves: Curves) -> dict[str, list[str]]:
    families: dict[str, list[str]] = {}
    for column in curves.series:
        families.setdefault(family_of(column), []).append(column)
    # the loss first (what one looks at first), the learning rate last, the rest in the order they were logged
    order = sorted(families, key=lambda name: 0 if name == "loss" else 2 if name == "learning rate" else 1)
    return {name: families[name] for name in order}


def _figure(width: float = 4.2, height: float = 2.8):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=90, layout="constrained")
    return figure, figure.add_subplot()


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _spans_decades(values: list[float], ratio: float = 100) -> bool:
    return bool(values) and min(values) > 0 and max(values) / min(values) >= ratio


def curves_png(family: str, columns: list[str], curves: Curves) -> bytes:
    figure, axes = _figure()
    every = []
    for column in columns:
        steps, values = curves.series[column]
        style = {"marker": "o", "markersize": 3} if len(values) < 30 else {}
        axes.plot(steps, values, label=column, linewidth=1.2, **style)
        every.extend(values)
    if _spans_decades(every, 10):  # a loss that falls tenfold: its late changes are visible on a log axis only
        axes.set_yscale("log")
    axes.set_title(family, fontsize=10)
    axes.set_xlabel("step", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    return _png(figure)


def is_numeric(values: list) -> bool:
    try:
        return all(math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def metric_vs_param_png(param: str, xs: list, ys: list[float], metric: str, best: int | None = None,
                        groups: list[str] | None = None) -> bytes:
    """``metric`` of each completed job against its value of ``param``; ``best`` (an index) is ringed. ``groups``
    labels each job by its other swept values: one line per label, so jobs that differ elsewhere are not joined."""
    figure, axes = _figure(4.6, 3.0)
    numeric = is_numeric(xs)
    categories = list(dict.fromkeys(str(x) for x in xs))
    positions = [float(x) for x in xs] if numeric else [float(categories.index(str(x))) for x in xs]
    labels = groups or [""] * len(xs)
    for label in dict.fromkeys(labels):
        members = sorted((i for i, g in enumerate(labels) if g == label), key=positions.__getitem__)
        axes.plot([positions[i] for i in members], [ys[i] for i in members], "o-" if numeric else "o",
                  linewidth=1, markersize=5, label=label or None)
    if numeric and _spans_decades(positions):
        axes.set_xscale("log")
    if not numeric:
        axes.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 4 else 0,
                        ha="right" if len(categories) > 4 else "center")
    if best is not None:
        axes.plot([positions[best]], [ys[best]], "o", markersize=12, markerfacecolor="none", color="tab:green",
                  label="best")
    if best is not None or any(labels):
        axes.legend(fontsize=7)
    axes.set_xlabel(param, fontsize=9)
    axes.set_ylabel(metric, fontsize=9)
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
    return _png(figure)
