"""Exported weights: a ``.safetensors`` file and the JSON beside it (``gencli export format=safetensors``).

The pair is what leaves gencli without Lightning or pickles:

- ``NAME.safetensors``: the model's tensors (safetensors stores raw tensors and a JSON header, so reading
  it cannot run code, unlike a pickle);
- ``NAME.json`` (the fixed naming rule: same folder, same stem): the checkpoint's ``gencli`` record (the
  resolved run config, family, image shape, classes), which weights were exported, and the SHA-256 of
  the weights file, so a JSON paired with another export's weights is refused rather than half-loaded.

EMA: a family that keeps an exponential moving average of a net (``X_ema`` beside ``X``: diffusion's
``net_ema``, the GAN's ``generator_ema``) samples with it by default, so the export stores the EMA weights
under the raw net's names (``weights: "ema"``) and leaves the copy out; ``use_ema=false`` stores the raw
weights instead. Reading an export back (:func:`read_export`, called by the one checkpoint loader for a
``.safetensors`` path) gives a checkpoint-shaped dict that goes through the same checks as a ``.ckpt``
(format version, allow-listed ``_target_``\\ s, the model rebuilt from the config, every tensor's name and
shape); :func:`finish_restore` then puts the weights where sampling looks for them and records that only
those weights exist, so ``use_ema=`` asking for the others is refused (:func:`check_use_ema`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from gencli.errors import ConfigError

#: Version of the export JSON (``gencli_export``); a newer one is refused with "upgrade gencli".
EXPORT_FORMAT = 1
SUFFIX = ".safetensors"
#: Suffix of a module name whose weights are an EMA copy of the module without it (``net_ema`` of ``net``).
EMA_SUFFIX = "_ema"
#: Keys of the checkpoint's gencli record that are training state, not what rebuilds the model.
TRAINING_STATE = ("latent_moments",)


def json_path(weights: str | os.PathLike) -> Path:
    """The JSON that goes with a weights file: ``model.safetensors`` -> ``model.json``."""
    return Path(weights).with_suffix(".json")


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``ckpt=path`` names an export (its .safetensors, or its .json) rather than a Lightning .ckpt."""
    return Path(str(path)).suffix in (SUFFIX, ".json")


# ----------------------------------------------------------------------------- choosing the weights
def ema_pairs(state_dict: dict[str, Tensor]) -> dict[str, str]:
    """{raw module: its EMA copy} for the top-level modules of a state dict (``{"net": "net_ema"}``)."""
    prefixes = {key.split(".", 1)[0] for key in state_dict}
    return {name[: -len(EMA_SUFFIX)]: name for name in sorted(prefixes)
            if name.endswith(EMA_SUFFIX) and name[: -len(EMA_SUFFIX)] in prefixes}


def pick_weights(state_dict: dict[str, Tensor], use_ema: bool | None, family: str) -> tuple[dict[str, Tensor], str]:
    """The tensors to export and which weights they are ("ema" or "raw"): with EMA (the default where the family
    keeps one) each EMA copy's tensors take the raw module's names; the copies themselves are left out."""
    pairs = ema_pairs(state_dict)
    if use_ema is None:
        use_ema = bool(pairs)
    if use_ema and not pairs:
        raise ConfigError(f"use_ema=true, but this {family} keeps no EMA weights (only GANs and diffusion models "
                          "trained with model.ema_decay set do). Drop use_ema= to export its weights.")
    copies = {f"{ema}." for ema in pairs.values()}
    chosen = {}
    for key in state_dict:
        if any(key.startswith(prefix) for prefix in copies):
            continue
        source = key
        if use_ema:
            raw, _, rest = key.partition(".")
            if raw in pairs:
                source = f"{pairs[raw]}.{rest}"
                if source not in state_dict:
                    raise ConfigError(f"the checkpoint's {pairs[raw]} has no tensor {rest} although {key} exists: it "
                                      "is corrupt or was edited. Export with use_ema=false, or use another checkpoint.")
        # safetensors wants contiguous tensors that share no memory with each other
        chosen[key] = state_dict[source].detach().cpu().clone().contiguous()
    return chosen, "ema" if use_ema else "raw"


def export_record(checkpoint: dict[str, Any], weights: str, pairs: dict[str, str], source: str) -> dict[str, Any]:
    """The JSON beside the weights: the gencli record that rebuilds the model (plain data only) and what was exported."""
    record = {key: value for key, value in checkpoint["gencli"].items()
              if key not in TRAINING_STATE and _plain(value)}
    return {
        "gencli_export": EXPORT_FORMAT,
        "weights": weights,
        # which EMA copies exist in the model and were folded into (or left out of) the file
        "ema_modules": pairs,
        "source": source,
        "gencli": record,
    }


def _plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


# ----------------------------------------------------------------------------- writing
def write_export(tensors: dict[str, Tensor], record: dict[str, Any], weights_path: Path) -> tuple[Path, Path]:
    """Write the weights and then their JSON, each to a temporary name renamed into place. The JSON carries the
    weights' SHA-256, so a crash between the two renames leaves a pair that is refused, never a wrong one."""
    from safetensors.torch import save

    from gencli.io import atomic_write, write_json

    data = save(tensors, metadata={"format": "pt", "gencli_export": str(EXPORT_FORMAT)})
    record = {**record, "weights_file": weights_path.name, "sha256": hashlib.sha256(data).hexdigest(),
              "tensors": len(tensors), "parameters": int(sum(t.numel() for t in tensors.values()))}
    with atomic_write(weights_path, "wb") as f:
        f.write(data)
    return weights_path, write_json(json_path(weights_path), record)


# ----------------------------------------------------------------------------- reading
def read_export(path: str | os.PathLike, key: str = "ckpt") -> dict[str, Any]:
    """Read an export pair (``path`` names the .safetensors or its .json) as a checkpoint-shaped dict:
    ``{"state_dict", "gencli", "export"}``. The caller (``checkpoints.load_checkpoint``) checks the gencli
    record like a .ckpt's."""
    from safetensors.torch import load

    given = Path(str(path)).expanduser()
    weights = given.with_suffix(SUFFIX)
    meta_path = json_path(weights)
    if key == "resume":
        raise ConfigError(f"resume={given} is an export (weights only, from 'gencli export'): it holds no optimiser, "
                          "schedule or loop state to continue from. Resume from the .ckpt it was exported from.")
    for needed, what in ((weights, "weights"), (meta_path, "JSON config")):
        if not needed.is_file():
            raise ConfigError(
                f"{key}={given}: the export's {what} {needed} is missing. 'gencli export' writes NAME.safetensors "
                "with NAME.json beside it (same folder, same name); copy both, or export again from the .ckpt."
            )
    try:
        record = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{key}={given}: {meta_path} is not readable JSON ({err}); it is corrupt or was not written "
                          "by 'gencli export'. Export again from the .ckpt.") from err
    if not isinstance(record, dict) or "gencli_export" not in record:
        raise ConfigError(f"{key}={given}: {meta_path} is JSON but not a gencli export record (no 'gencli_export' "
                          "key); give the JSON 'gencli export' wrote beside the weights.")
    version = record["gencli_export"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f"{key}={given}: {meta_path} has the export format {version!r}, which gencli never writes; "
                          "it was edited. Export again from the .ckpt.")
    if version > EXPORT_FORMAT:
        raise ConfigError(f"{key}={given} was exported by a newer gencli (export format {version}; this one reads "
                          f"up to {EXPORT_FORMAT}). Upgrade gencli to load it.")
    meta = record.get("gencli")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or not meta["config"]:
        raise ConfigError(f"{key}={given}: {meta_path} carries no gencli config (its 'gencli.config' is missing), so "
                          "the model cannot be rebuilt from it. Export again from the .ckpt.")
    if record.get("weights") not in ("ema", "raw") or not isinstance(record.get("ema_modules", {}), dict):
        raise ConfigError(f"{key}={given}: {meta_path} says weights={record.get('weights')!r}; gencli writes 'ema' or "
                          "'raw' (and an ema_modules mapping). The file was edited; export again.")
    try:
        data = weights.read_bytes()
    except OSError as err:
        raise ConfigError(f"{key}={given}: {weights} cannot be read ({err.strerror or err}).") from err
    digest = hashlib.sha256(data).hexdigest()
    if record.get("sha256") != digest:
        raise ConfigError(
            f"{key}={given}: {weights} is not the weights file {meta_path} describes (SHA-256 {digest[:12]}..., the "
            f"JSON expects {str(record.get('sha256'))[:12]}...): the pair comes from two exports, or one of them was "
            "truncated or changed. Copy both files of one export again, or export again from the .ckpt."
        )
    try:
        state_dict = load(data)
    except Exception as err:  # safetensors' SafetensorError (a bad header) or a bad dtype: not an export
        raise ConfigError(f"{key}={given}: {weights} is not a readable safetensors file ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else 'unreadable'}). Export again from the "
                          ".ckpt.") from err
    return {"state_dict": state_dict, "gencli": meta, "export": {**record, "path": str(weights)}}


def expand_state(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The exported tensors with each EMA copy filled in from the module it was exported under, so the model the
    config builds (EMA copy included) loads with no key missing; :func:`finish_restore` sorts out which is which."""
    state = dict(checkpoint["state_dict"])
    for raw, ema in checkpoint["export"].get("ema_modules", {}).items():
        for key in list(checkpoint["state_dict"]):
            if key.startswith(f"{raw}."):
                state[f"{ema}.{key[len(raw) + 1:]}"] = checkpoint["state_dict"][key]
    return state


def finish_restore(model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """After loading: an EMA export samples with the EMA copy (which holds the exported weights, as the raw
    module does); a raw export drops the copy, so sampling uses the raw weights and says so. Either way the
    model remembers which weights it has (``exported_weights``) for :func:`check_use_ema`."""
    export = checkpoint["export"]
    if export["weights"] == "raw":
        for ema in export.get("ema_modules", {}).values():
            if isinstance(getattr(model, ema, None), nn.Module):
                setattr(model, ema, None)
    model.exported_weights = export["weights"]
    model.export_path = export["path"]


def check_use_ema(model: nn.Module, use_ema: Any) -> None:
    """Refuse ``use_ema=`` asking for weights that an export does not hold (it holds one set, EMA or raw)."""
    held = getattr(model, "exported_weights", None)
    if held is None or use_ema is None or bool(use_ema) == (held == "ema"):
        return
    other = "use_ema=false" if held == "ema" else "use_ema=true"
    raise ConfigError(
        f"use_ema={str(use_ema).lower()}: {getattr(model, 'export_path', 'this export')} holds only the "
        f"{'EMA' if held == 'ema' else 'raw'} weights (exported with the {'default' if held == 'ema' else 'raw'} "
        f"choice), not the {'raw' if held == 'ema' else 'EMA'} ones. Drop use_ema=, or export the checkpoint again "
        f"with 'gencli export ckpt=... {other}', or sample from the .ckpt."
    )

