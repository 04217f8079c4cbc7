"""mdlens.hooks.scores: the score correlation recovers a planted key score and ignores masked keys."""

import pytest
import torch

from mdlens import MTDTask
from mdlens.construction import build_md_transformer
from mdlens.hooks.scores import key_score_correlation
from mdlens.models import DisentangledTransformer


def test_a_planted_key_position_score_correlates_fully_and_masks_are_skipped():
    # A 1-layer disentangled model with zero content score and key_pos_score = c_j: the score of key
    # j at the last query is c_j, so it correlates +1 with c and -1 with -c, whatever the tokens.
    model = DisentangledTransformer(4, 12, n_layers=1, window=3, dtype=torch.float64, seed=0)
    with torch.no_grad():
        model.blocks[0].attn.W_Q.zero_()
        model.blocks[0].attn.rel_query.zero_()
        planted = torch.linspace(-1, 2, 12, dtype=torch.float64) ** 2
        model.blocks[0].attn.key_pos_score.copy_(planted)
    tokens = torch.randint(0, 4, (5, 12), generator=torch.Generator().manual_seed(0))
    quantity = planted.expand(5, 12)
    torch.testing.assert_close(
        key_score_correlation(model, tokens, quantity, first_key=2), torch.ones(1, 1, dtype=torch.float64)
    )
    torch.testing.assert_close(
        key_score_correlation(model, tokens, -quantity, first_key=2), -torch.ones(1, 1, dtype=torch.float64)
    )


def test_construction_layer_1_scores_are_log_pi_of_the_window():
    # Layer 1 of the construction scores key t-g by log pi(y_{t-g}, y_t) (masked elsewhere): over the
    # keys of the lag window its scores correlate +1 with that quantity, in every sequence.
    task = MTDTask(vocab_size=5, order=3, seed=0)
    sample = task.sample(6, 20, generator=torch.Generator().manual_seed(1))
    model = build_md_transformer(task.transition, 3, 20, eta=0.1)
    last = sample.tokens[:, -1]
    quantity = torch.log(task.transition[sample.tokens, last[:, None]])  # log pi(y_j, y_T) at every key j
    # keys 16..18 are the window (offsets 3, 2, 1) of the last query (19).
    correlation = key_score_correlation(model, sample.tokens, quantity, first_key=16, last_key=18)
    assert abs(correlation[0, 0].item() - 1.0) < 1e-9


def test_bad_input_is_named():
    model = DisentangledTransformer(4, 12, n_layers=1, window=3, seed=0)
    tokens = torch.zeros(2, 10, dtype=torch.int64)
    with pytest.raises(ValueError, match="shape"):
        key_score_correlation(model, tokens, torch.zeros(2, 9), first_key=1)
    with pytest.raises(ValueError, match="first_key"):
        key_score_correlation(model, tokens, torch.zeros(2, 10), first_key=10)
    with pytest.raises(ValueError, match="n_ctx"):
        key_score_correlation(model, torch.zeros(2, 13, dtype=torch.int64), torch.zeros(2, 13), first_key=1)
