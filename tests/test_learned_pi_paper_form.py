"""``hooks.weights.softmax_transition_kl``, the paper's "KL between pi and a softmax of layer 1's W_A",
against row-by-row numpy loops and the construction's known answers (its score block is exactly
``(log pi)^T``)."""

import json

import numpy as np
import pytest
import torch

import mdlens
from mdlens.analyses import report
from mdlens.analyses import training_mechanism as tm
from mdlens.construction import build_md_transformer
from mdlens.hooks.weights import PAPER_LEARNED_TRANSITION_KL, softmax_transition_kl
from mdlens.models import DisentangledTransformer, standard_transformer


def random_transition(q: int, seed: int) -> torch.Tensor:
    rows = -torch.log(torch.rand(q, q, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return rows / rows.sum(dim=1, keepdim=True)


def model_with_scores(scores: torch.Tensor) -> DisentangledTransformer:
    """A float64 one-layer disentangled model whose layer-1 token-token block is ``scores``."""
    q = scores.shape[0]
    model = DisentangledTransformer(q, 8, n_layers=1, window=3, dtype=torch.float64, order=2)
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0, :q, :q] = scores
    return model


def brute_force(scores: np.ndarray, pi: np.ndarray) -> dict[str, float]:
    """Every form, one row at a time: softmax by hand, KL(target || softmax) with 0 log 0 = 0."""
    q = pi.shape[0]

    def softmax(vector: np.ndarray) -> np.ndarray:
        e = np.exp(vector - vector.max())
        return e / e.sum()

    def kl(p: np.ndarray, r: np.ndarray) -> float:
        return sum(p[v] * np.log(p[v] / r[v]) for v in range(len(p)) if p[v] > 0)

    posterior = np.array([[pi[a, b] / pi[:, b].sum() for a in range(q)] for b in range(q)])  # row b: P(a | b)
    uniform = np.full(q, 1.0 / q)
    return {
        "softmax_over_keys_vs_pi": np.mean([kl(pi[i], softmax(scores[i, :])) for i in range(q)]),
        "softmax_over_queries_vs_pi": np.mean([kl(pi[a], softmax(scores[:, a])) for a in range(q)]),
        "softmax_over_keys_vs_parent_posterior": np.mean([kl(posterior[b], softmax(scores[b, :])) for b in range(q)]),
        "uniform_vs_pi": np.mean([kl(pi[a], uniform) for a in range(q)]),
        "uniform_vs_parent_posterior": np.mean([kl(posterior[b], uniform) for b in range(q)]),
    }


@pytest.mark.parametrize("q, seed", [(3, 0), (5, 1), (8, 2)])
def test_every_form_matches_a_row_by_row_computation_on_random_scores(q, seed):
    generator = torch.Generator().manual_seed(100 + seed)
    scores = 3 * torch.randn(q, q, generator=generator, dtype=torch.float64)
    pi = random_transition(q, seed)
    pi[0, 1] = 0.0  # a zero transition: 0 log 0 = 0 in every form
    pi = pi / pi.sum(dim=1, keepdim=True)
    result = softmax_transition_kl(model_with_scores(scores), pi)
    expected = brute_force(scores.numpy(), pi.numpy())
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-10, abs=1e-14), key
    assert min(result.values()) > 0  # random scores and a random pi: no form is exact


@pytest.mark.parametrize("q, m", [(5, 3), (4, 2), (6, 4)])
def test_the_construction_scores_zero_in_the_transposed_forms_and_not_in_the_literal_one(q, m):
    pi = random_transition(q, seed=q + m)
    model = build_md_transformer(pi, m, seq_len=16, eta=0.1)
    result = softmax_transition_kl(model, pi)
    # The block is (log pi)^T: softmax over queries per key a is pi(a, .) itself, and softmax over keys
    # per query b is pi(., b) / sum_a pi(a, b), the parent posterior.
    assert result["softmax_over_queries_vs_pi"] < 1e-12
    assert result["softmax_over_keys_vs_parent_posterior"] < 1e-12
    # Read as log pi itself (no transpose), it is as wrong as brute force says, and not 0.
    log_pi_T = np.log(pi.numpy()).T
    literal = brute_force(log_pi_T, pi.numpy())["softmax_over_keys_vs_pi"]
    assert result["softmax_over_keys_vs_pi"] == pytest.approx(literal, rel=1e-10) and literal > 1e-3


def test_per_query_shifts_change_only_the_form_attention_cannot_see():
    pi = random_transition(5, seed=7)
    model = build_md_transformer(pi, 3, seq_len=12, eta=0.2)
    before = softmax_transition_kl(model, pi)
    shifts = 4 * torch.randn(5, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0, :5, :5] += shifts  # one constant per query row: attention is unchanged
    after = softmax_transition_kl(model, pi)
    for key in ("softmax_over_keys_vs_pi", "softmax_over_keys_vs_parent_posterior", "uniform_vs_pi"):
        assert after[key] == pytest.approx(before[key], abs=1e-12)
    assert after["softmax_over_queries_vs_pi"] > 1e-3  # was 0: this form reads the shifts as signal


def test_the_uniform_guess_is_what_zero_scores_score():
    pi = random_transition(5, seed=3)
    result = softmax_transition_kl(model_with_scores(torch.zeros(5, 5, dtype=torch.float64)), pi)
    assert result["softmax_over_keys_vs_pi"] == pytest.approx(result["uniform_vs_pi"], abs=1e-14)
    assert result["softmax_over_queries_vs_pi"] == pytest.approx(result["uniform_vs_pi"], abs=1e-14)
    assert result["softmax_over_keys_vs_parent_posterior"] == pytest.approx(
        result["uniform_vs_parent_posterior"], abs=1e-14
    )
    # KL(p || uniform) = log q - H(p), averaged over the rows
    entropy = -(pi * pi.log()).sum(dim=1)
    assert result["uniform_vs_pi"] == pytest.approx(float((np.log(5) - entropy).mean()), rel=1e-12)


def test_the_shipped_3l_long_model_is_closest_in_the_attention_form():
    # Its layer 1 follows (log pi)^T (README): the per-query form is the one that is far below uniform.
    model, task = mdlens.load_pretrained("disentangled-3l-long")
    result = softmax_transition_kl(model, task.transition)
    scores = model.blocks[0].attn.W_Q[0, :5, :5].detach().to(torch.float64).numpy()
    expected = brute_force(scores, task.transition.numpy())
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-9), key
    assert result["softmax_over_keys_vs_parent_posterior"] < result["uniform_vs_parent_posterior"] / 3


def test_bad_inputs_raise_value_errors():
    pi = random_transition(4, seed=1)
    with pytest.raises(ValueError, match="DisentangledTransformer"):
        softmax_transition_kl(standard_transformer(4, 8, n_layers=1, d_model=8, n_heads=1, seed=0), pi)
    model = model_with_scores(torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="d_vocab"):
        softmax_transition_kl(model, random_transition(5, seed=1))
    never_next = pi.clone()
    never_next[:, 2] = 0.0
    never_next = never_next / never_next.sum(dim=1, keepdim=True)
    with pytest.raises(ValueError, match=r"columns \[2\] are zero"):
        softmax_transition_kl(model, never_next)
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        softmax_transition_kl(model, pi)


# ----------------------------------------------------------------------------------------------
# The report's table and verdict, and the training study's curves
# ----------------------------------------------------------------------------------------------

PAPER = 0.0376  # D'Angelo & Flammarion: KL at T=192 for their trained model
FORMS = ("softmax_over_keys_vs_pi", "softmax_over_queries_vs_pi", "softmax_over_keys_vs_parent_posterior")
UNIFORM_OF = {
    "softmax_over_keys_vs_pi": "uniform_vs_pi",
    "softmax_over_queries_vs_pi": "uniform_vs_pi",
    "softmax_over_keys_vs_parent_posterior": "uniform_vs_parent_posterior",
}


def mechanisms_of(kls_by_model: dict) -> dict:
    """A mechanisms JSON's "models" with only what the report's paper-form rows read."""
    return {name: {"softmax_transition_kl": kls} for name, kls in kls_by_model.items()} | {
        "standard-3l": {"softmax_transition_kl": None}
    }


@pytest.fixture(scope="module")
def shipped_kls():
    """Brute-force paper-form KLs of the construction and of every shipped disentangled model."""
    kls = {}
    for name in ("disentangled-3l", "disentangled-3l-long", "disentangled-5l"):
        model, task = mdlens.load_pretrained(name)
        q = task.vocab_size
        kls[name] = brute_force(model.blocks[0].attn.W_Q[0, :q, :q].detach().double().numpy(), task.transition.numpy())
    pi = task.transition.numpy()
    return {"construction": brute_force(np.log(pi).T, pi), **kls}


def test_the_reports_table_has_every_form_of_every_disentangled_model(shipped_kls):
    assert PAPER_LEARNED_TRANSITION_KL == PAPER  # the number the analyses write beside ours
    table = report.softmax_table(mechanisms_of(shipped_kls), PAPER)
    header, rows = table[0], table[2:-1]
    assert [cell.strip() for cell in header.strip("|").split("|")][3:] == list(shipped_kls)  # no standard-3l
    assert len(rows) == len(FORMS)
    for row, form in zip(rows, FORMS, strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == str(PAPER)
        assert float(cells[2]) == pytest.approx(shipped_kls["construction"][UNIFORM_OF[form]], abs=5e-5)
        for name, cell in zip(shipped_kls, cells[3:], strict=True):
            assert float(cell) == pytest.approx(shipped_kls[name][form], abs=5e-5)


def test_the_verdict_follows_the_best_trained_form(shipped_kls):
    mechanisms = mechanisms_of(shipped_kls)
    # The best trained (model, form), found here by a plain loop; the construction does not count.
    best = min((kls[form], name, form) for name, kls in shipped_kls.items() if name != "construction" for form in FORMS)
    value, name, form = best
    uniform = shipped_kls[name][UNIFORM_OF[form]]
    verdict = report.softmax_verdict(mechanisms, PAPER)
    if value <= PAPER:
        assert verdict.startswith("agrees")
    elif value < uniform:
        assert verdict.startswith(f"partly: {name}'s best") and f"{value / PAPER:.2f}x the paper's" in verdict
        assert f"{value / uniform:.2f}x the uniform guess's" in verdict
    else:
        assert verdict.startswith("differs")
    # The other branches, on made-up numbers.
    perfect = dict(shipped_kls["disentangled-3l"], softmax_over_queries_vs_pi=0.01)
    assert report.softmax_verdict(mechanisms_of({"construction": perfect, "a": perfect}), PAPER).startswith("agrees")
    useless = dict.fromkeys(FORMS, 9.0) | {"uniform_vs_pi": 0.5, "uniform_vs_parent_posterior": 0.3}
    verdict = report.softmax_verdict(mechanisms_of({"a": useless}), PAPER)
    assert verdict.startswith("differs") and "a: no form below the uniform guess" in verdict
    assert report.softmax_verdict(mechanisms_of({"construction": perfect}), PAPER) == "n/a"


def test_the_report_links_only_the_executed_notebooks_that_exist(tmp_path):
    assert report.notebook_section(tmp_path) == []
    (tmp_path / "notebooks").mkdir()
    for file in ("02_b.html", "01_a.html", "notes.txt"):
        (tmp_path / "notebooks" / file).write_text("<html></html>")
    links = [line for line in report.notebook_section(tmp_path) if line.startswith("- [")]
    assert links == ["- [notebooks/01_a.html](notebooks/01_a.html)", "- [notebooks/02_b.html](notebooks/02_b.html)"]


def test_the_training_study_records_every_form_at_every_step(tmp_path, monkeypatch):
    record = tm.train_recipe("base", tmp_path, quick=True)
    task = tm.make_task()
    q = task.vocab_size
    untrained = tm.build_model(task, tm.recipe_settings("base"), tm.QUICK["seq_len"])
    expected = brute_force(untrained.blocks[0].attn.W_Q[0, :q, :q].detach().double().numpy(), task.transition.numpy())
    for key, value in expected.items():
        assert record["curve"][0][key] == pytest.approx(value, rel=1e-6), key  # float32 weights, float64 maths
        assert all(point[key] is not None and point[key] >= 0 for point in record["curve"])
    assert record["curve"][-1]["softmax_over_keys_vs_pi"] != record["curve"][0]["softmax_over_keys_vs_pi"]  # trained
    # A record written before these measurements existed is trained again, not reused.
    path = tmp_path / "recipes" / "base.json"
    old = json.loads(path.read_text())
    for point in (*old["curve"], old["final"]):
        for key in expected:
            point.pop(key)
    path.write_text(json.dumps(old))

    class Retrained(Exception):
        pass

    def train(*args, **kwargs):
        raise Retrained

    monkeypatch.setattr(tm, "train", train)
    with pytest.raises(Retrained):
        tm.train_recipe("base", tmp_path, quick=True)
