"""The benchmark suite's CI smoke run: ``--quick`` (tiny counts, one trial) proves every section runs end
to end and writes sane JSON. No time is asserted: the numbers depend on the machine and its load."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.root  # the suite creates the accounts its tasks run as

REPOSITORY = Path(__file__).resolve().parents[1]
SECTIONS = ("throughput", "roundtrip", "cold_start", "users", "payloads", "slurm")


def numbers(value: Any, path: str = "") -> list[tuple[str, float]]:
    """Every number in the report, with where it is."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [(path, float(value))]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in numbers(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in numbers(item, f"{path}[{index}]")]
    return []


def test_quick_suite_writes_every_section_with_sane_numbers(tmp_path: Path, router_account: str) -> None:
    output = tmp_path / "quick.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--quick", "--output", str(output)],
                            cwd=REPOSITORY, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(output.read_text())
    sections = report["sections"]
    assert set(SECTIONS) <= set(sections), sorted(sections)
    for path, value in numbers(sections):
        assert math.isfinite(value) and value >= 0, f"{path} = {value}"

    for workers, block in sections["throughput"]["by_workers"].items():
        for name, row in block["rows"].items():
            assert row["tasks_per_s"]["median"] > 0, (workers, name)
    assert {"mep", "htex", "pool", "mep_single_user", "mep_htex_engine"} <= set(
        sections["throughput"]["by_workers"]["2"]["rows"])
    for name, row in sections["roundtrip"]["rows"].items():
        assert row["median_ms"] > 0 and row["p99_ms"] >= row["median_ms"], name
    assert sections["roundtrip"]["rows"]["mep"]["hops_median_ms"], "the service's timestamps give the hops"
    cold = sections["cold_start"]
    assert cold["total_ms"]["median"] > 0
    assert "decision -> endpoint forked, dropped, exec'd" in cold["phases_median_ms"]
    users = sections["users"]
    assert users["all_results_cold_s"] > 0 and users["manager_pss_mib"] > 0
    assert users["endpoint_tree_pss_mib"]["min"] > 0
    for label, entry in sections["payloads"]["sizes"].items():
        for direction in ("to_worker", "from_worker"):
            assert entry[direction]["mep"]["mb_per_s"]["median"] > 0, (label, direction)
            assert entry[direction]["htex"]["mb_per_s"]["median"] > 0, (label, direction)
    slurm = sections["slurm"]
    assert slurm.get("skipped") or slurm["first_result_ms"] > 0, slurm
    assert "throughput 2w" in result.stdout


def test_large_results_benchmark_smoke_run(tmp_path: Path, router_account: str) -> None:
    """``benchmarks.large_results --smoke``: 1 KiB inline and 2 MiB through a file, both ways, every peak read."""
    output = tmp_path / "large.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.large_results", "--smoke", "--output", str(output)],
                            cwd=REPOSITORY, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(output.read_text())
    assert set(report["sizes"]) == {"1 KiB", "2 MiB"}
    assert (report["sizes"]["1 KiB"]["kept_in_file"], report["sizes"]["2 MiB"]["kept_in_file"]) == (False, True)
    for path, value in numbers(report):
        assert math.isfinite(value) and value >= 0, f"{path} = {value}"
    for label, row in report["sizes"].items():
        for mode in ("in_place", "through_service"):
            peaks = row[mode]["peak_rss_mib"]
            assert set(peaks) == {"service", "router", "endpoint", "worker", "sdk"}, (label, mode)
            assert all(peak > 0 for peak in peaks.values()), (label, mode, peaks)
