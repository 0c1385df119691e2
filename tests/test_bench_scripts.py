"""The benchmark scripts import: they run by hand, not in CI, so a helper renamed elsewhere would otherwise break them
unseen (bench_dynamic_conv.py and bench_tvconv.py once imported a `median_ms` that no longer existed)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("bench_*.py")))
def test_benchmark_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    namespace = runpy.run_path(str(BENCH / script), run_name="benchmark_import_check")
    assert callable(namespace["main"])
