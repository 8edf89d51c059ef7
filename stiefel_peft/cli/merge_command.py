"""``stiefel-peft merge ADAPTER --output DIR``: the base model with the adapter merged in.

Writes a plain transformers model (``W' = W + (alpha / r) B A`` in every adapted layer, no
peft needed to load it) and the tokenizer. The base is the one named in the adapter's
``adapter_config.json`` (``base_model_name_or_path``) or ``--base``. A 4-bit base is refused:
adding ``B A`` to NF4 weights would round most of the update away, and an adapter trained on
a 4-bit base (``--quantize nf4``) was fitted to those rounded weights, so merging it into the
full-precision weights would not give the model that was trained either.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stiefel_peft.cli.options import UsageError, prepare_output, resolve_output

__all__ = ["MergeSettings", "add_parser", "run"]


@dataclass
class MergeSettings:
    """``stiefel-peft merge``.

    Attributes:
        adapter: the adapter folder (``adapter_config.json``, ``adapter_model.safetensors``).
        output: the folder of the merged model.
        base: the base model (None: the adapter's ``base_model_name_or_path``).
        device: where to merge (``cpu`` or ``cuda``).
    """

    adapter: str
    output: str | None = None
    base: str | None = None
    device: str = "cpu"


def _adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise UsageError(f"{str(folder)!r} is not an adapter folder (no adapter_config.json)")
    return json.loads(path.read_text())


def _trained_quantization(folder: Path) -> str | None:
    """The ``--quantize`` of the run that trained the adapter, from its saved run config."""
    for candidate in (folder / "run_config.json", folder.parent / "run_config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text()).get("quantize")
    return None


def check(settings: MergeSettings) -> MergeSettings:
    """The checks before any model loads; resolves the base and prepares the output.

    Raises:
        UsageError: no adapter folder, a 4-bit base or an adapter trained on one, no base
            recorded, or an unusable output folder.
    """
    from stiefel_peft.cli.assets import model_source

    folder = Path(settings.adapter)
    config = _adapter_config(folder)
    quantized = _trained_quantization(folder)
    if quantized:
        raise UsageError(
            f"the adapter was trained on a 4-bit base (--quantize {quantized}); merging it would "
            "not reproduce the trained model: keep it as an adapter (peft loads it on the 4-bit "
            "base) or retrain on a full-precision base to merge"
        )
    base = settings.base or config.get("base_model_name_or_path")
    if not base:
        raise UsageError("the adapter names no base model; pass --base MODEL")
    try:
        source = model_source(base)
    except ValueError as error:
        raise UsageError(str(error).splitlines()[0]) from None
    base_config = Path(source) / "config.json"
    if base_config.is_file() and "quantization_config" in json.loads(base_config.read_text()):
        raise UsageError(
            f"the base {base!r} is stored quantized; merging into quantized weights would round "
            "the update away: pass --base with the full-precision model"
        )
    settings.base = base
    settings.output = str(prepare_output(resolve_output(settings.output, "merge")))
    return settings


def run(settings: MergeSettings) -> Path:
    """Load the base and the adapter, merge, save the plain model and tokenizer."""
    import peft

    from stiefel_peft.cli.assets import load_model

    assert settings.base is not None and settings.output is not None
    model, tokenizer = load_model(settings.base, device=settings.device)
    adapted = peft.PeftModel.from_pretrained(model, settings.adapter)
    merged = adapted.merge_and_unload()
    output = Path(settings.output)
    merged.save_pretrained(output)
    tokenizer.save_pretrained(output)
    print(f"merged {settings.adapter} into {settings.base}; saved to {output}")
    return output


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """The ``merge`` subcommand's options."""
    parser = commands.add_parser(
        "merge",
        help="save the base model with an adapter merged in, as a plain transformers model",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("adapter", help="the adapter folder (a finetune output)")
    parser.add_argument(
        "--output", default=None, help="output folder (default: runs/merge-<date>-<time>)"
    )
    parser.add_argument(
        "--base", default=None,
        help="the base model (default: the adapter's base_model_name_or_path)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    return parser


def settings_from(arguments: argparse.Namespace) -> MergeSettings:
    return check(
        MergeSettings(
            adapter=arguments.adapter,
            output=arguments.output,
            base=arguments.base,
            device=arguments.device,
        )
    )
