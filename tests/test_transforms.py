import subprocess
import sys

import pytest
import torch

import edgeslim as es
from edgeslim.core.data.transforms import HaarSplit, apply_transform, haar_merge, haar_split


def test_haar_split_is_the_2x2_haar_transform_and_inverts():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 6, 8)
    bands = haar_split(x)
    assert bands.shape == (2, 12, 3, 4)
    a, b = x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]  # top-left, top-right of each block
    c, d = x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]
    expected = torch.stack(
        [(a + b + c + d) / 2, (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2], 2
    ).reshape(2, 12, 3, 4)  # per channel: LL, LH, HL, HH
    assert torch.allclose(bands, expected, atol=1e-6)
    assert torch.allclose(haar_merge(bands), x, atol=1e-6)
    assert torch.allclose(bands.pow(2).sum(), x.pow(2).sum())  # orthonormal
    assert haar_split(torch.rand(1, 1, 27, 27)).shape == (1, 4, 14, 14)  # odd: zero-padded
    assert torch.equal(HaarSplit()(x), bands)
    with pytest.raises(es.ShapeError, match=r"\(B, C, H, W\)"):
        haar_split(torch.rand(28, 28))


def test_transform_applies_to_every_split_and_recipes_validate_it(mnist):
    data = apply_transform(mnist, "haar")
    assert data.input_shape == (4, 14, 14) and data.name == "mnist+haar"
    assert torch.equal(data.test.y, mnist.test.y) and len(data.train) == len(mnist.train)
    assert apply_transform(mnist, None) is mnist
    with pytest.raises(es.DataError, match="unknown input transform 'fft'"):
        apply_transform(mnist, "fft")
    with pytest.raises(es.ConfigError, match=r"data\.transform: .*'haar'"):
        es.Recipe.from_dict(
            {"name": "x", "model": "zoo:haarnet", "data": {"source": "mnist", "transform": "dct"}}
        )


def test_haarnet_recipe_runs_on_sub_bands(tmp_path, mnist):
    recipe = es.Recipe.from_dict(
        {
            "name": "haar",
            "model": "zoo:haarnet",
            "data": {"source": "mnist", "max_train": 300, "transform": "haar"},
            "train": {"epochs": 1, "lr": 0.003},
        }
    )
    row = es.run_recipe(recipe, tmp_path / "run").rows[0]
    assert row["accuracy"] > 0.15  # learning (chance is 0.1); docs/zoo.md has full training
    lenet5 = es.profile(es.load_model("zoo:lenet5"), torch.rand(1, 1, 28, 28), latency=False)
    assert row["macs"] < lenet5.macs / 5  # a quarter of the positions, 3x3 kernels
    saved = es.load_model(tmp_path / "run" / "stage-0" / "model.pt2")
    assert saved.input_shape == (4, 14, 14)
    assert es.evaluate(saved, apply_transform(mnist, "haar")) == row["accuracy"]
    proc = subprocess.run(
        [sys.executable, "-m", "edgeslim.cli", "evaluate", str(tmp_path / "run" / "stage-0" /
         "model.pt2"), "--transform", "haar"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"{100 * row['accuracy']:.2f}%" in proc.stdout
