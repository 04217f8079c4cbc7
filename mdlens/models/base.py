"""The base class every mdlens model is: :class:`MDLensTransformer`, the ``HookedTransformer`` subclass
whose TransformerLens paths (``forward`` with ``return_type="loss"``, ``run_with_cache``, ``generate``)
read each model's real distribution, with checked token input and the offline tokenizer."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mdlens.models.outputs import check_output_type, output_to_probs, probs_cross_entropy
from mdlens.models.tokenizer import attach_tokenizer
from mdlens.validation import check_context_tokens, check_int


class MDLensTransformer(HookedTransformer):
    """A ``HookedTransformer`` whose TransformerLens paths read ``output_type`` (the base of every mdlens model).

    ``model(tokens)`` returns the raw output ``[batch, pos, q]``, whose meaning ``output_type`` states:

    - ``"logits"``: logits, as for any TransformerLens model; ``softmax`` gives the distribution.
    - ``"probs"``: the probability vector itself (trained with MSE), not forced onto the simplex; the
      distribution is ``mdlens.predict.output_to_probs``: clipped at zero and renormalised.

    What changes against a plain ``HookedTransformer``:

    - **Loss**: ``model(tokens, return_type="loss" | "both")`` (and so ``run_with_cache(...,
      incl_bwd=True)`` on the loss) is the cross-entropy of the model's real distribution: TL's
      ``lm_cross_entropy_loss`` for ``"logits"`` (every position), :func:`probs_cross_entropy` (the
      clipped, renormalised probabilities, differentiable) for ``"probs"``. A "probs" model that knows
      its MTD order ``m`` (``model.order``, as every disentangled model built for a task does) scores
      only the positions ``t > m`` (1-based) it is trained on: the next token after positions
      ``1..m-1`` is one of the first ``m`` i.i.d. uniform tokens (nothing to predict), and there its
      never-trained outputs are often clipped to zero at the observed token (an infinite loss). The
      raw outputs there stay as they are; ``loss_per_token`` is 0 at the unscored positions, as
      TransformerLens does for masked ones. ``loss_per_token`` and ``attention_mask`` as in
      TransformerLens. An observed token that the clipped output makes impossible gives an infinite
      loss and one warning per call.
    - **Generation**: ``generate`` / ``generate_stream`` sample from the real distribution ``p``: for
      ``"probs"`` the sampler is handed ``log p`` as the logits, so ``temperature`` ``tau`` samples
      from ``p^(1/tau)`` renormalised (1: ``p`` itself; towards 0: the most likely token; large: uniform
      over the tokens with ``p > 0``), ``top_k`` / ``top_p`` keep the most likely tokens of ``p``, and
      ``output_logits=True`` returns ``log p``. A last row with no positive entry is a ``ValueError``.
      Without an end-of-sequence token (no tokenizer, or one without EOS, and no ``eos_token_id``)
      ``stop_at_eos`` defaults to ``False``. The prompt plus ``max_new_tokens`` must fit ``n_ctx``.
      A prompt given as token ids (or as one string) is read as it is: TransformerLens would mask its
      trailing pad ids when the model has a tokenizer, and mdlens' pad id (0) is a real token. (A list
      of strings is left-padded by TransformerLens and keeps its masking.) Generation recomputes the
      prefix at each step (``use_past_kv_cache=False``; asking for ``True`` warns): TransformerLens
      3.9's cached generation adds the position embeddings of the wrong positions (it embeds the
      whole sequence at the cache's offset), which changes the samples of a model with learned
      absolute positions such as ``standard-3l``. A forward with ``past_kv_cache`` is exact.
    - **Input checks**: integer token input (to ``forward``, ``run_with_cache``, ``run_with_hooks``,
      TL's patching, ``generate``) must be ``[B, T]`` or ``[T]`` ids in ``[0, d_vocab)`` with
      ``B >= 1`` and ``1 <= T <= n_ctx``: a ``ValueError`` says what is wrong. Strings (through a
      tokenizer) and residual input with ``start_at_layer`` are passed to TransformerLens as they are.
    """

    def __init__(self, cfg, output_type: str = "logits", **kwargs):
        super().__init__(cfg, **kwargs)
        self.output_type = check_output_type(output_type)
        self._log_probs_for_sampling = False  # set by generate: forward hands the sampler log p
        if self.tokenizer is None:  # token ids as decimal strings, offline (mdlens.models.tokenizer)
            attach_tokenizer(self)

    def input_to_embed(self, input, *args, **kwargs):
        """TransformerLens' ``input_to_embed``, with integer token input checked first. Token ids run
        with a key/value cache and no ``attention_mask`` attend to every position: TransformerLens
        would derive a padding mask from the tokenizer's pad id, and mdlens' pad id (0) is a real token."""
        if isinstance(input, Tensor):  # strings go through the tokenizer as TransformerLens does
            check_context_tokens(input, self.cfg.d_vocab, self.cfg.n_ctx)
            if kwargs.get("past_kv_cache") is not None and kwargs.get("attention_mask") is None:
                kwargs["attention_mask"] = torch.ones_like(input if input.ndim == 2 else input[None])
        return super().input_to_embed(input, *args, **kwargs)

    def forward(self, *args, **kwargs):
        """TransformerLens' forward (see the class docstring for what the output means)."""
        output = super().forward(*args, **kwargs)
        if self._log_probs_for_sampling and self.output_type == "probs":
            # Only generate sets the flag, and it reads only the last position's "logits": give it
            # log p there, so that its softmax-based sampler draws from p.
            last = output_to_probs(output[:, -1:], "probs").log().to(output.dtype)
            output = torch.cat([output[:, :-1], last], dim=1)
        return output

    def loss_fn(
        self,
        logits: Float[Tensor, "batch pos q"],
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        per_token: bool = False,
    ):
        """Next-token cross-entropy of the model's distribution (``logits`` is the raw output)."""
        check_context_tokens(tokens, self.cfg.d_vocab, self.cfg.n_ctx)
        if self.output_type == "probs":
            return probs_cross_entropy(logits, tokens, attention_mask, per_token, order=getattr(self, "order", None))
        return super().loss_fn(logits, tokens, attention_mask, per_token)

    def all_composition_scores(self, mode: str) -> Float[Tensor, "layer1 head1 layer2 head2"]:
        """mdlens's composition scores in place of TransformerLens's: ``composition_scores(self, mode).total``
        (:func:`mdlens.models.composition.composition_scores`), float64, indexed as TransformerLens's.

        The same Frobenius score of every head pair (0 where ``l2 <= l1``), plus the disentangled
        position terms (a disentangled layer writes and reads through them, not only through ``W_OV`` /
        ``W_QK``), and 0 with one warning naming the zero matrices where TransformerLens divides 0 by 0
        and returns NaN without a word (the construction's ``W_Q`` is zero in layers 2-3).
        """
        from mdlens.models.composition import composition_scores  # composition reads the model classes

        return composition_scores(self, mode).total

    def generate(self, input="", max_new_tokens: int = 10, *args, **kwargs):
        """TransformerLens' ``generate``, sampling from the model's real distribution (class docstring)."""
        return_type = kwargs.get("return_type", "input")
        if isinstance(input, str) and self.tokenizer is not None:
            input = self._string_prompt_to_ids(input, kwargs)
            return_type = "str" if return_type == "input" else return_type
        input = self._check_generation_input(input, max_new_tokens)
        kwargs = self._generation_kwargs(input, args, kwargs)
        decode = isinstance(input, Tensor) and return_type == "str"
        if decode:  # decoded below, where the tokenizer is back
            kwargs["return_type"] = "tokens"
        with self._generating(input):
            output = super().generate(input, max_new_tokens, *args, **kwargs)
        if decode:
            texts = [self.to_string(sequence) for sequence in output]
            return texts[0] if len(texts) == 1 else texts
        return output

    def generate_stream(self, input="", max_new_tokens: int = 10, *args, **kwargs):
        """TransformerLens' ``generate_stream``, sampling from the model's real distribution."""
        if isinstance(input, str) and self.tokenizer is not None:
            input = self._string_prompt_to_ids(input, kwargs)  # it yields ids either way
        input = self._check_generation_input(input, max_new_tokens)
        kwargs = self._generation_kwargs(input, args, kwargs)
        stream = super().generate_stream(input, max_new_tokens, *args, **kwargs)
        while True:
            # The generation state is on only while the stream computes, not while the caller holds a chunk.
            with self._generating(input):
                try:
                    chunk = next(stream)
                except StopIteration:
                    return
            yield chunk

    def _string_prompt_to_ids(self, prompt: str, kwargs: dict) -> Int[Tensor, "1 pos"]:
        """One string prompt as its ids ``[1, T]``, to be generated from like a token prompt: a single
        string has no padding, so none of its ids may be masked as pad (see :meth:`_generating`)."""
        options = {name: kwargs.pop(name) for name in ("prepend_bos", "padding_side") if name in kwargs}
        return self.to_tokens(prompt, **options)

    @contextmanager
    def _generating(self, input) -> Iterator[None]:
        """While TransformerLens generates: ``forward`` hands the sampler ``log p`` (see ``forward``),
        and a token-tensor prompt runs without the tokenizer. TransformerLens masks a prompt's trailing
        (or leading) pad ids whenever the model has a tokenizer; a prompt given as ids has no padding,
        and mdlens' pad id is a real token (0), so masking would change the distribution sampled from."""
        sampling, tokenizer = self._log_probs_for_sampling, self.tokenizer
        self._log_probs_for_sampling = True
        if isinstance(input, Tensor):
            self.tokenizer = None
        try:
            yield
        finally:
            self._log_probs_for_sampling, self.tokenizer = sampling, tokenizer

    def _check_generation_input(self, input, max_new_tokens: int):
        """Checked prompt (``[T]`` tokens become ``[1, T]``); the prompt plus new tokens must fit ``n_ctx``."""
        max_new_tokens = check_int(max_new_tokens, "max_new_tokens", 1)
        if not isinstance(input, Tensor):
            return input  # strings: TransformerLens tokenises (and truncates to n_ctx)
        if input.is_floating_point() and input.ndim == 3:  # embeddings [batch, pos, d_model]
            n_prompt = input.shape[1]
        else:
            input = check_context_tokens(input, self.cfg.d_vocab, self.cfg.n_ctx)
            n_prompt = input.shape[1]
        if n_prompt + max_new_tokens > self.cfg.n_ctx:
            raise ValueError(
                f"a prompt of T={n_prompt} positions plus max_new_tokens={max_new_tokens} exceeds the model's "
                f"context n_ctx={self.cfg.n_ctx}"
            )
        return input

    def _generation_kwargs(self, input, args: tuple, kwargs: dict) -> dict:
        """TransformerLens' generation arguments, with mdlens' defaults (class docstring)."""
        kwargs = dict(kwargs)
        if kwargs.get("use_past_kv_cache"):
            warnings.warn(
                "use_past_kv_cache=True is ignored: TransformerLens' cached generation shifts absolute "
                "position embeddings; mdlens recomputes the prefix at each step (the model's own samples)",
                stacklevel=3,
            )
        kwargs["use_past_kv_cache"] = False  # the same samples as TL's uncached path
        if args:  # stop_at_eos and eos_token_id come first among the positional arguments: leave them
            return kwargs
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        if kwargs.get("eos_token_id") is None and eos is not None:
            kwargs["eos_token_id"] = eos  # the tokenizer's (a token prompt runs without the tokenizer)
        if "stop_at_eos" not in kwargs and kwargs.get("eos_token_id") is None:
            kwargs["stop_at_eos"] = False  # MTD sequences have no end-of-sequence token
        return kwargs
