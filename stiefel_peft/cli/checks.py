"""The checks of ``finetune`` and ``fisher`` that argparse cannot do, all cheap (no model is
loaded): a bad option stops the program with one line and exit code 2 in a second, not after
minutes of loading and scoring."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from stiefel_peft.cli.assets import BUILTIN_MODELS, model_source
from stiefel_peft.cli.options import UsageError, prepare_output, resolve_output
from stiefel_peft.cli.settings import DataSettings, FinetuneSettings
from stiefel_peft.cli.sources import data_kind, hub_unreachable
from stiefel_peft.cli.trainer import process_count

__all__ = ["check", "check_model", "checkpoint_folder"]


def check_model(name: str) -> None:
    """A built-in name, a Hugging Face folder, or a hub id that the hub (or, with
    ``HF_HUB_OFFLINE=1``, the local cache) has.

    Raises:
        UsageError: none of the three, or a hub id that cannot be fetched (no network, not
            cached, unknown id).
    """
    if name in BUILTIN_MODELS:
        return
    try:
        source = model_source(name)
    except ValueError as error:
        raise UsageError(str(error).splitlines()[0]) from None
    if Path(source).is_dir():
        return
    reason = hub_unreachable()
    from transformers import AutoConfig

    if reason is not None and "HF_HUB_OFFLINE" not in reason:
        raise UsageError(
            f"--model {name!r} is a hub id, but {reason}: download it where there is network "
            "and pass the folder (or set HF_HUB_OFFLINE=1 to use a copy in the local "
            "Hugging Face cache)"
        )
    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if reason else "the hub"
        raise UsageError(
            f"--model {name!r} could not be fetched from {where}: {str(error).splitlines()[0]}"
        ) from None


def checkpoint_folder(path: str) -> Path:
    """A ``checkpoint-<step>`` folder written by ``finetune --save-every`` or Ctrl-C.

    Raises:
        UsageError: a missing folder, or one without ``trainer_state.json`` and an adapter.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UsageError(f"--resume {path!r} is not a folder")
    needed = ("trainer_state.json", "adapter_config.json", "optimizer.pt")
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise UsageError(
            f"--resume {path!r} is not a training checkpoint (missing {', '.join(missing)}); "
            "pass a checkpoint-<step> folder of a finetune run"
        )
    return folder


def _check_lr_search(settings: FinetuneSettings) -> None:
    """``--lr-search`` replaces the rates and trains every candidate without checkpoints."""
    rates = settings.lr_search or []
    if len(rates) < 2 or len(set(rates)) != len(rates):
        raise UsageError(f"--lr-search needs at least two distinct rates, got {rates}")
    library = FinetuneSettings()
    clashes = [
        option
        for option, given, default in (
            ("--lr", settings.lr, library.lr),
            ("--stiefel-lr", settings.stiefel_lr, library.stiefel_lr),
            ("--relative-lr", settings.relative_lr, library.relative_lr),
            ("--resume", settings.resume, None),
            ("--save-every", settings.save_every, None),
            ("--eval-every", settings.eval_every, None),
        )
        if given != default
    ]
    if clashes:
        raise UsageError(
            f"--lr-search chooses the rates itself and trains each candidate without "
            f"checkpoints or evaluations: drop {', '.join(clashes)}, or drop --lr-search"
        )
    if process_count() > 1:
        raise UsageError("--lr-search runs in one process; start it without torchrun")


def check(settings: DataSettings, command: str) -> None:
    """The checks argparse cannot do; raise :class:`UsageError` with one line.

    Last, the output folder is resolved once (``settings.output`` is set to it) and created;
    a resumed run continues in its checkpoint's run folder.
    """
    check_model(settings.model)
    try:
        data_kind(settings.data)
    except ValueError as error:
        raise UsageError(str(error).splitlines()[0]) from None
    if "{text}" not in settings.template:
        raise UsageError("--template must contain {text}")
    resume_into: Path | None = None
    if isinstance(settings, FinetuneSettings):
        if settings.steps is not None and settings.epochs is not None:
            raise UsageError("give --steps or --epochs, not both")
        if not 0 <= settings.dropout < 1:
            raise UsageError(f"--dropout must be in [0, 1), got {settings.dropout}")
        if settings.precision == "fp16" and not settings.device.startswith("cuda"):
            raise UsageError("--precision fp16 needs CUDA (--device cuda); use fp32 or bf16")
        if settings.batch_size % process_count():
            raise UsageError(
                f"--batch-size {settings.batch_size} must be a multiple of the "
                f"{process_count()} processes"
            )
        if settings.lr_search is not None:
            _check_lr_search(settings)
        elif settings.lr_search_seeds != 1:
            raise UsageError(
                f"--lr-search-seeds {settings.lr_search_seeds} needs --lr-search: give the "
                "rates to try, or drop --lr-search-seeds"
            )
        if settings.resume is not None:
            resume_into = checkpoint_folder(settings.resume).parent
            settings.resume = str(checkpoint_folder(settings.resume))
    if settings.quantize is not None and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(
            f"--quantize {settings.quantize} needs bitsandbytes: pip install "
            "'stiefel_peft[quantization]' (or pip install bitsandbytes)"
        )
    device = settings.device
    if device != "auto" and not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} asked for CUDA, but torch sees no CUDA device")
    if process_count() > 1:
        if settings.output is None:
            raise UsageError(
                "--output is needed with several processes: every rank writes its part of the "
                "checkpoints into the same folder"
            )
        if int(os.environ.get("RANK", "0")) > 0:
            return  # the first process checks and creates the folder
    if resume_into is not None and settings.output is None:
        settings.output = str(resume_into)  # continue in the run's own folder
        return
    if resume_into is not None and Path(settings.output).resolve() == resume_into.resolve():
        return
    settings.output = str(prepare_output(resolve_output(settings.output, command)))
