"""Named selections: the same parameter budget spent by blocks, by layers, or by rank."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

from stiefel_peft.fisher import FisherScores
from stiefel_peft.fora import (
    SELECTIONS,
    FoRAConfig,
    apply_fora,
    constrained_parameters,
    fora_optimizer,
    plan_fora,
    register_selection,
    select,
)
from stiefel_peft.fora.selection import layer_scores, proportional_ranks
from stiefel_peft.geometry import orthogonality_error
from tests.tiny_models import tiny_model_case

RANK = 4


def _scores(plan, per_block: dict[int, float], per_module: dict[str, float]) -> FisherScores:
    return FisherScores(
        estimator="empirical", per_module=per_module, per_block=per_block,
        num_examples=4, num_batches=1, seconds=0.0,
    )  # fmt: skip


def _plan(budget: float = 0.5):
    case = tiny_model_case("llama")
    model = case.build()
    config = FoRAConfig(r=RANK, budget=budget)
    return case, model, config, plan_fora(model, config)


def test_every_selection_spends_at_most_the_top_blocks_budget() -> None:
    case, model, config, plan = _plan()
    per_block = {index: float(index + 1) for index in range(plan.blocks.length)}
    per_module = {name: 1.0 + i for i, name in enumerate(plan.features)}
    scores = _scores(plan, per_block, per_module)
    budget = select(plan, scores, config).parameters(RANK)
    for name in SELECTIONS:
        chosen = select(plan, scores, FoRAConfig(r=RANK, budget=0.5, selection=name))
        assert 0 < chosen.parameters(RANK) <= budget, name


def test_top_modules_takes_layers_by_score_per_parameter() -> None:
    case, model, config, plan = _plan()
    names = list(plan.features)
    density = {name: 1.0 / (RANK * sum(plan.features[name])) for name in names}
    best = names[-3:]  # three layers of the last block, scored far above the rest
    per_module = {name: density[name] * (100.0 if name in best else 1.0) for name in names}
    scores = _scores(plan, {i: 1.0 for i in range(plan.blocks.length)}, per_module)
    chosen = select(plan, scores, FoRAConfig(r=RANK, selection="top_modules"))
    assert set(best) <= set(chosen.adapted_modules)
    budget = plan.count * plan.parameters(RANK, plan.per_block[0])
    left = budget - chosen.parameters(RANK)
    unused = [n for n in names if n not in chosen.adapted_modules]
    assert all(RANK * sum(plan.features[n]) > left for n in unused)  # nothing else fits


def test_fisher_rank_gives_every_block_rank_in_proportion_summing_to_k_r() -> None:
    case, model, config, plan = _plan()
    per_block = {index: float(index) for index in range(plan.blocks.length)}  # block 0: zero
    chosen = select(plan, _scores(plan, per_block, {}), FoRAConfig(r=RANK, selection="fisher_rank"))
    block_rank = {i: chosen.rank_of(plan.per_block[i][0], RANK) for i in chosen.selected_blocks}
    assert sum(block_rank.values()) == plan.count * RANK
    assert 0 not in chosen.selected_blocks  # a zero score gets no adapter
    ranks = [block_rank[i] for i in sorted(block_rank)]
    assert ranks == sorted(ranks) and max(ranks) <= 2 * RANK and len(ranks) >= 2


def test_proportional_ranks_sum_cap_and_hand_on_capped_shares() -> None:
    assert proportional_ranks({0: 1, 1: 1, 2: 2}, 8, 10) == {0: 2, 1: 2, 2: 4}
    ranks = proportional_ranks({0: 100, 1: 1, 2: 1}, 12, 6)  # 0 capped at 6, the rest share
    assert ranks[0] == 6 and sum(ranks.values()) == 12
    assert sum(proportional_ranks({0: 0.2, 1: 0.3, 2: 0.5}, 7, 7).values()) == 7
    assert proportional_ranks({0: 0, 1: 0}, 4, 4) == {0: 2, 1: 2}  # no signal: even
    with pytest.raises(ValueError, match="cannot give"):
        proportional_ranks({0: 1, 1: 1}, 9, 4)


@pytest.mark.parametrize("selection", ["top_modules", "fisher_rank"])
def test_variants_train_save_and_reload_with_peft_alone(selection: str, tmp_path: Path) -> None:
    case = tiny_model_case("llama")
    calibration = [case.make_batch(3, 8, seed) for seed in range(2)]
    model = apply_fora(case.build(), calibration=calibration, r=RANK, selection=selection)
    report = model.fora_report
    assert report.selection == selection and report.parameter_ratio <= 0.5 + 1e-9
    if selection == "fisher_rank":
        assert report.ranks and len(set(report.ranks.values())) >= 1
    optimizer = fora_optimizer(model, lr=1e-2, stiefel_lr=1e-2)
    batch = case.make_batch(4, 8, 7)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()
    for _, weight in constrained_parameters(model, "B"):
        assert float(orthogonality_error(weight.detach())) < 1e-5
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(case.build(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


def test_layer_scores_match_peft_names_and_unknown_selections_are_refused() -> None:
    case, model, config, plan = _plan()
    prefixed = {f"base_model.model.{name}.base_layer": 2.0 for name in plan.features}
    assert set(layer_scores(plan, prefixed).values()) == {2.0}
    with pytest.raises(ValueError, match="no single Fisher score"):
        layer_scores(plan, {})
    with pytest.raises(ValueError, match="`selection` must be one of"):
        FoRAConfig(selection="best_guess")


def test_a_registered_selection_is_accepted_by_the_config() -> None:
    @register_selection("first_block")
    def first_block(plan, scores, config):
        return plan.with_blocks([0])

    try:
        case = tiny_model_case("llama")
        model = apply_fora(
            case.build(), calibration=[case.make_batch(2, 8, 0)], r=RANK, selection="first_block"
        )
        assert model.fora_report.selected_blocks == [0]
        with pytest.raises(ValueError, match="already registered"):
            register_selection("first_block")(first_block)
    finally:
        SELECTIONS.pop("first_block", None)
