"""Class labels of generated images: which class image i is asked to be.

Like its noise (:mod:`gencli.seeds`), image i's label depends only on (the ``labels=`` setting, i), never on
the batch it is made in, so ``gencli sample`` and ``gencli eval`` of a conditional checkpoint agree image by
image at any batch size, and a run split over processes makes the same images.

``labels=`` (sample and eval):

- ``null`` (the default): class-balanced, image i is class ``i % K`` (K classes);
- a list ``[3,3,7]`` (class indices, or class names such as folder subfolders): image i is ``list[i % len]``;
- one class, ``7`` or ``cat``: every image;
- ``all`` (gencli sample): a grid with one row per class, ``nrow`` images (default 8) each.

An unconditional model takes no labels: asking for some is a ConfigError (exit 2), not a silent ignore.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gencli.errors import ConfigError

#: The rule, written into sample.json and metrics.json.
LABEL_RULE = "image i is class labels[i % len(labels)]; balanced (the default): class i % num_classes"


@dataclass(frozen=True)
class LabelPlan:
    """The class of every image index: ``labels[i % len(labels)]``, or ``i // per_row`` for a grid of all classes."""

    labels: tuple[int, ...]
    kind: str  # balanced | list | all
    class_names: tuple[str, ...] = ()
    per_row: int = 0  # kind=all: images per class (one grid row each)

    def label_of(self, i: int) -> int:
        if self.kind == "all":
            return self.labels[min(i // self.per_row, len(self.labels) - 1)]
        return self.labels[i % len(self.labels)]

    def labels_for(self, start: int, count: int, device: torch.device | str | None = None) -> Tensor:
        """The labels of images ``start .. start + count - 1`` as an int64 tensor."""
        return self.labels_of(range(int(start), int(start) + int(count)), device)

    def labels_of(self, indices: Sequence[int], device: torch.device | str | None = None) -> Tensor:
        """The labels of the images ``indices`` (a PerImageGenerator's) as an int64 tensor."""
        return torch.tensor([self.label_of(int(i)) for i in indices], dtype=torch.long, device=device)

    def name(self, label: int) -> str:
        return self.class_names[label] if label < len(self.class_names) else str(label)

    def describe(self) -> dict[str, Any]:
        shown = list(self.labels) if len(self.labels) <= 32 else [*self.labels[:32], "..."]
        return {"labels": self.kind if self.kind != "list" else shown, "rule": LABEL_RULE if self.kind != "all"
                else f"one row of {self.per_row} images per class, in class order",
                **({"class_names": list(self.class_names)} if self.class_names else {})}


def plan_labels(spec: Any, model, per_row: int = 8) -> LabelPlan | None:
    """The :class:`LabelPlan` for ``labels=spec`` and this model; None for an unconditional model given no labels.

    ``model`` is anything with ``conditional``, ``num_classes`` and ``class_names`` (a GenerativeModel)."""
    conditional = bool(getattr(model, "conditional", False))
    if not conditional:
        if spec is not None:
            raise ConfigError(
                f"labels={format_spec(spec)} asks for classes, but this checkpoint holds an unconditional "
                f"{type(model).__name__}: it was trained without labels and cannot be told which class to draw. Drop "
                "labels=, or train a class-conditional model with model.conditional=true (e.g. "
                "experiment=cddpm_mnist_cpu)."
            )
        return None
    k = int(model.num_classes)
    names = tuple(str(n) for n in (getattr(model, "class_names", None) or ()))
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("balanced", "null", "none", "")):
        return LabelPlan(tuple(range(k)), "balanced", names)
    if isinstance(spec, str) and spec.strip().lower() == "all":
        if per_row < 1:
            raise ConfigError(f"labels=all draws nrow={per_row} images per class; nrow must be >= 1.")
        return LabelPlan(tuple(range(k)), "all", names, per_row=int(per_row))
    items = list(spec) if isinstance(spec, Sequence) and not isinstance(spec, str) else [spec]
    if not items:
        raise ConfigError("labels=[] names no class; give class indices or names, e.g. labels=[3,7], or drop labels= "
                          "for class-balanced images.")
    return LabelPlan(tuple(class_index(item, k, names) for item in items), "list", names)


def class_index(item: Any, num_classes: int, names: Sequence[str]) -> int:
    """One entry of ``labels=``: a class index 0..K-1 or a class name."""
    if isinstance(item, bool):
        item = str(item)
    if isinstance(item, int) or (isinstance(item, str) and item.strip().lstrip("-").isdigit() and item not in names):
        index = int(item)
        if not 0 <= index < num_classes:
            raise ConfigError(f"labels: class {index} does not exist: this model knows {num_classes} classes, "
                              f"0..{num_classes - 1}{known_names(names)}.")
        return index
    if isinstance(item, str) and item in names:
        return list(names).index(item)
    raise ConfigError(f"labels: {item!r} is neither a class index (0..{num_classes - 1}) nor a class "
                      f"name{known_names(names)}.")


def known_names(names: Sequence[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return f" (names: {shown})"


def format_spec(spec: Any) -> str:
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return "[" + ",".join(str(s) for s in spec) + "]"
    return str(spec)


def default_labels(n: int, num_classes: int, generator: Any = None, device: Any = None) -> Tensor:
    """Class-balanced labels for a batch: image i (its index from a PerImageGenerator, else its row) is i % K."""
    indices = getattr(generator, "indices", None)
    rows = torch.tensor(indices, dtype=torch.long) if indices is not None and len(indices) == n else torch.arange(n)
    return (rows % int(num_classes)).to(device)
