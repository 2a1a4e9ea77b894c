"""``lmforge merge``: fold a PEFT run's adapter into its base and write a plain run directory."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LMForgeError
from ..peft import get_method, method_names


def merge(source: Path, out: Path, *, check: bool = True) -> int:
    """Merge a fine-tuned adapter into its base model and write a plain run directory.

    The result has model.safetensors with the adapted weights (and the trained task head), no
    adapter files, and gives the same outputs as the adapter run. Methods whose math allows it can
    be merged ({mergeable}); the others ({not_mergeable}) stop with an error saying why.

    Args:
        source: the run directory of a PEFT fine-tuning run (adapter.safetensors + adapter_config.json).
        out: the run directory to write.
        check: compare the merged model's outputs with the adapter model's on a probe batch.
    """
    from .. import peft
    from ..runs import BASE_MODEL_KEY, load, save_run

    if out.exists() and not out.is_dir():
        raise LMForgeError("the output exists and is not a folder", file=out)
    run = load(source)
    model = run.model
    name = peft.active_adapter(model)
    if name is None:
        raise LMForgeError("this run has no adapter to merge (it is already a plain model)", file=source)
    method = peft.peft_configs(model)[name].method
    probe = _probe(model)
    with torch.no_grad():
        before = model(**probe).logits if check else None
    peft.merge_and_unload(model, name)
    if before is not None:
        with torch.no_grad():
            after = model(**probe).logits
        worst = float((after - before).abs().max())
        if worst > 1e-3 * max(1.0, float(before.abs().max())):
            raise LMForgeError(f"the merged model's outputs differ from the adapter model's by {worst:.2e}")
    config = {k: v for k, v in run.config.items() if k not in ("model", BASE_MODEL_KEY)}
    config["merged_from"] = {"run": str(source), "method": method, "adapter": name}
    save_run(out, model=model, tokenizer=run.tokenizer, config=config)
    print(
        f"merged the {method} adapter of {source} into its base: wrote {out} ({model.num_params():,} parameters)"
    )
    return 0


# The lists in --help come from the PEFT method registry.
merge.__doc__ = (merge.__doc__ or "").format(
    mergeable=", ".join(n for n in method_names() if get_method(n).mergeable),
    not_mergeable=", ".join(n for n in method_names() if not get_method(n).mergeable),
)


def _probe(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A small deterministic batch the model accepts."""
    config = model.config
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(model.parameters()).device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool)}
    if config.arch == "encoder_decoder":
        batch["decoder_input_ids"] = ids[:, :5]
    return batch
