"""Every estimator against a dense float64 brute-force reference, over the tiny model table."""

from __future__ import annotations

import pytest
import torch

from stiefel_peft.fisher import estimate_fisher
from stiefel_peft.fisher.losses import CAUSAL_LM, head_kind
from tests.fisher import reference
from tests.tiny_models import TINY_MODELS, tiny_model_case

# float64 models, but Hugging Face's ForCausalLMLoss upcasts logits with .float(), i.e. to
# float32, so the reference loss carries float32 rounding (~1e-7 relative); a bug is O(1).
RELATIVE = 2e-6
NAMES = [case.name for case in TINY_MODELS]


def assert_scores_close(ours: dict[str, float], expected: dict[str, float]) -> None:
    assert ours.keys() == expected.keys()
    scale = max(abs(value) for value in expected.values())
    assert scale > 0
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, rel=RELATIVE, abs=RELATIVE * scale), name


def batches_for(case, sizes=((3, 8, 1), (2, 6, 2))) -> list[dict]:
    return [case.make_batch(batch_size, seq_len, seed) for batch_size, seq_len, seed in sizes]


@pytest.mark.parametrize("case", TINY_MODELS, ids=lambda case: case.name)
def test_empirical_matches_per_example_autograd(case):
    model = case.build(seed=0, dtype=torch.float64)
    batches = batches_for(case)
    scores = estimate_fisher(model, batches, "empirical")
    assert scores.num_examples == 5 and scores.num_batches == 2
    assert_scores_close(scores.per_module, reference.empirical(model, batches))


@pytest.mark.parametrize("name", NAMES)
def test_empirical_batch_matches_squared_batch_gradient(name):
    case = tiny_model_case(name)
    model = case.build(seed=0, dtype=torch.float64)
    batches = batches_for(case)
    scores = estimate_fisher(model, batches, "empirical_batch")
    assert_scores_close(scores.per_module, reference.empirical_batch(model, batches))


@pytest.mark.parametrize("name", NAMES)
def test_taylor_matches_weight_times_mean_gradient(name):
    case = tiny_model_case(name)
    model = case.build(seed=0, dtype=torch.float64)
    batches = batches_for(case)
    scores = estimate_fisher(model, batches, "taylor")
    assert_scores_close(scores.per_module, reference.taylor(model, batches))


@pytest.mark.parametrize("name", NAMES)
def test_kfac_trace_matches_explicit_factors(name):
    case = tiny_model_case(name)
    model = case.build(seed=0, dtype=torch.float64)
    batches = batches_for(case)
    scores = estimate_fisher(model, batches, "kfac_trace")
    assert_scores_close(scores.per_module, reference.kfac_trace(model, batches))


@pytest.mark.parametrize("name", NAMES)
def test_sampled_matches_empirical_on_the_drawn_labels(name):
    """Redraw the labels with an independent sampler on the same seeded generator, then
    brute-force the empirical Fisher of those labels."""
    case = tiny_model_case(name)
    model = case.build(seed=0, dtype=torch.float64)
    batches = batches_for(case)
    num_samples, seed = 3, 7
    scores = estimate_fisher(model, batches, "sampled", num_samples=num_samples, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    drawn_batches = []
    for batch in batches:
        with torch.no_grad():
            logits = model(**batch).logits
        causal = head_kind(model, batch["labels"]) == CAUSAL_LM
        for _ in range(num_samples):
            drawn = reference.sample_like_the_model(logits, batch["labels"], causal, generator)
            drawn_batches.append({**batch, "labels": drawn})
    assert scores.num_examples == 5 * num_samples
    assert_scores_close(scores.per_module, reference.empirical(model, drawn_batches))


def test_examples_without_labels_are_left_out():
    case = tiny_model_case("llama")
    model = case.build(seed=0, dtype=torch.float64)
    batch = case.make_batch(3, 8, seed=1)
    batch["labels"][1] = -100  # example 1 has no loss
    scores = estimate_fisher(model, [batch], "empirical")
    assert scores.num_examples == 2
    assert_scores_close(scores.per_module, reference.empirical(model, [batch]))


def test_restricted_modules_match_reference():
    case = tiny_model_case("llama")
    model = case.build(seed=0, dtype=torch.float64)
    batches = batches_for(case)
    names = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj", "lm_head"]
    scores = estimate_fisher(model, batches, "empirical", modules=names)
    assert list(scores.per_module) == names
    modules = {name: model.get_submodule(name) for name in names}
    assert_scores_close(scores.per_module, reference.empirical(model, batches, modules))
    assert scores.per_block == {
        0: scores.per_module["model.layers.0.self_attn.q_proj"],
        1: scores.per_module["model.layers.1.mlp.down_proj"],
    }


def test_gram_and_outer_forms_agree_on_a_model(monkeypatch):
    """Force each form in turn for every module: same scores."""
    from stiefel_peft.fisher import estimators, norms

    case = tiny_model_case("phi3")
    model = case.build(seed=0, dtype=torch.float64)
    batches = batches_for(case)
    results = []
    for method in ("gram", "outer"):

        def forced(inputs, output_grads, *, bias, method=method):
            return norms.squared_gradient_norms(inputs, output_grads, bias=bias, method=method)

        monkeypatch.setattr(estimators, "squared_gradient_norms", forced)
        results.append(estimate_fisher(model, batches, "empirical").per_module)
    assert_scores_close(results[0], results[1])
