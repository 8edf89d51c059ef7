"""estimate_fisher's contract: model left untouched, determinism, errors, result round trip."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from stiefel_peft.fisher import ESTIMATORS, FisherScores, estimate_fisher
from tests.fisher import reference
from tests.tiny_models import tiny_model_case


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "values": {name: p.detach().clone() for name, p in model.named_parameters()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grad": {
            name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()
        },
        "training": {name: m.training for name, m in model.named_modules()},
        "hooks": {
            name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in model.named_modules()
        },
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    for name, value in before["values"].items():
        assert torch.equal(value, after["values"][name]), name
    for name, grad in before["grad"].items():
        if grad is None:
            assert after["grad"][name] is None, name
        else:
            assert torch.equal(grad, after["grad"][name]), name


def prepared_model(name: str = "llama"):
    """A model in a deliberately odd state: train mode with one eval block, mixed flags, a grad."""
    case = tiny_model_case(name)
    model = case.build(dtype=torch.float64).train()
    model.model.layers[1].eval()
    parameters = list(model.parameters())
    for index, parameter in enumerate(parameters):
        parameter.requires_grad_(index % 3 != 0)
    parameters[1].grad = torch.randn_like(parameters[1])
    return case, model


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_model_is_left_exactly_as_found(estimator):
    case, model = prepared_model()
    before = snapshot(model)
    estimate_fisher(model, [case.make_batch(3, 8, 1)], estimator)
    assert_same(before, snapshot(model))


def test_model_is_restored_when_an_exception_is_raised_mid_pass():
    case, model = prepared_model()
    before = snapshot(model)

    def batches():
        yield case.make_batch(3, 8, 1)
        raise KeyError("data loader failed")

    with pytest.raises(KeyError, match="data loader failed"):
        estimate_fisher(model, batches())
    assert_same(before, snapshot(model))

    calls = []

    def failing_hook(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("forward failed")

    handle = model.model.layers[0].register_forward_hook(failing_hook)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="forward failed"):
        estimate_fisher(model, [case.make_batch(3, 8, 1), case.make_batch(3, 8, 2)])
    assert_same(before, snapshot(model))
    handle.remove()


def test_estimate_runs_in_eval_mode_without_dropout():
    """Dropout switched on in the config: the estimate equals that of the eval-mode reference."""
    case = tiny_model_case("gpt_neox")
    model = case.build(dtype=torch.float64)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    batch = case.make_batch(3, 8, 1)
    model.train()
    scores = estimate_fisher(model, [batch]).per_module
    model.eval()
    expected = reference.empirical(model, [batch])
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, rel=2e-6)


def test_sampled_is_deterministic_under_a_seed_and_changes_with_it():
    case = tiny_model_case("llama")
    model = case.build(dtype=torch.float64)
    batches = [case.make_batch(3, 8, 1)]
    first = estimate_fisher(model, batches, "sampled", seed=3, num_samples=2)
    again = estimate_fisher(model, batches, "sampled", seed=3, num_samples=2)
    other = estimate_fisher(model, batches, "sampled", seed=4, num_samples=2)
    assert first.per_module == again.per_module
    assert first.per_module != other.per_module
    assert first.num_samples == 2 and first.seed == 3


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_per_block_is_the_sum_of_its_modules(estimator):
    case = tiny_model_case("gemma3")
    scores = estimate_fisher(case.build(), [case.make_batch(2, 8, 0)], estimator)
    assert sorted(scores.per_block) == list(range(case.num_blocks))
    for index, total in scores.per_block.items():
        parts = [
            v
            for name, v in scores.per_module.items()
            if name.startswith(f"{scores.blocks_path}.{index}.")
        ]
        assert total == pytest.approx(math.fsum(parts), rel=1e-12)
        assert total > 0
    assert scores.block_ranking()[0] == max(scores.per_block, key=scores.per_block.get)


def test_max_batches_dataloader_and_progress(capsys):
    case = tiny_model_case("bert")
    model = case.build(dtype=torch.float64)
    batch = case.make_batch(4, 8, 1)
    rows = [{key: value[index] for key, value in batch.items()} for index in range(4)]
    loader = DataLoader(rows, batch_size=2)
    scores = estimate_fisher(model, loader, max_batches=1, progress=True)
    assert scores.num_batches == 1 and scores.num_examples == 2
    expected = reference.empirical(model, [{k: v[:2] for k, v in batch.items()}])
    for name, value in expected.items():
        assert scores.per_module[name] == pytest.approx(value, rel=1e-8)
    assert "fisher (empirical)" in capsys.readouterr().err


def test_unknown_head_uses_the_per_example_loop():
    config = tiny_model_case("bert").make_config()
    config.num_labels = 3
    torch.manual_seed(0)
    model = transformers.BertForTokenClassification(config).double().eval()
    batch = tiny_model_case("bert").make_batch(3, 8, 1)
    batch["labels"] = torch.randint(0, 3, (3, 8)).masked_fill(batch["attention_mask"] == 0, -100)
    scores = estimate_fisher(model, [batch])
    assert scores.metadata["head"] == "unknown"
    expected = reference.empirical(model, [batch])
    for name, value in expected.items():
        assert scores.per_module[name] == pytest.approx(value, rel=1e-8, abs=1e-30)
    with pytest.raises(ValueError, match="cannot sample labels"):
        estimate_fisher(model, [batch], "sampled")


class _ScaledLossLlamaForCausalLM(transformers.LlamaForCausalLM):
    def forward(self, **kwargs):
        outputs = super().forward(**kwargs)
        if outputs.loss is not None:
            outputs.loss = 2 * outputs.loss
        return outputs


def test_a_nonstandard_loss_raises_instead_of_answering_wrongly():
    case = tiny_model_case("llama")
    torch.manual_seed(0)
    model = _ScaledLossLlamaForCausalLM(case.make_config()).eval()
    with pytest.raises(RuntimeError, match="not the standard one"):
        estimate_fisher(model, [case.make_batch(2, 6, 0)])


def test_errors_say_what_to_pass():
    case = tiny_model_case("llama")
    model = case.build()
    batch = case.make_batch(2, 6, 0)
    with pytest.raises(ValueError, match="pass one of"):
        estimate_fisher(model, [batch], "fisher")
    with pytest.raises(ValueError, match="batches is empty"):
        estimate_fisher(model, [])
    with pytest.raises(ValueError, match="batches is empty"):
        estimate_fisher(model, iter([]))
    unlabeled = {key: value for key, value in batch.items() if key != "labels"}
    for estimator in ESTIMATORS:
        with pytest.raises(ValueError, match="needs labels"):
            estimate_fisher(model, [unlabeled], estimator)
    with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
        estimate_fisher(model, [batch], "sampled", num_samples=0)
    with pytest.raises(ValueError, match="max_batches must be None or an int >= 1"):
        estimate_fisher(model, [batch], max_batches=0)
    with pytest.raises(ValueError, match="unknown module names"):
        estimate_fisher(model, [batch], modules=["nope"])
    unlabelled = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    for estimator in ESTIMATORS:  # the same error from every estimator
        with pytest.raises(ValueError, match="no example has a labelled token"):
            estimate_fisher(model, [unlabelled], estimator)
    with pytest.raises(ValueError, match="dict of tensors"):
        estimate_fisher(model, [(batch["input_ids"],)])


@pytest.mark.parametrize("estimator", ["empirical", "empirical_batch", "taylor", "kfac_trace"])
def test_batches_without_a_labelled_token_are_left_out(estimator):
    case = tiny_model_case("llama")
    model = case.build(dtype=torch.float64)
    batch = case.make_batch(3, 8, 1)
    empty = {**case.make_batch(2, 6, 2)}
    empty["labels"] = torch.full_like(empty["labels"], -100)
    alone = estimate_fisher(model, [batch], estimator)
    mixed = estimate_fisher(model, [batch, empty], estimator)
    assert mixed.num_batches == 2 and mixed.num_examples == alone.num_examples
    for name, value in alone.per_module.items():
        assert mixed.per_module[name] == pytest.approx(value, rel=1e-12, abs=1e-300)


def test_missing_label_hints_say_what_works():
    llama, bert = tiny_model_case("llama"), tiny_model_case("bert")
    batch = llama.make_batch(2, 6, 0)
    del batch["labels"]
    with pytest.raises(ValueError, match="labels=input_ids to sample") as caught:
        estimate_fisher(llama.build(), [batch], "sampled")
    assert "use estimator='sampled'" not in str(caught.value)
    with pytest.raises(ValueError, match="labels=input_ids scores every"):
        estimate_fisher(llama.build(), [batch], "empirical")
    classification = bert.make_batch(2, 6, 0)
    del classification["labels"]
    with pytest.raises(ValueError, match="use estimator='sampled'"):
        estimate_fisher(bert.build(), [classification], "empirical")


class _PlainNetwork(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.encoder(features)))


def test_a_model_without_blocks_or_hugging_face_calls_gets_accurate_hints():
    model = _PlainNetwork()
    batch = {"input_ids": torch.randn(3, 8), "labels": torch.tensor([0, 1, 0])}
    with pytest.raises(ValueError, match="modules=.*Hugging Face"):
        estimate_fisher(model, [batch])
    with pytest.raises(ValueError, match=r"model\(\*\*batch\) failed.*keyword arguments"):
        estimate_fisher(model, [batch], modules=["encoder", "head"])


class _PackedLinear(torch.nn.Linear):
    """A stand-in for a quantized layer: the parameter is packed bytes, the math dequantizes."""

    def __init__(self, dense: torch.nn.Linear) -> None:
        super().__init__(dense.in_features, dense.out_features, bias=dense.bias is not None)
        self.register_buffer("dense", dense.weight.detach().clone())
        packed = torch.zeros(dense.weight.numel() // 2, 1, dtype=torch.uint8)
        self.weight = torch.nn.Parameter(packed, requires_grad=False)
        if dense.bias is not None:
            self.bias = torch.nn.Parameter(dense.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.dense, self.bias)


def test_taylor_refuses_a_packed_weight_and_empirical_scores_it():
    case = tiny_model_case("llama")
    model = case.build(dtype=torch.float64)
    name = "model.layers.0.mlp.down_proj"
    parent = model.get_submodule("model.layers.0.mlp")
    parent.down_proj = _PackedLinear(parent.down_proj)
    batch = case.make_batch(2, 6, 0)
    with pytest.raises(ValueError, match=f"{name!r}.*packed or quantized.*'empirical'"):
        estimate_fisher(model, [batch], "taylor")
    assert estimate_fisher(model, [batch], "empirical").per_module[name] > 0


def test_a_registered_estimator_is_accepted_everywhere():
    from stiefel_peft.fisher import Estimator, register_estimator
    from stiefel_peft.fisher.estimators import ESTIMATORS as registry

    @register_estimator("output_gradient_norm")
    class OutputGradientNorm(Estimator):
        def __init__(self, modules):
            super().__init__(modules)
            self.sums = {name: torch.zeros((), dtype=torch.float64) for name in modules}

        def on_gradient(self, name, x, delta):
            self.sums[name] += delta.double().square().sum()

        def running_sums(self):
            return list(self.sums.values())

        def finish(self, count):
            return {name: float(total) / count for name, total in self.sums.items()}

    try:
        case = tiny_model_case("llama")
        scores = estimate_fisher(case.build(), [case.make_batch(2, 6, 0)], "output_gradient_norm")
        assert all(value > 0 for value in scores.per_block.values())
        from stiefel_peft.fora import FoRAConfig

        assert FoRAConfig(estimator="output_gradient_norm").estimator == "output_gradient_norm"
        with pytest.raises(ValueError, match="already registered"):
            register_estimator("output_gradient_norm")(OutputGradientNorm)
    finally:
        registry.pop("output_gradient_norm", None)


def test_sampled_classifier_needs_no_labels():
    case = tiny_model_case("bert")
    batch = case.make_batch(3, 8, 1)
    del batch["labels"]
    scores = estimate_fisher(case.build(), [batch], "sampled")
    assert scores.num_examples == 3


scores_strategy = st.builds(
    FisherScores,
    estimator=st.sampled_from(sorted(ESTIMATORS)),
    per_module=st.dictionaries(st.text(min_size=1, max_size=12), st.floats(allow_nan=False)),
    per_block=st.dictionaries(st.integers(0, 100), st.floats(allow_nan=False)),
    num_examples=st.integers(0, 10**6),
    num_batches=st.integers(0, 10**4),
    seconds=st.floats(0, 1e6),
    blocks_path=st.one_of(st.none(), st.just("model.layers")),
    num_samples=st.integers(1, 8),
    seed=st.integers(0, 2**31),
)


@settings(max_examples=50, deadline=None)
@given(scores_strategy)
def test_json_round_trip(scores):
    assert FisherScores.from_json(scores.to_json()) == scores
    assert FisherScores.from_dict(scores.to_dict()) == scores


def test_save_and_load(tmp_path):
    case = tiny_model_case("opt")
    scores = estimate_fisher(case.build(), [case.make_batch(2, 6, 0)], "kfac_trace")
    scores.save(tmp_path / "fisher.json")
    assert FisherScores.load(tmp_path / "fisher.json") == scores
    with pytest.raises(ValueError, match="format_version"):
        FisherScores.from_dict({**scores.to_dict(), "format_version": 99})
