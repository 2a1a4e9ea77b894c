"""Supervised fine-tuning through a chat template: messages rows, or prompt/target rendered as a
user turn and the assistant's answer; the loss counts the assistant turns only; the answer is
generated up to the end of the turn. On a tiny decoder, end to end (train, save, load, predict)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge import LMForgeError, ModelConfig, Transformer
from lmforge.objectives.base import IGNORE_INDEX
from lmforge.pipeline.evaluation import load_task_run, predict
from lmforge.pipeline.finetuning import DataSpec, finetune_run
from lmforge.tasks import SFTOptions, SFTTask
from lmforge.tasks.data import Row
from lmforge.tokenizers import Tokenizer
from lmforge.training import TrainConfig

INTENTS = {"what time is it": "time", "set an alarm": "alarm", "play some music": "music", "how is the weather": "weather"}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [f"{q} {a} system user assistant You sort requests into intents." for q, a in INTENTS.items()] * 20
    tok = Tokenizer.train(iter(texts), kind="bpe", vocab_size=300, show_progress=False)
    tok.backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return Tokenizer(tok.backend, {"bos": "[BOS]", "eos": "[EOS]", "pad": "[PAD]"}, chat_template=None)


def task(tokenizer: Tokenizer, **options) -> SFTTask:
    return SFTTask(SFTOptions(chat=True, chat_template="chatml", max_length=64, **options), tokenizer)


def test_only_the_assistant_turn_is_learned(tokenizer: Tokenizer) -> None:
    sft = task(tokenizer, system="You sort requests into intents.")
    (example,) = sft.parse(Row({"source": "set an alarm", "target": "alarm"}, Path("x"), 1))
    (feature,) = sft.encode([example])
    ids, labels = feature["input_ids"], feature["labels"]
    learned = [ids[i + 1] for i, label in enumerate(labels) if label != IGNORE_INDEX]  # labels are shifted
    assert tokenizer.decode(learned, skip_special_tokens=False).strip() == "alarm<|im_end|>"
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou sort requests into intents.<|im_end|>")


def test_a_messages_row_keeps_its_own_conversation(tokenizer: Tokenizer) -> None:
    sft = task(tokenizer)
    messages = [{"role": "user", "content": "play some music"}, {"role": "assistant", "content": "music"},
                {"role": "user", "content": "what time is it"}, {"role": "assistant", "content": "time"}]  # fmt: skip
    (example,) = sft.parse(Row({"messages": messages}, Path("x"), 1))
    assert example.response == "time"
    (feature,) = sft.encode([example])
    learned = [feature["input_ids"][i + 1] for i, label in enumerate(feature["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned, skip_special_tokens=False).replace(" ", "").count("<|im_end|>") == 2
    with pytest.raises(Exception, match="turn 1 of 'messages' needs a role"):
        sft.parse(Row({"messages": [{"speaker": "me"}]}, Path("x"), 1))


def test_chat_sft_learns_saves_and_answers(tokenizer: Tokenizer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-llama", vocab_size=tokenizer.vocab_size))
    base = lmforge.save_run(tmp_path / "base", model=model, tokenizer=tokenizer)
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"source": q, "target": a} for q, a in INTENTS.items()]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 16))
    (data / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = finetune_run(
        model=base, data=DataSpec(data), task_name="sft", method="full",
        options={"chat": True, "chat_template": "chatml", "system": "Intent?", "max_target_length": 8},
        train=TrainConfig(max_steps=120, batch_size=8, lr=5e-3, warmup_steps=5, eval_every=60, progress=False),
        out=tmp_path / "run",
    )  # fmt: skip
    assert result.summary["validation"]["loss"] < 0.5
    loaded = load_task_run(tmp_path / "run")
    answers = predict(loaded, [{"source": q} for q in INTENTS])
    assert [a["prediction"] for a in answers] == list(INTENTS.values())  # stopped at the end of the turn


def test_chat_mode_needs_a_template(tokenizer: Tokenizer) -> None:
    with pytest.raises(LMForgeError, match="chat template"):
        SFTTask(SFTOptions(chat=True), tokenizer)
