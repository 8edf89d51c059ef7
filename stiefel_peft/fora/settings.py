"""FoRA settings that travel with the adapter: ``fora_config.json`` beside peft's files.

A FoRA adapter is a plain LoRA adapter, so peft alone loads it; what peft does not keep (which
factor is constrained, the retraction, the learning rates, the selection report) is written to
``fora_config.json`` in the adapter's folder, a file peft ignores. ``apply_fora`` makes the
returned model's ``save_pretrained`` write it (so do ``transformers.Trainer`` checkpoints, which
call it); :func:`load_fora_adapter` reads it back. An adapter reloaded with peft alone still
trains as FoRA: ``fora_optimizer`` reads the constrained factor from its weights.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

import peft
from torch import nn

from stiefel_peft.fora.config import FoRAConfig
from stiefel_peft.fora.report import FoRAReport

__all__ = ["SETTINGS_FILE", "attach_settings", "load_fora_adapter", "read_settings"]

SETTINGS_FILE = "fora_config.json"
FORMAT_VERSION = 1


def attach_settings(
    model: peft.PeftModel, adapter_name: str, config: FoRAConfig, report: FoRAReport | None
) -> None:
    """Record an adapter's FoRA settings on ``model`` and make its ``save_pretrained`` write them.

    Sets ``model.fora_configs[adapter_name]`` and ``model.fora_reports[adapter_name]``, and
    ``model.fora_config`` / ``model.fora_report`` to these (the latest adapter's).
    """
    model.__dict__.setdefault("fora_configs", {})[adapter_name] = config
    model.__dict__.setdefault("fora_reports", {})[adapter_name] = report
    model.fora_config = config
    model.fora_report = report
    if "save_pretrained" not in model.__dict__:
        model.save_pretrained = types.MethodType(_save_with_settings, model)


def _save_with_settings(
    self: peft.PeftModel, save_directory: str | os.PathLike, *args: Any, **kwargs: Any
) -> Any:
    """peft's ``save_pretrained``, then ``fora_config.json`` in each saved FoRA adapter's folder
    (peft's layout: ``"default"`` at the root, any other adapter in ``<directory>/<name>``)."""
    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    selected = kwargs.get("selected_adapters") or list(self.peft_config)
    for name in selected:
        config = self.fora_configs.get(name)
        if config is None:
            continue
        folder = Path(save_directory) / (name if name != "default" else "")
        report = self.fora_reports.get(name)
        payload = {
            "format_version": FORMAT_VERSION,
            "adapter_name": name,
            "config": config.to_dict(),
            "report": report.to_dict() if report is not None else None,
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SETTINGS_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    return result


def read_settings(folder: str | os.PathLike) -> tuple[FoRAConfig, FoRAReport | None] | None:
    """The FoRA settings saved in an adapter folder, or None when it has none (plain LoRA).

    Raises:
        ValueError: the file is from a newer format.
    """
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {payload.get('format_version')!r}; this stiefel_peft "
            f"reads {FORMAT_VERSION}"
        )
    report = payload.get("report")
    return FoRAConfig.from_dict(payload["config"]), (
        FoRAReport.from_dict(report) if report is not None else None
    )


def load_fora_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    adapter_name: str = "default",
    *,
    is_trainable: bool = True,
    **kwargs: Any,
) -> peft.PeftModel:
    """Load a FoRA adapter with peft and its FoRA settings with it.

    On a plain transformers model this is ``peft.PeftModel.from_pretrained``; on a
    ``PeftModel`` it is ``model.load_adapter`` (the adapter is added beside the others).
    ``fora_config.json``, when present, is attached as by ``apply_fora``, so
    ``fora_optimizer(model)`` continues with the saved factor, retraction and learning rates.

    Args:
        model: the base model, or a ``PeftModel``.
        folder: the adapter folder written by ``save_pretrained``.
        adapter_name: the name to load it under.
        is_trainable: load for training (default), not inference.
        **kwargs: passed to peft.
    """
    if isinstance(model, peft.PeftModel):
        model.load_adapter(folder, adapter_name, is_trainable=is_trainable, **kwargs)
        loaded = model
    else:
        loaded = peft.PeftModel.from_pretrained(
            model, folder, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs
        )
    settings = read_settings(folder)
    if settings is not None:
        config, report = settings
        attach_settings(loaded, adapter_name, config, report)
    return loaded
