"""Beam search with a length penalty.

Keeps the ``num_beams`` highest-scoring partial sequences of each input, scored by the sum of
their tokens' log-probabilities. A sequence that reaches an end-of-sequence token is set aside as
a hypothesis with the score sum / length^α (Wu et al. 2016, "Google's Neural Machine Translation
System", in Hugging Face's simple form; length = generated tokens, the end token included): α > 0
favors longer outputs, α < 0 shorter ones, α = 0 is the plain sum. The search of an input stops

- with ``early_stopping=True``: once it holds ``num_beams`` hypotheses;
- with ``early_stopping=False``: once no running beam can still beat the worst kept hypothesis,
  taking the most favorable length it could reach (log-probabilities only add negative terms, so
  the bound is exact).

Each step looks at the best (1 + number of end tokens)·num_beams candidates so that num_beams of
them continue even when some end. Cf. Graves 2012, Sutskever et al. 2014 for beam search in
sequence models; layout after Hugging Face's ``BeamSearchScorer``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sampling import apply_repetition_penalty
from .state import DecodeState


class Hypotheses:
    """The best ``num_beams`` finished sequences of one input, with their length-penalized scores."""

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.kept: list[tuple[float, Tensor]] = []  # (score, generated tokens), best first

    def score(self, sum_logprobs: float, length: int) -> float:
        return sum_logprobs / (length**self.length_penalty)

    def add(self, sum_logprobs: float, tokens: Tensor) -> None:
        """Keep ``tokens`` (1-D, generated part) if it is among the best ``num_beams``."""
        self.kept.append((self.score(sum_logprobs, tokens.numel()), tokens))
        self.kept.sort(key=lambda item: item[0], reverse=True)
        del self.kept[self.num_beams :]

    @property
    def full(self) -> bool:
        return len(self.kept) >= self.num_beams

    @property
    def worst(self) -> float:
        return self.kept[-1][0]

    def can_improve(self, best_running: float, length: int, max_length: int) -> bool:
        """Whether a running beam of sum ``best_running`` at ``length`` generated tokens can still
        beat the worst hypothesis: further tokens only lower the sum, so its best possible score
        is the sum over the most favorable length ahead (the longest when α > 0)."""
        if not self.full:
            return True
        if best_running == float("-inf"):
            return False
        best_length = max_length if self.length_penalty > 0 and best_running < 0 else length
        return self.score(best_running, best_length) > self.worst


def beam_search(
    state: DecodeState,
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    early_stopping: bool = True,
    eos_token_ids: list[int] | None = None,
    pad_token_id: int = 0,
    repetition_penalty: float = 1.0,
) -> Tensor:
    """Run beam search from ``state`` (one row per input) and return the best sequence of each.

    Returns:
        (B, P + L) long: the prompt columns of ``state`` followed by the best hypothesis of each
        input, padded with ``pad_token_id`` to the longest one (L ≤ max_new_tokens).
    """
    B, K = state.batch_size, num_beams
    eos = eos_token_ids or []
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=state.tokens.device)
    prompt = state.tokens[:, : state.prompt_len].clone()  # (B, P)
    hypotheses = [Hypotheses(K, length_penalty) for _ in range(B)]
    done = [False] * B

    logits = state.forward()  # (B, V) one row per input: beams start identical, no need to run K
    V = logits.shape[-1]
    seen = state.seen_tokens(V) if repetition_penalty != 1.0 else None
    state.expand(K)
    if seen is not None:
        seen = seen.repeat_interleave(K, dim=0)
    logits = logits.repeat_interleave(K, dim=0)  # (B·K, V)
    # Only the first copy of each input may start, so the K beams begin with K different tokens.
    beam_scores = torch.zeros(B, K, device=logits.device)
    beam_scores[:, 1:] = float("-inf")
    beam_scores = beam_scores.view(-1)  # (B·K,)
    num_candidates = min((1 + len(eos)) * K, K * V)
    offsets = (torch.arange(B, device=logits.device) * K)[:, None]  # (B, 1) first beam row of each input

    for step in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B·K, V)
        candidates = (beam_scores[:, None] + logprobs).view(B, K * V)  # (B, K·V) sum of each extension
        top_scores, top_index = candidates.topk(num_candidates, dim=1)  # (B, C) best first
        top_beam, top_token = top_index // V, top_index % V  # (B, C) which beam, which token
        length = step + 1  # generated tokens, the new one included

        if eos:
            is_eos = torch.isin(top_token, eos_tensor)  # (B, C)
            # An end token among the K best candidates closes a hypothesis (HF's rule).
            ended = (is_eos[:, :K] & torch.isfinite(top_scores[:, :K])).nonzero().tolist()
            for b, j in ended:
                if done[b]:
                    continue
                row = b * K + int(top_beam[b, j])
                tokens = torch.cat(
                    (state.tokens[row, state.prompt_len : state.length], top_token[b, j : j + 1])
                )
                hypotheses[b].add(float(top_scores[b, j]), tokens)
            top_scores = top_scores.masked_fill(is_eos, float("-inf"))  # ended: not continued

        next_scores, pick = top_scores.topk(K, dim=1)  # (B, K) best running extensions
        next_beam = top_beam.gather(1, pick)  # (B, K)
        next_token = top_token.gather(1, pick)  # (B, K)
        rows = (offsets + next_beam).view(-1)  # (B·K,) row each new beam continues
        state.reorder(rows)
        state.append(next_token.view(-1))
        beam_scores = next_scores.view(-1)
        if seen is not None:
            seen = seen.index_select(0, rows).scatter_(1, next_token.view(-1, 1), True)

        best_running = next_scores[:, 0].tolist()
        for b in range(B):
            if not done[b] and hypotheses[b].full:
                done[b] = early_stopping or not hypotheses[b].can_improve(
                    best_running[b], length, max_new_tokens
                )
        if all(done) or step + 1 == max_new_tokens:
            break
        logits = state.forward()

    # Inputs still searching when the budget ran out also consider their running beams.
    scores = beam_scores.view(B, K).tolist()
    for b in range(B):
        if done[b]:
            continue
        for k in range(K):
            if scores[b][k] > float("-inf"):
                hypotheses[b].add(scores[b][k], state.tokens[b * K + k, state.prompt_len : state.length])
    best = [
        h.kept[0][1] if h.kept else state.tokens[b * K, state.prompt_len : state.length]
        for b, h in enumerate(hypotheses)
    ]
    longest = max(t.numel() for t in best)
    out = torch.full((B, prompt.shape[1] + longest), pad_token_id, dtype=torch.long, device=prompt.device)
    out[:, : prompt.shape[1]] = prompt
    for b, tokens in enumerate(best):
        out[b, prompt.shape[1] : prompt.shape[1] + tokens.numel()] = tokens
    return out
