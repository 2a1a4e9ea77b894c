"""Scoring label words: log p(word | prompt) for every word of a verbalizer.

Decoder (label-word scoring). A word of n tokens w₁…wₙ scores
``log p(w₁ | prompt) + log p(w₂ | prompt, w₁) + …``. Scoring every label separately would run
the whole prompt once per word; here the prompt runs once and the words share its keys/values:

1. the prompt pass: the prompt goes through the model into a KV cache; its last position gives
   log p(w₁ | prompt) of every word at once. The cache is kept between calls and cut back to the
   longest token prefix the next prompt shares with this one (an instruction, the same
   demonstrations, a chat system prompt): those positions are not computed again. A causal
   model's keys at a position depend only on the tokens before it, so this is exact.
2. the continuation pass (only when a word has more than one token): the words' tokens
   w₁…wₙ₋₁, all of them packed into ONE sequence after the cached prompt, each word with its own
   positions (prompt length + i) and a block-diagonal causal mask: a word's tokens see the whole
   prompt and the earlier tokens of the same word only. This is the batched pass over all labels,
   packed rather than stacked as rows so that the prompt's cache is never copied per label (151
   CLINC150 intents after a 500-token prompt would need 151 copies of 30 layers of keys).

:func:`full_pass_log_probs` is the reference the tests hold this to: one full forward pass per word.
Models whose positions are score biases over slots (ALiBi, T5 buckets) or that prepend soft-prompt
tokens (prompt tuning) cannot pack words that way; they take the reference path.

Encoder (cloze, PET: Schick & Schütze 2021; LM-BFF: Gao et al. 2021). The label slot becomes n
``[MASK]`` tokens; a word of n tokens scores Σᵢ log p(wᵢ at mask i), one pass for all words of
the same length (the masks are predicted independently, as PET does for multi-token words).

Label scores from word scores: a label with several words takes the log of their mean
probability; ``length_normalize`` divides each word's log-probability by its token count first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import LMForgeError
from ..generation.state import last_logits
from ..model import ModelCache

PACKABLE_POSITIONS = ("rope", "learned", "sinusoidal", "none")  # positions given by position ids


@dataclass(frozen=True)
class WordTable:
    """A verbalizer's words as token ids, flattened: word ``w`` stands for label ``owner[w]``."""

    ids: tuple[tuple[int, ...], ...]
    owner: tuple[int, ...]
    num_labels: int

    @classmethod
    def build(cls, label_word_ids: Sequence[Sequence[Sequence[int]]]) -> WordTable:
        ids, owner = [], []
        for label, words in enumerate(label_word_ids):
            for word in words:
                ids.append(tuple(int(t) for t in word))
                owner.append(label)
        return cls(tuple(ids), tuple(owner), len(label_word_ids))

    @property
    def lengths(self) -> Tensor:
        return torch.tensor([len(w) for w in self.ids], dtype=torch.float32)

    def first_words(self) -> list[tuple[int, ...]]:
        """The first word of each label (what demonstrations and training targets use)."""
        seen: dict[int, tuple[int, ...]] = {}
        for word, label in zip(self.ids, self.owner, strict=True):
            seen.setdefault(label, word)
        return [seen[label] for label in range(self.num_labels)]


def label_log_probs(word_log_probs: Tensor, table: WordTable, *, length_normalize: bool = False) -> Tensor:
    """(…, W) word log-probabilities → (…, L) log-probabilities over the labels (normalized over
    labels): each label scores the log of its words' mean probability (each word's log-probability
    divided by its length first with ``length_normalize``)."""
    scores = word_log_probs / table.lengths.to(word_log_probs.device) if length_normalize else word_log_probs
    owner = torch.tensor(table.owner, device=scores.device)
    out = []
    for label in range(table.num_labels):
        mine = scores[..., owner == label]  # (…, words of this label)
        out.append(torch.logsumexp(mine, dim=-1) - math.log(mine.shape[-1]))
    labels = torch.stack(out, dim=-1)  # (…, L)
    return torch.log_softmax(labels, dim=-1)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The number of leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def can_pack(model: nn.Module) -> bool:
    """Whether words can be packed after a cached prompt (positions from ids, no soft prompt)."""
    stack = model.decoder
    return model.config.position in PACKABLE_POSITIONS and getattr(stack, "prompt", None) is None


class DecoderScorer:
    """Scores a verbalizer's words after prompts with a decoder, sharing the prompt's KV cache.

    Args:
        model: a decoder with an LM head (in eval mode).
        table: the words as token ids.
        share_cache: keep the cache between prompts and reuse their common prefix (False: every
            prompt from scratch, for measuring).

    Attributes:
        tokens_computed: prompt and word tokens that went through the model (for speed reports).
    """

    def __init__(self, model: nn.Module, table: WordTable, *, share_cache: bool = True) -> None:
        if model.config.arch != "decoder" or model.config.head != "lm":
            raise LMForgeError("label-word scoring needs a decoder with an LM head", key="model")
        self.model = model
        self.table = table
        self.share_cache = share_cache
        self.packed = can_pack(model)
        self.cache: ModelCache | None = None
        self.cached: list[int] = []
        self.tokens_computed = 0
        multi = [w for w in table.ids if len(w) > 1]
        inputs = [t for w in multi for t in w[:-1]]
        self.pack_ids = torch.tensor(inputs, dtype=torch.long)  # (N,) all words' tokens but their last
        self.pack_offsets = torch.tensor([i for w in multi for i in range(len(w) - 1)], dtype=torch.long)
        self.pack_targets = torch.tensor([t for w in multi for t in w[1:]], dtype=torch.long)
        # which word each packed token belongs to, and the block-diagonal causal mask among them
        member = torch.tensor([j for j, w in enumerate(multi) for _ in w[:-1]], dtype=torch.long)
        same = member[:, None] == member[None, :]
        self.pack_mask = same & torch.ones_like(same).tril()  # (N, N)
        self.pack_word = torch.tensor([j for j, w in enumerate(table.ids) if len(w) > 1], dtype=torch.long)
        self.pack_member = member

    def reset(self) -> None:
        """Forget the cached prompt."""
        self.cache, self.cached = None, []

    def _cache_for(self, prompt: Sequence[int]) -> int:
        """A cache holding the longest usable prefix of ``prompt``; returns its length."""
        needed = len(prompt) + len(self.pack_ids)
        if self.cache is not None and self.share_cache and self.cache.self_attention[0].max_seq_len >= needed:
            keep = min(common_prefix(self.cached, prompt), len(prompt) - 1)  # at least one token to run
            self.cache.truncate(keep)
            return keep
        capacity = max(needed, 2 * len(self.cached), 64)
        limit = self.model.config.max_seq_len
        if self.model.config.position in ("learned", "sinusoidal"):
            if needed > limit:
                raise LMForgeError(
                    f"the prompt and its label words need {needed} positions, the model holds {limit}", key="prompt"
                )
            capacity = min(capacity, limit)
        device = self.model.tok_embed.weight.device
        self.cache = self.model.new_cache(1, capacity, device=device)
        return 0

    @torch.no_grad()
    def word_log_probs(self, prompt: Sequence[int]) -> Tensor:
        """(W,) log p(word | prompt) of every word, summed over its tokens."""
        if not prompt:
            raise LMForgeError("an empty prompt cannot be scored: it needs at least one token", key="prompt")
        if not self.packed:
            return full_pass_log_probs(self.model, prompt, self.table)
        model = self.model
        device = model.tok_embed.weight.device
        keep = self._cache_for(prompt)
        assert self.cache is not None
        new = torch.tensor([list(prompt[keep:])], dtype=torch.long, device=device)  # (1, T)
        logits = last_logits(model, new, None, None, self.cache.self_attention, None, None, None)  # (1, V)
        self.cached = list(prompt)
        self.tokens_computed += new.shape[1]
        first = torch.log_softmax(logits[0].float(), dim=-1)  # (V,)
        scores = first[torch.tensor([w[0] for w in self.table.ids], device=device)]  # (W,)
        if len(self.pack_ids):
            scores = scores + self._continuations(len(prompt)).to(scores.device)
        if not self.share_cache:
            self.reset()
        return scores.cpu()

    def _continuations(self, P: int) -> Tensor:
        """(W,) the log-probabilities of every word's tokens after the first, in one packed pass."""
        assert self.cache is not None
        device = self.model.tok_embed.weight.device
        N = len(self.pack_ids)
        ids = self.pack_ids.to(device)[None]  # (1, N)
        positions = (P + self.pack_offsets).to(device)[None]  # (1, N): each word restarts after the prompt
        mask = torch.cat(
            (torch.ones(N, P, dtype=torch.bool), self.pack_mask), dim=1
        ).to(device)[None]  # (1, N, P + N): the prompt, then the word's own earlier tokens
        out = self.model(ids, attention_mask=mask, position_ids=positions, cache=self.cache)
        self.cache.truncate(P)
        self.tokens_computed += N
        token_lp = torch.log_softmax(out.logits[0].float(), dim=-1)  # (N, V)
        picked = token_lp.gather(1, self.pack_targets.to(device)[:, None])[:, 0]  # (N,)
        per_multi = torch.zeros(len(self.pack_word), device=device).index_add_(0, self.pack_member.to(device), picked)
        scores = torch.zeros(len(self.table.ids), device=device)
        scores[self.pack_word.to(device)] = per_multi
        return scores


@torch.no_grad()
def full_pass_log_probs(model: nn.Module, prompt: Sequence[int], table: WordTable) -> Tensor:
    """(W,) the reference: for each word, one forward pass over prompt + word, no cache."""
    device = model.tok_embed.weight.device
    out = torch.empty(len(table.ids))
    for index, word in enumerate(table.ids):
        ids = torch.tensor([list(prompt) + list(word)], dtype=torch.long, device=device)  # (1, P + n)
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # (n, V): the positions before each word token
        token_lp = torch.log_softmax(logits, dim=-1)
        out[index] = token_lp.gather(1, torch.tensor(word, device=device)[:, None]).sum().cpu()
    return out


def cloze_inputs(
    before: Sequence[int],
    after: Sequence[int],
    n: int,
    *,
    start: Sequence[int],
    end: Sequence[int],
    mask_id: int,
    max_length: int,
) -> tuple[list[int], int]:
    """An encoder's input with ``n`` masks in the label slot — ``start`` (e.g. [CLS]), the text
    before (its start cut to fit ``max_length``), the masks, the text after, ``end`` (e.g. [SEP])
    — and the position of the first mask."""
    room = max_length - len(start) - len(end) - n - len(after)
    if room < 1:
        raise LMForgeError(f"the cloze input is longer than max_length {max_length}", key="max_length")
    head = list(before)[-room:]
    return list(start) + head + [mask_id] * n + list(after) + list(end), len(start) + len(head)


class ClozeScorer:
    """Scores a verbalizer's words in the ``[MASK]`` slot of an encoder with a masked-LM head.

    Args:
        model: an encoder with head ``mlm``.
        table: the words as token ids.
        tokenizer: gives [CLS]/[SEP]/[MASK].
        max_length: longest input; the text before the masks is cut from its start to fit.
    """

    def __init__(self, model: nn.Module, table: WordTable, tokenizer: object, *, max_length: int = 512) -> None:
        if model.config.arch != "encoder" or model.config.head != "mlm":
            raise LMForgeError("cloze scoring needs an encoder with a masked-LM head (head mlm)", key="model")
        mask_id = getattr(tokenizer, "mask_id", None)
        if mask_id is None:
            raise LMForgeError("cloze scoring needs a [MASK] token and the tokenizer has none", key="tokenizer")
        self.model, self.table, self.mask_id = model, table, mask_id
        self.start = [i for i in (getattr(tokenizer, "cls_id", None),) if i is not None]
        self.end = [i for i in (getattr(tokenizer, "sep_id", None),) if i is not None]
        self.max_length = max_length
        self.tokens_computed = 0

    def inputs(self, before: Sequence[int], after: Sequence[int], n: int) -> tuple[list[int], int]:
        return cloze_inputs(
            before, after, n, start=self.start, end=self.end, mask_id=self.mask_id, max_length=self.max_length
        )

    @torch.no_grad()
    def word_log_probs(self, before: Sequence[int], after: Sequence[int]) -> Tensor:
        """(W,) Σᵢ log p(wᵢ at mask i) of every word; one pass per distinct word length."""
        device = self.model.tok_embed.weight.device
        out = torch.empty(len(self.table.ids))
        for n in sorted({len(w) for w in self.table.ids}):
            ids, at = self.inputs(before, after, n)
            logits = self.model(torch.tensor([ids], device=device)).logits[0, at : at + n].float()  # (n, V)
            token_lp = torch.log_softmax(logits, dim=-1).cpu()
            self.tokens_computed += len(ids)
            for index, word in enumerate(self.table.ids):
                if len(word) == n:
                    out[index] = token_lp[torch.arange(n), torch.tensor(word)].sum()
        return out


__all__ = [
    "ClozeScorer",
    "DecoderScorer",
    "WordTable",
    "can_pack",
    "cloze_inputs",
    "common_prefix",
    "full_pass_log_probs",
    "label_log_probs",
]
