"""The Transformer: encoder (BERT-style), decoder (GPT/Llama-style) or encoder-decoder
(original Transformer / T5 / BART), built from one :class:`~lmforge.config.ModelConfig`.

    token ids ──embedding (+ token types)──► stack: positions → blocks → norm ──► head

An encoder stack attends in both directions; a decoder stack is causal and, in an
encoder-decoder, also attends to the encoder's output through cross-attention. References:
Vaswani et al. 2017; Radford et al. 2019 (GPT-2, pre-norm); Devlin et al. 2019 (BERT);
Raffel et al. 2020 (T5); Touvron et al. 2023 (Llama). Layout after nanoGPT's ``GPT`` and litgpt's
``GPT``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..kernels.linear import hooked, settled
from ..kernels.norm import added_normed
from .heads import LMHead, MLMHead, make_head
from .kv_cache import KVCache, ModelCache
from .layers import RMSNorm, TransformerBlock, make_norm
from .packing import Packing
from .positions import ALiBi, LearnedPositions, RelativePositionBias, RotaryEmbedding, SinusoidalPositions


@dataclass
class ModelOutput:
    """What a forward pass returns.

    logits: the head's output (None without a head): (B, T, V) for LM/MLM, (B, num_labels) for
        sequence classification, (B, T, num_labels) for tagging, (B, T, 2) for QA spans.
    hidden_states: the last stack's output (B, T, E) (the decoder's in an encoder-decoder).
    encoder_hidden_states: the encoder's output of an encoder-decoder (reuse it while decoding).
    attentions / cross_attentions: per layer α (B, H, T, S), when asked with ``need_weights``.
    """

    logits: Tensor | None
    hidden_states: Tensor
    encoder_hidden_states: Tensor | None = None
    attentions: list[Tensor] | None = None
    cross_attentions: list[Tensor] | None = None


class TransformerStack(nn.Module):
    """Positions, a stack of blocks and the final norm: the encoder or the decoder of a model."""

    def __init__(self, config: ModelConfig, *, causal: bool, cross_attention: bool, num_layers: int) -> None:
        super().__init__()
        self.causal = causal
        self.embed_scale = math.sqrt(config.embed_dim) if config.scale_embeddings else 1.0
        self.pos_embed: nn.Module | None = None
        if config.position == "learned":
            self.pos_embed = LearnedPositions(config.max_seq_len, config.embed_dim)
        elif config.position == "sinusoidal":
            self.pos_embed = SinusoidalPositions(config.max_seq_len, config.embed_dim)
        assert config.head_dim is not None
        self.rope = (
            RotaryEmbedding(config.head_dim, base=config.rope_theta) if config.position == "rope" else None
        )
        self.alibi = ALiBi(config.num_heads) if config.position == "alibi" else None
        self.relative_bias = (
            RelativePositionBias(
                config.num_heads,
                bidirectional=not causal,
                num_buckets=config.relative_buckets,
                max_distance=config.relative_max_distance,
            )
            if config.position == "relative"
            else None
        )
        self.embed_norm = (
            make_norm(config.norm, config.embed_dim, config.norm_eps, bias=config.norm_bias) if config.embed_norm else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(config, causal=causal, cross_attention=cross_attention)
            for _ in range(num_layers)
        )
        # Pre-norm stacks end with a norm (the residual stream is never normalized otherwise).
        self.norm = make_norm(config.norm, config.embed_dim, config.norm_eps, bias=config.norm_bias) if config.prenorm else None
        self.activation_checkpointing = False  # recompute block activations in backward to save memory
        # With a (B, T) padding mask that hides some tokens, run the position-wise layers on the
        # real tokens only (see packing.py); outputs at padding positions are then zeros. Off
        # inside torch.compile, whose graphs want shapes that do not depend on the data.
        self.skip_padding = True
        # Seam for prompt tuning: a module called with the batch size that returns P soft-prompt
        # embeddings (B, P, E) to put before the input, or None. They take positions 0…P−1, every
        # token sees them, and their outputs are dropped, so callers see (B, T, E) as usual.
        self.prompt: nn.Module | None = None

    def forward(
        self,
        embeds: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: list[KVCache] | None = None,
        cross_cache: list[KVCache] | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor] | None, list[Tensor] | None]:
        """embeds (B, T, E) → hidden (B, T, E), and per-layer α when ``need_weights``.

        ``position_ids`` (B, T) or (T,) default to 0…T−1 after any cached positions; pass them for
        left-padded batches. ALiBi and T5 biases use slot indices (they depend only on offsets).
        """
        B, T, _ = embeds.shape
        past = cache[0].length if cache else 0
        prompt = self.prompt(B) if self.prompt is not None else None  # (B, P, E) or None
        num_prompt = 0
        if prompt is not None:
            num_prompt = prompt.shape[1]
            if attention_mask is not None and attention_mask.dim() == 2:  # the prompt is always visible
                visible = torch.ones(B, num_prompt, dtype=attention_mask.dtype, device=attention_mask.device)
                attention_mask = torch.cat((visible, attention_mask), dim=1)  # (B, P + S)
            elif attention_mask is not None:
                raise ValueError("prompt tuning takes a (B, S) padding mask, not a full attention mask")
            if position_ids is not None:
                position_ids = position_ids + num_prompt
            if past == 0:  # the first pass carries the prompt; with a cache, later passes find it there
                embeds = torch.cat((prompt.to(embeds.dtype), embeds), dim=1)  # (B, P + T, E)
                if position_ids is not None:
                    prompt_positions = torch.arange(num_prompt, device=embeds.device)
                    position_ids = torch.cat(
                        (prompt_positions.expand(*position_ids.shape[:-1], -1), position_ids), -1
                    )
                T = T + num_prompt
        slots = torch.arange(past, past + T, device=embeds.device)  # (T,) positions of the queries
        if position_ids is None:
            position_ids = slots
            if (
                isinstance(self.pos_embed, LearnedPositions | SinusoidalPositions)
                and past + T > self.pos_embed.max_seq_len
            ):
                raise ValueError(
                    f"position {past + T - 1} is past max_seq_len {self.pos_embed.max_seq_len} of the position table"
                )
            positions_checked = True
        else:
            positions_checked = False

        x = embeds * self.embed_scale if self.embed_scale != 1.0 else embeds
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids, checked=positions_checked).to(x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if self.dropout.p:
            x = self.dropout(x)

        rope = self.rope(position_ids) if self.rope is not None else None
        position_bias = None
        if self.alibi is not None or self.relative_bias is not None:
            key_slots = torch.arange(past + T, device=embeds.device)  # (S,)
            bias_module = self.alibi if self.alibi is not None else self.relative_bias
            position_bias = bias_module(slots, key_slots)  # (1, H, T, S)

        packing = None
        if (
            self.skip_padding
            and cache is None
            and not torch.compiler.is_compiling()  # data-dependent shapes would break the graph
            and attention_mask is not None
            and attention_mask.dim() == 2
            and attention_mask.shape[1] == T
            and not bool(attention_mask.all())
        ):
            packing = Packing.from_mask(attention_mask.bool())
            x = packing.unpad(x)  # (B, T, E) -> (N, E): the real tokens

        self_weights: list[Tensor] = []
        cross_weights: list[Tensor] = []
        # In training, each block's last residual branch is added together with the next block's
        # first norm (TransformerBlock.run); where hooks watch a block's output every block is
        # called whole.
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        deferred = (
            torch.is_grad_enabled()
            and cache is None
            and all(type(layer) is TransformerBlock and not hooked(layer) for layer in self.layers)
        )
        branch = None
        for i, layer in enumerate(self.layers):
            kwargs = dict(
                attention_mask=attention_mask,
                rope=rope,
                position_bias=position_bias,
                memory=memory,
                memory_mask=memory_mask,
                kv_cache=cache[i] if cache else None,
                cross_kv_cache=cross_cache[i] if cross_cache else None,
                need_weights=need_weights,
                packing=packing,
            )
            if deferred:
                if checkpointing:  # the block's activations recomputed in the backward pass
                    x, branch, sw, cw = checkpoint(layer.run, x, branch, use_reentrant=False, **kwargs)
                else:
                    x, branch, sw, cw = layer.run(x, branch, **kwargs)
            elif checkpointing:
                x, sw, cw = checkpoint(layer, x, use_reentrant=False, **kwargs)
            else:
                x, sw, cw = layer(x, **kwargs)
            if need_weights:
                self_weights.append(sw)
                if cw is not None:
                    cross_weights.append(cw)
        if branch is not None and self.norm is not None:  # the last branch and the final norm
            x = added_normed(self.norm, x, branch, low=False)[1]
        elif branch is not None:
            x = x + settled(branch)
        elif self.norm is not None:
            x = self.norm(x)
        if packing is not None:
            x = packing.pad(x)  # (N, E) -> (B, T, E), zeros at padding positions
        if num_prompt and past == 0:  # drop the prompt's own outputs
            x = x[:, num_prompt:]
        if not need_weights:
            return x, None, None
        return x, self_weights, cross_weights or None


class Transformer(nn.Module):
    """An encoder, a decoder or an encoder-decoder with a head, as ``config`` says.

    >>> model = Transformer(ModelConfig.from_name("tiny-decoder"))
    >>> model(torch.randint(0, 256, (2, 10))).logits.shape
    torch.Size([2, 10, 256])
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.type_embed = (
            nn.Embedding(config.type_vocab_size, config.embed_dim) if config.type_vocab_size else None
        )
        has_encoder = config.arch in ("encoder", "encoder_decoder")
        has_decoder = config.arch in ("decoder", "encoder_decoder")
        self.encoder = (
            TransformerStack(config, causal=False, cross_attention=False, num_layers=config.num_layers)
            if has_encoder
            else None
        )
        self.decoder = (
            TransformerStack(
                config,
                causal=True,
                cross_attention=config.arch == "encoder_decoder",
                num_layers=config.num_decoder_layers or config.num_layers,
            )
            if has_decoder
            else None
        )
        self.head = make_head(config, self.tok_embed)
        self.reset_parameters()

    # ---- construction ------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """GPT-2 initialization: N(0, init_std) weights, zero biases, unit norms, and residual
        output projections scaled down by √(2·layers) so the residual stream does not grow with depth;
        a token table tied to a head scaled by ``logit_scale`` starts at init_std / logit_scale."""
        std = self.config.init_std
        depth = self.config.num_layers + (self.config.num_decoder_layers or 0)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scaled = name.endswith(("out_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, std / math.sqrt(2 * depth) if scaled else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, nn.LayerNorm | RMSNorm):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, LearnedPositions):
                nn.init.normal_(module.weight, 0.0, std)
        if self.head is not None and hasattr(self.head, "bias") and isinstance(self.head.bias, nn.Parameter):
            nn.init.zeros_(self.head.bias)
        if self.config.tie_embeddings and self.config.logit_scale != 1.0:
            # A tied head that scales hidden states by logit_scale (T5: width^-1/2) would start with
            # logits logit_scale times smaller than an N(0, init_std) head and a token signal drowned
            # by the first layers' outputs: the table starts at init_std / logit_scale instead (T5
            # itself starts it at 1.0). With the 0.02 table a small T5 learned a language model of
            # the target and ignored the source (benchmarks/RESULTS.md, Multi30k).
            nn.init.normal_(self.tok_embed.weight, 0.0, std / self.config.logit_scale)

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors once). ``non_embedding`` leaves out lookup-only tables:
        positions, token types, and the token embedding unless a head reuses it as a matmul."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            lookup = [m.weight for m in self.modules() if isinstance(m, LearnedPositions)]
            if self.type_embed is not None:
                lookup.append(self.type_embed.weight)
            head_weight = getattr(getattr(self.head, "proj", None), "weight", None)
            if head_weight is not self.tok_embed.weight:
                lookup.append(self.tok_embed.weight)
            total -= sum(w.numel() for w in lookup)
        return total

    @property
    def stack(self) -> TransformerStack:
        """The stack the head reads: the decoder if there is one, else the encoder."""
        stack = self.decoder if self.decoder is not None else self.encoder
        assert stack is not None
        return stack

    # ---- forward -----------------------------------------------------------------------------

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Token (+ token-type) embeddings (B, T, E); positions are added by the stack."""
        x = self.tok_embed(input_ids)
        if self.type_embed is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.type_embed(token_type_ids)
        return x

    def encode(
        self,
        input_ids: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor] | None]:
        """Run the encoder stack: hidden states (B, S, E) and α per layer when asked."""
        if self.encoder is None:
            raise ValueError(f"a {self.config.arch} model has no encoder")
        embeds = (
            inputs_embeds if inputs_embeds is not None else self.embed(_required(input_ids), token_type_ids)
        )
        hidden, weights, _ = self.encoder(
            embeds, attention_mask=attention_mask, position_ids=position_ids, need_weights=need_weights
        )
        return hidden, weights

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        decoder_inputs_embeds: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        cache: ModelCache | None = None,
        need_weights: bool = False,
        logits_at: Tensor | None = None,
    ) -> ModelOutput:
        """One forward pass.

        ``logits_at`` (B, T) bool, for language-model heads: the head runs only at these positions
        and ``logits`` is (N, V), N of them in row order — a loss over a few positions (an SFT
        answer, masked-LM targets) then skips the vocabulary projection of all the others.

        Decoder or encoder: ``input_ids`` (B, T) (or ``inputs_embeds`` (B, T, E)) with
        ``attention_mask`` (B, S) True/1 = real token (S includes cached positions).
        Encoder-decoder: ``input_ids``/``attention_mask`` feed the encoder (or pass its output as
        ``encoder_hidden_states``), ``decoder_input_ids``/``decoder_attention_mask`` the decoder.
        ``cache`` (from :meth:`new_cache`) makes decoding incremental.
        """
        encoder_hidden = encoder_hidden_states
        encoder_weights = None
        if self.config.arch == "encoder_decoder":
            if encoder_hidden is None:
                encoder_hidden, encoder_weights = self.encode(
                    input_ids,
                    attention_mask=attention_mask,
                    token_type_ids=token_type_ids,
                    position_ids=position_ids,
                    inputs_embeds=inputs_embeds,
                    need_weights=need_weights,
                )
            assert self.decoder is not None
            embeds = (
                decoder_inputs_embeds
                if decoder_inputs_embeds is not None
                else self.embed(_required(decoder_input_ids, "decoder_input_ids"))
            )
            hidden, weights, cross = self.decoder(
                embeds,
                attention_mask=decoder_attention_mask,
                memory=encoder_hidden,
                memory_mask=attention_mask,
                cache=cache.self_attention if cache else None,
                cross_cache=cache.cross_attention if cache else None,
                need_weights=need_weights,
            )
            head_mask = decoder_attention_mask
        elif self.config.arch == "decoder":
            assert self.decoder is not None
            embeds = (
                inputs_embeds
                if inputs_embeds is not None
                else self.embed(_required(input_ids), token_type_ids)
            )
            hidden, weights, cross = self.decoder(
                embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache.self_attention if cache else None,
                need_weights=need_weights,
            )
            head_mask = attention_mask
        else:
            if cache is not None:
                raise ValueError("an encoder has no KV cache: it sees the whole sequence at once")
            hidden, weights = self.encode(
                input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                need_weights=need_weights,
            )
            cross = None
            head_mask = attention_mask
        if head_mask is not None and head_mask.dim() == 2 and head_mask.shape[1] != hidden.shape[1]:
            head_mask = head_mask[:, -hidden.shape[1] :]  # with a cache: the mask of the new positions
        if logits_at is not None:
            if not isinstance(self.head, LMHead | MLMHead):
                raise ValueError("logits_at selects positions for a language-model head only")
            logits = self.head(hidden[:, -logits_at.shape[1] :][logits_at])  # (N, V)
        else:
            logits = self.head(hidden, head_mask) if self.head is not None else None
        if encoder_weights is not None and weights is not None:
            weights = encoder_weights + weights
        return ModelOutput(
            logits=logits,
            hidden_states=hidden,
            encoder_hidden_states=encoder_hidden,
            attentions=weights,
            cross_attentions=cross,
        )

    def new_cache(
        self,
        batch_size: int,
        max_seq_len: int | None = None,
        *,
        memory_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> ModelCache:
        """Empty KV caches for decoding ``batch_size`` sequences of up to ``max_seq_len`` positions
        (an encoder-decoder also needs ``memory_len``, the encoder output length)."""
        if self.decoder is None:
            raise ValueError("an encoder has no KV cache: it sees the whole sequence at once")
        reference = self.tok_embed.weight
        dtype = dtype or reference.dtype
        device = device or reference.device
        config = self.config
        assert config.num_kv_heads is not None and config.head_dim is not None
        max_seq_len = max_seq_len or config.max_seq_len

        def caches(length: int) -> list[KVCache]:
            return [
                KVCache(batch_size, length, config.num_kv_heads, config.head_dim, dtype=dtype, device=device)
                for _ in self.decoder.layers
            ]

        cross = None
        if config.arch == "encoder_decoder":
            if memory_len is None:
                raise ValueError("an encoder-decoder cache needs memory_len (the encoder output length)")
            cross = caches(memory_len)
        return ModelCache(caches(max_seq_len), cross)


def _required(ids: Tensor | None, name: str = "input_ids") -> Tensor:
    if ids is None:
        raise ValueError(f"pass {name} (or the matching inputs_embeds)")
    return ids
