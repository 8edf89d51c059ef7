"""No gradient, edit or input silently corrupts a factor (issue: reliability).

Non-finite gradients are skipped per factor (or raise), every bucket position may lack a
gradient, a factor changed outside the optimizer is reported at the next check and never
stepped into NaN, and a ManifoldParameter's own choices are honoured or refused.
"""

from __future__ import annotations

import math

import geoopt
import pytest
import torch

from stiefel_peft.geometry import Stiefel, orthogonality_error, random_stiefel
from stiefel_peft.optim import RiemannianWrapper, StiefelAdam, StiefelSGD
from tests.tolerances import orthonormal_tolerance

OPTIMIZERS = {
    "adam": lambda params: StiefelAdam(params, lr=0.05),
    "adam-element": lambda params: StiefelAdam(params, lr=0.05, second_moment="element"),
    "adam-qr": lambda params: StiefelAdam(params, lr=0.05, retraction="qr"),
    "sgd": lambda params: StiefelSGD(params, lr=0.05, momentum=0.9),
    "wrapper": lambda params: RiemannianWrapper(torch.optim.Adam(params, lr=0.05)),
}


def _frames(count: int = 3, n: int = 12, p: int = 3, seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(random_stiefel(n, p, generator=generator)) for _ in range(count)]


def _gradients(params, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(param.shape, generator=generator) for param in params]


def _snapshot(optimizer, param) -> dict[str, torch.Tensor]:
    state = optimizer.state[param]
    saved = {k: v.clone() for k, v in state.items() if torch.is_tensor(v) and k != "step"}
    saved.pop("nonfinite_skips", None)
    return {"param": param.detach().clone(), **saved}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
def test_a_non_finite_gradient_leaves_its_factor_and_state_exactly_as_they_were(name, poison):
    params = _frames()
    optimizer = OPTIMIZERS[name](params)
    for step in range(3):  # some history, so the moments are not zero
        for param, grad in zip(params, _gradients(params, step), strict=True):
            param.grad = grad
        optimizer.step()
    before = [_snapshot(optimizer, param) for param in params]
    grads = _gradients(params, 10)
    grads[1][4, 2] = poison  # one entry of the middle factor's gradient
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad
    optimizer.step()
    after = [_snapshot(optimizer, param) for param in params]
    for key, value in before[1].items():  # the poisoned factor: bit for bit unchanged
        assert torch.equal(after[1][key], value), key
    for index in (0, 2):  # the others moved
        assert not torch.equal(after[index]["param"], before[index]["param"])
    assert optimizer.nonfinite_skips() == 1
    for param in params:
        assert torch.isfinite(param).all()
        assert orthogonality_error(param.detach()) <= 10 * orthonormal_tolerance(torch.float32, 3)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_nonfinite_raise_stops_before_anything_changes(name: str) -> None:
    params = _frames()
    euclidean = torch.nn.Parameter(torch.randn(5))
    if name == "wrapper":
        inner = torch.optim.Adam(
            [{"params": params}, {"params": [euclidean], "stiefel": False}], lr=0.05
        )
        optimizer = RiemannianWrapper(inner, nonfinite="raise")
    else:
        optimizer = OPTIMIZERS[name](
            [{"params": params}, {"params": [euclidean], "stiefel": False}]
        )
        for group in optimizer.param_groups:
            group["nonfinite"] = "raise"
    euclidean.grad = torch.ones(5)
    grads = _gradients(params, 3)
    grads[2][0, 0] = math.nan
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad
    before = [param.detach().clone() for param in [*params, euclidean]]
    with pytest.raises(ValueError, match="not finite.*nonfinite='skip'"):
        optimizer.step()
    for param, value in zip([*params, euclidean], before, strict=True):
        assert torch.equal(param.detach(), value)


@pytest.mark.parametrize("missing", [[0], [1], [2], [0, 2], [0, 1, 2]])
def test_any_position_of_a_bucket_may_lack_a_gradient(missing: list[int]) -> None:
    params = _frames()
    reference = _frames()
    optimizer, alone = StiefelAdam(params, lr=0.05), StiefelAdam(reference, lr=0.05)
    grads = _gradients(params, 1)
    for index, (param, twin, grad) in enumerate(zip(params, reference, grads, strict=True)):
        param.grad = None if index in missing else grad
        twin.grad = None if index in missing else grad.clone()
    before = [param.detach().clone() for param in params]
    optimizer.step()
    alone.step()
    for index, (param, twin) in enumerate(zip(params, reference, strict=True)):
        if index in missing:
            assert torch.equal(param.detach(), before[index])
            assert not optimizer.state[param] or int(optimizer.state[param]["step"]) == 0
        else:
            assert not torch.equal(param.detach(), before[index])
            torch.testing.assert_close(param, twin, rtol=0, atol=0)


@pytest.mark.parametrize("value", [math.inf, math.nan])
@pytest.mark.parametrize("option", ["lr", "eps"])
def test_infinite_or_nan_hyperparameters_are_refused(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"`{option}` must be a finite real number"):
        StiefelAdam(_frames(1), **{option: value})


def test_zero_eps_is_refused_in_a_stiefel_group() -> None:
    # lora_B's first gradient is exactly zero while lora_A is zero: 0/0 with eps = 0
    with pytest.raises(ValueError, match="`eps` must be > 0 in a Stiefel group"):
        StiefelAdam(_frames(1), eps=0.0)
    StiefelAdam([{"params": [torch.nn.Parameter(torch.ones(3))], "stiefel": False}], eps=0.0)


@pytest.mark.parametrize("name", ["adam", "adam-element", "adam-qr", "sgd"])
def test_a_factor_edited_off_the_manifold_is_reported_and_never_stepped_into_nan(name: str):
    params = _frames()
    optimizer = OPTIMIZERS[name](params)
    for group in optimizer.param_groups:
        group["check_every"] = 5
    for step in range(2):
        for param, grad in zip(params, _gradients(params, step), strict=True):
            param.grad = grad
        optimizer.step()
    with torch.no_grad():
        params[1].mul_(3.0)  # a user edit: no longer orthonormal
    edited = params[1].detach().clone()
    raised = None
    for step in range(2, 8):
        for param, grad in zip(params, _gradients(params, step), strict=True):
            param.grad = grad
        try:
            optimizer.step()
        except ValueError as error:
            raised = (step, str(error))
            break
        assert torch.equal(params[1].detach(), edited)  # left as it was until the check
    assert raised is not None and raised[0] == 4, raised  # the 5th step is a check step
    assert "has left the manifold" in raised[1] and "orthonormalize" in raised[1]
    assert "(12, 3)" in raised[1]
    assert all(torch.isfinite(param).all() for param in params)


def test_the_check_names_a_parameter_by_its_name_when_the_group_has_names() -> None:
    params = _frames(2)
    optimizer = StiefelAdam([("encoder.lora_B", params[0]), ("decoder.lora_B", params[1])])
    with torch.no_grad():
        params[1].mul_(2.0)
    for param in params:
        param.grad = torch.ones_like(param)
    with pytest.raises(ValueError, match="'decoder.lora_B'"):
        optimizer.step()


def test_an_edited_half_precision_factor_refills_its_master_or_is_reported() -> None:
    generator = torch.Generator().manual_seed(3)
    param = torch.nn.Parameter(random_stiefel(40, 4, generator=generator).to(torch.bfloat16))
    optimizer = StiefelAdam([param], lr=0.01, check_every=2)
    param.grad = torch.randn(param.shape, generator=generator).to(torch.bfloat16)
    optimizer.step()
    replacement = random_stiefel(40, 4, generator=generator)  # a new orthonormal value
    with torch.no_grad():
        param.copy_(replacement.to(torch.bfloat16))
    optimizer.step()  # step 2 checks: the master is refilled from the edited parameter
    master = optimizer.state[param]["master"]
    assert (master - replacement).abs().max() < 0.05  # followed the edit, not the old master
    with torch.no_grad():
        param.mul_(2.0)
    optimizer.step()
    with pytest.raises(ValueError, match="has left the manifold"):
        optimizer.step()


def test_a_manifold_parameter_must_agree_with_its_group() -> None:
    frame = random_stiefel(8, 2, generator=torch.Generator().manual_seed(4))
    on_qr = geoopt.ManifoldParameter(frame.clone(), manifold=Stiefel(retraction="qr"))
    with pytest.raises(ValueError, match="retraction='qr'.*retraction='cayley'"):
        StiefelAdam([on_qr])
    StiefelAdam([on_qr], retraction="qr")  # agreeing: accepted
    canonical = geoopt.ManifoldParameter(frame.clone(), manifold=Stiefel(metric="canonical"))
    with pytest.raises(ValueError, match="metric='canonical'"):
        StiefelSGD([canonical])
    with pytest.raises(ValueError, match="metric='canonical'"):
        RiemannianWrapper(torch.optim.SGD([canonical], lr=0.1))
    with pytest.raises(ValueError, match="retraction='qr'.*RiemannianWrapper"):
        RiemannianWrapper(torch.optim.SGD([on_qr], lr=0.1), retraction="polar")
    optimizer = StiefelAdam([on_qr], retraction="qr")
    optimizer.param_groups[0]["retraction"] = "polar"  # changed after construction
    on_qr.grad = torch.ones_like(on_qr)
    with pytest.raises(ValueError, match="retraction='qr'"):
        optimizer.step()


def test_the_wrapper_is_a_torch_optimizer_for_schedulers_and_new_groups() -> None:
    params = _frames(2)
    wrapper = RiemannianWrapper(torch.optim.SGD(params, lr=0.1))
    assert isinstance(wrapper, torch.optim.Optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(wrapper, step_size=1, gamma=0.5)
    for param in params:
        param.grad = torch.ones_like(param)
    wrapper.step()
    scheduler.step()
    assert wrapper.param_groups[0]["lr"] == pytest.approx(0.05)
    assert wrapper.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # shared, not copied
    extra = _frames(1, seed=9)[0]
    wrapper.add_param_group({"params": [extra], "lr": 0.2})
    assert wrapper.optimizer.param_groups[-1]["params"][0] is extra
    with pytest.raises(ValueError, match="not a \\(..., n, p\\) matrix"):
        wrapper.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))]})
    assert len(wrapper.optimizer.param_groups) == 2
    restored = RiemannianWrapper(torch.optim.SGD(_frames(2), lr=0.1))
    restored.add_param_group({"params": [_frames(1, seed=9)[0]], "lr": 0.2})
    restored.load_state_dict(wrapper.state_dict())
    assert restored.param_groups[0]["lr"] == pytest.approx(0.05)


def test_non_finite_gradients_under_float16_autocast_and_grad_scaler() -> None:
    # GradScaler skips a whole step when any gradient is not finite (and lowers its scale);
    # without it, StiefelAdam skips only the affected factor. Together: no skip reaches us.
    generator = torch.Generator().manual_seed(5)
    frame = torch.nn.Parameter(random_stiefel(16, 4, generator=generator))
    head = torch.nn.Parameter(torch.randn(4, 3, generator=generator))
    optimizer = StiefelAdam([{"params": [frame]}, {"params": [head], "stiefel": False}], lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**70)  # overflows float16 at first
    inputs = torch.randn(8, 16, generator=generator)
    skipped_by_scaler = 0
    for _ in range(6):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = ((inputs @ frame) @ head).float().square().mean()
        before = frame.detach().clone()
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if scaler.get_scale() < scale:
            skipped_by_scaler += 1
            assert torch.equal(frame.detach(), before)
    assert skipped_by_scaler >= 1
    assert optimizer.nonfinite_skips() == 0
    assert orthogonality_error(frame.detach()) <= orthonormal_tolerance(torch.float32, 4)
