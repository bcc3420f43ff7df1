"""Bring your own model and data: docs/byo.md run block by block, and a recipe on a generated
image folder and a model factory in a temporary package, through ``edgeslim compress``."""

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def _env(tmp_path: Path) -> dict[str, str]:
    """PATH with an ``edgeslim`` that runs this checkout's CLI; its src first on PYTHONPATH."""
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "edgeslim"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m edgeslim.cli "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": path,
        "EDGESLIM_QUIET": "1",
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
    }


def doc_blocks(path: Path) -> list[tuple[str, str | None, str]]:
    """(language, file name or None, body) of every fenced block of a markdown file."""
    out = []
    for lang, info, body in BLOCK.findall(path.read_text(encoding="utf-8")):
        name = re.search(r"file=(\S+)", info)
        out.append((lang, name.group(1) if name else None, body))
    return out


def test_byo_page_runs_block_by_block(tmp_path):
    """Every command of docs/byo.md, in order, in an empty directory."""
    env = _env(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    ran = []
    for k, (lang, name, body) in enumerate(doc_blocks(ROOT / "docs" / "byo.md")):
        if name is not None:
            (work / name).write_text(body)
            continue
        if lang == "python":
            script = work / f".block{k}.py"
            script.write_text(body)
            cmd = [sys.executable, str(script)]
        elif lang == "sh":
            cmd = ["bash", "-e", "-o", "pipefail", "-c", body]
        else:  # text: shown, not run
            continue
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        print(f"block {k} ({lang}): {time.perf_counter() - start:.1f} s")
        assert proc.returncode == 0, f"block {k} ({lang}) failed:\n{body}\n{proc.stderr[-3000:]}"
        ran.append((lang, proc.stdout))
    assert [lang for lang, _ in ran] == ["python", "python", "sh", "python", "python"]
    rows = [json.loads(line) for line in (work / "runs/tinynet/metrics.jsonl").open()]
    assert [r["metric"] for r in rows] == ["top5", "top5"]
    assert (work / "tinynet.onnx").stat().st_size > 1000
    assert "verified in ONNX Runtime" in ran[2][1]
    assert "ONNX Runtime agrees with PyTorch" in ran[3][1]


def test_readme_links_the_byo_page():
    assert "docs/byo.md" in (ROOT / "README.md").read_text()


def _image_folder(root: Path, classes: int = 10, per_class: int = 10, size: int = 8) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"c{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size)).astype(np.uint8)
            pixels[c % size, :] = 255  # a bright row per class
            Image.fromarray(pixels).save(folder / f"{i}.png")


FACTORY = """
import torch
from torch import nn


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )
"""


def test_compress_recipe_on_an_image_folder_and_a_model_factory(tmp_path):
    """folder: + py: sources, the top-5 metric, a streaming DataLoader with a worker process,
    through ``edgeslim compress`` in a subprocess."""
    _image_folder(tmp_path / "pics")
    package = tmp_path / "pkgs" / "tmpnets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(FACTORY)
    recipe = {
        "name": "byo",
        "model": "py:tmpnets.models:small_cnn",
        "data": {
            "source": f"folder:{tmp_path / 'pics'}",
            "channels": 1,
            "metric": "top5",
            "num_workers": 1,
        },
        "train": {"epochs": 2, "lr": 0.01, "batch_size": 16},
        "stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = _env(tmp_path)
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}{os.pathsep}{tmp_path / 'pkgs'}"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeslim.cli", "compress", "r.yaml", "--out", "run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    assert [r["stage"] for r in rows] == ["baseline", "prune"]
    for row in rows:
        assert row["metric"] == "top5" and row["higher_is_better"] is True
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["val_accuracy"] <= 1
    assert rows[1]["nonzero_params"] < rows[0]["params"]
    artifact = tmp_path / "run/stage-1" / rows[1]["file"]
    assert artifact.is_file() and artifact.stat().st_size == rows[1]["size_bytes"]
    assert (tmp_path / "run/stage-1/model.pt2").is_file()
    assert "top-5 accuracy" in (tmp_path / "run/report.md").read_text()


@pytest.mark.parametrize("block", ["my_model.py", "recipe.yaml", "my_data.py"])
def test_byo_page_files_are_what_the_text_says(block):
    files = {name: body for _, name, body in doc_blocks(ROOT / "docs" / "byo.md") if name}
    assert block in files
    if block.endswith(".yaml"):
        from edgeslim.pipeline.recipe import Recipe

        recipe = Recipe.from_dict(yaml.safe_load(files[block]))
        assert recipe.data.metric == "top5" and recipe.data.source == "folder:images"
