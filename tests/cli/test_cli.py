"""The command line end to end on a tiny random model and a tiny CSV, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from stiefel_peft.cli import main
from stiefel_peft.fora import FoRAReport


def _finetune_arguments(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--model", str(model), "--data", str(data), "--text-column", "review",
        "--label-column", "sentiment", "--heldout", "30", "--steps", "40", "--batch-size", "8",
        "--rank", "4", "--calibration-examples", "16", "--lr", "1e-2", "--stiefel-lr", "1e-2",
        "--max-length", "24", "--output", str(output), "--quiet", *extra,
    ]  # fmt: skip


def test_finetune_end_to_end_writes_a_loadable_adapter_report_plot_and_config(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "run"
    assert main(_finetune_arguments(tiny_model_folder, tiny_csv, output)) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("accuracy ") and "x LoRA on every block" in summary
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "fora_report.json",
        "fisher_scores.png",
        "run_config.json",
    ):
        assert (output / name).is_file(), name
    report = FoRAReport.load(output)
    assert len(report.selected_blocks) == 2 and report.num_blocks == 4
    assert report.extra["heldout_examples"] == 30 and report.extra["steps"] == 40
    assert report.extra["accuracy_after"] >= 0.8  # the words decide the label
    assert report.extra["accuracy_after"] > report.extra["accuracy_before"]
    assert set(report.extra["seconds"]) >= {"load", "score", "train", "total"}
    config = json.loads((output / "run_config.json").read_text())
    assert config["budget"] == 0.5 and config["rank"] == 4
    # peft alone reloads the adapter on a fresh base.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_folder)
    reloaded = peft.PeftModel.from_pretrained(base, output)
    assert sum(".lora_B." in n for n, _ in reloaded.named_parameters()) == 2 * 5


def test_fisher_command_prints_the_table_and_saves_scores(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "scores"
    arguments = [
        "fisher",
        "--model",
        str(tiny_model_folder),
        "--data",
        str(tiny_csv),
        "--text-column",
        "review",
        "--label-column",
        "sentiment",
        "--heldout",
        "10",
        "--calibration-examples",
        "16",
        "--output",
        str(output),
        "--quiet",
    ]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    marked = [line for line in printed.splitlines() if line.startswith("*")]
    assert len(marked) == 2  # top half of 4 blocks
    assert (output / "fisher_scores.json").is_file() and (output / "fisher_scores.png").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budget", "1.5"], "--budget: must be in (0, 1]"),
        (["--budget", "0"], "--budget: must be in (0, 1]"),
        (["--rank", "0"], "--rank: must be a positive integer"),
        (["--steps", "5", "--epochs", "1"], "give --steps or --epochs, not both"),
        (["--label-column", "stars"], "column 'stars' is missing"),
        (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
        (["--template", "no placeholder"], "--template must contain {text}"),
    ],
)
def test_bad_input_stops_with_one_line_and_exit_code_2_before_loading_the_model(
    extra: list[str],
    message: str,
    tiny_model_folder: Path,
    tiny_csv: Path,
    tmp_path: Path,
    capsys,
    monkeypatch,
) -> None:
    import stiefel_peft.cli.finetune as finetune

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(finetune, "load_model", must_not_load)
    arguments = _finetune_arguments(tiny_model_folder, tiny_csv, tmp_path / "out")
    # Later occurrences of an option win in argparse.
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main([*arguments, *extra]))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error


def test_missing_files_unknown_models_and_used_outputs_are_usage_errors(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path, capsys
) -> None:
    cases = [
        (["finetune", "--data", str(tmp_path / "missing.csv")], "does not exist"),
        (["finetune", "--model", "gpt-17"], "neither a built-in model"),
        (["finetune", "--data", str(tmp_path / "notes.txt")], "neither a built-in data set"),
        (["finetune", "--data", str(tmp_path)], "not a dataset saved with datasets"),
    ]
    used = tmp_path / "used"
    used.mkdir()
    (used / "file").write_text("x")
    cases.append(
        (
            [
                "finetune",
                "--model",
                str(tiny_model_folder),
                "--data",
                str(tiny_csv),
                "--output",
                str(used),
            ],
            "not empty",
        )
    )
    for arguments, message in cases:
        assert main(arguments) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and message in error, error


def test_python_dash_m_and_help_list_every_option_with_defaults() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stiefel_peft", "finetune", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for option in (
        "--budget",
        "--rank",
        "--estimator",
        "--retraction",
        "--steps",
        "--epochs",
        "--batch-size",
        "--lr",
        "--stiefel-lr",
        "--relative-lr",
        "--seed",
        "--device",
        "--output",
        "--model",
        "--data",
    ):
        assert option in result.stdout, option
    assert "default: 0.5" in result.stdout
    fisher_help = subprocess.run(
        [sys.executable, "-m", "stiefel_peft", "fisher", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--estimator" in fisher_help.stdout


def test_the_rates_reach_the_fora_config_and_default_to_the_library_rule() -> None:
    from stiefel_peft.cli.arguments import parse
    from stiefel_peft.fora.config import free_factor_rates

    _, settings = parse(["finetune"])
    config = settings.fora_config()
    assert (config.lr, config.relative_lr) == (None, None)  # the library's weight-scaled default
    _, settings = parse(["finetune", "--relative-lr", "5e-3", "--lr", "1e-3"])
    config = settings.fora_config()
    assert (config.relative_lr, config.lr) == (5e-3, 1e-3)
    _, settings = parse(["finetune", "--lr", "2e-4"])  # one fixed rate, as before the rule
    assert free_factor_rates(settings.lr, settings.relative_lr) == (2e-4, None)


def test_length_grouped_batches_cover_every_example_once_and_cut_padding() -> None:
    from stiefel_peft.cli.training import length_grouped_order

    examples = [{"text": "x" * ((37 * i) % 101)} for i in range(200)]
    groups = length_grouped_order(examples, 16, torch.Generator().manual_seed(0))
    assert sorted(i for group in groups for i in group) == list(range(200))
    assert all(len(group) <= 16 for group in groups)
    again = length_grouped_order(examples, 16, torch.Generator().manual_seed(0))
    assert groups == again  # seeded

    def padding(groups: list[list[int]]) -> int:
        lengths = [[len(examples[i]["text"]) for i in group] for group in groups]
        return sum(max(ls) * len(ls) - sum(ls) for ls in lengths)

    random_groups = [list(range(i, min(i + 16, 200))) for i in range(0, 200, 16)]
    assert padding(groups) < 0.5 * padding(random_groups)


def test_an_output_that_cannot_be_created_stops_before_the_model_loads(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import stiefel_peft.cli.finetune as finetune

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(finetune, "load_model", no_loading)
    regular_file = tmp_path / "taken"
    regular_file.write_text("not a folder")
    cases = {
        str(regular_file / "run"): "cannot be created",  # a path under a regular file
        "/proc/stiefel-peft-run": "cannot be created",  # a virtual file system
        str(regular_file): "is a file",
    }
    for output, message in cases.items():
        code = main(_finetune_arguments(tiny_model_folder, tiny_csv, Path(output)))
        error = capsys.readouterr().err.strip()
        assert code == 2
        assert len(error.splitlines()) == 1 and message in error, error


def test_output_is_checked_once_and_created_before_loading(
    tiny_csv: Path, tmp_path: Path, monkeypatch
) -> None:
    from stiefel_peft.cli.arguments import parse
    from stiefel_peft.cli.checks import check
    from stiefel_peft.cli.options import UsageError

    regular_file = tmp_path / "taken"
    regular_file.write_text("x")
    command, settings = parse(
        ["finetune", "--data", str(tiny_csv), "--output", str(regular_file / "run")]
    )
    with pytest.raises(UsageError, match="cannot be created"):
        check(settings, command)
    command, defaults = parse(["finetune"])
    monkeypatch.chdir(tmp_path)
    check(defaults, command)
    created = tmp_path / defaults.output
    assert created.is_dir() and not any(created.iterdir())  # created, empty, and remembered
    assert defaults.output.startswith("runs/finetune-")


def test_missing_matplotlib_skips_the_plot_with_one_warning(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    output = tmp_path / "run"
    arguments = _finetune_arguments(tiny_model_folder, tiny_csv, output)
    arguments[arguments.index("--steps") + 1] = "2"
    assert main(arguments) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "matplotlib" in line]
    assert len(warnings) == 1 and "fisher_scores.png" in warnings[0]
    assert (output / "fora_report.json").is_file() and (output / "adapter_config.json").is_file()
    assert not (output / "fisher_scores.png").exists()
