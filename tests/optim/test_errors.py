"""Every rejected input raises ValueError naming the option or the parameter."""

from __future__ import annotations

import geoopt
import pytest
import torch

from stiefel_peft.geometry import random_stiefel
from stiefel_peft.optim import RiemannianWrapper, StiefelAdam, StiefelSGD


def _frame() -> torch.nn.Parameter:
    return torch.nn.Parameter(random_stiefel(6, 2, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lr": -1e-3}, "`lr`"),
        ({"eps": -1.0}, "`eps`"),
        ({"betas": (1.0, 0.999)}, r"betas\[0\]"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
        ({"betas": (0.9,)}, "`betas`"),
        ({"retraction": "nope"}, "`retraction`"),
        (
            {"retraction": "cayley_iterative", "retraction_options": {"bogus": 1}},
            "retraction_options",
        ),
        ({"second_moment": "diag"}, "second_moment"),
        ({"weight_decay": 0.01}, "weight_decay"),
        ({"weight_decay": -0.01, "stiefel": False}, "weight_decay"),
        ({"check_every": 0}, "check_every"),
        ({"fused": True}, "fused"),
        ({"capturable": True}, "capturable"),
        ({"differentiable": True}, "differentiable"),
        ({"stiefel": "yes"}, "stiefel"),
    ],
)
def test_adam_rejects_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StiefelAdam([_frame()], **options)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lr": -0.1}, "`lr`"),
        ({"momentum": -0.5}, "momentum"),
        ({"nesterov": True}, "nesterov"),
        ({"weight_decay": 0.1}, "weight_decay"),
        ({"retraction": "svd"}, "retraction"),
    ],
)
def test_sgd_rejects_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StiefelSGD([_frame()], **options)


def test_group_overrides_are_validated_and_unknown_keys_rejected() -> None:
    with pytest.raises(ValueError, match="`lr`"):
        StiefelAdam([{"params": [_frame()], "lr": -1.0}])
    with pytest.raises(ValueError, match="momentum"):
        StiefelAdam([{"params": [_frame()], "momentum": 0.9}])
    optimizer = StiefelAdam([_frame()])
    with pytest.raises(ValueError, match="retraction"):
        optimizer.add_param_group({"params": [_frame()], "retraction": "bad"})
    assert len(optimizer.param_groups) == 1


def test_one_dimensional_parameter_in_stiefel_group() -> None:
    with pytest.raises(ValueError, match=r"shape \(5,\).*stiefel=False"):
        StiefelAdam([torch.nn.Parameter(torch.zeros(5))])
    StiefelAdam([{"params": [torch.nn.Parameter(torch.zeros(5))], "stiefel": False}])


def test_manifold_parameter_on_another_manifold() -> None:
    sphere = geoopt.ManifoldParameter(torch.tensor([1.0, 0.0]), manifold=geoopt.Sphere())
    with pytest.raises(ValueError, match="Sphere"):
        StiefelAdam([{"params": [sphere], "stiefel": False}])


def test_not_orthonormal_at_first_step_names_shape_and_fix() -> None:
    wide = torch.nn.Parameter(torch.randn(3, 8))
    optimizer = StiefelAdam([wide])
    wide.grad = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"\(3, 8\).*rows.*orthonormalize"):
        optimizer.step()
    bf16 = torch.nn.Parameter(1.5 * random_stiefel(8, 3).to(torch.bfloat16))
    bf16.grad = torch.zeros_like(bf16)
    with pytest.raises(ValueError, match=r"\(8, 3\).*bfloat16"):
        StiefelSGD([bf16], lr=0.1).step()


def test_wrapper_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="retraction"):
        RiemannianWrapper(torch.optim.SGD([_frame()], lr=0.1), retraction="none")
    with pytest.raises(ValueError, match="optimizer"):
        RiemannianWrapper("sgd")
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        RiemannianWrapper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(4))], lr=0.1))
