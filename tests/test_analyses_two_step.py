"""The causal two-step analysis: its variants against mdlens.estimators, and a quick end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mdlens import MTDTask
from mdlens import estimators as E
from mdlens.analyses import causal_two_step as two_step

CONSTRUCTION_KEYS = ("causal_md2", "causal_md3", "construction_2step", "construction_3step", "bayes_exact")


@pytest.fixture(scope="module")
def sample():
    task = MTDTask(vocab_size=4, order=3, alpha=1.0, seed=3)
    return task, task.sample(16, 40, generator=torch.Generator().manual_seed(7))


def test_final_grad_at_md_scales_is_two_step_mirror_descent(sample):
    task, batch = sample
    m, eta, context = task.order, 0.07, batch.tokens.shape[1] - task.order
    weights = two_step.two_step_weights(
        batch.tokens, task.transition, m, "final-grad", eta * m * context, eta * m * context, eta * context
    )
    expected = E.md_weights(batch.tokens, task.transition, m, eta, steps=2)
    torch.testing.assert_close(weights, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", two_step.VARIANTS)
def test_without_second_step_every_variant_is_one_step_mirror_descent(sample, variant):
    task, batch = sample
    m, eta, context = task.order, 0.05, batch.tokens.shape[1] - task.order
    weights = two_step.two_step_weights(batch.tokens, task.transition, m, variant, 3.0, eta * m * context, 0.0, 2.0)
    torch.testing.assert_close(weights, E.md_weights(batch.tokens, task.transition, m, eta), rtol=1e-10, atol=1e-12)


def test_online_and_final_agree_on_the_rows_where_the_prefix_is_the_whole_sequence(sample):
    # With T = m + 1 there is one row: lambda1(k) at that row is the final estimate.
    task, batch = sample
    m = task.order
    tokens = batch.tokens[:, : m + 1]
    for kind in ("grad", "resp"):
        online = two_step.two_step_weights(tokens, task.transition, m, f"online-{kind}", 4.0, 2.0, 3.0)
        final = two_step.two_step_weights(tokens, task.transition, m, f"final-{kind}", 4.0, 2.0, 3.0)
        torch.testing.assert_close(online, final, rtol=1e-12, atol=1e-14)


def test_attend_final_without_key_weighting_is_one_step_mirror_descent(sample):
    # d = 0: uniform attention over positions, g1 = g0, so lambda2 = softmax((b + c) g0) = MD1.
    task, batch = sample
    m, eta, context = task.order, 0.04, batch.tokens.shape[1] - task.order
    weights = two_step.two_step_weights(
        batch.tokens, task.transition, m, "attend-final", 5.0, 0.3 * eta * m * context, 0.7 * eta * m * context, 0.0
    )
    torch.testing.assert_close(weights, E.md_weights(batch.tokens, task.transition, m, eta), rtol=1e-10, atol=1e-12)


def test_attend_final_matches_a_loop_over_positions(sample):
    task, batch = sample
    m, pi = task.order, task.transition
    a, b, c, d = 6.0, 4.0, 3.0, 2.5
    weights = two_step.two_step_weights(batch.tokens, pi, m, "attend-final", a, b, c, d)
    for row, sequence in enumerate(batch.tokens.tolist()):
        # gamma_k(g) = pi(y_{k-g}, y_k) / sum_h pi(y_{k-h}, y_k), k = m+1..T (1-based), by hand.
        gammas = []
        for k in range(m, len(sequence)):
            likelihoods = [pi[sequence[k - g], sequence[k]].item() for g in range(1, m + 1)]
            gammas.append([value / sum(likelihoods) for value in likelihoods])
        mean = [sum(gamma[g] for gamma in gammas) / len(gammas) for g in range(m)]
        first = [math.exp(a * x) for x in mean]
        first = [x / sum(first) for x in first]
        key_scores = [math.exp(-d * sum(first[g] * gamma[g] for g in range(m))) for gamma in gammas]
        second = [
            sum(w * gamma[g] for w, gamma in zip(key_scores, gammas, strict=True)) / sum(key_scores) for g in range(m)
        ]
        logits = [math.exp(b * mean[g] + c * second[g]) for g in range(m)]
        expected = torch.tensor([x / sum(logits) for x in logits], dtype=weights.dtype)
        torch.testing.assert_close(weights[row], expected, rtol=1e-10, atol=1e-12)


def test_unknown_variant_is_a_value_error(sample):
    task, batch = sample
    with pytest.raises(ValueError, match="variant"):
        two_step.two_step_weights(batch.tokens, task.transition, task.order, "online", 1.0, 1.0, 1.0)


def test_quick_run_writes_json_and_png_and_the_fit_never_loses_to_its_md2_start(tmp_path):
    result = two_step.run(tmp_path, quick=True)
    data = json.loads((tmp_path / "two_step.json").read_text())
    assert [row["seq_len"] for row in data["results"]] == two_step.QUICK["lengths"]
    task = MTDTask(**two_step.TASK)
    for row in data["results"]:
        assert set(row["kl"]) == {*two_step.TUNED_MD, *two_step.VARIANTS, *CONSTRUCTION_KEYS}
        # The tuned constructions, run as models, compute their estimators (to rounding).
        assert max(row["construction_max_abs_diff"].values()) < 1e-12
        assert row["scales"]["attend-final"] == row["scales"]["construction_2step"]
        # final-grad contains two-step MD, and the fit starts there: on the tuning batch it is no worse.
        tune, _ = two_step.sample_batches(task, row["seq_len"], two_step.QUICK["n_tune"], two_step.QUICK["n_eval"])
        m, eta = task.order, row["eta"]["md2_tuned"]
        md2_kl = E.kl_divergence(
            tune.next_probs,
            E.predictive(tune.tokens, task.transition, E.md_weights(tune.tokens, task.transition, m, eta, 2)),
        ).mean()
        fitted = two_step.two_step_weights(tune.tokens, task.transition, m, "final-grad", *row["scales"]["final-grad"])
        fitted_kl = E.kl_divergence(tune.next_probs, E.predictive(tune.tokens, task.transition, fitted)).mean()
        assert fitted_kl <= md2_kl + 1e-12
        # The 3-step fit starts from the 2-step fit with a do-nothing third step: it tunes no worse.
        three_kl, two_kl = (
            E.kl_divergence(
                tune.next_probs,
                E.predictive(
                    tune.tokens,
                    task.transition,
                    E.causal_md_weights(tune.tokens, task.transition, m, row["scales"][f"construction_{steps}step"]),
                ),
            ).mean()
            for steps in (3, 2)
        )
        assert three_kl <= two_kl + 1e-12
    assert [row["seq_len"] for row in data["three_step"]] == two_step.QUICK["lengths"]
    assert set(data["three_step"][0]["kl"]) == {
        "md1_tuned",
        "md2_tuned",
        "md3_tuned",
        "construction_2step",
        "construction_3step",
        "bayes_exact",
    }
    assert any("constr3/MD3" in line for line in data["summary"])
    comparison = data["trained_comparison"]
    assert comparison["model"] == "disentangled-5l" and comparison["seq_len"] == two_step.QUICK["lengths"][-1]
    assert len(comparison["attention"]["tv"]) == 5  # one model layer per construction layer, in order
    assert [ours[0] for _, ours in comparison["attention"]["pairs"]] == sorted(
        ours[0] for _, ours in comparison["attention"]["pairs"]
    )
    assert {"lambda1", "second_step_mean", "lambda2"} <= set(comparison["probes"]["r2"])
    assert set(comparison["sensitivity"]) == {"construction_2step", "construction_1step"}
    assert (tmp_path / "two_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(result.files) == sorted(str(tmp_path / name) for name in ("two_step.json", "two_step.png"))
