"""The paper's layer numbering against TransformerLens's block indices (mdlens.models.layout)."""

import pytest
import torch

from mdlens.models.layout import block_index_of, layer_label, paper_layer, resid_post_of_layer, residual_hook_of


def test_layer_labels_count_the_paper_layers_from_one():
    assert layer_label(0) == "L1"
    assert layer_label(1) == "L2"
    assert layer_label(11) == "L12"
    assert layer_label(0, head=0) == "L1.H0"
    assert layer_label(2, head=3) == "L3.H3"
    assert layer_label(torch.tensor(1), head=torch.tensor(0)) == "L2.H0"


def test_paper_layer_and_block_index_are_one_apart():
    assert [paper_layer(b) for b in range(4)] == [1, 2, 3, 4]
    assert [block_index_of(layer) for layer in (1, 2, 3, 4)] == [0, 1, 2, 3]


def test_residual_hooks_after_a_paper_layer():
    assert resid_post_of_layer(1) == "blocks.0.hook_resid_post"
    assert resid_post_of_layer(2) == "blocks.1.hook_resid_post"
    assert residual_hook_of("L2.mean_responsibility") == "blocks.1.hook_resid_post"
    assert residual_hook_of("L1.L1.rel") == "blocks.0.hook_resid_post"
    assert residual_hook_of("L3") == "blocks.2.hook_resid_post"
    assert residual_hook_of("tokens") == "blocks.0.hook_resid_pre"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: layer_label(-1), "block_index"),
        (lambda: layer_label(1.0), "block_index"),
        (lambda: layer_label(True), "block_index"),
        (lambda: layer_label(0, head=-1), "head"),
        (lambda: paper_layer(-2), "block_index"),
        (lambda: block_index_of(0), "1-based"),
        (lambda: resid_post_of_layer(0), "1-based"),
        (lambda: residual_hook_of("L0.rel"), "1-based"),
    ],
)
def test_numbering_rejects_out_of_range_indices(call, message):
    with pytest.raises(ValueError, match=message):
        call()
