"""The bench's judgement: targets defined once, a run where an engine beats the floor measured beside it is
INVALID (never PASS), an engine that did not run gets no legend entry.  Synthetic results: deterministic."""

from __future__ import annotations

import pytest

from bench import report


def _point(fast_s: float, fast_work_floor: float, vllm: dict | None = None) -> dict:
    engines = {
        "reference": {"status": "ok", "seconds": 20.0, "floor_seconds": 1.0, "work_floor_seconds": 1.0,
                      "peak_rss_mb": 100.0},
        "fast": {"status": "ok", "seconds": fast_s, "floor_seconds": 1.0, "work_floor_seconds": fast_work_floor,
                 "peak_rss_mb": 10.0},
        "vllm": vllm or {"status": "skipped", "reason": "--no-vllm given"},
        "floor": {"status": "ok", "seconds": 0.9},
    }
    return {"workload": {"name": "W1"}, "engines": engines, "axis": "base"}


def test_an_engine_under_its_floor_makes_the_run_invalid():
    point = _point(fast_s=0.61, fast_work_floor=0.9)  # "fast / floor 0.61x" on a busy machine
    report.derive(point)
    point["validity"] = report.validity(point)
    assert point["validity"]["status"] == "INVALID"
    assert [b["engine"] for b in point["validity"]["beat_floor"]] == ["fast"]
    statuses = {t["target"]: t["status"] for t in report.check_targets(point)}
    assert "PASS" not in statuses.values() and statuses["fast time / floor time <= 1.15"] == "INVALID"
    assert "INVALID: fast took 0.610 s" in report.format_point({**point, **_shape()}, quick=False)


def test_a_valid_run_is_judged_by_the_floor_measured_beside_each_engine():
    point = _point(fast_s=1.1, fast_work_floor=0.9)
    report.derive(point)
    point["validity"] = report.validity(point)
    assert point["validity"]["status"] == "valid"
    assert point["engines"]["fast"]["ratio_to_floor"] == pytest.approx(1.1)  # its own floor (1.0), not 0.9
    statuses = {t["target"]: t["status"] for t in report.check_targets(point)}
    assert statuses["fast time / floor time <= 1.15"] == "PASS"
    assert statuses["fast vs reference speedup >= 10"] == "PASS"
    assert statuses["fast vs vLLM STEP pooler speedup >= 5"] == "n/a"
    assert report.validity(point, quick=True)["status"] == "not judged"


def test_targets_are_printed_from_the_one_table():
    text = report.format_targets()
    for workload, targets in report.TARGETS.items():
        for name, _, op, threshold in targets:
            assert f"{workload}" in text and f"{name} {op} {threshold:g}" in text
    assert "fast vs reference speedup >= 10" in text and "fast time / floor time <= 1.15" in text


def test_a_skipped_engine_gets_no_legend_entry(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    point = _point(fast_s=1.2, fast_work_floor=0.9)
    results = {"workloads": [{"name": "W1", "points": [point]}],
               "meta": {"threads": 2, "cpu": "test", "loadavg_start": [0.0]}}
    seen = []
    real = plt.Figure.savefig

    def capture(fig, *args, **kwargs):
        seen.extend(t.get_text() for ax in fig.axes for t in (ax.get_legend().get_texts() if ax.get_legend() else []))
        return real(fig, *args, **kwargs)

    plt.Figure.savefig = capture
    try:
        report.plot(results, tmp_path / "p.png")
    finally:
        plt.Figure.savefig = real
    assert seen == ["reference", "fast", "floor"]


def _shape() -> dict:
    return {"title": "W1", "tokens": {"shared_prefix": 1, "image_tokens": 0, "suffix_mean": 1.0, "markers": [1],
                                      "unique_tokens": 2, "total_tokens": 2},
            "workload": {"name": "W1", "n_candidates": 1}, "flops": {"total": 1e9}}
