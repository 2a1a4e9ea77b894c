"""Skipping padding (lmforge.model.packing): the position-wise layers run on the real tokens only,
and the outputs and gradients at real positions are those of the padded computation."""

from __future__ import annotations

import pytest
import torch

from lmforge import ModelConfig, Transformer, peft
from lmforge.model import TransformerStack
from lmforge.model.packing import Packing


def set_skip_padding(model: torch.nn.Module, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, TransformerStack):
            module.skip_padding = on


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(5, 256, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 6:] = False  # right padding
    mask[1, :3] = False  # left padding
    return ids, mask


def outputs_and_grads(model: Transformer, ids: torch.Tensor, mask: torch.Tensor, *, skip: bool):
    set_skip_padding(model, skip)
    model.zero_grad(set_to_none=True)
    kwargs = {"attention_mask": mask}
    if model.config.arch == "encoder_decoder":
        kwargs.update(decoder_input_ids=ids, decoder_attention_mask=mask)
    out = model(ids, **kwargs)
    target = out.logits if out.logits is not None else out.hidden_states
    if target.dim() == 3:
        target = target[mask]  # real positions only
    (target.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return target.detach(), out.hidden_states.detach(), grads


def test_pad_and_unpad_are_inverse() -> None:
    _, mask = padded_batch()
    packing = Packing.from_mask(mask)
    x = torch.randn(3, 10, 4)
    rows = packing.unpad(x)
    assert rows.shape == (int(mask.sum()), 4)
    back = packing.pad(rows)
    torch.testing.assert_close(back[mask], x[mask])
    assert (back[~mask] == 0).all()


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny-encoder", {}),
        ("tiny-encoder", {"head": "classification", "num_labels": 3, "pooling": "mean"}),
        ("tiny-decoder", {"position": "alibi"}),
        ("tiny-llama", {}),  # RoPE, grouped-query attention, RMSNorm, SwiGLU
        ("tiny-encoder-decoder", {"position": "relative"}),
        ("tiny-encoder-decoder", {}),
    ],
)
def test_skipping_padding_gives_the_same_outputs_and_gradients(preset: str, overrides: dict) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(preset, **overrides)).train()  # no dropout in the tiny presets
    ids, mask = padded_batch()
    skipped, hidden, grads_skipped = outputs_and_grads(model, ids, mask, skip=True)
    full, _, grads_full = outputs_and_grads(model, ids, mask, skip=False)
    torch.testing.assert_close(skipped, full, atol=1e-5, rtol=1e-4)
    assert grads_skipped.keys() == grads_full.keys()
    for name in grads_full:
        torch.testing.assert_close(grads_skipped[name], grads_full[name], atol=1e-5, rtol=1e-4, msg=name)
    assert (hidden[~mask] == 0).all()  # padding positions come back as zeros


@pytest.mark.parametrize(
    "method, options",
    [
        ("lora", {"r": 4, "target_modules": "all-linear"}),
        ("adapter", {}),
        ("ia3", {}),
        ("prefix", {"num_virtual_tokens": 3}),
        ("prompt", {"num_virtual_tokens": 3}),
    ],
)
def test_peft_methods_see_the_same_numbers_with_padding_skipped(method: str, options: dict) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-encoder", head="classification", num_labels=2, pooling="mean"))
    peft.apply(model, method, **options)
    for p in model.parameters():  # move adapters off their no-op start
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else torch.nn.init.normal_(p, 1.0, 0.05)
    model.train()
    ids, mask = padded_batch()
    skipped, _, grads_skipped = outputs_and_grads(model, ids, mask, skip=True)
    full, _, grads_full = outputs_and_grads(model, ids, mask, skip=False)
    torch.testing.assert_close(skipped, full, atol=1e-5, rtol=1e-4)
    for name in grads_full:
        torch.testing.assert_close(grads_skipped[name], grads_full[name], atol=1e-5, rtol=1e-4, msg=name)


def test_position_wise_layers_see_only_real_tokens() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-encoder")).eval()
    ids, mask = padded_batch()
    seen: list[int] = []
    hook = model.encoder.layers[0].mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    model(ids, attention_mask=mask)
    set_skip_padding(model, False)
    model(ids, attention_mask=mask)
    hook.remove()
    assert seen == [int(mask.sum()), 3]  # N real-token rows, then the padded (B, T, E) batch
