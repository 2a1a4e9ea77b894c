"""Multi-head attention, the showcase of lmforge.

For one head, with input rows X (one row per token):

    Q = X W_Q        K = X W_K        V = X W_V           (projections)
    A = Q Kᵀ / √d    (scores: how much each query matches each key; d = head width)
    α = softmax(A + mask)                                  (weights; each row sums to 1)
    O = α V                                                (a weighted mix of the values)
    Y = concat(O_1 … O_H) W_O                              (heads joined, projected back)

References: Vaswani et al. 2017, "Attention Is All You Need" (scaled dot-product and multi-head
attention); Shazeer 2019, "Fast Transformer Decoding" (multi-query attention); Ainslie et al. 2023,
"GQA" (grouped-query attention). Layout follows nanoGPT's CausalSelfAttention and litgpt's
CausalSelfAttention: the projections, then one method (:meth:`SelfAttention.attend`) holding the
attention proper, with two interchangeable paths behind it:

- an explicit path that spells out the formulas above and can return α (for teaching and heatmaps);
- a fast path through ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), which never
  stores α and, without a materialized mask, uses memory linear in sequence length.

Both give the same numbers; a test holds them to it. A third runs while a CPU decodes a token
per sequence in the decoding form (:func:`lmforge.quant.for_decoding`): the same formulas for
each new query, with the rotation and the cache's append, in one native call
(:func:`lmforge.kernels.decode_attention`) instead of some thirty small operators a layer. A
fourth while a CPU trains in float32 on plain causal self-attention (no mask, bias, cache, prefix
or attention dropout; RoPE allowed): :func:`lmforge.kernels.causal.causal_attention` reads the
stacked projection below, rotates, attends and joins the heads in one native pass forward and one
backward, about twice as fast as SDPA's CPU kernel at the lengths it takes.

Q, K and V stay three ``nn.Linear`` modules (``q_proj``, ``k_proj``, ``v_proj``: the names PEFT
methods target and Hugging Face weight maps use), but while training they run as one matmul over
the three weights stacked, [Q | K | V] = X [W_Q | W_K | W_V] (nanoGPT's ``c_attn``): one product
with a wider output instead of three, one read of X, and one gradient for X instead of a sum of
three. A PEFT method that wraps one of them (LoRA on q/v, IA3 on k/v) gets the separate path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import block_kernels, decode_attention
from ..kernels.causal import causal_attention, native_causal_attention
from ..kernels.linear import Pending, bf16_autocast, linear, project, project_unbiased
from .kv_cache import KVCache
from .packing import Packing
from .positions import apply_rotary


def one_new_token(
    x: Tensor,
    memory: Tensor | None,
    packing: Packing | None,
    position_bias: Tensor | None,
    need_weights: bool,
) -> bool:
    """Whether a call with a self-attention cache decodes one new token per row, x (B, 1, E),
    with nothing the native decoding paths leave out (cross-attention memory, packed rows, a
    position bias, the attention weights asked for)."""
    return (
        memory is None
        and packing is None
        and position_bias is None
        and not need_weights
        and x.dim() == 3
        and x.shape[1] == 1
    )


class SelfAttention(nn.Module):
    """Multi-head (grouped-query, multi-query) attention over the input or a memory.

    Args:
        embed_dim: width E of the input rows.
        num_heads: number of query heads H.
        num_kv_heads: key/value heads Hkv (defaults to H; 1 is multi-query, 1 < Hkv < H grouped-query).
        head_dim: width D of one head (defaults to E / H).
        bias: bias terms in all four projections.
        qkv_bias: bias in the Q/K/V projections only, overriding ``bias`` for them (Qwen2 style).
        dropout: dropout on the attention weights α during training.
        causal: each query sees only keys at or before its own position (decoders).
        scale: the score scale (defaults to 1/√D; T5 uses 1).

    Raises:
        ValueError: when the shapes cannot work, naming the offending values.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        qkv_bias: bool | None = None,
        dropout: float = 0.0,
        causal: bool = False,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim <= 0 or num_heads <= 0 or num_kv_heads <= 0:
            raise ValueError(
                f"embed_dim {embed_dim}, num_heads {num_heads}, num_kv_heads {num_kv_heads}: must be positive"
            )
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
            head_dim = embed_dim // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout {dropout} must be in [0, 1)")
        qkv_bias = bias if qkv_bias is None else qkv_bias

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.causal = causal
        self.dropout = dropout
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        self.use_sdpa = True  # False forces the explicit path (e.g. to compare or to teach)
        # One matmul for Q, K and V while gradients are on (see the module docstring). Without
        # gradients (decoding one token at a time) stacking the weights would cost more than it saves.
        self.fuse_qkv = True

        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)
        # Q, K and V already fused for decoding (lmforge.quant.for_decoding), used while the three
        # projections are still the ones it fused.
        self.qkv_decode: nn.Module | None = None
        # Seam for prefix tuning: a module called with the batch size that returns extra
        # (keys, values), each (B, Hkv, P, D), seen by every query, or None (no prefix now).
        self.prefix: nn.Module | None = None

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        position_bias: Tensor | None = None,
        kv_cache: KVCache | None = None,
        need_weights: bool = False,
        packing: Packing | None = None,
        unbiased: bool = False,
    ) -> Tensor | Pending | tuple[Tensor, Tensor]:
        """Attend from x to itself, or to ``memory`` (cross-attention).

        Notation: B batch, T query length, S key length, E embed_dim, H heads, Hkv key/value
        heads, D head_dim, P prefix length.

        Args:
            x: queries' input (B, T, E).
            memory: keys'/values' input (B, S, E) for cross-attention; None attends to x.
            attention_mask: which keys to attend to. Boolean or 0/1 (True/1 = attend) of shape
                (B, S) (padding), (B, T, S) or (B, 1 or H, T, S); or a float mask of those 3-D/4-D
                shapes, added to the scores. With a KV cache, S counts the cached keys too.
            rope: (cos, sin) angles of the query positions from :class:`RotaryEmbedding`.
            position_bias: additive score bias (1 or B, H, T, S), from ALiBi or T5 buckets.
            kv_cache: keys/values of earlier steps; the new ones are appended. For
                cross-attention it holds the projected memory, computed on first use.
            need_weights: also return α (B, H, T, S); this takes the explicit path.
            packing: x holds only the real tokens of a padded batch, as rows (N, E) (see
                :mod:`~lmforge.model.packing`): the projections run on those rows, attention on
                the padded layout, and Y comes back as rows (N, E).
            unbiased: where the output projection is a plain biased ``nn.Linear``, return Y as
                :class:`~lmforge.kernels.linear.Pending` (Y without the bias, the bias): for a
                pre-norm block's "add & norm" to add it (not with ``need_weights``).

        Returns:
            Y (B, T, E), or (Y, α) when ``need_weights``.
        """
        if kv_cache is not None and one_new_token(x, memory, packing, position_bias, need_weights):
            y = self._decode_natively(x, rope, kv_cache, attention_mask)
            if y is not None:
                return y
        if packing is not None:
            B, T = packing.batch, packing.length
        else:
            B, T, _ = x.shape
        # Projected rows to heads; packed rows are first laid out padded, (N, ·) -> (B, T, ·).
        padded = packing.pad if packing is not None else (lambda t: t)
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if memory is not None and self.causal:
            raise ValueError("a causal attention layer cannot attend to a memory; build it with causal=False")

        if memory is None and self._fuse_qkv_now(x, attention_mask, packing, position_bias, kv_cache, need_weights):
            # [Q | K | V] = X [W_Q | W_K | W_V]: one matmul, then each one's D-wide slice per head.
            qkv = padded(self._stacked_qkv(x))  # (B, T, (H + 2·Hkv)·D)
            if self._causal_natively(qkv, packing, attention_mask, rope, position_bias, kv_cache, need_weights):
                # rotation and attention in one native pass each way, heads joined: (B, T, H·D)
                out = causal_attention(qkv, H, Hkv, D, self.scale, rope, checked=True)
                return self._project_out(packing.unpad(out) if packing is not None else out, unbiased)
            q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
            q = q.view(B, T, H, D).transpose(1, 2)  # (B, T, H·D) -> (B, H, T, D)
            k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, T, Hkv·D) -> (B, Hkv, T, D)
            v = v.view(B, T, Hkv, D).transpose(1, 2)  # (B, T, Hkv·D) -> (B, Hkv, T, D)
        else:
            # Q = X W_Q, one D-wide slice per head.
            q = padded(self.q_proj(x)).view(B, T, H, D).transpose(1, 2)  # (B, T, H·D) -> (B, H, T, D)
            if memory is None:
                # K = X W_K, V = X W_V, with fewer heads under GQA/MQA.
                k = padded(self.k_proj(x)).view(B, T, Hkv, D).transpose(1, 2)  # (B, T, Hkv·D) -> (B, Hkv, T, D)
                v = padded(self.v_proj(x)).view(B, T, Hkv, D).transpose(1, 2)  # (B, T, Hkv·D) -> (B, Hkv, T, D)

        if memory is None:
            if rope is not None:  # rotate q and k by their positions (before caching: keys keep theirs)
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if kv_cache is not None:
                k, v = kv_cache.update(k, v)  # (B, Hkv, S, D), S = cached + T
        elif kv_cache is not None and kv_cache.length:
            k, v = kv_cache.get()  # the memory was projected on an earlier step
        else:
            S_mem = memory.shape[1]
            k = self.k_proj(memory).view(B, S_mem, Hkv, D).transpose(1, 2)  # (B, S, Hkv·D) -> (B, Hkv, S, D)
            v = self.v_proj(memory).view(B, S_mem, Hkv, D).transpose(1, 2)  # (B, S, Hkv·D) -> (B, Hkv, S, D)
            if kv_cache is not None:
                k, v = kv_cache.update(k, v)

        causal = self.causal and memory is None
        mask, bias, is_causal = combine_masks(
            attention_mask,
            position_bias,
            batch_size=B,
            query_len=T,
            key_len=k.shape[2],
            causal=causal,
            device=x.device,
        )
        prefix = self.prefix(B) if self.prefix is not None else None
        if prefix is not None:
            prefix_k, prefix_v = prefix  # (B, Hkv, P, D) each
            k = torch.cat((prefix_k.to(k.dtype), k), dim=2)  # (B, Hkv, P + S, D)
            v = torch.cat((prefix_v.to(v.dtype), v), dim=2)
            mask, bias = prepend_visible_keys(
                mask, bias, is_causal, num_prefix=prefix_k.shape[2], query_len=T, device=x.device
            )
            is_causal = False

        out, weights = self.attend(
            q, k, v, mask=mask, bias=bias, is_causal=is_causal, need_weights=need_weights
        )

        # Join the heads and project back: Y = concat(O_1 … O_H) W_O.
        out = out.transpose(1, 2).reshape(B, T, H * D)  # (B, H, T, D) -> (B, T, H·D)
        if packing is not None:
            out = packing.unpad(out)  # (B, T, H·D) -> (N, H·D)
        y = self._project_out(out, unbiased and not need_weights)  # (B, T, E), or (N, E) packed
        return (y, weights) if need_weights else y

    def _project_out(self, out: Tensor, unbiased: bool) -> Tensor | Pending:
        """Y = out W_O (+ b_O); with ``unbiased``, :func:`~lmforge.kernels.linear.project_unbiased`'s."""
        return project_unbiased(self.out_proj, out) if unbiased else project(self.out_proj, out)

    def _causal_natively(
        self,
        qkv: Tensor,
        packing: Packing | None,
        attention_mask: Tensor | None,
        rope: tuple[Tensor, Tensor] | None,
        position_bias: Tensor | None,
        kv_cache: KVCache | None,
        need_weights: bool,
    ) -> bool:
        """Whether this self-attention over the fused projection ``qkv`` is plain causal attention
        that :func:`lmforge.kernels.causal.causal_attention` computes (training a decoder, mostly):
        no mask (or only right padding that ``packing`` drops again: see :mod:`~lmforge.model.packing`),
        no position bias, cache, prefix or dropout, weights not asked for, SDPA not turned off, and
        the kernel taking ``qkv`` and the rotary angles, if any."""
        return self._plain_causal(attention_mask, packing, position_bias, kv_cache, need_weights) and (
            native_causal_attention(qkv, self.num_heads, self.num_kv_heads, self.head_dim, rope)
        )

    def _plain_causal(
        self,
        attention_mask: Tensor | None,
        packing: Packing | None,
        position_bias: Tensor | None,
        kv_cache: KVCache | None,
        need_weights: bool,
    ) -> bool:
        """The layer's and the call's side of :meth:`_causal_natively` (before any projection)."""
        return (
            self.causal
            and (attention_mask is None or (packing is not None and packing.tokens_first))
            and position_bias is None
            and kv_cache is None
            and not need_weights
            and self.prefix is None
            and self.use_sdpa
            and (self.dropout == 0.0 or not self.training)
        )

    def _decode_natively(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, kv_cache: KVCache, attention_mask: Tensor | None
    ) -> Tensor | None:
        """One new token of each sequence (x (B, 1, E)) as decoding runs it on a CPU: Q/K/V fused
        for decoding (:func:`lmforge.quant.for_decoding`), then rotation, the cache's append and
        attention over it in one native call (:func:`lmforge.kernels.decode_attention`: the
        same formulas as below, without some thirty small operators a layer). None where
        :meth:`native_positions` says it does not apply (then the general path runs)."""
        positions = self.native_positions(x, kv_cache, attention_mask)
        if positions is None:
            return None
        if rope is not None:  # each row's angles, or one set for all: (B or 1, R)
            rope = (rope[0].reshape(-1, rope[0].shape[-1]), rope[1].reshape(-1, rope[1].shape[-1]))
        B = x.shape[0]
        qkv = self.qkv_decode(x).view(B, -1)  # type: ignore[misc]  # native_positions found it in place
        out = decode_attention(
            qkv, rope, kv_cache.keys, kv_cache.values, positions, self.num_heads, self.scale
        )
        kv_cache.length += 1  # each row's key and value are written
        return self.out_proj(out.view(B, 1, -1))

    def native_positions(
        self, x: Tensor, kv_cache: KVCache, attention_mask: Tensor | None
    ) -> int | Tensor | None:
        """Where each row's new token (x (B, 1, E)) goes in ``kv_cache`` when the native attention
        of decoding applies to it: the cache's ``length`` for every row, with no mask; or, for a
        cache that says where each row is (``lengths``: serving's slots,
        :class:`~lmforge.serving.slots.SlotView`), those positions, the mask (B, length + 1) being
        the one they make (each row sees its positions up to its own). None where it does not
        apply: Q/K/V not fused for decoding, no native kernels, gradients, a compiled graph,
        another dtype or device, a prefix, the explicit path asked for, another mask, a cache that
        is not the rows' own, a full one."""
        keys, values = kv_cache.keys, kv_cache.values
        if (
            self.decode_qkv() is None
            or not self.causal
            or self.prefix is not None
            or not self.use_sdpa
            or (self.training and self.dropout)
            or x.dtype is not torch.float32
            or keys.dtype is not torch.float32
            or not x.is_cpu
            or not keys.is_cpu
            or keys.shape[0] != x.shape[0]
            or not (keys.is_contiguous() and values.is_contiguous())
            or self.head_dim % 8
            or kv_cache.length >= keys.shape[2]
            or (torch.is_grad_enabled() and x.requires_grad)
            or torch.compiler.is_compiling()
            or block_kernels() is None
        ):
            return None
        lengths: Tensor | None = getattr(kv_cache, "lengths", None)  # each row's position, when they differ
        if lengths is None:
            return kv_cache.length if attention_mask is None else None
        if attention_mask is not None and (
            attention_mask.dim() != 2 or attention_mask.shape[1] != kv_cache.length + 1
        ):
            return None
        return lengths

    def decode_qkv(self) -> nn.Module | None:
        """The Q/K/V weights fused for decoding, while the projections are the ones fused. (Read
        from the module's own dictionary: a submodule's attribute read costs about a microsecond,
        and decoding asks this of every layer at every token.)"""
        modules = self._modules
        fused = modules.get("qkv_decode")
        if fused is None or not fused.covers(modules["q_proj"], modules["k_proj"], modules["v_proj"]):
            return None
        return fused

    def _fuse_qkv_now(
        self,
        x: Tensor,
        attention_mask: Tensor | None,
        packing: Packing | None,
        position_bias: Tensor | None,
        kv_cache: KVCache | None,
        need_weights: bool,
    ) -> bool:
        """Whether Q, K, V run as one matmul now: fused for decoding; or asked for, all three plain
        ``nn.Linear`` (not wrapped by a PEFT method, not quantized), and either gradients on
        (training) or, without them, an uncached causal pass over at least as many tokens as the
        layer is wide that the native causal attention can take (an evaluation pass: stacking the
        weights copies 3·E² values, little beside the tokens' products and what the native kernel
        saves over SDPA; a short or cached pass keeps the three projections)."""
        if self.decode_qkv() is not None:
            return True
        plain = (
            self.fuse_qkv
            and type(self.q_proj) is nn.Linear
            and type(self.k_proj) is nn.Linear
            and type(self.v_proj) is nn.Linear
            and (self.q_proj.bias is None) == (self.k_proj.bias is None) == (self.v_proj.bias is None)
        )
        if not plain or torch.is_grad_enabled():
            return plain
        return (
            self._plain_causal(attention_mask, packing, position_bias, kv_cache, need_weights)
            and x.dtype is torch.float32
            and x.device.type == "cpu"
            and x.shape[:-1].numel() >= x.shape[-1]
        )

    def _stacked_qkv(self, x: Tensor) -> Tensor:
        """X [W_Q | W_K | W_V] (+ [b_Q | b_K | b_V]): (…, E) -> (…, (H + 2·Hkv)·D)."""
        fused = self.decode_qkv()
        if fused is not None:
            return fused(x)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weights = [p.weight for p in projections]
        if bf16_autocast():  # cast before joining: the join then moves half the bytes
            weights = [w.to(torch.bfloat16) for w in weights]
        weight = torch.cat(weights)  # ((H + 2·Hkv)·D, E)
        bias = torch.cat([p.bias for p in projections]) if self.q_proj.bias is not None else None
        return linear(x, weight, bias)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        mask: Tensor | None = None,
        bias: Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """softmax(QKᵀ·scale + bias, masked) V for q (B, H, T, D), k/v (B, Hkv, S, D).

        ``mask`` is boolean (True = attend) broadcastable to (B, H, T, S); ``bias`` is added to
        the scores; ``is_causal`` means a lower-triangular mask over T == S not materialized yet.
        Returns O (B, H, T, D) and α (B, H, T, S) or None.
        """
        dropout_p = self.dropout if self.training else 0.0
        if need_weights or not self.use_sdpa:
            return self._attend_explicit(q, k, v, mask, bias, is_causal, dropout_p)
        if bias is not None:  # SDPA takes one mask: fold the boolean one into the additive bias
            if is_causal:
                mask = causal_mask(q.shape[2], k.shape[2], device=q.device)
            if mask is not None:
                bias = bias.masked_fill(~mask, float("-inf"))
            mask, is_causal = bias.to(q.dtype), False
        gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.scale, **gqa
        )
        return out, None

    def _attend_explicit(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        bias: Tensor | None,
        is_causal: bool,
        dropout_p: float,
    ) -> tuple[Tensor, Tensor]:
        """The formulas, one line each. GQA without copying K/V: the G = H/Hkv query heads that
        share a key/value head are grouped in a dimension of their own and broadcast."""
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        G = H // Hkv
        q = q.view(B, Hkv, G, T, D)  # heads h = g_kv·G + g share key/value head g_kv
        k, v = k[:, :, None], v[:, :, None]  # (B, Hkv, 1, S, D): broadcast over the G queries

        # A = Q Kᵀ / √d
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, Hkv, G, T, S)
        scores = scores.view(B, H, T, S)  # (B, Hkv, G, T, S) -> (B, H, T, S)
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()  # softmax in fp32 under half precision
        if bias is not None:
            scores = scores + bias
        if is_causal:
            mask = causal_mask(T, S, device=q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        # A query with no visible key (e.g. a left-padding position under a causal mask) gets
        # α = 0 and output 0, as SDPA does, instead of NaN.
        empty_rows = (
            torch.isneginf(scores).all(dim=-1, keepdim=True) if mask is not None or bias is not None else None
        )
        if empty_rows is not None:
            scores = scores.masked_fill(empty_rows, 0.0)

        # α = softmax(A + mask)
        weights = torch.softmax(scores, dim=-1)  # (B, H, T, S), each row sums to 1
        if empty_rows is not None:
            weights = weights.masked_fill(empty_rows, 0.0)
        weights = weights.to(q.dtype)
        dropped = F.dropout(weights, p=dropout_p) if dropout_p else weights

        # O = α V
        out = dropped.view(B, Hkv, G, T, S) @ v  # (B, Hkv, G, T, S) @ (B, Hkv, 1, S, D) -> (B, Hkv, G, T, D)
        return out.view(B, H, T, D), weights

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, causal={self.causal}"
        )


def causal_mask(query_len: int, key_len: int, *, device: torch.device | None = None) -> Tensor:
    """(T, S) boolean, True where query i may see key j. The queries are the last T of the S
    positions (as when a KV cache holds S − T earlier ones), so i sees j ≤ S − T + i."""
    return torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril(key_len - query_len)


def combine_masks(
    attention_mask: Tensor | None,
    position_bias: Tensor | None,
    *,
    batch_size: int,
    query_len: int,
    key_len: int,
    causal: bool,
    device: torch.device | None = None,
) -> tuple[Tensor | None, Tensor | None, bool]:
    """Bring every kind of mask to one of three forms the attention paths take.

    Returns:
        mask: boolean, broadcastable to (B, H, T, S), True = attend; or None.
        bias: float, broadcastable to (B, H, T, S), added to the scores; or None.
        is_causal: True when the only constraint left is a causal mask over T == S, which the fast
            path applies without materializing it (memory linear in sequence length).
    """
    T, S = query_len, key_len
    mask: Tensor | None = None
    bias = position_bias
    if attention_mask is not None:
        if attention_mask.dim() == 2:  # (B, S) padding mask
            if attention_mask.shape != (batch_size, S):
                raise ValueError(
                    f"attention_mask of shape {tuple(attention_mask.shape)} does not match "
                    f"batch {batch_size} × {S} keys"
                )
            attention_mask = attention_mask[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
        elif attention_mask.dim() == 3:
            attention_mask = attention_mask[:, None]  # (B, T, S) -> (B, 1, T, S)
        elif attention_mask.dim() != 4:
            raise ValueError(f"attention_mask must have 2, 3 or 4 dimensions, got {attention_mask.dim()}")
        if attention_mask.shape[-1] != S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} keys but there are {S}")
        if attention_mask.is_floating_point():
            bias = attention_mask if bias is None else bias + attention_mask
        else:
            mask = attention_mask.bool()
    is_causal = False
    if causal and T > 1:  # one query at the end sees every key: no mask needed
        if mask is None and bias is None and T == S:
            is_causal = True
        else:
            tri = causal_mask(T, S, device=device)
            mask = tri if mask is None else mask & tri
    return mask, bias, is_causal


def prepend_visible_keys(
    mask: Tensor | None,
    bias: Tensor | None,
    is_causal: bool,
    *,
    num_prefix: int,
    query_len: int,
    device: torch.device | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Extend mask/bias (over T queries × S keys) for P keys prepended before the others and
    visible to every query (prefix tuning)."""
    if is_causal:  # T == S here
        mask = causal_mask(query_len, query_len, device=device)
    if mask is not None:
        visible = torch.ones(*mask.shape[:-1], num_prefix, dtype=torch.bool, device=mask.device)
        mask = torch.cat((visible, mask), dim=-1)
    if bias is not None:
        zeros = torch.zeros(*bias.shape[:-1], num_prefix, dtype=bias.dtype, device=bias.device)
        bias = torch.cat((zeros, bias), dim=-1)
    return mask, bias
