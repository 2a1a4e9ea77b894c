"""Choosing and ordering the demonstrations of in-context learning.

- ``random``: k training examples drawn with a seed, class-balanced: the classes take turns (in
  a seeded order) and each turn draws an unused example of that class, so 8 shots of a binary task
  are 4 + 4 and k shots of many classes cover k distinct classes (Brown et al. 2020 draw at random;
  balancing removes the majority-label bias Zhao et al. 2021 describe).
- ``knn``: for each query, the k training examples whose sentence embeddings are nearest to its
  own by cosine similarity (Liu et al. 2022, "What Makes Good In-Context Examples for GPT-3?",
  KATE). The embeddings are mean-pooled hidden states: of a sentence encoder such as MiniLM (as
  sentence-transformers pools it) or of the language model itself. Ties go to the earlier example,
  so the choice is deterministic.

Orders: ``random`` (seeded shuffle), ``alternate`` (labels in turn), ``similar_last`` (the most
similar demonstration next to the query, Liu et al.'s best order) and ``similar_first``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import LMForgeError

Selection = Literal["random", "knn"]
Order = Literal["auto", "random", "alternate", "similar_last", "similar_first"]


def balanced_sample(labels: Sequence[int], k: int, *, seed: int) -> list[int]:
    """Indices of ``k`` examples, the classes taking turns in a seeded order (each class's
    examples drawn without replacement in a seeded order). Fewer come back when the pool runs out."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    queues = {c: list(rng.permutation(members)) for c, members in sorted(by_class.items())}
    classes = [int(c) for c in rng.permutation(sorted(queues))]
    chosen: list[int] = []
    while len(chosen) < k and any(queues.values()):
        for c in classes:
            if len(chosen) < k and queues[c]:
                chosen.append(int(queues[c].pop(0)))
    return chosen


def per_class_sample(labels: Sequence[int], per_class: int, *, seed: int, exclude: Sequence[int] = ()) -> list[int]:
    """``per_class`` examples of every class (fewer where a class has fewer), seeded, in a
    seeded order; ``exclude``: indices not to take (e.g. the training examples, for a dev set)."""
    rng = np.random.default_rng(seed)
    skip = set(exclude)
    chosen: list[int] = []
    for c in sorted({int(x) for x in labels}):
        members = [i for i, label in enumerate(labels) if int(label) == c and i not in skip]
        chosen += [int(i) for i in rng.permutation(members)[:per_class]]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def nearest(queries: Tensor, pool: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` pool rows most similar to each query: indices (N, k) and cosine similarities
    (N, k), most similar first, ties to the lower index. Rows need not be normalized."""
    if k > pool.shape[0]:
        raise LMForgeError(f"{k} demonstrations asked but the pool has only {pool.shape[0]} examples", key="shots")
    q = torch.nn.functional.normalize(queries.double(), dim=-1)
    p = torch.nn.functional.normalize(pool.double(), dim=-1)
    similarity = (q @ p.T).numpy()  # (N, M)
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]  # stable: ties keep the lower index
    return torch.from_numpy(order.copy()), torch.from_numpy(np.take_along_axis(similarity, order, axis=1))


def arrange(chosen: Sequence[int], labels: Sequence[int], how: Order, *, seed: int) -> list[int]:
    """``chosen`` demonstrations (most similar first, for kNN) put in the order ``how`` names."""
    chosen = list(chosen)
    if how in ("similar_first", "auto"):
        return chosen
    if how == "similar_last":
        return chosen[::-1]
    if how == "random":
        return [chosen[i] for i in np.random.default_rng(seed).permutation(len(chosen))]
    if how == "alternate":
        by_class: dict[int, list[int]] = {}
        for index in chosen:
            by_class.setdefault(int(labels[index]), []).append(index)
        out: list[int] = []
        while any(by_class.values()):
            for c in sorted(by_class):
                if by_class[c]:
                    out.append(by_class[c].pop(0))
        return out
    raise LMForgeError(f"unknown order '{how}' (random, alternate, similar_last, similar_first)", key="order")


@torch.no_grad()
def embed_texts(
    model: nn.Module,
    tokenizer: object,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    add_special_tokens: bool | None = None,
    progress: bool = False,
) -> Tensor:
    """(N, E) sentence embeddings: the model's last hidden states averaged over each text's
    tokens, L2-normalized. An encoder reads its ``[CLS] … [SEP]`` form (as sentence-transformers
    does for MiniLM); a decoder the plain text (``add_special_tokens`` overrides)."""
    special = model.config.arch == "encoder" if add_special_tokens is None else add_special_tokens
    device = model.tok_embed.weight.device
    rows = [ids[:max_length] or [0] for ids in tokenizer.encode_many(list(texts), add_special_tokens=special)]
    order = np.argsort([-len(r) for r in rows], kind="stable")
    out = torch.empty(len(rows), model.config.embed_dim)
    for start in tqdm(range(0, len(rows), batch_size), desc="embeddings", disable=not progress, leave=False):
        index = order[start : start + batch_size]
        batch = [rows[i] for i in index]
        T = max(len(r) for r in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.bool)
        for i, r in enumerate(batch):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        hidden = model(ids.to(device), attention_mask=mask.to(device)).hidden_states.float().cpu()  # (B, T, E)
        weights = mask[..., None].float()
        pooled = (hidden * weights).sum(1) / weights.sum(1)  # (B, E)
        out[torch.from_numpy(index.copy())] = torch.nn.functional.normalize(pooled, dim=-1)
    return out


__all__ = [
    "Order",
    "Selection",
    "arrange",
    "balanced_sample",
    "embed_texts",
    "nearest",
    "per_class_sample",
]
