"""The one training loop: learning, exact resume, atomic checkpoints, accumulation, schedules,
decay groups, NaN detection, early stopping, callbacks and loggers.

Batches come from a small resumable source of random windows over a fixed token sequence and a
next-token objective written here, so the loop is tested on its own (the real objectives and
samplers have their own tests and are used by tests/test_pretrain_cli.py).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmforge
import lmforge.files
from lmforge import LMForgeError, ModelConfig, Transformer
from lmforge.training import (
    Callback,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    latest_checkpoint,
    list_checkpoints,
    lr_at,
    param_groups,
    seed_everything,
)
from lmforge.training import checkpoint as checkpoint_module

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Out:
    loss_sum: torch.Tensor
    num_targets: torch.Tensor
    metrics: dict[str, float]


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> Out:
    loss_sum = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
    )
    n = (labels != -100).sum()
    return Out(loss_sum, n, {"accuracy": float((logits.argmax(-1) == labels).sum() / n.clamp(min=1))})


def next_token(model: torch.nn.Module, batch: dict) -> Out:
    """Labels are the next tokens already (set by the source)."""
    return token_loss(
        model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )


def masked_tokens(model: torch.nn.Module, batch: dict) -> Out:
    """Encoder: predict the tokens hidden behind mask id 1 (labels -100 elsewhere)."""
    return token_loss(
        model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )


def copy_sequence(model: torch.nn.Module, batch: dict) -> Out:
    """Encoder-decoder: reproduce the input on the decoder side (teacher forcing)."""
    logits = model(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
    ).logits
    return token_loss(logits, batch["labels"])


CORPUS = torch.tensor([(i * 7 + (i // 5) * 3) % 29 + 3 for i in range(4000)])  # a learnable pattern


class Windows:
    """Random windows over CORPUS, resumable: its generator state is its position."""

    def __init__(self, *, batch_size: int = 4, seq_len: int = 16, seed: int = 0, kind: str = "clm") -> None:
        self.batch_size, self.seq_len, self.kind = batch_size, seq_len, kind
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Windows:
        return self

    def __next__(self) -> dict:
        starts = torch.randint(
            0, len(CORPUS) - self.seq_len - 1, (self.batch_size,), generator=self.generator
        )
        rows = torch.stack([CORPUS[s : s + self.seq_len + 1] for s in starts.tolist()])
        ids = rows[:, :-1]
        mask = torch.ones_like(ids, dtype=torch.bool)
        if self.kind == "clm":
            return {"input_ids": ids, "attention_mask": mask, "labels": rows[:, 1:].clone()}
        if self.kind == "mlm":
            chosen = torch.rand(ids.shape, generator=self.generator) < 0.25
            return {
                "input_ids": ids.masked_fill(chosen, 1),
                "attention_mask": mask,
                "labels": ids.masked_fill(~chosen, -100),
            }
        decoder_input = torch.cat([torch.full((ids.shape[0], 1), 2), ids[:, :-1]], dim=1)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "decoder_input_ids": decoder_input,
            "decoder_attention_mask": mask,
            "labels": ids.clone(),
        }

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def val_batches(kind: str = "clm", n: int = 3) -> list[dict]:
    source = Windows(seed=99, kind=kind)
    return [next(source) for _ in range(n)]


def tiny(preset: str = "tiny-decoder", **overrides) -> Transformer:
    return Transformer(ModelConfig.from_name(preset, **overrides))


def quiet(**overrides) -> TrainConfig:
    base = dict(
        max_steps=8, lr=3e-3, warmup_steps=2, eval_every=0, save_every=0, progress=False, device="cpu"
    )
    return TrainConfig(**{**base, **overrides})


class Recorder(Callback):
    """Records the hooks called and every step's loss."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.losses: dict[int, float] = {}

    def on_train_begin(self, trainer):
        self.calls.append("train_begin")

    def on_step_end(self, trainer, metrics):
        self.calls.append(f"step_end:{trainer.state.step}")
        self.losses[trainer.state.step] = metrics["loss"]
        metrics["lr_of_group_0"] = trainer.optimizer.param_groups[0]["lr"]  # a callback adds a metric

    def on_evaluate(self, trainer, metrics):
        self.calls.append(f"evaluate:{trainer.state.step}")

    def on_save(self, trainer, path):
        self.calls.append(f"save:{trainer.state.step}")

    def on_train_end(self, trainer):
        self.calls.append("train_end")


# ---- learning ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "kind", "objective"),
    [
        ("tiny-decoder", "clm", next_token),
        ("tiny-encoder", "mlm", masked_tokens),
        ("tiny-encoder-decoder", "copy", copy_sequence),
    ],
)
def test_each_architecture_lowers_the_loss(preset, kind, objective) -> None:
    seed_everything(0)
    trainer = Trainer(
        tiny(preset),
        objective,
        Windows(kind=kind),
        config=quiet(max_steps=40, eval_every=40),
        eval_data=val_batches(kind),
    )
    before = trainer.evaluate()["eval_loss"]
    state = trainer.fit()
    assert state.step == 40
    assert state.evals[-1]["eval_loss"] < 0.8 * before, (before, state.evals)
    assert "eval_accuracy" in state.evals[-1]


def test_bf16_autocast_trains_on_cpu() -> None:
    seed_everything(0)
    trainer = Trainer(
        tiny(), next_token, Windows(), config=quiet(max_steps=30, precision="bf16"), eval_data=val_batches()
    )
    before = trainer.evaluate()["eval_loss"]
    assert trainer.fit().evals[-1]["eval_loss"] < 0.8 * before
    assert trainer.model.tok_embed.weight.dtype == torch.float32  # weights stay fp32; matmuls run in bf16


def test_activation_checkpointing_gives_the_same_losses() -> None:
    losses = []
    for checkpointing in (False, True):
        seed_everything(0)
        recorder = Recorder()
        trainer = Trainer(
            tiny(),
            next_token,
            Windows(),
            config=quiet(max_steps=4, activation_checkpointing=checkpointing),
            callbacks=[recorder],
        )
        trainer.fit()
        assert trainer.model.decoder.activation_checkpointing is checkpointing
        losses.append(list(recorder.losses.values()))
    torch.testing.assert_close(losses[0], losses[1])


# ---- exact resume and checkpoints -----------------------------------------------------------------


def run(
    tmp: Path | None, *, steps: int, resume: bool = False, callbacks=(), **config
) -> tuple[Trainer, Recorder]:
    seed_everything(0)
    model = tiny(dropout=0.1)  # dropout: resume must restore the torch RNG too
    recorder = Recorder()
    trainer = Trainer(
        model,
        next_token,
        Windows(),
        config=quiet(max_steps=steps, grad_accum=2, eval_every=3, **config),
        eval_data=val_batches(),
        callbacks=[recorder, *callbacks],
        run_dir=tmp,
    )
    if resume:
        trainer.resume()
    trainer.fit()
    return trainer, recorder


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path: Path) -> None:
    full, full_losses = run(tmp_path / "full", steps=10)
    # Stop at step 6 (a checkpoint), then resume in a fresh model, optimizer and data source.
    run(tmp_path / "split", steps=10, max_minutes=None, save_every=6, callbacks=[StopAt(6)])
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step-00000006"]
    resumed, resumed_losses = run(tmp_path / "split", steps=10, resume=True)
    assert list(resumed_losses.losses) == [7, 8, 9, 10]
    assert [resumed_losses.losses[s] for s in range(7, 11)] == [full_losses.losses[s] for s in range(7, 11)]
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # metrics.jsonl reads as one run: every step logged once, in order.
    steps = [
        r["step"]
        for r in map(json.loads, (tmp_path / "split" / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 10


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, metrics):
        if trainer.state.step == self.step:
            trainer.state.should_stop = True


class CtrlCAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, metrics):
        if trainer.state.step == self.step:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C sends


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path: Path) -> None:
    _, full = run(tmp_path / "full", steps=8)
    interrupted, _ = run(tmp_path / "run", steps=8, callbacks=[CtrlCAt(5)])
    assert interrupted.state.interrupted and interrupted.state.step == 5
    assert latest_checkpoint(tmp_path / "run").name == "step-00000005"
    _, resumed = run(tmp_path / "run", steps=8, resume=True)
    assert [resumed.losses[s] for s in (6, 7, 8)] == [full.losses[s] for s in (6, 7, 8)]


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    trainer, _ = run(tmp_path, steps=4, save_every=2)
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    original = torch.save

    def dies_midway(obj, path):
        original(obj, path)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # torn file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_midway)
    trainer.config.max_steps = 6
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    loaded = lmforge.load(tmp_path)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["step"] == 4


def test_a_killed_writer_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    """A real process killed (SIGKILL) in the middle of writing its second checkpoint."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO / "tests")!r})
        import torch
        import test_training as t
        from lmforge.training import checkpoint
        original = torch.save
        calls = []
        def save_then_die(obj, path):
            calls.append(path)
            original(obj, path)
            if len(calls) == 2:  # second checkpoint: optimizer file half written, then killed
                Path(path).write_bytes(Path(path).read_bytes()[:64])
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.torch.save = save_then_die
        t.run(Path({str(tmp_path)!r}), steps=4, save_every=2)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]
    assert any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())  # the torn one
    loaded = lmforge.load(tmp_path)
    assert loaded.model.config.arch == "decoder"
    # And the run resumes from it: same losses as a run that never died.
    _, full = run(tmp_path / "full", steps=4)
    _, resumed = run(tmp_path, steps=4, resume=True, save_every=2)
    assert [resumed.losses[s] for s in (3, 4)] == [full.losses[s] for s in (3, 4)]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004"]


def test_tied_weights_are_saved_once_and_retied(tmp_path: Path) -> None:
    model = tiny()
    assert model.head.proj.weight is model.tok_embed.weight
    path = lmforge.files.save_weights(model, tmp_path / "w.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert "head.proj.weight" not in f.keys() and "tok_embed.weight" in f.keys()  # noqa: SIM118
    fresh = tiny()
    lmforge.files.load_weights(fresh, path)
    assert fresh.head.proj.weight is fresh.tok_embed.weight
    assert torch.equal(fresh.tok_embed.weight, model.tok_embed.weight)


# ---- accumulation, schedules, decay groups --------------------------------------------------------


class Fixed:
    """Yields the given batches in order, forever."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches


class Gradients(Callback):
    """Keeps the gradients of the last step (the loop leaves them in .grad for callbacks)."""

    def on_step_end(self, trainer, metrics):
        self.grads = [p.grad.clone() for p in trainer.model.parameters()]


def test_gradient_accumulation_equals_one_large_batch() -> None:
    big = next(Windows(batch_size=8, seed=5))
    big["labels"][:3, :11] = -100  # micro-batches with very different numbers of targets
    big["labels"][6, 4:] = -100
    results = []
    for batch_size, accum in ((8, 1), (2, 4)):
        torch.manual_seed(3)
        model = tiny()
        micro = [{k: v[i : i + batch_size] for k, v in big.items()} for i in range(0, 8, batch_size)]
        grads = Gradients()
        trainer = Trainer(
            model,
            next_token,
            Fixed(micro),
            config=quiet(max_steps=1, grad_accum=accum, batch_size=batch_size, grad_clip=None),
            callbacks=[grads],
        )
        trainer.fit()
        results.append((trainer.state.last_loss, grads.grads))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_schedule_shapes(schedule: str) -> None:
    config = TrainConfig(
        max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, schedule=schedule, decay_fraction=0.2
    )
    lrs = [lr_at(step, config) for step in range(100)]
    assert lrs[:10] == sorted(lrs[:10]) and lrs[0] < 0.2 and lrs[9] < 1.0  # linear warmup
    assert lrs[10] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(lrs[10:], lrs[11:], strict=False))  # never rises after warmup
    if schedule == "constant":
        assert lrs[-1] == 1.0
        return
    assert lrs[-1] == pytest.approx(0.1)
    middle = lrs[55]
    if schedule == "cosine":
        assert middle == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))
    elif schedule == "linear":
        assert middle == pytest.approx(1.0 - 0.9 * 45 / 89)
    else:  # wsd: flat until the last 20 steps, then 1 - sqrt decay
        assert lrs[79] == 1.0 and lrs[80] == 1.0 and lrs[81] < 1.0
        assert lrs[90] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(10 / 19)))


def test_decay_groups_cover_trainable_weights_once() -> None:
    model = tiny()
    model.decoder.layers[0].requires_grad_(False)  # as PEFT freezes the base
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids))  # the tied embedding/head weight appears once
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable and len(trainable) < len(list(model.parameters()))
    assert id(model.tok_embed.weight) in {id(p) for p in decay["params"]}


# ---- failures, stopping, callbacks, logging ---------------------------------------------------------


def test_nan_loss_is_reported_with_its_step_and_never_trained_on() -> None:
    def poisoned(model, batch):
        out = next_token(model, batch)
        if poisoned.calls == 5:  # step 3, micro-batch 1
            out.loss_sum = out.loss_sum * float("nan")
        poisoned.calls += 1
        return out

    poisoned.calls = 0
    recorder = Recorder()
    trainer = Trainer(
        tiny(), poisoned, Windows(), config=quiet(max_steps=5, grad_accum=2), callbacks=[recorder]
    )
    weights = {}

    class Snapshot(Callback):
        def on_step_end(self, trainer, metrics):
            weights.update({k: v.clone() for k, v in trainer.model.state_dict().items()})

    trainer.callbacks.append(Snapshot())
    with pytest.raises(
        TrainingDiverged, match=r"the loss is nan at step 3 \(micro-batch 2 of 2\).*lower --train.lr"
    ):
        trainer.fit()
    assert trainer.state.step == 2 and recorder.calls[-1] == "train_end"
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, weights[key])  # the NaN never reached the weights


def test_early_stopping_stops_after_patience_evaluations() -> None:
    def flat_in_eval(model, batch):
        out = next_token(model, batch)
        if not model.training:  # a validation loss that never improves
            out.loss_sum = out.num_targets.float() * 2.0
        return out

    trainer = Trainer(
        tiny(),
        flat_in_eval,
        Windows(),
        config=quiet(max_steps=100, eval_every=2, early_stopping_patience=3),
        eval_data=val_batches(),
    )
    state = trainer.fit()
    assert state.step == 8  # evaluations at 2 (best), 4, 6, 8: three without improvement
    assert "early stopping" in state.stop_reason


def test_callbacks_are_called_in_order_and_can_log_metrics(tmp_path: Path) -> None:
    recorder = Recorder()
    trainer = Trainer(
        tiny(),
        next_token,
        Windows(),
        config=quiet(max_steps=4, eval_every=2, save_every=4, log_every=1),
        eval_data=val_batches(),
        callbacks=[recorder],
        run_dir=tmp_path,
    )
    trainer.fit()
    assert recorder.calls == [
        "train_begin",
        "step_end:1",
        "step_end:2",
        "evaluate:2",
        "step_end:3",
        "step_end:4",
        "evaluate:4",
        "save:4",
        "train_end",
    ]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert all("lr_of_group_0" in r and "grad_norm" in r for r in train_records)
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]


def test_tensorboard_files_when_asked(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    Trainer(
        tiny(), next_token, Windows(), config=quiet(max_steps=2, tensorboard=True), run_dir=tmp_path
    ).fit()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "metrics.jsonl").is_file()


def test_wandb_without_the_package_is_a_clear_error(tmp_path: Path) -> None:
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed: the missing-package error cannot be shown")
    except ImportError:
        pass
    with pytest.raises(LMForgeError, match="pip install wandb"):
        Trainer(tiny(), next_token, Windows(), config=quiet(wandb=True), run_dir=tmp_path)


def test_time_limit_stops_with_a_checkpoint(tmp_path: Path) -> None:
    state = Trainer(
        tiny(), next_token, Windows(), config=quiet(max_steps=10_000, max_minutes=0.02), run_dir=tmp_path
    ).fit()
    assert 0 < state.step < 10_000 and "time limit" in state.stop_reason
    assert latest_checkpoint(tmp_path).name == f"step-{state.step:08d}"


def test_bad_train_config_names_the_key() -> None:
    with pytest.raises(LMForgeError, match="key 'grad_accum'"):
        TrainConfig(grad_accum=0)
    with pytest.raises(LMForgeError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    assert TrainConfig(lr=1e-3).final_lr == pytest.approx(1e-4)


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one() -> None:
    losses = []
    for compiled in (False, True):
        seed_everything(0)
        recorder = Recorder()
        Trainer(
            tiny(), next_token, Windows(), config=quiet(max_steps=5, compile=compiled), callbacks=[recorder]
        ).fit()
        losses.append(list(recorder.losses.values()))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)


class TermAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, metrics):
        if trainer.state.step == self.step:
            signal.raise_signal(signal.SIGTERM)  # what Docker, Kubernetes, Slurm and systemd send


def test_sigterm_saves_a_checkpoint_like_ctrl_c_and_exits_143(tmp_path: Path) -> None:
    _, full = run(tmp_path / "full", steps=8)
    stopped, _ = run(tmp_path / "run", steps=8, callbacks=[TermAt(3)])
    state = stopped.state
    assert state.interrupted and state.step == 3 and state.stopped_by == "SIGTERM" and state.exit_code == 143
    assert latest_checkpoint(tmp_path / "run").name == "step-00000003"
    _, resumed = run(tmp_path / "run", steps=8, resume=True)
    assert [resumed.losses[s] for s in range(4, 9)] == [full.losses[s] for s in range(4, 9)]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_leftovers_of_a_killed_process_are_removed_on_the_next_start(tmp_path: Path) -> None:
    dead = 2**22 + 12345  # above the kernel's default pid_max: no such process
    stale_checkpoint = tmp_path / "checkpoints" / f".tmp-step-00000003-{dead}"
    stale_checkpoint.mkdir(parents=True)
    (stale_checkpoint / "model.safetensors").write_bytes(b"half")
    stale_file = tmp_path / f".trainer_state.json.tmp-{dead}"
    stale_file.write_text("{")
    live = tmp_path / "checkpoints" / f".tmp-step-00000004-{os.getpid()}"  # ours: not a leftover
    live.mkdir()
    run(tmp_path, steps=2)
    assert not stale_checkpoint.exists() and not stale_file.exists() and live.exists()


def test_a_time_budget_shrinks_the_plan_to_what_fits_and_ends_it_properly(tmp_path: Path) -> None:
    from lmforge.training import TimeBudget

    def slow_next_token(model, batch):  # each step takes at least 20 ms
        time.sleep(0.02)
        return next_token(model, batch)

    seed_everything(0)
    budget = TimeBudget(0.01, check_after=3)  # 0.6 s of training for a plan of 1000 steps
    trainer = Trainer(tiny(), slow_next_token, Windows(), config=quiet(max_steps=1000, eval_every=0),
                      eval_data=val_batches(), callbacks=[budget], run_dir=tmp_path)  # fmt: skip
    state = trainer.fit()
    assert budget.adjusted_to is not None and 3 <= budget.adjusted_to < 40
    assert state.step == budget.adjusted_to == trainer.config.max_steps  # ended at its (new) last step
    assert "time limit" not in state.stop_reason and state.evals  # with its final evaluation
