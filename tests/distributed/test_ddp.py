"""DDP (gloo, 2 CPU processes): StiefelAdam / fora_optimizer keep the replicas identical and
equal to one process on the global batch; Fisher scores are reduced so every rank selects the
same blocks, those of the union of the calibration shards."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from stiefel_peft.fisher import estimate_fisher
from stiefel_peft.fora import apply_fora
from tests.distributed import workers
from tests.distributed.launch import run_workers
from tests.tolerances import CLOSE

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    return run_workers("ddp_and_fisher", tmp_path_factory.mktemp("ddp"), timeout=120)


def test_ddp_replicas_equal_the_single_process_run(results: list[dict[str, Any]]) -> None:
    reference = workers.reference_training("B")
    rank0, rank1 = (result["ddp"] for result in results)
    assert rank0["optimizer"] == "StiefelAdam"
    assert set(rank0["factors"]) == set(reference["final"])
    for name, expected in reference["final"].items():
        assert torch.equal(rank0["factors"][name], rank1["factors"][name]), name
        torch.testing.assert_close(
            rank0["factors"][name], expected, atol=CLOSE[torch.float32], rtol=0, msg=name
        )
        moved = (expected - reference["initial"][name]).abs().max()
        assert moved > 100 * CLOSE[torch.float32], f"{name} barely trained; the test is vacuous"


def test_fisher_scores_are_those_of_the_union(results: list[dict[str, Any]]) -> None:
    union = workers.calibration_shard(0) + workers.calibration_shard(1)
    for estimator in workers.FISHER_ESTIMATORS:
        expected = estimate_fisher(workers.fisher_model(), union, estimator).per_module
        for result in results:
            got = result["fisher"]["scores"][estimator]
            assert got.keys() == expected.keys()
            for name, score in expected.items():
                assert got[name] == pytest.approx(score, rel=1e-10), (estimator, name)


def test_ranks_with_different_shards_select_the_same_blocks(
    results: list[dict[str, Any]],
) -> None:
    alone = [result["fisher"]["selected_alone"] for result in results]
    assert alone[0] != alone[1], "precondition: the shards alone must disagree"
    union = workers.calibration_shard(0) + workers.calibration_shard(1)
    expected = apply_fora(
        workers.fisher_model(), workers.SELECTION_BUDGET, calibration=union, r=workers.RANK
    ).fora_report
    for result in results:
        assert result["fisher"]["selected"] == expected.selected_blocks
        assert result["fisher"]["examples"] == expected.calibration_examples


def test_apply_fora_rejects_an_unknown_process_group_string() -> None:
    from tests.tiny_models import tiny_model_case

    with pytest.raises(ValueError, match="process_group"):
        apply_fora(tiny_model_case("llama").build(), 0.5, process_group="world")
