"""What gencli sends to Lightning's loggers beyond scalars: sample grids, the run's config, the final metrics.

Lightning gives every logger ``log_metrics`` and ``log_hyperparams``, but images, summaries and closing a run are
each logger's own API. This module is the one place that knows them, so the sample-grid callback and the train
job stay logger-agnostic:

- :func:`log_image`: TensorBoard ``add_image``, W&B ``log_image`` (media in the run), MLflow ``log_image`` (an
  image artifact with its step); CSV keeps no images (the PNGs are in ``<run>/samples``).
- :func:`log_config`: the fully resolved run config (what ``.hydra/config.yaml`` and every checkpoint hold). W&B
  takes it nested; MLflow takes flat ``key=value`` params under Hydra's dotted override names
  (``model.latent_dim``), each value cut to MLflow's limit, so the full config is also logged as ``config.yaml``.
- :func:`log_final_metrics`: what ``metrics.json`` holds, as ``final/<name>``: W&B's run summary, MLflow metrics
  and a tag with the run's status, TensorBoard scalars at the last step. Then :func:`close` ends the W&B run
  (the next job of a multirun would otherwise log into this one) and says how to upload an offline run.

W&B and MLflow are optional extras; :func:`missing_package` lets the schema refuse ``logger=wandb`` before
anything runs when the package is absent, instead of an ImportError from deep inside Lightning.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

#: Logger classes that need a package gencli does not install by default: the module, the pip extra, and the
#: logger= option that composes it.
OPTIONAL = {
    "lightning.pytorch.loggers.WandbLogger": ("wandb", "wandb", "wandb"),
    "lightning.pytorch.loggers.MLFlowLogger": ("mlflow", "mlflow", "mlflow"),
}

#: MLflow's own limits (mlflow.utils.validation): param values up to 6000 characters, keys up to 250,
#: at most 100 params per log_batch call.
MLFLOW_PARAM_VALUE = 6000
MLFLOW_PARAM_KEY = 250
MLFLOW_BATCH = 100


def missing_package(target: str) -> str | None:
    """The fix, when ``target`` is a logger class whose optional package is not installed; else None."""
    if target not in OPTIONAL:
        return None
    module, extra, option = OPTIONAL[target]
    if importlib.util.find_spec(module) is not None:
        return None
    return (f"logger={option} needs the {module} package, which is not installed: pip install 'gencli[{extra}]' "
            f"(or choose another logger: logger=csv, logger=tensorboard or a list such as logger=[csv,tensorboard]).")


def kind(logger: Any) -> str | None:
    """'tensorboard', 'wandb', 'mlflow' or 'csv' for Lightning's loggers (by class, without importing the optional
    packages), None for any other."""
    names = {cls.__name__ for cls in type(logger).__mro__}
    for name, short in (("TensorBoardLogger", "tensorboard"), ("WandbLogger", "wandb"), ("MLFlowLogger", "mlflow"),
                        ("CSVLogger", "csv")):
        if name in names:
            return short
    return None


def rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def log_image(logger: Any, key: str, image: Any, step: int) -> bool:
    """Log one CHW image in [0, 1] (a tensor) to ``logger`` if it keeps images; returns whether it did."""
    if not rank_zero():
        return False
    which = kind(logger)
    if which == "tensorboard":
        logger.experiment.add_image(key, image.clamp(0, 1), step)
        return True
    if which not in ("wandb", "mlflow"):
        return False
    array = (image.detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    if array.shape[-1] == 1:
        array = array[..., 0]  # grayscale: both libraries take H x W
    if which == "wandb":
        logger.log_image(key=key, images=[array], step=step)
    else:
        # an image "over time": the UI shows it with a step slider (images/<key>+step+<n>+...png in the artifacts)
        logger.experiment.log_image(logger.run_id, array, key=key, step=int(step), synchronous=True)
    return True


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"latent_dim": 16}}`` -> ``{"model.latent_dim": 16}``: Hydra's override names."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def mlflow_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The flat config as MLflow params: values as text (YAML-ish: null, true, lists as [a, b]) cut to MLflow's
    limit with a note saying so; keys longer than MLflow takes are left out (config.yaml has them)."""
    import json

    params = {}
    for key, value in flatten(config).items():
        if len(key) > MLFLOW_PARAM_KEY:
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > MLFLOW_PARAM_VALUE:
            note = " ... (cut: the full value is in config.yaml)"
            text = text[: MLFLOW_PARAM_VALUE - len(note)] + note
        params[key] = text
    return params


def log_config(loggers: Iterable[Any], config: Mapping[str, Any] | None) -> None:
    """Log the run's resolved config to the loggers that keep one (W&B, MLflow). TensorBoard and CSV get Lightning's
    own ``log_hyperparams`` (the model's hyper-parameters); the run folder has the whole config in .hydra/."""
    if not config or not rank_zero():
        return
    config = {k: v for k, v in config.items() if k != "hydra"}
    for logger in loggers:
        which = kind(logger)
        if which in ("wandb", "mlflow"):
            start(logger, which)
        if which == "wandb":
            logger.experiment.config.update(dict(config), allow_val_change=True)
        elif which == "mlflow":
            from mlflow.entities import Param

            client, run_id = logger.experiment, logger.run_id
            params = [Param(key, value) for key, value in mlflow_params(config).items()]
            for first in range(0, len(params), MLFLOW_BATCH):
                client.log_batch(run_id, params=params[first: first + MLFLOW_BATCH])
            client.log_dict(run_id, dict(config), "config.yaml")


def start(logger: Any, which: str) -> None:
    """Open the logger's run now, before training, so that a W&B run without a login or an MLflow server that
    cannot be reached is one paragraph at the start, not a traceback."""
    from gencli.errors import RuntimeFailure

    try:
        logger.experiment  # noqa: B018 - the property starts the run
        if which == "mlflow":
            logger.run_id  # noqa: B018 - and this creates the experiment and the run
    except Exception as err:  # noqa: BLE001 - any library error becomes the one paragraph below
        reason = " ".join(str(err).split())[:300]
        fix = ("Offline runs need neither: logger.wandb.offline=true (the default; upload later with wandb sync), "
               "or run 'wandb login' (or set WANDB_API_KEY) for an online run." if which == "wandb" else
               f"Check logger.mlflow.tracking_uri={getattr(logger, '_tracking_uri', '?')} (a sqlite:/// file, or a "
               "server that is running and reachable).")
        raise RuntimeFailure(f"logger={which} could not start its run ({type(err).__name__}: {reason}). {fix}") from err


def log_final_metrics(loggers: Iterable[Any], metrics: Mapping[str, float], status: str, step: int) -> None:
    """What metrics.json says at the end of a run, as ``final/<name>`` (and ``final/status`` where a logger keeps
    text). CSV gets nothing: metrics.json beside it is the file form, and a last row of other columns would only
    make csv/metrics.csv harder to read."""
    if not rank_zero():
        return
    final = {f"final/{name}": float(value) for name, value in metrics.items()}
    for logger in loggers:
        which = kind(logger)
        if which == "wandb":
            logger.experiment.summary.update({**final, "final/status": status})
        elif which == "mlflow":
            from mlflow.entities import Metric, RunTag

            client, run_id = logger.experiment, logger.run_id
            import time

            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, int(step)) for k, v in final.items()],
                             tags=[RunTag("gencli.status", status)])
        elif which == "tensorboard":
            logger.log_metrics(final, step=step)
            logger.save()


def close(loggers: Iterable[Any]) -> None:
    """End what Lightning leaves open: the W&B run (its ``finalize`` does not end it, and the next WandbLogger in
    this process, as in a multirun, would log into it). Say where an offline W&B run is and how to upload it."""
    if not rank_zero():
        return
    for logger in loggers:
        if kind(logger) != "wandb" or getattr(logger, "_experiment", None) is None:
            continue
        run = logger.experiment
        offline = bool(getattr(run, "offline", False) or getattr(getattr(run, "settings", None), "_offline", False))
        where = getattr(getattr(run, "settings", None), "sync_dir", None) or getattr(run, "dir", None)
        run.finish()
        if offline and where:
            log.info("wandb: offline run in %s; upload it with: wandb sync %s", where, where)
