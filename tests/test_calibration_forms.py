"""Calibration data in every form users hold it, through one helper (core.hooks.iter_batches)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import edgeslim as es
from edgeslim.core.hooks import iter_batches, run_calibration


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _seen_rows(model: nn.Module, calib, batch_size: int = 4) -> torch.Tensor:
    rows = []
    run_calibration(
        model, calib, {"0": model[0]}, lambda n, m, i, o: rows.append(i[0]), batch_size=batch_size
    )
    return torch.cat(rows)


def test_every_form_feeds_the_same_inputs():
    x = torch.randn(10, 8)
    y = torch.arange(10)
    model = _mlp()
    forms = {
        "tensor": x,
        "list of tensors": [x[:4], x[4:]],
        "tuple of tensors": (x[:4], x[4:]),
        "Dataset (x, y)": TensorDataset(x, y),
        "Dataset x": TensorDataset(x),
        "DataLoader (x, y)": DataLoader(TensorDataset(x, y), batch_size=3),
        "generator": (x[i : i + 5] for i in (0, 5)),
    }
    for name, calib in forms.items():
        assert torch.equal(_seen_rows(model, calib), x), name


def test_a_mapping_is_one_batch_of_keyword_inputs():
    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, input_ids, attention_mask):
            return self.fc(input_ids * attention_mask)

    batch = {"input_ids": torch.randn(3, 8), "attention_mask": torch.ones(3, 8)}
    assert [list(b) for b in iter_batches(batch)] == [["input_ids", "attention_mask"]]
    assert len(list(iter_batches([batch, batch]))) == 2  # a list of mappings: a batch each
    out = []
    model = Keywords()
    run_calibration(model, batch, {"fc": model.fc}, lambda n, m, i, o: out.append(o))
    assert len(out) == 1 and out[0].shape == (3, 2)


def test_datasplits_give_their_calibration_set(mnist):
    (batch,) = list(iter_batches(mnist.limit(100), batch_size=1000))
    assert batch.shape == (100, 1, 28, 28)


@pytest.mark.parametrize(
    ("calib", "message"),
    [
        ("some text", r"type str is not supported; give a tensor"),
        (3.5, r"type float is not supported"),
        (["a", "b"], r"calibration item 0 is a str; a batch must be a tensor"),
        ([{1: torch.zeros(1)}], r"calibration item 0: keys must be argument names"),
        (TensorDataset(torch.zeros(0, 8)), r"calibration Dataset is empty"),
        ([], r"calibration data is empty"),
    ],
)
def test_other_forms_are_a_calibration_error_naming_what_was_given(calib, message):
    with pytest.raises((es.CalibrationError, es.ShapeError), match=message):
        list(iter_batches(calib))


transformers = pytest.importorskip("transformers")


def test_wanda_on_bert_takes_a_tokenizers_output():
    """Regression: a BatchEncoding was iterated by its keys ('str' has no attribute 'size')."""
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 64, (4, 12))
    encoding = transformers.BatchEncoding(
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    )
    log = es.prune_(model, es.Wanda(sparsity=0.5), calib=encoding, progress=False)
    assert len(log) == 12 and all(v == 0.5 for v in log.values())  # 6 linears x 2 blocks
