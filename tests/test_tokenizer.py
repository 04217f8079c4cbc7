"""The offline vocabulary tokenizer: TransformerLens's string tools on mdlens models, checkpoints keep it.

Token ids are checked against the ids written in the strings themselves ("3 1 4" -> [3, 1, 4]);
a custom tokenizer (letters) shows that a checkpoint restores the saved tokenizer, not a default.
"""

import json
import socket

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

import mdlens
from mdlens.checkpoints import CONFIG_FILE
from mdlens.models import build_like, disentangled_transformer, standard_transformer
from mdlens.models.tokenizer import (
    NO_TOKEN,
    attach_tokenizer,
    tokenizer_from_dict,
    tokenizer_to_dict,
    vocabulary_tokenizer,
)

Q = 12  # two-digit ids: "10" must stay one token


@pytest.fixture(scope="module")
def model():
    return attach_tokenizer(disentangled_transformer(Q, 2, 16, n_layers=2, dtype=torch.float64))


def letters_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that is not mdlens's default: A C G T -> 0 1 2 3."""
    backend = Tokenizer(WordLevel({"A": 0, "C": 1, "G": 2, "T": 3}, unk_token=None))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.pad_token = "A"
    return tokenizer


# ----------------------------------------------------------------------------------------------
# The tokenizer itself


def test_the_vocabulary_is_exactly_the_q_ids():
    tokenizer = vocabulary_tokenizer(Q)
    assert tokenizer.get_vocab() == {str(v): v for v in range(Q)}
    assert len(tokenizer) == Q and tokenizer.get_added_vocab() == {}
    assert tokenizer("3 10 0 11")["input_ids"] == [3, 10, 0, 11]  # "10" is not split at the pad "0"
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id is None and tokenizer.bos_token is None
    assert tokenizer.decode([3, 10, 0]) == "3 10 0"


def test_nothing_is_downloaded(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a network connection")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    fresh = attach_tokenizer(standard_transformer(5, 8, n_layers=1, d_model=8))
    assert fresh.to_tokens("4 0 1").tolist() == [[4, 0, 1]]


# ----------------------------------------------------------------------------------------------
# TransformerLens's own string tools


def test_to_tokens_to_str_tokens_to_string(model):
    assert not model.cfg.default_prepend_bos and not model.cfg.tokenizer_prepends_bos
    assert torch.equal(model.to_tokens("3 1 4"), torch.tensor([[3, 1, 4]]))
    assert torch.equal(model.to_tokens("  3\t1 \n4 "), torch.tensor([[3, 1, 4]]))  # any whitespace
    assert model.to_str_tokens("3 10 0") == ["3", "10", "0"]
    assert model.to_str_tokens(torch.tensor([11, 2])) == ["11", "2"]
    assert model.to_string(torch.tensor([3, 1, 4])) == "3 1 4"
    assert model.to_string(torch.tensor([[3, 1], [0, 11]])) == ["3 1", "0 11"]
    assert model.to_single_token("7") == 7
    # A ragged batch is right-padded with id 0.
    assert model.to_tokens(["3 1 4 10", "2 2"]).tolist() == [[3, 1, 4, 10], [2, 2, 0, 0]]


def test_a_string_input_runs_the_same_forward_as_its_ids(model):
    with torch.no_grad():
        assert torch.equal(model("5 1 4 1 5 9"), model(torch.tensor([[5, 1, 4, 1, 5, 9]])))


def test_standard_models_get_the_same_tokenizer():
    standard = attach_tokenizer(standard_transformer(5, 8, n_layers=1, d_model=8, seed=1))
    assert standard.to_tokens("4 0 1").tolist() == [[4, 0, 1]]
    assert standard.to_str_tokens("4 0 1") == ["4", "0", "1"]


@pytest.mark.parametrize("text, word", [("3 12 4", "'12'"), ("3 x", "'x'"), ("03 1", "'03'"), ("-1", "'-1'")])
def test_words_outside_the_vocabulary_raise(model, text, word):
    with pytest.raises(ValueError, match=f"{word}.*not in this tokenizer's vocabulary of {Q} tokens"):
        model.to_tokens(text)


def test_asking_for_a_bos_raises(model):
    with pytest.raises(ValueError, match=r"no BOS token.*prepend_bos=False"):
        model.to_tokens("3 1 4", prepend_bos=True)
    assert model.tokenizer.bos_token == NO_TOKEN and model.tokenizer.bos_token_id is None


@pytest.mark.parametrize("ids", [[Q], [3, -1]])
def test_ids_outside_the_vocabulary_raise_when_decoded(model, ids):
    with pytest.raises(ValueError, match=r"outside this tokenizer's vocabulary \(ids 0..11\)"):
        model.to_string(torch.tensor(ids))
    with pytest.raises(ValueError, match="outside this tokenizer's vocabulary"):
        model.to_str_tokens(torch.tensor(ids))


def test_attach_rejects_a_tokenizer_that_does_not_fit():
    small = standard_transformer(3, 8, n_layers=1, d_model=8)
    with pytest.raises(ValueError, match=r"ids in \[0, 11\] but the model reads ids in \[0, 3\)"):
        attach_tokenizer(small, vocabulary_tokenizer(Q))
    no_pad = letters_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="needs a pad token"):
        attach_tokenizer(standard_transformer(4, 8, n_layers=1, d_model=8), no_pad)
    with pytest.raises(ValueError, match="must be a HookedTransformer"):
        attach_tokenizer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="vocab_size must be an int >= 1"):
        vocabulary_tokenizer(0)


def test_dict_round_trip_and_malformed_records():
    record = tokenizer_to_dict(letters_tokenizer())
    assert json.loads(json.dumps(record)) == record  # JSON-friendly
    rebuilt = tokenizer_from_dict(record)
    assert rebuilt("G A T")["input_ids"] == [2, 0, 3] and rebuilt.pad_token == "A"
    with pytest.raises(ValueError, match="a tokenizer record has the keys"):
        tokenizer_from_dict({"backend": record["backend"]})
    with pytest.raises(ValueError, match="malformed tokenizer JSON"):
        tokenizer_from_dict({**record, "backend": {"model": "nonsense"}})
    with pytest.raises(ValueError, match="padding_side must be one of"):
        tokenizer_from_dict({**record, "padding_side": "middle"})


# ----------------------------------------------------------------------------------------------
# Checkpoints


def test_save_and_load_keep_the_tokenizer(tmp_path):
    model = attach_tokenizer(disentangled_transformer(4, 2, 12, seed=3), letters_tokenizer())
    mdlens.save(model, tmp_path)
    loaded = mdlens.load(tmp_path)
    assert loaded.to_str_tokens(torch.tensor([0, 1, 2, 3])) == ["A", "C", "G", "T"]
    assert loaded.to_tokens("T G A").tolist() == [[3, 2, 0]]
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["version"] == 2
    # The default tokenizer survives too.
    mdlens.save(attach_tokenizer(disentangled_transformer(Q, 2, 12)), tmp_path / "default")
    assert mdlens.load(tmp_path / "default").to_str_tokens("11 0 3") == ["11", "0", "3"]


def test_a_model_saved_without_a_tokenizer_loads_with_the_default(tmp_path):
    model = disentangled_transformer(4, 2, 12)
    model.tokenizer = None
    mdlens.save(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["tokenizer"] is None
    assert mdlens.load(tmp_path).to_tokens("3 1 0").tolist() == [[3, 1, 0]]


def test_an_old_format_checkpoint_loads_with_a_tokenizer(tmp_path):
    model = attach_tokenizer(standard_transformer(5, 8, n_layers=1, d_model=8), vocabulary_tokenizer(5))
    mdlens.save(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    del config["tokenizer"]
    config["version"] = 1
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    loaded = mdlens.load(tmp_path)
    assert loaded.to_tokens("4 0 1").tolist() == [[4, 0, 1]]
    assert loaded.to_str_tokens(torch.tensor([2, 3])) == ["2", "3"]
    # A version-2 file must say which tokenizer it has.
    config["version"] = 2
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks the fields \['tokenizer'\]"):
        mdlens.load(tmp_path)


def test_a_saved_tokenizer_that_does_not_fit_raises(tmp_path):
    mdlens.save(disentangled_transformer(4, 2, 12), tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["tokenizer"] = tokenizer_to_dict(vocabulary_tokenizer(Q))
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the saved tokenizer does not fit the model"):
        mdlens.load(tmp_path)


def test_shipped_checkpoints_load_with_a_tokenizer():
    model, _ = mdlens.load_pretrained("disentangled-3l")
    assert model.to_tokens("4 0 2").tolist() == [[4, 0, 2]]
    assert model.to_str_tokens(torch.tensor([1, 3])) == ["1", "3"]


def test_build_like_keeps_the_tokenizer():
    model = attach_tokenizer(disentangled_transformer(4, 2, 12), letters_tokenizer())
    fresh = build_like(model, seed=5)
    assert fresh.to_str_tokens(torch.tensor([3, 0])) == ["T", "A"]
