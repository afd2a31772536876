"""Save and load trained models as plain dictionaries readable with `torch.load(weights_only=True)`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from groupim.config import ConfigError, TrainConfig
from groupim.model import GroupIM

FORMAT_VERSION = 1


def save_checkpoint(
    path: str | Path,
    model: GroupIM,
    config: TrainConfig,
    metrics: dict[str, Any] | None = None,
    data_checksum: str | None = None,
) -> Path:
    """Write the model's state dict with its config; the file appears only when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "n_items": model.n_items,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metrics": metrics or {},
        "data_checksum": data_checksum,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GroupIM, TrainConfig, dict]:
    """Rebuild the model of a checkpoint written by `save_checkpoint`, in eval mode."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} is a folder, not a file. Pass the model.pt written by groupim train. "
            "To test a search trial's model, run search/report.py with --run-id or --model"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged or foreign files
        # torch's own message suggests weights_only=False, which lets the file run pickled code.
        raise ValueError(f"{path} is not a readable GroupIM checkpoint (torch.load failed with {type(err).__name__}). "
                         "Pass a model.pt written by groupim train") from None
    if not isinstance(payload, dict) or not {"state_dict", "config", "n_items"} <= set(payload):
        raise ValueError(f"{path} is not a GroupIM checkpoint (no state_dict, config and n_items); "
                         "write one with groupim train")
    try:
        config = TrainConfig.from_dict(payload["config"], source=f"{path} (config)")
        model = GroupIM.from_config(int(payload["n_items"]), config)
        model.load_state_dict(payload["state_dict"])
    except (ConfigError, RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is a damaged GroupIM checkpoint: {err}") from None
    return model.to(device).eval(), config, payload
