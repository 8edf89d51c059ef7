"""``finetune --lr-search``: one full run per rate, the lowest final training loss kept."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from stiefel_peft.cli import main
from stiefel_peft.cli import rate_search as rate_search_module
from stiefel_peft.cli.rate_search import (
    LOSS_WINDOW,
    SEARCH_FOLDER,
    final_loss,
    grid_edge,
    mean_loss,
    search_rates,
)
from stiefel_peft.cli.trainer import FitResult, TrainingPlan
from stiefel_peft.fora import FoRAReport, apply_fora
from tests.tiny_models import tiny_model_case


def _arguments(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--model", str(model), "--data", str(data), "--text-column", "review",
        "--label-column", "sentiment", "--heldout", "30", "--batch-size", "8", "--rank", "4",
        "--calibration-examples", "16", "--max-length", "24", "--steps", "6",
        "--output", str(output), "--quiet", "--no-plot", *extra,
    ]  # fmt: skip


def test_final_loss_is_the_mean_of_the_last_window_and_a_diverged_run_never_wins() -> None:
    assert final_loss([9.0, 1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(3.0)
    assert final_loss([2.0, 4.0]) == pytest.approx(3.0)  # fewer than the window: all of them
    assert final_loss([1.0, 2.0, 3.0], window=1) == 3.0
    assert final_loss([1.0, float("nan"), 1.0]) == math.inf
    with pytest.raises(ValueError, match="logged no loss"):
        final_loss([])
    with pytest.raises(ValueError, match="window"):
        final_loss([1.0], window=0)
    assert LOSS_WINDOW == 5  # the study's choice (docs/results.md, item 3)


def test_mean_loss_averages_the_seeds_and_a_rate_diverged_on_any_seed_never_wins() -> None:
    assert mean_loss([0.5]) == 0.5
    assert mean_loss([0.2, 0.4, 0.9]) == pytest.approx(0.5)
    assert mean_loss([0.2, math.inf]) == math.inf
    with pytest.raises(ValueError, match="at least one seed"):
        mean_loss([])


def test_grid_edge_names_a_pick_at_either_end_of_the_grid() -> None:
    rates = [5e-4, 2.5e-4, 2e-3, 1e-3]  # the order tried does not matter
    assert grid_edge(rates, 2.5e-4) == "lowest"
    assert grid_edge(rates, 2e-3) == "highest"
    assert grid_edge(rates, 5e-4) is None and grid_edge(rates, 1e-3) is None
    with pytest.raises(ValueError, match="must be one of `rates`"):
        grid_edge(rates, 3e-3)


def test_the_search_keeps_the_run_a_plain_run_at_the_chosen_rate_gives(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    searched = tmp_path / "searched"
    search_options = ("--lr-search", "1e-3", "3e-2")
    assert main(_arguments(tiny_model_folder, tiny_csv, searched, *search_options)) == 0
    summary = capsys.readouterr().out  # --quiet still says that the pick is an end of the grid
    assert "rate tried: a better one may lie beyond it" in summary
    report = FoRAReport.load(searched)
    search = report.extra["lr_search"]
    assert search["rates"] == [1e-3, 3e-2] and search["loss_window"] == LOSS_WINDOW
    losses = search["final_losses"]
    assert search["chosen"] == search["rates"][losses.index(min(losses))]
    # two rates: the pick is an end of the grid, and the record and the summary say which
    assert search["edge"] == ("lowest" if search["chosen"] == 1e-3 else "highest")
    assert f"the {search['edge']} rate tried" in summary
    for rate in ("0.001", "0.03"):  # every candidate's training log, no checkpoint
        folder = searched / SEARCH_FOLDER / f"lr-{rate}"
        assert (folder / "metrics.jsonl").is_file()
        assert not list(folder.glob("checkpoint-*"))
    saved = json.loads((searched / "fora_config.json").read_text())
    saved = saved.get("config", saved)
    assert saved["lr"] == saved["stiefel_lr"] == search["chosen"]
    # Every candidate started where a plain run starts: the kept adapter is the plain run's.
    chosen = f"{search['chosen']:g}"
    plain = tmp_path / "plain"
    arguments = ("--lr", chosen, "--stiefel-lr", chosen)
    assert main(_arguments(tiny_model_folder, tiny_csv, plain, *arguments)) == 0
    first = load_file(searched / "adapter_model.safetensors")
    second = load_file(plain / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert max(float((first[k] - second[k]).abs().max()) for k in first) <= 1e-6
    assert report.extra["last_losses"] == FoRAReport.load(plain).extra["last_losses"]


def test_a_search_over_seeds_keeps_the_chosen_rates_run_on_the_first_seed(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    searched = tmp_path / "searched"
    options = ("--lr-search", "1e-3", "3e-2", "--lr-search-seeds", "2", "--seed", "3")
    assert main(_arguments(tiny_model_folder, tiny_csv, searched, *options)) == 0
    assert "lowest mean final loss over 2 seeds" in capsys.readouterr().out
    search = FoRAReport.load(searched).extra["lr_search"]
    assert search["seeds"] == [3, 4]
    assert [len(losses) for losses in search["run_losses"]] == [2, 2]
    rates = search["rates"]
    for rate, losses, mean in zip(rates, search["run_losses"], search["final_losses"], strict=True):
        assert mean == pytest.approx(sum(losses) / 2)
        for seed, loss in zip(search["seeds"], losses, strict=True):  # each run's own log, per seed
            log = searched / SEARCH_FOLDER / f"lr-{rate:g}" / f"seed-{seed}" / "metrics.jsonl"
            logged = [json.loads(line).get("loss") for line in log.read_text().splitlines()]
            logged = [value for value in logged if value is not None]
            assert loss == pytest.approx(final_loss(logged))
    assert search["run_losses"][0] != search["run_losses"][1]
    assert (
        search["chosen"]
        == search["rates"][search["final_losses"].index(min(search["final_losses"]))]
    )
    # the kept adapter is the chosen rate's run on --seed 3, as a plain run gives it
    chosen = f"{search['chosen']:g}"
    plain = tmp_path / "plain"
    arguments = ("--lr", chosen, "--stiefel-lr", chosen, "--seed", "3")
    assert main(_arguments(tiny_model_folder, tiny_csv, plain, *arguments)) == 0
    first = load_file(searched / "adapter_model.safetensors")
    second = load_file(plain / "adapter_model.safetensors")
    assert max(float((first[k] - second[k]).abs().max()) for k in first) <= 1e-6


def test_the_mean_over_seeds_decides_not_the_first_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = apply_fora(tiny_model_case("llama").build(seed=0), 1.0, r=4, lora_dropout=0.0)
    # 2e-3 is lowest on the first seed and collapses on the second; 1e-3 is steady
    table = {(1e-3, 5): 0.30, (1e-3, 6): 0.32, (2e-3, 5): 0.20, (2e-3, 6): 0.90}
    calls: list[tuple[float, int, Path]] = []

    def by_rate_and_seed(_model, optimizer, _examples, _collate, plan, folder, **__) -> FitResult:
        rate = optimizer.param_groups[0]["lr"]
        calls.append((rate, plan.seed, folder))
        assert plan.save_every is None and plan.eval_every is None
        return FitResult([table[(rate, plan.seed)]], step=2, interrupted=False, checkpoint=None)

    monkeypatch.setattr(rate_search_module, "fit", by_rate_and_seed)
    plan = TrainingPlan(steps=2, seed=5, save_every=1, eval_every=1)
    one = search_rates(model, [1e-3, 2e-3], [], None, plan, tmp_path, say=lambda _: None)
    assert one.chosen == 2e-3 and one.seeds == [5]  # what one seed sees
    assert [folder.name for *_, folder in calls] == ["lr-0.001", "lr-0.002"]
    calls.clear()
    lines: list[str] = []
    two = search_rates(model, [1e-3, 2e-3], [], None, plan, tmp_path, seeds=2, say=lines.append)
    assert two.chosen == 1e-3 and two.seeds == [5, 6]
    assert two.final_losses == pytest.approx([0.31, 0.55])
    assert two.result.losses == [0.30]  # the kept run is the chosen rate's on seed 5
    assert [(rate, seed) for rate, seed, _ in calls] == [(1e-3, 5), (1e-3, 6), (2e-3, 5), (2e-3, 6)]
    assert calls[1][2] == tmp_path / SEARCH_FOLDER / "lr-0.001" / "seed-6"
    assert "lr 0.002: mean final training loss 0.5500 over 2 seeds" in lines
    assert two.to_dict()["run_losses"] == [[0.30, 0.32], [0.20, 0.90]]
    for seeds in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="`seeds` must be an integer >= 1"):
            search_rates(model, [1e-3, 2e-3], [], None, plan, tmp_path, seeds=seeds)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--lr-search-seeds", "2"), "--lr-search-seeds 2 needs --lr-search"),
        (("--lr-search", "1e-3", "2e-3", "--lr-search-seeds", "0"), "--lr-search-seeds"),
        (("--lr-search", "1e-3"), "at least two distinct rates"),
        (("--lr-search", "1e-3", "1e-3"), "at least two distinct rates"),
        (("--lr-search", "1e-3", "2e-3", "--lr", "5e-4"), "drop --lr"),
        (("--lr-search", "1e-3", "2e-3", "--relative-lr", "5e-3"), "drop --relative-lr"),
        (("--lr-search", "1e-3", "2e-3", "--save-every", "2"), "drop --save-every"),
        (("--lr-search", "1e-3", "2e-3", "--eval-every", "2"), "drop --eval-every"),
    ],
)
def test_clashing_options_stop_with_one_line_before_anything_runs(
    tiny_model_folder: Path,
    tiny_csv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    message: str,
) -> None:
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors exit, ours return 2
        raise SystemExit(main(_arguments(tiny_model_folder, tiny_csv, output, *extra)))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_a_search_where_every_run_diverges_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = apply_fora(tiny_model_case("llama").build(seed=0), 1.0, r=4, lora_dropout=0.0)

    def diverged(*_, **__) -> FitResult:
        return FitResult(losses=[1.0, float("inf")], step=2, interrupted=False, checkpoint=None)

    monkeypatch.setattr(rate_search_module, "fit", diverged)
    with pytest.raises(RuntimeError, match="non-finite training loss; try smaller rates"):
        search_rates(model, [1e-3, 2e-3], [], None, TrainingPlan(steps=2), tmp_path, say=print)
    with pytest.raises(ValueError, match="two distinct rates"):
        search_rates(model, [1e-3], [], None, TrainingPlan(steps=2), tmp_path)
    with pytest.raises(ValueError, match="positive finite"):
        search_rates(model, [1e-3, -1.0], [], None, TrainingPlan(steps=2), tmp_path)


@pytest.mark.parametrize(
    ("best_rate", "edge", "advice"),
    [(2.5e-4, "lowest", "with 0.000125 added"), (2e-3, "highest", "with 0.004 added"),
     (5e-4, None, None)],
)  # fmt: skip
def test_a_pick_at_an_end_of_the_grid_names_the_rate_to_add(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    best_rate: float,
    edge: str | None,
    advice: str | None,
) -> None:
    model = apply_fora(tiny_model_case("llama").build(seed=0), 1.0, r=4, lora_dropout=0.0)

    def by_rate(_model, optimizer, *_, **__) -> FitResult:  # the loss is lowest at best_rate
        rate = optimizer.param_groups[0]["lr"]
        loss = 1.0 + abs(math.log(rate / best_rate))
        return FitResult(losses=[2.0, loss], step=2, interrupted=False, checkpoint=None)

    monkeypatch.setattr(rate_search_module, "fit", by_rate)
    lines: list[str] = []
    grid = [2.5e-4, 5e-4, 1e-3, 2e-3]
    search = search_rates(model, grid, [], None, TrainingPlan(steps=2), tmp_path, say=lines.append)
    assert search.chosen == best_rate and search.edge == edge
    assert search.to_dict()["edge"] == edge
    advice_lines = [line for line in lines if "search again" in line]
    if advice is None:
        assert advice_lines == []
    else:
        assert len(advice_lines) == 1 and advice in advice_lines[0]
