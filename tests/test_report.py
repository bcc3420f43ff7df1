"""Tests of the run report: metrics parsing, derived table rows, report.md and plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeslim.core.errors import CheckpointError, RunDirError
from edgeslim.report import (
    human_bytes,
    human_count,
    read_metrics,
    render_report,
    stage_rows,
    stage_table,
    summary_line,
)

SRC = Path(__file__).resolve().parents[1] / "src"
DENSE_LAYERS = {
    "conv1": {"type": "Conv2d", "params": 520, "nonzero_params": 520},
    "conv2": {"type": "Conv2d", "params": 25050, "nonzero_params": 25050},
    "fc1": {"type": "Linear", "params": 400500, "nonzero_params": 400500},
    "fc2": {"type": "Linear", "params": 5010, "nonzero_params": 5010},
}


def _row(index: int, name: str, accuracy: float, nonzero: int, size: int, **extra) -> dict:
    row = {
        "stage": "baseline" if index == 0 else "prune",
        "index": index,
        "name": name,
        "accuracy": accuracy,
        "params": 431080,
        "nonzero_params": nonzero,
        "macs": 2293000,
        "effective_macs": 300000,
        "size_bytes": size,
        "format": "dense" if index == 0 else "sparse",
        "latency_ms": 0.21,
        "peak_activation_bytes": 50000,
        "seconds": 1.5,
    }
    row.update(extra)
    return row


ROWS = [
    _row(0, "baseline", 0.974, 431080, 1724680, effective_macs=2293000, layers=DENSE_LAYERS),
    _row(
        1,
        "stage-1 prune",
        0.976,
        40000,
        200000,
        layers={
            "conv1": {"type": "Conv2d", "params": 520, "nonzero_params": 343},
            "conv2": {"type": "Conv2d", "params": 25050, "nonzero_params": 3006},
            "fc1": {"type": "Linear", "params": 400500, "nonzero_params": 35640},
            "fc2": {"type": "Linear", "params": 5010, "nonzero_params": 1011},
        },
    ),
    _row(
        2,
        "stage-2 prune",
        0.973,
        34800,
        100660,
        layers={
            "conv1": {"type": "Conv2d", "params": 520, "nonzero_params": 260},
            "conv2": {"type": "Conv2d", "params": 25050, "nonzero_params": 2505},
            "fc1": {"type": "Linear", "params": 400500, "nonzero_params": 31035},
            "fc2": {"type": "Linear", "params": 5010, "nonzero_params": 1000},
        },
    ),
]
del ROWS[2]["latency_ms"], ROWS[2]["effective_macs"]  # optional keys may be missing


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (out / "recipe.yaml").write_text("name: han2015_lenet300\nseed: 0\nstages: []\n")
    return out


def test_human_bytes_and_counts():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1724680) == "1.6 MiB"
    assert human_bytes(100660) == "98.3 KiB"
    assert human_bytes(1048575) == "1.0 MiB"  # never "1024.0 KiB"
    assert human_bytes(None) == "–"
    assert human_count(520) == "520"
    assert human_count(35000) == "35.0K"
    assert human_count(431080) == "431K"
    assert human_count(2293000) == "2.29M"
    assert human_count(999999) == "1.00M"  # never "1000K"
    assert human_count(None) == "–"


def test_read_metrics_round_trips(run_dir: Path):
    assert read_metrics(run_dir) == ROWS


def test_stage_rows_exact(run_dir: Path):
    base, mid, final = stage_rows(read_metrics(run_dir))
    assert base == {
        "stage": "baseline",
        "accuracy": "97.40%",
        "delta": "+0.00",
        "nonzero_params": "431,080",
        "ratio": "1.0x",
        "size": "1.6 MiB",
        "size_ratio": "1.0x",
        "format": "dense",
        "macs": "2.29M",
        "effective_macs": "2.29M",
        "latency": "0.210",
    }
    assert mid["delta"] == "+0.20"
    assert mid["ratio"] == "10.8x"  # 431080 / 40000
    assert mid["size"] == "195.3 KiB"
    assert mid["size_ratio"] == "8.6x"  # 1724680 / 200000
    assert mid["effective_macs"] == "300K"
    assert final["stage"] == "stage-2 prune"
    assert final["accuracy"] == "97.30%"
    assert final["delta"] == "−0.10"
    assert final["ratio"] == "12.4x"  # 431080 / 34800
    assert final["size"] == "98.3 KiB"
    assert final["size_ratio"] == "17.1x"  # 1724680 / 100660
    assert final["format"] == "sparse"
    assert final["effective_macs"] == "–"
    assert final["latency"] == "–"


def test_summary_and_rich_table(run_dir: Path):
    rows = read_metrics(run_dir)
    assert summary_line(rows) == (
        "final: 12.4x fewer nonzero weights, 17.1x smaller file, accuracy 97.3% (Δ −0.1 pt)"
    )
    table = stage_table(rows, title="run")
    assert table.row_count == 3
    assert [c.header for c in table.columns][:3] == ["stage", "accuracy\nΔ pts", "nonzero\nfewer"]
    assert list(table.columns[1].cells) == ["97.40%\n+0.00", "97.60%\n+0.20", "97.30%\n−0.10"]


def test_render_report_writes_markdown_and_pngs(run_dir: Path):
    path = render_report(run_dir)
    assert path == run_dir / "report.md"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# edgeslim run report: han2015_lenet300\n")
    header = (
        "| stage | accuracy | Δ | nonzero params | ratio | size | size ratio | format | MACs "
        "| eff. MACs | latency (ms) |"
    )
    assert header in text
    assert "| stage-2 prune | 97.30% | −0.10 | 34,800 | 12.4x | 98.3 KiB | 17.1x | sparse |" in text
    assert "12.4x fewer nonzero weights, 17.1x smaller file, accuracy 97.3% (Δ −0.1 pt)" in text
    assert "| layer | type | params | nonzero | kept % |" in text
    assert "| fc1 | Linear | 400,500 | 31,035 | 7.7% |" in text
    for name in ("accuracy_vs_size.png", "layer_sparsity.png"):
        assert f"(plots/{name})" in text
        data = (run_dir / "plots" / name).read_bytes()
        assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n")
    leftovers = [p.name for p in run_dir.rglob("*.tmp")]
    assert leftovers == []


def test_render_report_tolerates_minimal_rows_and_no_recipe(tmp_path: Path):
    out = tmp_path / "bare-run"
    out.mkdir()
    rows = [
        {"stage": "baseline", "accuracy": 0.9, "size_bytes": 4000},
        {"stage": "prune", "accuracy": 0.88, "size_bytes": 1000},
    ]
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    text = render_report(out).read_text(encoding="utf-8")
    assert text.startswith("# edgeslim run report: bare-run\n")
    assert "| prune | 88.00% | −2.00 | – | – | 1000 B | 4.0x | – | – | – | – |" in text
    assert "_no per-layer data recorded._" in text
    assert (out / "plots" / "layer_sparsity.png").read_bytes().startswith(b"\x89PNG")


def test_corrupt_line_raises_checkpoint_error_with_line_number(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    path.write_text(path.read_text() + '{"stage": "prune", "accur\n')
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl, line 4: not valid JSON"):
        read_metrics(run_dir)


def test_row_without_required_key_raises_checkpoint_error(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = json.dumps({"stage": "prune", "accuracy": 0.9})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match=r"line 2: missing key\(s\) size_bytes"):
        read_metrics(run_dir)


def test_missing_run_dir_or_file_raises_run_dir_error(tmp_path: Path):
    with pytest.raises(RunDirError, match="does not exist"):
        read_metrics(tmp_path / "nope")
    with pytest.raises(RunDirError, match=r"no metrics\.jsonl in .*edgeslim compress"):
        render_report(tmp_path)


def test_import_report_does_not_import_torch():
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    code = "import edgeslim.report, sys; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
