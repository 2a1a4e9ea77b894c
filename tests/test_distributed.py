"""Several processes, one loop: real torchrun jobs of 2 processes on this machine (gloo, CPU).

Each job is checked against one process doing the same work: 2 ranks × batch b train on the
rows one process with batch 2b draws, so the losses step by step and the final weights agree to
float rounding (atol 2e-5: the order of the sums differs, nothing else). Dropout is off, since
each process draws its own masks."""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import tiny_base

import lmforge
from lmforge.commands.launch import without_nproc
from lmforge.data.python_docs import python_docs_corpus
from lmforge.tokenizers import Tokenizer

ATOL = 2e-5
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available in this build",
)


def lmforge_cli(args: list[object], *, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """``lmforge ARGS`` in a fresh process, or as a torchrun job of ``nproc`` processes."""
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    )
    command = [sys.executable, *launcher, "-m", "lmforge", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def steps(run: Path) -> dict[int, dict]:
    """metrics.jsonl's training lines by step; every line whole JSON, each step written once."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # an interleaved or half line fails here
    train = [r for r in records if "loss" in r]
    assert len({r["step"] for r in train}) == len(train), "a step logged twice: two writers"
    return {r["step"]: r for r in train}


def same_losses(a: Path, b: Path, *, padded: bool = False) -> None:
    """The same loss at every step (and the same input tokens, unless batches are padded: each
    rank pads its slice to its own longest row)."""
    first, second = steps(a), steps(b)
    assert first.keys() == second.keys() and len(first) >= 10
    # Padded slices are matmuls of other shapes than the one big batch: other rounding, which
    # Adam carries from step to step (about 1e-5 by step 16 of a full fine-tune, see finetune_args).
    atol = 1e-4 if padded else ATOL
    for step in first:
        assert first[step]["loss"] == pytest.approx(second[step]["loss"], abs=atol), step
        assert padded or first[step]["tokens"] == second[step]["tokens"]


def same_weights(a: Path, b: Path, name: str = "model.safetensors") -> None:
    first, second = load_file(str(a / name)), load_file(str(b / name))
    assert first.keys() == second.keys()
    for key in first:
        if key.endswith("k_proj.bias"):  # its gradient is 0 in exact arithmetic (softmax ignores a
            continue  # shift shared by all keys): AdamW turns the rounding noise into updates
        torch.testing.assert_close(first[key], second[key], atol=ATOL, rtol=0, msg=key)


def no_leftovers(run: Path) -> None:
    hidden = [p.name for p in run.rglob(".*") if p.name != ".metadata"]  # DCP's own index
    assert not hidden, f"half-written files left behind: {hidden}"


# ---- pretraining ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n\n".join(python_docs_corpus(max_bytes=60_000)), encoding="utf-8")
    return path


def pretrain_args(
    text: Path, out: Path, *, batch: int, steps: int = 20, save_every: int = 10
) -> list[object]:
    return [
        "pretrain", "--data.path", text, "--data.documents", "blank_line", "--data.seq_len", 32,
        "--model.preset", "tiny-decoder", "--model.dropout", 0, "--tokenizer.kind", "char",
        "--train.batch_size", batch, "--train.max_steps", steps, "--train.lr", 3e-3,
        "--train.warmup_steps", 5, "--train.eval_every", 10, "--train.eval_batches", 4,
        "--train.save_every", save_every, "--train.log_every", 1, "--train.progress", "false", "--out", out,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def alone(text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, batch 8: the reference every job of 2 × 4 is held to."""
    out = tmp_path_factory.mktemp("alone") / "run"
    ok(lmforge_cli(pretrain_args(text, out, batch=8)))
    return out


def test_ddp_pretraining_gives_the_numbers_of_one_process(alone: Path, text: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    # --nproc 2 relaunches the command under torchrun (DDP: the strategy auto picks on a CPU)
    result = ok(lmforge_cli([*pretrain_args(text, out, batch=4), "--nproc", 2]))
    assert "on each of 2 processes" in result.stdout and result.stdout.count("pretrain: run directory") == 1
    same_losses(alone, out)
    same_weights(alone, out)
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    reference = [
        json.loads(x) for x in (alone / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x
    ]
    assert [e["eval_loss"] for e in evals] == pytest.approx([e["eval_loss"] for e in reference], abs=ATOL)
    no_leftovers(out)
    # its data position belongs to a job of 2: a single process refuses it in one line
    more = lmforge_cli([*pretrain_args(text, out, batch=4, steps=30), "--resume"])
    assert more.returncode == 2 and "saved by 2 process(es), this job has 1" in more.stderr


def test_fsdp_pretraining_gives_the_numbers_of_one_process(alone: Path, text: Path, tmp_path: Path) -> None:
    out = tmp_path / "fsdp"
    ok(lmforge_cli([*pretrain_args(text, out, batch=4), "--train.strategy", "fsdp"], nproc=2))
    same_losses(alone, out)
    same_weights(alone, out)  # consolidated into one model.safetensors at the end
    checkpoint = out / "checkpoints" / "step-00000020"
    assert (checkpoint / "sharded" / ".metadata").is_file() and (checkpoint / "trainer_state.json").is_file()
    no_leftovers(out)
    # a sharded checkpoint is read by lmforge.load when the whole weights are not there
    (out / "model.safetensors").unlink()
    loaded = lmforge.load(out).model.state_dict()
    reference = load_file(str(alone / "model.safetensors"))
    for key, tensor in reference.items():
        torch.testing.assert_close(loaded[key], tensor, atol=ATOL, rtol=0)
    more = lmforge_cli([*pretrain_args(text, out, batch=4, steps=30), "--resume"])
    assert more.returncode == 2 and "sharded (FSDP): resume it under torchrun" in more.stderr


def test_a_job_refuses_an_occupied_folder_on_every_rank_and_touches_nothing(
    text: Path, tmp_path: Path
) -> None:
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    result = lmforge_cli(pretrain_args(text, out, batch=4), nproc=2)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("lmforge: error: ")]
    # rank 0 decides and says why; rank 1 raises the same line (unless torchrun stopped it first)
    assert any(line.startswith("lmforge: error: [rank 0] ") for line in errors), result.stderr[-2000:]
    assert all("not empty" in line and "--overwrite" in line for line in errors), errors
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # nothing written, nothing removed


def test_fsdp_mixed_precision_trains_in_bf16_near_fp32(alone: Path, text: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    args = [*pretrain_args(text, out, batch=4), "--train.strategy", "fsdp", "--train.precision", "bf16"]
    ok(lmforge_cli(args, nproc=2))
    bf16, fp32 = steps(out), steps(alone)
    assert bf16[1]["loss"] != fp32[1]["loss"]  # computed in bf16 ...
    for step in fp32:  # ... and close to fp32 all the way (bf16 keeps 8 bits of mantissa)
        assert bf16[step]["loss"] == pytest.approx(fp32[step]["loss"], abs=0.05), step
    assert (
        load_file(str(out / "model.safetensors"))["tok_embed.weight"].dtype == torch.float32
    )  # fp32 masters


def rank_pid(parent: subprocess.Popen, rank: int) -> int | None:
    """The pid of the job's process of ``rank`` (a child of torchrun with RANK in its environment)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "status").read_text()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if ppid == parent.pid and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job's processes through /proc (Linux)")
def test_a_killed_rank_stops_the_job_and_resume_continues_exactly(text: Path, tmp_path: Path) -> None:
    args = [
        *pretrain_args(text, tmp_path / "killed", batch=4, steps=60, save_every=10),
        "--train.strategy",
        "fsdp",
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(
        [*launcher, "-m", "lmforge", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    first = tmp_path / "killed" / "checkpoints" / "step-00000010"
    deadline = time.monotonic() + 240
    while not first.is_dir() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    pid = rank_pid(job, 1)
    assert pid is not None and job.poll() is None, "the job ended before rank 1 could be killed"
    os.kill(pid, signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0
    message = [line for line in err.splitlines() if line.startswith("lmforge: error: [rank 0]")]
    assert message and "another process of this job stopped" in message[0], err[-3000:]
    assert "run the same command with --resume" in message[0]
    killed = tmp_path / "killed"
    last = sorted(p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith("."))[-1]
    assert f"the last checkpoint is step {int(last.removeprefix('step-'))}" in message[0]
    assert int(last.removeprefix("step-")) < 60
    lmforge.load(killed)  # the last checkpoint is whole

    ok(lmforge_cli([*args, "--resume"], nproc=2))
    straight = tmp_path / "straight"
    ok(
        lmforge_cli(
            [*pretrain_args(text, straight, batch=4, steps=60, save_every=10), "--train.strategy", "fsdp"],
            nproc=2,
        )
    )
    same_losses(straight, killed)  # metrics.jsonl: the lines after the checkpoint were replaced
    same_weights(straight, killed)
    no_leftovers(killed)


LOST_AT_THE_END = """
import os, signal, sys
import torch
import torch.nn.functional as F
from lmforge import ModelConfig, Transformer
from lmforge.training import Callback, TrainConfig, Trainer, distributed


class Out:
    def __init__(self, loss_sum, num_targets):
        self.loss_sum, self.num_targets, self.metrics = loss_sum, num_targets, {}


def objective(model, batch):
    logits = model(batch["input_ids"]).logits
    return Out(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum"),
               torch.tensor(batch["labels"].numel()))


def batches():
    generator = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, 32, (2, 9), generator=generator)
        yield {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


class DiesAtTheEnd(Callback):  # rank 1 crashes between its last step and the final gathering
    def on_train_end(self, trainer):
        if os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)


torch.manual_seed(0)
model = Transformer(ModelConfig.from_name("tiny-decoder", vocab_size=32, dropout=0.0))
config = TrainConfig(max_steps=4, batch_size=2, lr=1e-3, save_every=2, eval_every=0, progress=False,
                     device="cpu", strategy="fsdp", log_every=1000)
with distributed.job("cpu"):
    trainer = Trainer(model, objective, batches(), config=config, run_dir=sys.argv[1], callbacks=[DiesAtTheEnd()])
    try:
        trainer.fit()
    except distributed.PeerLost as err:
        print("LOST:", err, flush=True)
        sys.exit(2)
print("FINISHED", flush=True)
"""


def test_a_rank_lost_while_the_final_weights_are_gathered_is_one_line(tmp_path: Path) -> None:
    """The last collectives of an FSDP run (consolidating the shards after the last step) fail like
    a step's would: one line naming where, with the last checkpoint, never a traceback."""
    script = tmp_path / "job.py"
    script.write_text(LOST_AT_THE_END)
    with socket.socket() as probe:  # a free port for the rendezvous (two plain processes, no torchrun)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2"}  # fmt: skip
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "run")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in (0, 1)
    ]
    out, err = ranks[0].communicate(timeout=240)
    ranks[1].communicate(timeout=60)
    assert ranks[1].returncode == -signal.SIGKILL
    assert ranks[0].returncode == 2, out + err[-3000:]
    lost = next(line for line in out.splitlines() if line.startswith("LOST:"))
    assert "another process of this job stopped" in lost and "while gathering the final weights" in lost
    assert "the last checkpoint is step 4: run the same command with --resume" in lost
    assert "Traceback" not in err


def test_a_lost_peer_anywhere_in_a_job_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Outside the training loop too (a pipeline's final evaluation, say), a collective that fails
    because a peer is gone ends the rank with one line and exit status 2; other errors stay as
    they are."""
    from lmforge import cli
    from lmforge.commands import pretrain as demo  # `lmforge demo` is lmforge.commands.pretrain.demo

    def failing(message: str):
        @functools.wraps(demo.demo)
        def command(*args: object, **kwargs: object) -> None:
            raise RuntimeError(message)

        return command

    monkeypatch.setattr(cli, "world_size", lambda: 2)
    monkeypatch.setattr(cli, "rank", lambda: 0)
    gloo = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500"
    monkeypatch.setattr(demo, "demo", failing(gloo))
    assert cli.main(["demo"]) == 2
    assert capsys.readouterr().err == (
        "lmforge: error: [rank 0] another process of this job stopped (Connection closed by peer); "
        "run the same command with --resume to continue from the last checkpoint\n"
    )
    monkeypatch.setattr(demo, "demo", failing("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["demo"])
    monkeypatch.setattr(cli, "world_size", lambda: 1)  # alone, there is no peer to lose
    monkeypatch.setattr(demo, "demo", failing(gloo))
    with pytest.raises(RuntimeError, match="Connection closed"):
        cli.main(["demo"])


# ---- fine-tuning -----------------------------------------------------------------------------


WORDS = ["the", "a", "movie", "plot", "was", "is", "very", "and", "but", "it"]
CUES = {"good": "pos", "great": "pos", "bad": "neg", "awful": "neg"}


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Tokenizer]:
    root = tmp_path_factory.mktemp("reviews")
    rng = random.Random(0)
    for split, n in (("train", 128), ("validation", 32)):
        lines = []
        for _ in range(n):
            cue = rng.choice(list(CUES))
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))] + [cue]
            rng.shuffle(words)
            lines.append(json.dumps({"text": " ".join(words), "label": CUES[cue]}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "labels.txt").write_text("neg\npos\n", encoding="utf-8")
    tokenizer = Tokenizer.train(
        iter([" ".join(WORDS + list(CUES))] * 10), kind="wordpiece", vocab_size=60, show_progress=False
    )
    return root, tokenizer


def finetune_args(base: Path, data: Path, out: Path, *, batch: int, method: str) -> list[object]:
    args: list[object] = [
        "finetune", "--model", base, "--data", data, "--task", "classification", "--method", method,
        "--options.max_length", 16, "--train.batch_size", batch, "--train.max_steps", 16, "--train.lr", 5e-3,
        "--train.warmup_steps", 2, "--train.eval_every", 8, "--train.log_every", 1, "--train.save_every", 8,
        "--train.progress", "false", "--out", out,
        # AdamW divides each gradient by its own running size: with ε 1e-8 a gradient that is 0 in
        # exact arithmetic (k_proj's bias) or nearly so turns rounding noise into lr-sized steps,
        # and the two runs drift apart by step 13 (7.7e-5 here, 2.9e-4 on another CPU). ε 1e-6
        # leaves real gradients alone and keeps the drift at rounding size (1e-5 over 16 steps).
        "--train.eps", 1e-6,
    ]  # fmt: skip
    return args + (["--peft.r", 4, "--peft.target_modules", "all-linear"] if method == "lora" else [])


@pytest.mark.parametrize(
    ("preset", "method", "strategy"),
    [("tiny-encoder", "lora", "ddp"), ("tiny-decoder", "lora", "fsdp"), ("tiny-decoder", "full", "fsdp")],
)
def test_finetuning_a_job_gives_the_numbers_of_one_process(
    reviews: tuple[Path, Tokenizer], tmp_path: Path, preset: str, method: str, strategy: str
) -> None:
    data, tokenizer = reviews
    base = tiny_base(tmp_path / "base", preset, tokenizer)
    one, job = tmp_path / "one", tmp_path / "job"
    # One process and two ranks pad their batches differently (a rank's slice may need none); a
    # decoder's right-padded batches take the same native attention as unpadded ones, so both sides
    # run the same kernels and differ by the shapes' rounding only.
    ok(lmforge_cli(finetune_args(base, data, one, batch=8, method=method)))
    ok(
        lmforge_cli(
            [*finetune_args(base, data, job, batch=4, method=method), "--train.strategy", strategy], nproc=2
        )
    )
    same_losses(one, job, padded=True)
    weights = "adapter.safetensors" if method == "lora" else "model.safetensors"
    same_weights(one, job, weights)
    summaries = [json.loads((run / "finetune.json").read_text()) for run in (one, job)]
    assert summaries[0]["validation"] == pytest.approx(summaries[1]["validation"], abs=1e-4)
    no_leftovers(job)


def test_nproc_is_taken_out_of_the_command_torchrun_runs() -> None:
    argv = ["pretrain", "--nproc", "2", "--out", "x", "--nproc=3", "--train.max_steps", "4"]
    assert without_nproc(argv) == ["pretrain", "--out", "x", "--train.max_steps", "4"]
