"""An offline tokenizer for every mdlens model: token id ``v`` is the word ``"v"`` (its decimal string).

TransformerLens's string tools (``model.to_tokens``, ``to_str_tokens``, ``to_string``,
``to_single_token``, ``transformer_lens.head_detector.detect_head``, CircuitsVis token labels) need a
HuggingFace tokenizer. MTD tokens are bare ids ``0..q-1`` with no text behind them, so the tokenizer
is built here, locally, with nothing downloaded: a ``tokenizers`` WordLevel model over the ``q``
words ``"0" .. "q-1"`` after a whitespace split, wrapped in ``transformers.PreTrainedTokenizerFast``
and set through TransformerLens's own ``model.set_tokenizer``::

    attach_tokenizer(model)
    model.to_tokens("3 1 4")              # tensor([[3, 1, 4]])  (default_prepend_bos=False)
    model.to_str_tokens("3 1 4")          # ['3', '1', '4']
    model.to_string(torch.tensor([3, 1, 4]))   # '3 1 4'

Special tokens. The vocabulary is exactly the ``q`` ids: no special token gets an id ``>= q``.

- **pad = token ``"0"`` (id 0).** TransformerLens pads every call (``padding=True``) and needs a
  pad id in range, and every id is a real token. Ragged batches are right-padded with 0; the models
  are causal, so what follows a sequence changes nothing before it, and a forward pass with right
  padding builds no attention mask. Keep ``padding_side="right"`` (the default set here): where
  TransformerLens builds a mask from the pad id (``padding_side="left"``, ``generate`` on a list of
  strings, which it left-pads) it masks a sequence's real *leading* 0s. Pad is set as an
  attribute, not registered as an added token (an added ``"0"`` is matched inside words, splitting
  ``"10"`` into ``"1", "0"``). A side effect: HuggingFace's ``skip_special_tokens=True`` drops 0s
  (TransformerLens never asks for it).
- **eos / bos = ``NO_TOKEN``, a string with no id.** MTD has no start or end token.
  TransformerLens's ``set_tokenizer`` copies eos into bos, so ``bos_token_id`` and
  ``eos_token_id`` are ``None``. The models have ``default_prepend_bos=False``; asking for a BOS
  (``prepend_bos=True``) raises a ``ValueError``.

Unknown words (``"7"`` when ``q = 5``, ``"x"``, ``"03"``) and ids outside the vocabulary raise a
``ValueError`` naming them, where ``tokenizers`` would raise a bare ``Exception`` and decoding would
return an empty string.

:func:`tokenizer_to_dict` / :func:`tokenizer_from_dict` give the JSON form that ``mdlens.save``
writes into ``model.json``.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerFast

from mdlens.validation import check_int

PAD_TOKEN = "0"  # pad id 0, a real token (see the module docstring)
NO_TOKEN = "<none>"  # eos (and, through TransformerLens, bos): names no id
PADDING_SIDES = ("right", "left")
# What tokenizers raises (as a bare Exception) for a word outside a WordLevel vocabulary without UNK.
_UNKNOWN_WORD_ERROR = "Missing [UNK]"
_SHOWN = 5  # unknown words / ids quoted in an error message


class VocabularyTokenizer(PreTrainedTokenizerFast):
    """A ``PreTrainedTokenizerFast`` that raises ``ValueError`` for words and ids outside its vocabulary."""

    def _encode_plus(self, text, text_pair=None, *args, **kwargs):
        try:
            return super()._encode_plus(text, text_pair, *args, **kwargs)
        except Exception as error:  # tokenizers raises a bare Exception for an unknown word
            if _UNKNOWN_WORD_ERROR not in str(error):
                raise
            raise ValueError(self._unknown_words_message([text, text_pair])) from error

    def _decode(self, token_ids, *args, **kwargs) -> str:
        ids = token_ids["input_ids"] if isinstance(token_ids, dict) else token_ids
        ids = [ids] if isinstance(ids, int) else list(ids)
        bad = [i for i in ids if not 0 <= int(i) < len(self) or self._tokenizer.id_to_token(int(i)) is None]
        if bad:
            raise ValueError(
                f"token ids {bad[:_SHOWN]} are outside this tokenizer's vocabulary (ids 0..{len(self) - 1})"
            )
        return super()._decode(token_ids, *args, **kwargs)

    def _unknown_words_message(self, texts: list) -> str:
        words = []
        for text in _strings(texts):
            if self._tokenizer.pre_tokenizer is None:
                words += text.split()
            else:
                words += [word for word, _ in self._tokenizer.pre_tokenizer.pre_tokenize_str(text)]
        unknown = list(dict.fromkeys(w for w in words if self._tokenizer.token_to_id(w) is None))
        size = len(self)
        example = " ".join(self._tokenizer.id_to_token(i) for i in range(min(size, 3)))
        message = (
            f"{unknown[:_SHOWN]} {'is' if len(unknown) == 1 else 'are'} not in this tokenizer's vocabulary of "
            f"{size} tokens: write a sequence as its tokens separated by whitespace, e.g. {example!r}"
        )
        if any(NO_TOKEN in word for word in unknown):
            message += (
                f"; {NO_TOKEN!r} is the BOS/EOS placeholder: mdlens models have no BOS token, so call "
                f"to_tokens / to_str_tokens with prepend_bos=False (the model default)"
            )
        return message


def _strings(value) -> list[str]:
    """Every string inside a text input (a string, a batch, pairs, pre-split words)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _strings(item)]
    return []


def vocabulary_tokenizer(vocab_size: int) -> VocabularyTokenizer:
    """The tokenizer of a model with ``vocab_size`` tokens: id ``v`` <-> the word ``str(v)``.

    Built locally (WordLevel over ``"0".."q-1"``, whitespace split, no UNK); pad = ``"0"``,
    eos = :data:`NO_TOKEN` (module docstring). Exactly ``vocab_size`` ids.
    """
    vocab_size = check_int(vocab_size, "vocab_size", 1)
    backend = Tokenizer(WordLevel({str(v): v for v in range(vocab_size)}, unk_token=None))
    backend.pre_tokenizer = WhitespaceSplit()
    return _wrap(backend, pad_token=PAD_TOKEN, eos_token=NO_TOKEN, padding_side="right")


def _wrap(backend: Tokenizer, pad_token: str | None, eos_token: str | None, padding_side: str) -> VocabularyTokenizer:
    tokenizer = VocabularyTokenizer(tokenizer_object=backend)
    # Set as attributes (not constructor arguments), so they are not registered as added tokens.
    tokenizer.pad_token = pad_token
    tokenizer.eos_token = eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def tokenizer_to_dict(tokenizer: PreTrainedTokenizerFast) -> dict:
    """JSON-friendly form: the ``tokenizers`` JSON of the backend, ``pad_token``, ``eos_token``,
    ``padding_side``. bos is not recorded: TransformerLens sets it to eos (a tokenizer handed over
    *with* a BOS would make TransformerLens reload it from the Hub)."""
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(
            f"mdlens records fast tokenizers (transformers.PreTrainedTokenizerFast) only, got {type(tokenizer).__name__}"
        )
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    # Padding and truncation are per-call settings that transformers leaves on the backend.
    backend.no_padding()
    backend.no_truncation()
    return {
        "backend": json.loads(backend.to_str()),
        "pad_token": tokenizer.pad_token,
        "eos_token": tokenizer.eos_token,
        "padding_side": tokenizer.padding_side,
    }


def tokenizer_from_dict(record: dict) -> VocabularyTokenizer:
    """The tokenizer written by :func:`tokenizer_to_dict`; ``ValueError`` for a malformed record."""
    keys = {"backend", "pad_token", "eos_token", "padding_side"}
    if not isinstance(record, dict) or set(record) != keys:
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"a tokenizer record has the keys {sorted(keys)}, got {got}")
    if record["padding_side"] not in PADDING_SIDES:
        raise ValueError(f"tokenizer padding_side must be one of {PADDING_SIDES}, got {record['padding_side']!r}")
    try:
        backend = Tokenizer.from_str(json.dumps(record["backend"]))
    except Exception as error:  # tokenizers raises a bare Exception for a malformed tokenizer JSON
        raise ValueError(f"malformed tokenizer JSON: {error}") from error
    return _wrap(backend, record["pad_token"], record["eos_token"], record["padding_side"])


def attach_tokenizer(model: HookedTransformer, tokenizer: PreTrainedTokenizerFast | None = None) -> HookedTransformer:
    """Give ``model`` a tokenizer through TransformerLens's ``set_tokenizer``; returns ``model``.

    Args:
        model: any ``HookedTransformer`` (mdlens models have ``default_prepend_bos=False``).
        tokenizer: ``None`` for :func:`vocabulary_tokenizer` ``(model.cfg.d_vocab)``; else a fast
            tokenizer whose ids all lie in ``[0, d_vocab)`` with a pad token among them. The model
            gets a copy (TransformerLens mutates the tokenizer it is given).

    Raises ``ValueError`` for a tokenizer with ids ``>= d_vocab`` or without a pad id in range.
    """
    if not isinstance(model, HookedTransformer):
        raise ValueError(f"model must be a HookedTransformer, got {type(model).__name__}")
    d_vocab = model.cfg.d_vocab
    if tokenizer is None:
        tokenizer = vocabulary_tokenizer(d_vocab)
    else:
        tokenizer = tokenizer_from_dict(tokenizer_to_dict(tokenizer))
    ids = tokenizer.get_vocab().values()
    if max(ids, default=-1) >= d_vocab or min(ids, default=0) < 0:
        raise ValueError(f"the tokenizer has ids in [{min(ids)}, {max(ids)}] but the model reads ids in [0, {d_vocab})")
    pad_id = tokenizer.pad_token_id
    if pad_id is None or not 0 <= pad_id < d_vocab:
        raise ValueError(
            f"TransformerLens pads every batch and needs a pad token with an id in [0, {d_vocab}); "
            f"pad_token={tokenizer.pad_token!r} has id {pad_id!r}"
        )
    model.set_tokenizer(tokenizer, default_padding_side=tokenizer.padding_side)
    return model


__all__ = [
    "NO_TOKEN",
    "PAD_TOKEN",
    "VocabularyTokenizer",
    "attach_tokenizer",
    "tokenizer_from_dict",
    "tokenizer_to_dict",
    "vocabulary_tokenizer",
]
