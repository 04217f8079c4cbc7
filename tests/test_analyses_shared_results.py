"""The analyses' shared results (``mdlens.evaluation``): what ``reproduce all`` computes once for several
analyses equals the direct computation, is computed once for equal inputs, and again for any other input."""

import pytest
import torch

from mdlens import MTDTask, evaluation
from mdlens import estimators as E
from mdlens.analyses import TASK


@pytest.fixture(autouse=True)
def fresh():
    evaluation.clear_shared()
    yield
    evaluation.clear_shared()


@pytest.fixture
def counted(monkeypatch):
    """Calls of the estimators the shared results wrap, by name."""
    calls = {"bayes_weights": 0, "tune_eta_refined": 0}
    for name in calls:
        original = getattr(E, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(E, name, counting)
    return calls


def test_batches_are_the_seeded_samples_and_drawn_once():
    task = MTDTask(**TASK)
    tune, evaluation_batch = evaluation.sample_batches(task, 12, 16, 24)
    seeds = evaluation.batch_seeds(12)
    direct = task.sample(24, 12, generator=torch.Generator().manual_seed(seeds["eval"]))
    assert torch.equal(evaluation_batch.tokens, direct.tokens) and torch.equal(evaluation_batch.weights, direct.weights)
    assert torch.equal(tune.tokens, task.sample(16, 12, generator=torch.Generator().manual_seed(seeds["tune"])).tokens)
    # The trained analysis (n_eval 24 here) and the two-step analysis (another n_tune) share the evaluation batch.
    other_tune, same_evaluation = evaluation.sample_batches(task, 12, 8, 24)
    assert same_evaluation is evaluation_batch and other_tune.tokens.shape == (8, 12)


def test_reference_bayes_and_tuned_steps_are_computed_once_per_batch(counted):
    task = MTDTask(**TASK)
    tune, evaluation_batch = evaluation.sample_batches(task, 10, 16, 20)
    pi, m = task.transition, task.order
    etas, kls = evaluation.reference_kls(task, tune, evaluation_batch)
    assert counted == {"bayes_weights": 1, "tune_eta_refined": 2}
    # A second analysis on the same batches: nothing is recomputed, and the values are the direct ones.
    bayes = evaluation.exact_bayes_weights(evaluation_batch.tokens, pi, m, alpha=task.alpha)
    md1 = evaluation.tuned_md(tune.tokens, pi, m, tune.next_probs, steps=1)
    assert counted == {"bayes_weights": 1, "tune_eta_refined": 2}
    assert torch.equal(bayes, E.bayes_weights(evaluation_batch.tokens, pi, m, alpha=task.alpha, method="exact"))
    expected = E.tune_eta_refined(tune.tokens, pi, m, tune.next_probs, steps=1)
    assert md1["eta"] == expected["eta"] == etas["md1_tuned"] and torch.equal(md1["mean_kl"], expected["mean_kl"])
    truth = evaluation_batch.next_probs
    assert torch.equal(kls["bayes_exact"], E.kl_divergence(truth, E.predictive(evaluation_batch.tokens, pi, bayes)))


def test_any_other_input_is_computed_again(counted):
    task = MTDTask(**TASK)
    sample = task.sample(6, 9, generator=torch.Generator().manual_seed(0))
    pi, m = task.transition, task.order
    evaluation.exact_bayes_weights(sample.tokens, pi, m)
    changed = sample.tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % task.vocab_size  # one token differs
    evaluation.exact_bayes_weights(changed, pi, m)
    evaluation.exact_bayes_weights(sample.tokens, pi, m, alpha=2.0)
    evaluation.exact_bayes_weights(sample.tokens, MTDTask(vocab_size=5, order=3, seed=1).transition, m)
    assert counted["bayes_weights"] == 4
    evaluation.tuned_md(sample.tokens, pi, m, sample.next_probs, steps=1)
    evaluation.tuned_md(sample.tokens, pi, m, sample.next_probs, steps=2)
    evaluation.tuned_md(sample.tokens, pi, m, torch.full_like(sample.next_probs, 0.2), steps=1)
    assert counted["tune_eta_refined"] == 3


def test_the_store_keeps_only_the_most_recent_results(monkeypatch, counted):
    monkeypatch.setattr(evaluation, "SHARED_ENTRIES", 2)
    task = MTDTask(**TASK)
    pi, m = task.transition, task.order
    batches = [task.sample(3, 8, generator=torch.Generator().manual_seed(seed)).tokens for seed in range(3)]
    for tokens in [*batches, batches[2], batches[0]]:
        evaluation.exact_bayes_weights(tokens, pi, m)
    assert counted["bayes_weights"] == 4  # batch 0 was dropped when batch 2 came in; batch 2 was kept
