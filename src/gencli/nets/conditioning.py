"""What every class-conditional net shares: the class count check and the class embedding with a "no class" row."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gencli.errors import ConfigError


def check_num_classes(num_classes: int | None) -> int:
    """0 for an unconditional net, else the number of classes (>= 2)."""
    if num_classes is None:
        return 0
    if int(num_classes) < 2:
        raise ConfigError(f"num_classes={num_classes} (model.net, model.generator or model.discriminator): a class-conditional net needs at least 2 classes "
                          "(null: unconditional).")
    return int(num_classes)


def class_embedding(embed: nn.Embedding | None, y: Tensor | None, n: int, device) -> Tensor | float:
    """The class embedding to add to the time embedding: 0 for an unconditional net, the "no class" token's
    (index num_classes) where ``y`` is None."""
    if embed is None:
        if y is not None:
            raise ValueError("class labels were given to an unconditional net (built with num_classes=null)")
        return 0.0
    if y is None:
        y = torch.full((n,), embed.num_embeddings - 1, dtype=torch.long, device=device)
    return embed(y)
