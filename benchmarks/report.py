"""A run's JSON as Markdown for RESULTS.md, with the issue's targets beside the same-run figures:

    /opt/mep/venv/bin/python -m benchmarks.report benchmarks/results/<run>.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = tuple[str, str, str]

# (figure, target text, where the same-run figure is, whether it meets the target)
TARGETS: list[tuple[str, str, Callable[[dict], float], Callable[[float], bool], str]] = [
    ("no-op throughput, 2 workers, mep / HTEX", ">= 3x",
     lambda s: s["throughput"]["by_workers"]["2"]["ratios"]["mep/htex"], lambda v: v >= 3.0, "{:.2f}x"),
    ("round trip median, mep / HTEX", "<= 1.0x",
     lambda s: s["roundtrip"]["ratios"]["mep/htex"], lambda v: v <= 1.0, "{:.2f}x"),
    ("100 KiB arguments, tasks/s, mep / HTEX", ">= 1.5x",
     lambda s: s["payloads"]["sizes"]["100 KiB"]["to_worker"]["ratio_mep/htex"], lambda v: v >= 1.5, "{:.2f}x"),
    ("5 MiB arguments, tasks/s, mep / HTEX", ">= 1.5x",
     lambda s: s["payloads"]["sizes"]["5 MiB"]["to_worker"]["ratio_mep/htex"], lambda v: v >= 1.5, "{:.2f}x"),
    ("mep htex engine / bare HTEX, throughput, 2 workers", ">= 0.9x",
     lambda s: s["throughput"]["by_workers"]["2"]["ratios"]["mep_htex_engine/htex"], lambda v: v >= 0.9, "{:.2f}x"),
    ("cold start, first task of an idle identity -> result", "<= 75 ms",
     lambda s: s["cold_start"]["total_ms"]["median"], lambda v: v <= 75.0, "{:.0f} ms"),
    ("idle user endpoint tree PSS", "<= 25 MiB",
     lambda s: s["users"]["endpoint_tree_pss_mib"]["median"], lambda v: v <= 25.0, "{:.1f} MiB"),
]


def target_rows(sections: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, target, measured, met) for each target whose section is in the run."""
    rows = []
    for figure, wanted, find, meets, fmt in TARGETS:
        try:
            value = find(sections)
        except KeyError:
            continue  # that section was not run
        rows.append((figure, wanted, fmt.format(value), "yes" if meets(value) else "no"))
    return rows


def _markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    def cell(text: str) -> str:
        nested = text.startswith(" ") and bool(text.strip())  # a breakdown row under the row above it
        return ("↳ " if nested else "") + (text.replace("|", "\\|").strip() or " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(text) for text in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(report: dict[str, Any], tables: dict[str, Callable[[dict], list[Row]]]) -> str:
    meta, sections = report["meta"], report["sections"]
    machine = meta["machine"]
    load = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    parts = [
        f"- started {meta['started']}, took {meta['elapsed_s'] / 60:.1f} min{' (quick run)' if meta['quick'] else ''}",
        f"- machine: {machine['hostname']}, {machine['cpus']} CPUs ({machine['cpu_model']}), "
        f"{machine['memory_gib']} GiB, Linux {machine['kernel']}, Python {machine['python']}",
        f"- versions: {versions}",
        f"- load average (1, 5, 15 min): {load(meta['load_average_start'])} at start, "
        f"{load(meta['load_average_end'])} at end",
        "",
        "### Targets (same-run ratios)",
        "",
        _markdown_table(("figure", "target", "measured", "met"), target_rows(sections)),
        "",
        "### All figures",
        "",
    ]
    rows = [row for name in sections if name in tables for row in tables[name](sections[name])]
    parts.append(_markdown_table(("measurement", "median", "detail"), rows))
    return "\n".join(parts) + "\n"


def main() -> int:
    from benchmarks.suite import TABLES

    report = json.loads(Path(sys.argv[1]).read_text())
    print(markdown(report, TABLES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
