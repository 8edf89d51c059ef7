"""The command line as a practitioner's tool: resume, Ctrl-C, data sources, replay, merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from stiefel_peft import __version__
from stiefel_peft.cli import main
from stiefel_peft.cli.arguments import parse
from stiefel_peft.fora import FoRAReport

ROOT = Path(__file__).resolve().parents[2]


def _arguments(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--model", str(model), "--data", str(data), "--text-column", "review",
        "--label-column", "sentiment", "--heldout", "30", "--batch-size", "8", "--rank", "4",
        "--calibration-examples", "16", "--lr", "1e-2", "--stiefel-lr", "1e-2",
        "--max-length", "24", "--output", str(output), "--quiet", "--no-plot", *extra,
    ]  # fmt: skip


def _adapter_difference(a: Path, b: Path) -> float:
    first = load_file(a / "adapter_model.safetensors")
    second = load_file(b / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    return max(float((first[k] - second[k]).abs().max()) for k in first)


def _environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), environment.get("PYTHONPATH", "")])
    return environment


def test_resume_from_checkpoint_3_of_6_writes_the_uninterrupted_adapter(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    full = tmp_path / "full"
    steps = ("--steps", "6", "--save-every", "3", "--micro-batch-tokens", "40")
    assert main(_arguments(tiny_model_folder, tiny_csv, full, *steps)) == 0
    assert (full / "checkpoint-3" / "run_config.json").is_file()
    resumed = tmp_path / "resumed"
    arguments = ["finetune", "--resume", str(full / "checkpoint-3"), "--output", str(resumed)]
    assert main(arguments) == 0  # every other setting is replayed from the checkpoint
    assert _adapter_difference(full, resumed) <= 1e-6
    report = FoRAReport.load(resumed)
    original = FoRAReport.load(full)
    assert report.selected_blocks == original.selected_blocks
    assert report.extra["accuracy_before"] == original.extra["accuracy_before"]
    assert report.extra["steps"] == 6


def test_ctrl_c_writes_a_checkpoint_exits_130_and_the_resumed_run_matches(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    steps = ("--steps", "150", "--micro-batch-tokens", "40")
    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "stiefel_peft",
               *_arguments(tiny_model_folder, tiny_csv, interrupted, *steps)]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment()
    )
    metrics = interrupted / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 130, error
    last = error.strip().splitlines()[-1]
    assert "resume with: stiefel-peft finetune --resume" in last, error
    checkpoint = Path(last.rsplit("--resume ", 1)[1])
    step = int(checkpoint.name.split("-")[1])
    assert checkpoint.parent == interrupted and 3 <= step < 150
    assert not (interrupted / "adapter_model.safetensors").exists()  # no final adapter yet

    assert main(["finetune", "--resume", str(checkpoint)]) == 0  # continues in its folder
    uninterrupted = tmp_path / "uninterrupted"
    assert main(_arguments(tiny_model_folder, tiny_csv, uninterrupted, *steps)) == 0
    assert _adapter_difference(interrupted, uninterrupted) <= 1e-6
    losses = [json.loads(line) for line in metrics.open() if '"loss"' in line]
    assert [record["step"] for record in losses] == list(range(1, 151))


def test_a_saved_dataset_with_an_eval_split_and_a_json_file_both_train(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [dict(row) for row in datasets.load_dataset("csv", data_files=str(tiny_csv))["train"]]
    features = datasets.Features(
        {"review": datasets.Value("string"),
         "sentiment": datasets.ClassLabel(names=["negative", "positive"])}
    )  # fmt: skip
    table = datasets.Dataset.from_list(rows, features=features)
    splits = datasets.DatasetDict(
        {"train": table.select(range(100)), "test": table.select(range(100, 120))}
    )
    splits.save_to_disk(tmp_path / "saved")
    output = tmp_path / "from-saved"
    arguments = _arguments(tiny_model_folder, tmp_path / "saved", output, "--steps", "2")
    assert main([*arguments, "--eval-split", "test"]) == 0
    report = FoRAReport.load(output)
    assert report.extra["heldout_examples"] == 20 and report.extra["train_examples"] == 100
    assert report.extra["label_names"] == ["negative", "positive"]  # from the ClassLabel

    table.select(range(60)).to_json(tmp_path / "reviews.json")  # JSON lines, .json suffix
    output = tmp_path / "from-json"
    arguments = _arguments(tiny_model_folder, tmp_path / "reviews.json", output, "--steps", "2")
    assert main(arguments) == 0
    assert FoRAReport.load(output).extra["train_examples"] == 30


def test_unreachable_hubs_missing_splits_and_columns_stop_before_the_model_loads(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    datasets = pytest.importorskip("datasets")
    import stiefel_peft.cli.finetune as finetune

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(finetune, "load_model", must_not_load)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no network
    rows = [{"review": "good", "sentiment": 1}] * 40
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    saved.save_to_disk(tmp_path / "saved")
    capsys.readouterr()  # the save's own progress bar
    cases = [
        (["--model", "someone/some-model"], "cannot be reached"),
        (["--data", "someone/some-dataset"], "would come from the Hugging Face hub"),
        (["--data", str(tmp_path / "saved"), "--eval-split", "validation"],
         "'validation' is not a split of the saved dataset"),
        (["--data", str(tmp_path / "saved"), "--split", "test"], "its splits: train"),
        (["--split", "train"], "holds one split"),
        (["--text-column", "body"], "column 'body' is missing"),
        (["--precision", "fp16", "--device", "cpu"], "fp16 needs CUDA"),
    ]  # fmt: skip
    for number, (extra, message) in enumerate(cases):
        arguments = _arguments(tiny_model_folder, tiny_csv, tmp_path / f"out{number}", *extra)
        started = time.monotonic()
        assert main(arguments) == 2, extra
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and message in error, error
        assert time.monotonic() - started < 15, extra  # no half minute of retries


def test_config_replays_a_run_and_the_command_line_overrides_it(
    tiny_csv: Path, tmp_path: Path, capsys
) -> None:
    config = tmp_path / "run_config.json"
    config.write_text(json.dumps({"command": "finetune", "data": str(tiny_csv), "rank": 8,
                                  "steps": 7, "lr": 0.003, "quiet": True}))  # fmt: skip
    command, settings = parse(["finetune", "--config", str(config), "--steps", "9"])
    assert command == "finetune"
    assert (settings.rank, settings.steps, settings.lr, settings.quiet) == (8, 9, 0.003, True)
    assert settings.data == str(tiny_csv)
    config.write_text(json.dumps({"command": "finetune", "rnak": 8}))
    assert main(["finetune", "--config", str(config)]) == 2
    assert "unknown settings ['rnak']" in capsys.readouterr().err
    config.write_text(json.dumps({"command": "fisher"}))
    assert main(["finetune", "--config", str(config)]) == 2
    assert "no settings of the finetune command" in capsys.readouterr().err


def test_version_prints_the_package_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stiefel_peft", "--version"],
        capture_output=True, text=True, env=_environment(),
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == f"stiefel-peft {__version__}"


def test_merge_writes_a_plain_model_equal_to_base_plus_adapter_and_refuses_4_bit(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path, capsys
) -> None:
    import peft

    run = tmp_path / "run"
    assert main(_arguments(tiny_model_folder, tiny_csv, run, "--steps", "3")) == 0
    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--output", str(merged)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not any("lora" in name for name, _ in plain.named_parameters())
    adapted = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_folder), run
    ).eval()
    ids = torch.tensor([[2, 5, 9, 11, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)

    config = json.loads((run / "run_config.json").read_text())
    (run / "run_config.json").write_text(json.dumps({**config, "quantize": "nf4"}))
    capsys.readouterr()  # the runs' progress bars and warnings so far
    assert main(["merge", str(run), "--output", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "trained on a 4-bit base" in error
    assert main(["merge", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    assert "not an adapter folder" in capsys.readouterr().err


PLUGIN = '''
from stiefel_peft.geometry import register_retraction, retract_qr

@register_retraction("{name}")
def retract_plugin(x, v):
    """QR under another name: a retraction from outside the library."""
    return retract_qr(x, v)
'''


def test_retractions_lists_a_retraction_registered_by_an_imported_module(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    from stiefel_peft.geometry import RETRACTIONS

    (tmp_path / "my_retraction.py").write_text(PLUGIN.format(name="plugin_file"))
    (tmp_path / "my_package_retraction.py").write_text(PLUGIN.format(name="plugin_module"))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        arguments = ["retractions", "--import", str(tmp_path / "my_retraction.py"),
                     "--import", "my_package_retraction", "--shapes", "2x12x3", "--steps", "20",
                     "--repeats", "2", "--output", str(tmp_path / "out")]  # fmt: skip
        assert main(arguments) == 0
        table = capsys.readouterr().out
        rows = json.loads((tmp_path / "out" / "retractions.json").read_text())["rows"]
        names = {row["retraction"] for row in rows}
        assert {"plugin_file", "plugin_module", "cayley", "qr"} <= names
        assert "| plugin_file |" in table and "| plugin_module |" in table
        by_name = {row["retraction"]: row for row in rows}
        assert by_name["plugin_file"]["order"] == pytest.approx(by_name["qr"]["order"], abs=1e-6)
        assert 0.8 < by_name["qr"]["order"] < 1.2 and 1.8 < by_name["polar"]["order"] < 2.2
        assert by_name["exp"]["order"] is None  # the geodesic itself
        exact = [row for row in rows if row["retraction"] != "cayley_iterative"]
        assert all(row["error_after_steps"] < 1e-4 for row in exact)
        assert main(["retractions", "--import", "no_such_module_here"]) == 2
        assert "--import 'no_such_module_here' failed" in capsys.readouterr().err
        assert main(["retractions", "--shapes", "12x30"]) == 2
        assert "p = 30 is larger than n = 12" in capsys.readouterr().err
    finally:
        RETRACTIONS.pop("plugin_file", None)
        RETRACTIONS.pop("plugin_module", None)


def test_torchrun_two_processes_select_the_same_blocks_and_equal_one_process(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    common = ("--steps", "3", "--dropout", "0", "--batch-size", "8", "--train-examples", "48")
    single = tmp_path / "single"
    assert main(_arguments(tiny_model_folder, tiny_csv, single, *common)) == 0
    double = tmp_path / "double"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "stiefel_peft",
               *_arguments(tiny_model_folder, tiny_csv, double, *common,
                           "--micro-batch-tokens", "30", "--device", "cpu")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=_environment(),
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = FoRAReport.load(double)
    per_rank = report.extra["selected_blocks_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1] == report.selected_blocks
    assert report.selected_blocks == FoRAReport.load(single).selected_blocks
    assert report.extra["passes_per_step"] > 1  # each rank accumulated over several passes
    assert _adapter_difference(single, double) <= 1e-5


def test_the_report_gives_each_phase_its_peak_memory(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    output = tmp_path / "run"
    assert main(_arguments(tiny_model_folder, tiny_csv, output, "--steps", "2")) == 0
    memory = FoRAReport.load(output).extra["memory"]
    phases = memory["peak_rss_mb"]
    assert list(phases) == ["load", "evaluate_before", "score", "train", "evaluate_after"]
    assert all(value > 50 for value in phases.values())  # a Python process with torch
    assert memory["overall_peak_rss_mb"] == max(phases.values())


def test_quantize_without_bitsandbytes_stops_with_the_install_line(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    arguments = _arguments(tiny_model_folder, tiny_csv, tmp_path / "q", "--quantize", "nf4")
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "needs bitsandbytes: pip install" in error, error
    assert not (tmp_path / "q").exists()  # stopped before anything was written


def test_quantize_nf4_trains_through_the_trainer_with_finite_losses_and_orthonormal_b(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "q"
    assert (
        main(_arguments(tiny_model_folder, tiny_csv, run, "--quantize", "nf4", "--steps", "3")) == 0
    )
    assert json.loads((run / "run_config.json").read_text())["quantize"] == "nf4"
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    losses = [record["loss"] for record in records if "loss" in record]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    weights = load_file(run / "adapter_model.safetensors")
    frames = [value for key, value in weights.items() if "lora_B" in key]
    assert frames
    for frame in frames:
        gram = frame.double().mT @ frame.double()
        assert torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype)) < 1e-5
