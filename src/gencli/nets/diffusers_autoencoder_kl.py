"""State-dict mapping between gencli's :class:`~gencli.nets.kl_autoencoder.KLAutoencoder` and diffusers'
``AutoencoderKL`` (``src/diffusers/models/autoencoders/autoencoder_kl.py``, ``vae.py``); pure dict and tensor code,
diffusers is not needed.

gencli's keys are latent-diffusion's, so the mapping is the one diffusers' own converters apply
(``scripts/convert_diffusers_to_original_stable_diffusion.py``, ``loaders/single_file_utils.py``
``convert_ldm_vae_checkpoint``):

==========================================  =================================================
gencli / latent-diffusion                   diffusers
==========================================  =================================================
encoder.down.{i}.block.{j}.*                encoder.down_blocks.{i}.resnets.{j}.*
encoder.down.{i}.downsample.conv.*          encoder.down_blocks.{i}.downsamplers.0.conv.*
decoder.up.{i}.block.{j}.*                  decoder.up_blocks.{L-1-i}.resnets.{j}.*  (reversed)
decoder.up.{i}.upsample.conv.*              decoder.up_blocks.{L-1-i}.upsamplers.0.conv.*
{en,de}coder.mid.block_{k}.*                {en,de}coder.mid_block.resnets.{k-1}.*
{en,de}coder.mid.attn_1.norm.*              {en,de}coder.mid_block.attentions.0.group_norm.*
{en,de}coder.mid.attn_1.{q,k,v}.*           {en,de}coder.mid_block.attentions.0.to_{q,k,v}.*  (1x1 conv -> Linear)
{en,de}coder.mid.attn_1.proj_out.*          {en,de}coder.mid_block.attentions.0.to_out.0.*    (1x1 conv -> Linear)
...nin_shortcut.*                           ...conv_shortcut.*
{en,de}coder.norm_out.*                     {en,de}coder.conv_norm_out.*
conv_in, conv_out, quant_conv, post_quant_conv, norm1, conv1, norm2, conv2: unchanged
==========================================  =================================================

with L = len(ch_mult). The attention weights are 1x1 convs (C, C, 1, 1) in gencli and Linear (C, C) in diffusers.
Every key must match a rule: an unknown key is an error, so nothing is dropped or passed through silently.

An architecture maps only where diffusers can build it (:func:`check_exportable`): its encoder's ``conv_in`` has
``block_out_channels[0]`` outputs where latent-diffusion's has ``ch``, so ``ch_mult[0]`` must be 1 (true of every
published KL autoencoder).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import Tensor

from gencli.errors import ConfigError

_ATTN_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_TO_GENCLI = {v: k for k, v in _ATTN_TO_DIFFUSERS.items()}
_RESNET_PARTS = {"norm1", "conv1", "norm2", "conv2"}
_PARAM = r"(weight|bias)"


def _levels(keys, pattern: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    if not found:
        raise ValueError(f"no key matches {pattern!r}: this is not a KL autoencoder state dict")
    return max(found) + 1


def _resnet_part(part: str, to_diffusers: bool) -> str | None:
    if part in _RESNET_PARTS:
        return part
    if to_diffusers and part == "nin_shortcut":
        return "conv_shortcut"
    if not to_diffusers and part == "conv_shortcut":
        return "nin_shortcut"
    return None


def gencli_to_diffusers_key(key: str, levels: int) -> str:
    """The diffusers name of one gencli (latent-diffusion) key; ``levels`` = len(ch_mult). ValueError if unknown."""
    if re.fullmatch(rf"(quant_conv|post_quant_conv)\.{_PARAM}", key):
        return key
    m = re.fullmatch(rf"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.{_PARAM}", key)
    if m:
        return f"{m[1]}.{'conv_norm_out' if m[2] == 'norm_out' else m[2]}.{m[3]}"
    m = re.fullmatch(rf"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.{_PARAM}", key)
    if m and (part := _resnet_part(m[3], True)):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{part}.{m[4]}"
    m = re.fullmatch(rf"encoder\.down\.(\d+)\.downsample\.conv\.{_PARAM}", key)
    if m:
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    m = re.fullmatch(rf"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.{_PARAM}", key)
    if m and (part := _resnet_part(m[3], True)) and int(m[1]) < levels:
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{part}.{m[4]}"
    m = re.fullmatch(rf"decoder\.up\.(\d+)\.upsample\.conv\.{_PARAM}", key)
    if m and int(m[1]) < levels:
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    m = re.fullmatch(rf"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.{_PARAM}", key)
    if m and (part := _resnet_part(m[3], True)):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{part}.{m[4]}"
    m = re.fullmatch(rf"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.{_PARAM}", key)
    if m:
        return f"{m[1]}.mid_block.attentions.0.{_ATTN_TO_DIFFUSERS[m[2]]}.{m[3]}"
    raise ValueError(f"{key!r} is not a key of gencli's KL autoencoder: no diffusers AutoencoderKL name for it")


def diffusers_to_gencli_key(key: str, levels: int) -> str:
    """The gencli (latent-diffusion) name of one diffusers ``AutoencoderKL`` key. ValueError if unknown."""
    if re.fullmatch(rf"(quant_conv|post_quant_conv)\.{_PARAM}", key):
        return key
    m = re.fullmatch(rf"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.{_PARAM}", key)
    if m:
        return f"{m[1]}.{'norm_out' if m[2] == 'conv_norm_out' else m[2]}.{m[3]}"
    m = re.fullmatch(rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.{_PARAM}", key)
    if m and (part := _resnet_part(m[3], False)):
        return f"encoder.down.{m[1]}.block.{m[2]}.{part}.{m[4]}"
    m = re.fullmatch(rf"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_PARAM}", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.{_PARAM}", key)
    if m and (part := _resnet_part(m[3], False)) and int(m[1]) < levels:
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{part}.{m[4]}"
    m = re.fullmatch(rf"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.{_PARAM}", key)
    if m and int(m[1]) < levels:
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.fullmatch(rf"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.{_PARAM}", key)
    if m and (part := _resnet_part(m[3], False)):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{part}.{m[4]}"
    m = re.fullmatch(rf"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.{_PARAM}",
                     key)
    if m:
        return f"{m[1]}.mid.attn_1.{_ATTN_TO_GENCLI[m[2]]}.{m[3]}"
    raise ValueError(f"{key!r} is not a key of diffusers' AutoencoderKL that gencli's KL autoencoder has")


def _is_attn_projection(diffusers_key: str) -> bool:
    return bool(re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key))


def _convert(state_dict: dict[str, Tensor], name: Callable[[str], str],
             reshape: Callable[[str, str, Tensor], Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = name(key)
        if new in out:
            raise ValueError(f"two keys map to {new!r}: the mapping is not one-to-one here")
        out[new] = reshape(key, new, value)
    return out


def _conv_to_linear(old: str, new: str, v: Tensor) -> Tensor:
    if not _is_attn_projection(new):
        return v
    if v.dim() != 4 or v.shape[2:] != (1, 1):
        raise ValueError(f"{old!r} has shape {tuple(v.shape)}: a 1x1 conv weight (C, C, 1, 1) was expected")
    return v.reshape(v.shape[:2])


def _linear_to_conv(old: str, new: str, v: Tensor) -> Tensor:
    if not _is_attn_projection(old):
        return v
    if v.dim() != 2:
        raise ValueError(f"{old!r} has shape {tuple(v.shape)}: a Linear weight (C, C) was expected")
    return v.reshape(*v.shape, 1, 1)


def to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A gencli KL autoencoder state dict (``KLAutoencoder.state_dict()``) in diffusers' ``AutoencoderKL`` layout.
    The attention projections' (C, C, 1, 1) conv weights become (C, C) Linear weights (views, not copies)."""
    levels = _levels(state_dict, r"decoder\.up\.(\d+)\.")
    return _convert(state_dict, lambda k: gencli_to_diffusers_key(k, levels), _conv_to_linear)


def from_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`to_diffusers`: a diffusers ``AutoencoderKL`` state dict in gencli's layout."""
    levels = _levels(state_dict, r"decoder\.up_blocks\.(\d+)\.")
    return _convert(state_dict, lambda k: diffusers_to_gencli_key(k, levels), _linear_to_conv)


def check_exportable(config: dict) -> None:
    """ConfigError naming the reason if diffusers' ``AutoencoderKL`` cannot hold this architecture."""
    ch_mult = list(config["ch_mult"])
    if ch_mult[0] != 1:
        raise ConfigError(f"model.net.ch_mult={ch_mult} cannot be exported to diffusers' AutoencoderKL: its encoder's "
                          f"first conv has ch * ch_mult[0] outputs where gencli's (and latent-diffusion's) has ch, so "
                          "the weights do not fit. Only nets with ch_mult[0] = 1 export (every published KL "
                          "autoencoder has it); train with e.g. model.net.ch_mult=[1,2,4].")


def diffusers_config(config: dict, scaling_factor: float) -> dict:
    """The ``config.json`` of diffusers' ``AutoencoderKL`` for a gencli ``KLAutoencoder.config`` and the latent
    diffusion model's ``scale_factor`` (diffusers' ``scaling_factor``: latents are multiplied by it before the
    UNet and divided by it before decoding)."""
    check_exportable(config)
    levels = len(config["ch_mult"])
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": int(config["in_channels"]),
        "out_channels": int(config["out_channels"]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [int(config["ch"]) * int(m) for m in config["ch_mult"]],
        "layers_per_block": int(config["num_res_blocks"]),
        "act_fn": "silu",
        "latent_channels": int(config["z_channels"]),
        "norm_num_groups": int(config["norm_groups"]),
        "sample_size": int(config["image_size"]),
        "scaling_factor": float(scaling_factor),
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": bool(config["mid_attention"]),
    }
