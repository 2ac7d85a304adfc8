"""``gencli export format=diffusers``: a pixel-space DDPM as a folder that diffusers' ``DDPMPipeline`` loads.

gencli's UNet (:mod:`gencli.nets.unet`) is the DDPM paper's design, which diffusers' ``UNet2DModel`` also
builds (google/ddpm-cifar10-32 is that net converted), so the weights map one to one when the settings
agree:

==============================  ============================================================================
gencli UNet                     UNet2DModel config
==============================  ============================================================================
sinusoidal t embedding          ``time_embedding_type=positional``, ``flip_sin_to_cos=false`` ([sin, cos]),
(w_i = 10000^(-i/(ch/2 - 1)))   ``freq_shift=1``; ``temb`` (Linear, SiLU, Linear) -> ``time_embedding``
``ch``, ``ch_mult``             ``block_out_channels = ch * ch_mult`` (needs ``ch_mult[0] = 1``: diffusers'
                                conv_in, time embedding and output norm all take ``block_out_channels[0]``)
``num_res_blocks``              ``layers_per_block`` (up levels have one more, in both)
ResBlock                        ``ResnetBlock2D`` (GroupNorm, SiLU, conv, + time projection, GroupNorm, SiLU,
                                dropout, conv; 1x1 ``conv_shortcut`` when the width changes)
AttnBlock at ``attn_resolutions``  ``Attn{Down,Up}Block2D`` at those levels, one head (``attention_head_dim``
                                null); the 1x1 ``qkv`` conv splits into ``to_q``/``to_k``/``to_v``, ``proj``
                                is ``to_out.0``
strided 3x3 conv down,          ``downsample_padding=1``, ``downsample_type=conv``; ``upsample_type=conv``
nearest x2 + 3x3 conv up
every GroupNorm: ``norm_groups``  ``norm_num_groups`` (gencli narrows the groups of a layer whose width they do
groups, eps 1e-6                not divide; diffusers cannot, so such nets are refused), ``norm_eps=1e-6``
==============================  ============================================================================

The noise schedule becomes a ``DDPMScheduler`` with gencli's exact betas (``trained_betas``), the prediction
type (eps -> epsilon, v -> v_prediction, x0 -> sample), the DDPM sampler's variance (beta_tilde ->
fixed_small, beta -> fixed_large) and x0 clipping to [-1, 1]. Refused, each with the reason: families other
than pixel-space diffusion, latent diffusion (an MLP denoiser on an autoencoder's latent: no DDPMPipeline
part holds a first stage), class-conditional models (DDPMPipeline passes no class labels and has no guidance),
and UNets whose settings fall outside the table. ``tests/unit/test_export.py`` loads the folder with
``DDPMPipeline.from_pretrained`` and checks the UNet's outputs and the pipeline's samples against gencli's.
diffusers itself is only needed to load the folder, not to write it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from gencli.errors import ConfigError

#: What the config files name as the writing version: the oldest diffusers the test extra allows (the folder
#: is tested with the installed one).
DIFFUSERS_VERSION = "0.30.0"
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
VARIANCE_TYPES = {"beta_tilde": "fixed_small", "beta": "fixed_large"}
RESNET_NAMES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
                "conv2": "conv2", "skip": "conv_shortcut"}


def check_mappable(model: nn.Module) -> None:
    """Refuse, with every reason at once, a model whose net does not map exactly onto UNet2DModel/DDPMPipeline."""
    from gencli.families.diffusion import Diffusion, LatentDiffusion
    from gencli.nets.unet import UNet

    family = type(model).__name__
    fix = "Use format=safetensors, which exports any gencli model."
    if isinstance(model, LatentDiffusion):
        raise ConfigError(f"format=diffusers cannot export latent diffusion ({family}): DDPMPipeline diffuses pixels "
                          "with a UNet, while this model diffuses an autoencoder's latent vector with an MLP and decodes "
                          f"it with its first stage, which no DDPMPipeline part holds. {fix}")
    if not isinstance(model, Diffusion):
        raise ConfigError(f"format=diffusers exports pixel-space diffusion models (model=ddpm) as a DDPMPipeline; "
                          f"this checkpoint holds a {family}. {fix}")
    if getattr(model, "conditional", False):
        raise ConfigError("format=diffusers cannot export a class-conditional diffusion model: DDPMPipeline passes no "
                          "class labels to the UNet and has no classifier-free guidance, so it could not sample it as "
                          f"gencli does. {fix}")
    net = model.net
    if not isinstance(net, UNet):
        raise ConfigError(f"format=diffusers maps gencli's UNet onto UNet2DModel; this model's net is a "
                          f"{type(net).__name__}. {fix}")
    problems = net_mismatches(net)
    if problems:
        raise ConfigError(f"format=diffusers: this UNet does not map exactly onto diffusers' UNet2DModel: "
                          f"{'; '.join(problems)}. {fix}")


def levels(blocks: nn.ModuleList, separator: str) -> list[list[nn.ModuleDict]]:
    """The UNet's down (or up) blocks grouped into levels at each ``down`` (``up``) resampling block, which ends
    its level."""
    grouped: list[list[nn.ModuleDict]] = [[]]
    for block in blocks:
        grouped[-1].append(block)
        if separator in block:
            grouped.append([])
    return grouped


def net_mismatches(net: nn.Module) -> list[str]:
    """Every setting of a gencli UNet that UNet2DModel cannot reproduce (empty: it maps exactly)."""
    problems = []
    if net.ch < 4:
        problems.append(f"ch={net.ch}: the time embedding divides by ch/2 - 1, which diffusers computes as 0 for ch < 4")
    down = levels(net.down, "down")
    widths = [level[0]["res"].conv1.out_channels for level in down]
    if widths[0] != net.ch:
        problems.append(f"ch_mult[0]={widths[0] // net.ch}: UNet2DModel's conv_in, time embedding and output norm all "
                        "use the first level's width, so ch_mult must start with 1")
    norms = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.GroupNorm)]
    groups = {m.num_groups for _, m in norms}
    if len(groups) > 1:
        narrowed = [f"{name} ({m.num_channels} channels: {m.num_groups} groups)" for name, m in norms
                    if m.num_groups != max(groups)][:3]
        problems.append(f"its GroupNorms do not all have the same number of groups ({sorted(groups)}; e.g. {', '.join(narrowed)}): "
                        "gencli narrows model.net.norm_groups where it does not divide a width, diffusers has one "
                        "norm_num_groups; choose norm_groups dividing ch")
    if {m.eps for _, m in norms} != {1e-6}:
        problems.append("GroupNorm eps differs from 1e-6")
    for level in down:
        attn = {"attn" in block for block in level if "res" in block}
        if len(attn) > 1:
            problems.append("attention on some blocks of a level only")
    return problems


def unet_config(net: nn.Module) -> dict[str, Any]:
    """UNet2DModel's config.json for a mappable gencli UNet (see the module's table)."""
    down = levels(net.down, "down")
    attn = ["attn" in level[0] for level in down]
    norm = next(m for m in net.modules() if isinstance(m, nn.GroupNorm))
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": net.image_size,
        "in_channels": net.in_channels,
        "out_channels": net.conv_out.out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [level[0]["res"].conv1.out_channels for level in down],
        "layers_per_block": sum("res" in block for block in down[0]),
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": float(net.down[0]["res"].dropout.p),
        "act_fn": "silu",
        "attention_head_dim": None,  # one head over all channels, as the DDPM UNet
        "norm_num_groups": norm.num_groups,
        "norm_eps": norm.eps,
        "resnet_time_scale_shift": "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": None,
    }


def module_names(net: nn.Module) -> dict[str, tuple[str, str]]:
    """gencli module name -> (diffusers module name, kind: res | attn | plain)."""
    names = {"conv_in": ("conv_in", "plain"), "temb.0": ("time_embedding.linear_1", "plain"),
             "temb.2": ("time_embedding.linear_2", "plain"), "mid_res1": ("mid_block.resnets.0", "res"),
             "mid_attn": ("mid_block.attentions.0", "attn"), "mid_res2": ("mid_block.resnets.1", "res"),
             "norm_out": ("conv_norm_out", "plain"), "conv_out": ("conv_out", "plain")}
    for side, separator, blocks in (("down", "down", net.down), ("up", "up", net.up)):
        index = 0
        for level_index, level in enumerate(levels(blocks, separator)):
            j = 0
            for block in level:
                here = f"{side}.{index}"
                if separator in block:
                    sampler = "downsamplers" if side == "down" else "upsamplers"
                    names[f"{here}.{separator}.conv"] = (f"{side}_blocks.{level_index}.{sampler}.0.conv", "plain")
                else:
                    names[f"{here}.res"] = (f"{side}_blocks.{level_index}.resnets.{j}", "res")
                    if "attn" in block:
                        names[f"{here}.attn"] = (f"{side}_blocks.{level_index}.attentions.{j}", "attn")
                    j += 1
                index += 1
    return names


def unet_state_dict(net: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The net's tensors (``state``: its own names, e.g. the exported EMA weights) under UNet2DModel's names."""
    names = module_names(net)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        sub = ""
        if module not in names:  # inside a block: res.norm1, attn.qkv, ...
            module, _, sub = module.rpartition(".")
        target, kind = names[module]
        if kind == "res":
            out[f"{target}.{RESNET_NAMES[sub]}.{param}"] = value
        elif kind == "attn" and sub == "qkv":  # the 1x1 conv's (3C, C, 1, 1) -> three (C, C) Linear weights
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{target}.{name}.{param}"] = linear(part)
        elif kind == "attn":
            name = {"norm": "group_norm", "proj": "to_out.0"}[sub]
            out[f"{target}.{name}.{param}"] = linear(value) if sub == "proj" else value
        else:
            out[f"{target}.{param}"] = value
    if len(out) != len(state) + 2 * sum(".qkv." in key for key in state):  # each qkv tensor became three
        raise AssertionError("the UNet -> UNet2DModel name map lost or duplicated a tensor")  # a gencli bug
    return out


def linear(conv_tensor: Tensor) -> Tensor:
    """A 1x1 conv's weight (O, I, 1, 1) as a Linear's (O, I); a bias (O,) stays as it is."""
    return conv_tensor.reshape(conv_tensor.shape[0], -1).contiguous() if conv_tensor.ndim == 4 else conv_tensor.contiguous()


def scheduler_config(model: nn.Module) -> dict[str, Any]:
    """DDPMScheduler's config: gencli's exact betas, prediction type, the DDPM sampler's variance and clipping."""
    schedule, sampler = model.schedule, model.default_sampler
    variance = getattr(sampler, "variance", "beta_tilde")  # a DDIM default: DDPM's own posterior variance
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": schedule.timesteps,
        # informative: trained_betas (gencli's float64 betas) is what diffusers uses when it is set
        "beta_schedule": "linear" if schedule.kind == "linear" else "squaredcos_cap_v2",
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "trained_betas": [float(b) for b in schedule.betas],
        "variance_type": VARIANCE_TYPES[variance],
        "clip_sample": bool(sampler.clip_denoised),
        "clip_sample_range": 1.0,
        "prediction_type": PREDICTION_TYPES[model.prediction],
        "thresholding": False,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }


def model_index() -> dict[str, Any]:
    return {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
