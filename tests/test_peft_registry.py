"""The method registry: each record carries what lmforge knows about a method, and a method added in
one module (here, one registered by the test) works everywhere without an edit elsewhere."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lmforge import ModelConfig, Transformer, peft
from lmforge.errors import LMForgeError
from lmforge.hooks import Callback
from lmforge.peft import base
from lmforge.peft.base import AdapterModule, PeftConfig, find_targets, register_peft_method, wrap
from lmforge.pipeline.finetuning import MethodName


@dataclass
class ShiftConfig(PeftConfig):
    """A toy method: a trainable vector added to each target's output."""

    method: str = "shift"
    target_modules: list[str] = field(default_factory=lambda: ["q_proj"])


class Shift(AdapterModule):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(size))

    def forward(self, base_module: nn.Linear, x: Tensor) -> Tensor:
        return base_module(x) + self.shift


class Marker(Callback):
    def __init__(self, name: str) -> None:
        self.name = name


def inject_shift(model: nn.Module, config: ShiftConfig, name: str) -> None:
    for target in find_targets(model, config.target_modules):
        wrap(model, target, name, Shift(base.unwrap(model.get_submodule(target)).out_features))


@pytest.fixture
def shift_method() -> Iterator[base.Method]:
    record = register_peft_method(
        "shift",
        ShiftConfig,
        inject_shift,
        mergeable=False,
        not_mergeable_reason="a toy that does not merge",
        callbacks=lambda model, name, config: [Marker(name)],
        no_hf_export_reason="a toy has no Hugging Face form",
        keep_best=False,
    )
    try:
        yield record
    finally:
        del base.METHODS["shift"]


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny-decoder")).eval()


def test_method_names_follow_the_registry() -> None:
    names = peft.method_names()
    assert names == list(peft.METHODS)
    assert {"lora", "adalora", "adapter", "prefix", "prompt", "ptuning", "ia3", "bitfit"} <= set(names)
    for name in names:
        record = peft.get_method(name)
        assert record.name == name
        assert record.config_class().method == name
        assert record.mergeable != bool(record.not_mergeable_reason)
        assert (record.hf_export is None) == bool(record.no_hf_export_reason)


def test_every_method_module_is_discovered() -> None:
    """Each module of lmforge.peft that registers a method is imported by the package itself."""
    registering = {
        f"lmforge.peft.{info.name}"
        for info in pkgutil.iter_modules(peft.__path__)
        if re.search(r"^register_peft_method\(", Path(peft.__path__[0], f"{info.name}.py").read_text(), re.M)
    }
    assert registering, "no method module found"
    assert registering == {record.config_class.__module__ for record in peft.METHODS.values()}


def test_unknown_method_is_named() -> None:
    with pytest.raises(LMForgeError, match="unknown PEFT method 'ia4' \\(did you mean 'ia3'"):
        peft.get_method("ia4")


def test_records_hold_the_method_knowledge() -> None:
    assert peft.get_method("adalora").keep_best is False
    assert peft.get_method("lora").keep_best is True
    assert "nonlinearity" in peft.get_method("adapter").not_mergeable_reason
    m = model()
    peft.apply(m, "adalora", init_r=4, target_r=2)
    assert [type(c).__name__ for c in peft.training_callbacks(m)] == ["AdaLoraCallback"]
    peft.apply(m, "lora", adapter_name="plain")
    assert peft.training_callbacks(m) == []


def test_a_new_method_works_everywhere_from_its_record(shift_method: base.Method, tmp_path: Path) -> None:
    assert "shift" in peft.method_names()
    m = model()
    ids = torch.randint(1, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    before = m(ids).logits
    peft.apply(m, "shift")
    torch.testing.assert_close(m(ids).logits, before)  # a no-op at step 0
    assert set(n for n, p in m.named_parameters() if p.requires_grad) == set(
        base.adapter_parameters(m, "default")
    )
    callbacks = peft.training_callbacks(m)
    assert [type(c) for c in callbacks] == [Marker] and callbacks[0].name == "default"
    with pytest.raises(LMForgeError, match="cannot merge adapter 'default': a toy that does not merge"):
        peft.merge(m)
    from lmforge.peft.hf_export import export_hf_peft

    with pytest.raises(LMForgeError, match="Hugging Face PEFT format .*: a toy has no Hugging Face form"):
        export_hf_peft(m, tmp_path / "hf")
    peft.save_adapter(m, tmp_path / "adapter")
    fresh = model()
    peft.load_adapter(fresh, tmp_path / "adapter")
    assert peft.peft_configs(fresh)["default"].method == "shift"


def test_registration_mistakes_are_refused(shift_method: base.Method) -> None:
    with pytest.raises(LMForgeError, match="'shift' is already registered"):
        register_peft_method("shift", ShiftConfig, inject_shift, mergeable=True, no_hf_export_reason="-")
    with pytest.raises(LMForgeError, match="ShiftConfig.method is 'shift', registered as 'other'"):
        register_peft_method("other", ShiftConfig, inject_shift, mergeable=True, no_hf_export_reason="-")
    other = dataclasses.make_dataclass(
        "OtherConfig", [("method", str, dataclasses.field(default="other"))], bases=(PeftConfig,)
    )
    with pytest.raises(LMForgeError, match="not_mergeable_reason exactly when it cannot merge"):
        register_peft_method("other", other, inject_shift, mergeable=False, no_hf_export_reason="-")
    with pytest.raises(LMForgeError, match="either hf_export or no_hf_export_reason"):
        register_peft_method("other", other, inject_shift, mergeable=True)
    assert "other" not in peft.METHODS


def test_hf_export_names_no_method() -> None:
    """The shared export machinery knows no method: each brings its part in its record."""
    source = Path(importlib.import_module("lmforge.peft.hf_export").__file__).read_text()
    for record in peft.METHODS.values():
        module = record.config_class.__module__.rsplit(".", 1)[-1]
        assert record.config_class.__name__ not in source
        assert f"from .{module} import" not in source
        assert f'"{record.name}"' not in source and f"'{record.name}'" not in source


def test_finetune_method_choices_come_from_the_registry() -> None:
    assert typing.get_args(MethodName) == ("full", *peft.method_names())


def test_command_help_lists_the_registered_methods() -> None:
    from lmforge.commands.convert import convert
    from lmforge.commands.merge import merge

    def listed(doc: str | None, before: str) -> set[str]:
        match = re.search(re.escape(before) + r"\s+\(([^)]*)\)", doc or "")
        assert match, before
        return set(match.group(1).split(", "))

    records = [peft.get_method(name) for name in peft.method_names()]
    assert listed(merge.__doc__, "be merged") == {r.name for r in records if r.mergeable}
    assert listed(merge.__doc__, "the others") == {r.name for r in records if not r.mergeable}
    assert listed(convert.__doc__, "exports a PEFT run") == {r.name for r in records if r.hf_export}
