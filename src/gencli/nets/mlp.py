"""A residual MLP denoiser for vector-shaped data, e.g. the latents of a trained autoencoder.

(x_t (N, D), t (N,)) -> prediction (N, D); the latent-diffusion counterpart of the UNet, which needs
images. Pre-norm residual blocks (LayerNorm -> SiLU -> Linear, + time embedding, -> SiLU -> dropout
-> Linear), the last layer of each block and the output zero-initialised so the net starts at 0.
"""

from __future__ import annotations

from torch import Tensor, nn

from gencli.errors import ConfigError
from gencli.nets.conditioning import check_num_classes, class_embedding
from gencli.nets.unet import timestep_embedding


class MLPBlock(nn.Module):
    def __init__(self, hidden: int, temb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.temb_proj = nn.Linear(temb_dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        out = self.fc1(nn.functional.silu(self.norm(h))) + self.temb_proj(temb)
        return h + self.fc2(self.dropout(nn.functional.silu(out)))


class MLPDenoiser(nn.Module):
    def __init__(self, in_features: int, hidden: int = 512, depth: int = 4, time_dim: int = 128, dropout: float = 0.0,
                 num_classes: int | None = None):
        super().__init__()
        if in_features < 1 or hidden < 1 or depth < 1:
            raise ConfigError(f"model.net: in_features={in_features}, hidden={hidden}, depth={depth} must all be >= 1.")
        self.in_features, self.time_dim = int(in_features), int(time_dim)
        self.temb = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        # class-conditional: a class embedding added to the time embedding; index num_classes is "no class"
        self.num_classes = check_num_classes(num_classes)
        self.class_embed = nn.Embedding(self.num_classes + 1, hidden) if self.num_classes else None
        self.inp = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, hidden, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, in_features)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        temb = self.temb(timestep_embedding(t, self.time_dim)) + class_embedding(self.class_embed, y, len(x), x.device)
        temb = nn.functional.silu(temb)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(nn.functional.silu(self.norm_out(h)))
