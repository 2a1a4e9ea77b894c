"""``lmforge merge``: fold a PEFT run's adapter into its base and write a plain run directory."""

from __future__ import annotations

from pathlib import Path

from ..peft import get_method, method_names
from ..pipeline.export import merge_adapter_run


def merge(source: Path, out: Path, *, check: bool = True, overwrite: bool = False) -> int:
    """Merge a fine-tuned adapter into its base model and write a plain run directory.

    The result has model.safetensors with the adapted weights (and the trained task head), no
    adapter files, and gives the same outputs as the adapter run. Methods whose math allows it can
    be merged ({mergeable}); the others ({not_mergeable}) stop with an error saying why.

    Args:
        source: the run directory of a PEFT fine-tuning run (adapter.safetensors + adapter_config.json).
        out: the run directory to write.
        check: compare the merged model's outputs with the adapter model's on a probe batch.
        overwrite: replace what OUT holds, as a whole: the new output is written beside it and swapped in at the end (without it, an occupied OUT is an error and nothing is touched).
    """
    merged = merge_adapter_run(source, out, check=check, overwrite=overwrite)
    print(
        f"merged the {merged.method} adapter of {source} into its base: wrote {out} "
        f"({merged.num_params:,} parameters)"
    )
    return 0


# The lists in --help come from the PEFT method registry.
merge.__doc__ = (merge.__doc__ or "").format(
    mergeable=", ".join(n for n in method_names() if get_method(n).mergeable),
    not_mergeable=", ".join(n for n in method_names() if not get_method(n).mergeable),
)
