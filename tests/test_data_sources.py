"""Data sources beyond mnist / npz: image folders read lazily, the user's own Datasets through
``py:``, streamed splits read through DataLoaders, and a DataError for each kind of bad data."""

import dataclasses
import hashlib
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import edgeslim as es
from edgeslim.core.data import images
from edgeslim.core.data.datasets import DatasetSplit, Split


def _folder(root, classes=3, per_class=10, size=(8, 8), mode="L", seed=0):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            pixels = rng.integers(0, 256, shape).astype(np.uint8)
            Image.fromarray(pixels, mode=mode).save(d / f"{i:02d}.png")
    return root


def _digest(model: nn.Module) -> str:
    raw = b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values())
    return hashlib.sha256(raw).hexdigest()


@pytest.fixture
def pymodule(tmp_path, monkeypatch):
    """Write a module into a temporary directory on sys.path; return its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def write(name: str, text: str) -> str:
        (tmp_path / f"{name}.py").write_text(text)
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


# ----------------------------------------------------------------------------- folder:


def test_folder_source_splits_by_class_and_reads_images_lazily(tmp_path, monkeypatch):
    root = _folder(tmp_path / "imgs", classes=3, per_class=10, size=(12, 10))
    reads = []
    real = images.read_image
    monkeypatch.setattr(images, "read_image", lambda p, o: reads.append(p) or real(p, o))
    data = es.load_data(f"folder:{root}", image_size=[8, 6], mean=0.5, std=0.25)
    assert reads == []  # nothing read at load time
    assert (len(data.train), len(data.val), len(data.test)) == (21, 3, 6)
    assert data.classes == ["class0", "class1", "class2"] and data.num_classes == 3
    assert isinstance(data.train, DatasetSplit) and data.streams
    batches = list(data.train.batches(8))
    assert [len(y) for _, y in batches] == [8, 8, 5] and len(reads) == 21  # item by item
    x = batches[0][0]
    assert x.shape == (8, 1, 8, 6) and x.dtype == torch.float32
    assert float(x.min()) >= -2.0 and float(x.max()) <= 2.0  # (x - 0.5) / 0.25
    assert torch.equal(torch.bincount(data.test.y[:]), torch.tensor([2, 2, 2]))
    assert data.input_shape == (1, 8, 6) and data.calib(5).shape == (5, 1, 8, 6)


def test_folder_source_channels_and_presplit_layout(tmp_path):
    rgb = _folder(tmp_path / "rgb", classes=2, per_class=8, mode="RGB")
    data = es.load_data(f"folder:{rgb}")
    assert data.input_shape == (3, 8, 8)  # from the first image's mode
    assert es.load_data(f"folder:{rgb}", channels=1).input_shape == (1, 8, 8)
    for split, n in (("train", 4), ("val", 1), ("test", 2)):
        _folder(tmp_path / "pre" / split, classes=2, per_class=n, seed=n)
    pre = es.load_data(f"folder:{tmp_path / 'pre'}")
    assert (len(pre.train), len(pre.val), len(pre.test)) == (8, 2, 4)
    assert pre.classes == ["class0", "class1"]


def test_training_on_a_folder_with_worker_processes(tmp_path):
    root = _folder(tmp_path / "imgs", classes=3, per_class=10)
    data = es.load_data(f"folder:{root}", num_workers=2, metric="top5")
    assert data.train.num_workers == 2 and data.metric == "top5"
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    history = es.fit(model, data, epochs=2, batch_size=8, progress=False)
    assert len(history) == 2 and history[0]["metric"] == "top5"
    assert es.evaluate(model, data) == 1.0  # 3 classes: always among the top 5


# ----------------------------------------------------------------------------- streaming


def test_a_streamed_split_trains_bit_identically_to_the_same_tensors(mnist):
    """Same seed, same batch order: a Dataset read through a DataLoader (with a worker) gives
    the weights the in-memory path gives, and leaves torch's global random state alone."""
    small = mnist.limit(300)
    streamed = dataclasses.replace(
        small,
        train=DatasetSplit(TensorDataset(small.train.x, small.train.y), "t", num_workers=1),
        val=DatasetSplit(TensorDataset(small.val.x, small.val.y), "v"),
    )
    results = []
    for data in (small, streamed):
        torch.manual_seed(0)
        model = es.load_model("zoo:lenet300")
        history = es.fit(model, data, epochs=2, shift=1, progress=False)
        results.append((history, _digest(model), torch.get_rng_state()))
    assert results[0][0] == results[1][0] and results[0][1] == results[1][1]
    assert torch.equal(results[0][2], results[1][2])
    assert torch.equal(streamed.calib(16, seed=3), small.calib(16, seed=3))


def test_split_columns_index_like_tensors():
    x, y = torch.randn(10, 2, 3), torch.arange(10)
    split = DatasetSplit(TensorDataset(x, y), "t")
    assert torch.equal(split.x[2:5], x[2:5]) and torch.equal(split.x[[7, 1]], x[[7, 1]])
    assert torch.equal(split.y[torch.tensor([3, 0])], y[[3, 0]]) and int(split.y[-1]) == 9
    assert split.x.shape == (10, 2, 3) and split.x[:0].shape == (0, 2, 3)
    assert len(split.subset(4)) == 4 and torch.equal(Split(x, y).subset(4).x, x[:4])


# ----------------------------------------------------------------------------- py:


DATASETS = """
import torch
from torch.utils.data import Dataset, TensorDataset

import edgeslim as es

class Items(Dataset):
    classes = ["a", "b", "c", "d"]

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(6, generator=g), i % 4

def three():
    return Items(40), Items(8), Items(12)

def mapping():
    return {"train": Items(20), "val": Items(4), "test": Items(4)}

def splits():
    return es.load_data("mnist").limit(100)

def two():
    return Items(4), Items(4)

def nothing():
    return None

def not_datasets():
    return [1, 2, 3], Items(4), Items(4)

def bad_items():
    return TensorDataset(torch.zeros(4, 2)), Items(4), Items(4)

def bad_labels():
    return Items(40), Items(8), Items(12)

NOT_CALLABLE = 3
"""


def test_py_source_returns_three_datasets_a_mapping_or_datasplits(pymodule):
    name = pymodule("user_data", DATASETS)
    data = es.load_data(f"py:{name}:three")
    assert (len(data.train), len(data.val), len(data.test)) == (40, 8, 12)
    assert data.num_classes == 4 and data.classes == ["a", "b", "c", "d"]
    assert data.input_shape == (6,) and data.name == f"py:{name}:three"
    model = nn.Linear(6, 4)
    es.fit(model, data, epochs=1, batch_size=16, progress=False)
    assert 0 <= es.evaluate(model, data, "val", metric="top1") <= 1
    assert len(es.load_data(f"py:{name}:mapping").train) == 20
    assert len(es.load_data(f"py:{name}:splits").train) == 100


# ----------------------------------------------------------------------------- bad data


def test_error_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(es.DataError, match=r"folder:.*empty: the folder is empty"):
        es.load_data(f"folder:{tmp_path / 'empty'}")


def test_error_folder_without_class_subfolders(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(es.DataError, match=r"flat: no class sub-folders \(1 image file"):
        es.load_data(f"folder:{tmp_path / 'flat'}")


def test_error_missing_folder(tmp_path):
    with pytest.raises(es.DataError, match="nowhere: the folder does not exist"):
        es.load_data(f"folder:{tmp_path / 'nowhere'}")


def test_error_mixed_image_sizes_without_a_resize(tmp_path):
    root = _folder(tmp_path / "imgs", classes=2, per_class=6)
    Image.fromarray(np.zeros((9, 7), np.uint8)).save(root / "class1" / "zz.png")
    with pytest.raises(es.DataError, match=r"different sizes .*zz\.png is 7x9.*image_size"):
        es.load_data(f"folder:{root}")


def test_mixed_sizes_with_a_resize_are_fine(tmp_path):
    root = _folder(tmp_path / "imgs", classes=2, per_class=6)
    Image.fromarray(np.zeros((9, 7), np.uint8)).save(root / "class1" / "zz.png")
    data = es.load_data(f"folder:{root}", image_size=8)
    assert torch.cat([x for x, _ in data.train.batches(4)]).shape[1:] == (1, 8, 8)


def test_error_unreadable_image(tmp_path):
    root = _folder(tmp_path / "imgs", classes=2, per_class=6)
    (root / "class0" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(es.DataError, match=r"cannot read image .*broken\.png"):
        es.load_data(f"folder:{root}")


def test_error_unreadable_image_found_when_read(tmp_path):
    """With a resize nothing is opened up front; the bad file is named when a batch reads it."""
    root = _folder(tmp_path / "imgs", classes=2, per_class=6)
    (root / "class1" / "broken.png").write_bytes(b"not a png")
    data = es.load_data(f"folder:{root}", image_size=8)
    with pytest.raises(es.DataError, match=r"cannot read image .*broken\.png"):
        for _ in data.train.batches(4):
            pass


def test_error_too_few_images_to_split(tmp_path):
    root = _folder(tmp_path / "imgs", classes=2, per_class=3)
    with pytest.raises(es.DataError, match=r"too few images to split.*val would be empty"):
        es.load_data(f"folder:{root}")


def test_error_image_options_on_a_non_folder_source():
    with pytest.raises(es.DataError, match="apply to folder: sources"):
        es.load_data("mnist", image_size=14)


def test_error_factory_module_missing():
    with pytest.raises(es.DataError, match="'py:no_such_module_xyz:f': cannot import"):
        es.load_data("py:no_such_module_xyz:f")


def test_error_factory_attribute_missing(pymodule):
    name = pymodule("user_data_a", DATASETS)
    with pytest.raises(es.DataError, match=f"{name} has no attribute 'absent'"):
        es.load_data(f"py:{name}:absent")


def test_error_factory_not_callable(pymodule):
    name = pymodule("user_data_b", DATASETS)
    with pytest.raises(es.DataError, match=f"{name}.NOT_CALLABLE is not callable"):
        es.load_data(f"py:{name}:NOT_CALLABLE")


def test_error_factory_malformed_spec():
    with pytest.raises(es.DataError, match=r"must look like 'py:package\.module:factory'"):
        es.load_data("py:only_a_module")


def test_error_factory_returns_none(pymodule):
    name = pymodule("user_data_c", DATASETS)
    with pytest.raises(es.DataError, match=f"py:{name}:nothing' returned NoneType; expected"):
        es.load_data(f"py:{name}:nothing")


def test_error_factory_returns_two_datasets(pymodule):
    name = pymodule("user_data_d", DATASETS)
    with pytest.raises(es.DataError, match="returned a tuple of 2 items; expected a DataSplits"):
        es.load_data(f"py:{name}:two")


def test_error_factory_returns_something_not_a_dataset(pymodule):
    name = pymodule("user_data_e", DATASETS)
    with pytest.raises(es.DataError, match="its train split is a list, not a torch Dataset"):
        es.load_data(f"py:{name}:not_datasets")


def test_error_dataset_items_are_not_pairs(pymodule):
    name = pymodule("user_data_f", DATASETS)
    data = es.load_data(f"py:{name}:bad_items")
    with pytest.raises(es.DataError, match=f"py:{name}:bad_items: a dataset item is a tuple"):
        next(data.train.batches(2))


def test_error_labels_out_of_range_in_training(pymodule):
    name = pymodule("user_data_g", DATASETS)
    data = es.load_data(f"py:{name}:bad_labels")  # labels 0..3
    with pytest.raises(es.DataError, match=r"bad_labels: label 3 is out of range .* 3 outputs"):
        es.fit(nn.Linear(6, 3), data, epochs=1, progress=False)


def test_error_labels_out_of_range_in_evaluation(tmp_path):
    root = _folder(tmp_path / "imgs", classes=3, per_class=10)
    data = es.load_data(f"folder:{root}")  # labels 0..2
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(es.DataError, match=r"label 2 is out of range for a model with 2 outputs"):
        es.evaluate(model, data)


def test_error_iterable_dataset_cannot_be_a_split():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(2), 0

    with pytest.raises(es.DataError, match="map-style torch Dataset"):
        DatasetSplit(Stream(), "py:x:y")


def test_in_memory_datasets_still_load_the_old_way(mnist):
    assert isinstance(mnist.train, Split) and not mnist.streams and mnist.metric == "top1"
