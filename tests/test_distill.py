import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgeslim as es
import edgeslim.core.train as train_module
from edgeslim.core import kd
from edgeslim.core.data.datasets import Split
from edgeslim.distillation import soft_target_loss


def test_soft_target_loss_is_t_squared_kl_of_softened_distributions():
    torch.manual_seed(0)
    s, t = torch.randn(5, 10), torch.randn(5, 10) * 3
    temp = 20.0
    p_t = torch.softmax(t / temp, 1)
    p_s = torch.softmax(s / temp, 1)
    expected = temp**2 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert torch.allclose(soft_target_loss(s, t, temp), expected, rtol=1e-5, atol=1e-7)
    assert float(soft_target_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-6)


def test_kd_config_validation():
    for bad in ({"temperature": 0}, {"alpha": 1.5}, {"soft": "l1"}, {"tempreature": 2}):
        with pytest.raises(ValueError):
            es.KD(**bad)
    with pytest.raises(es.ConfigError, match=r"stages\[0\]\.finetune\.distill\.alpha"):
        es.Recipe.from_dict(
            {
                "name": "x",
                "model": "zoo:lenet300",
                "stages": [
                    {
                        "prune": {"method": "magnitude", "sparsity": 0.5},
                        "finetune": {"distill": {"alpha": 2}},
                    }
                ],
            }
        )
    with pytest.raises(es.ConfigError, match=r"train\.distill: baseline training has no teacher"):
        es.Recipe.from_dict({"name": "x", "model": "zoo:lenet300", "train": {"distill": {}}})


def _tiny(mnist, n=600):
    return mnist.limit(n)


def test_distill_needs_a_separate_teacher(mnist):
    student = es.load_model("zoo:lenet300")
    with pytest.raises(es.ConfigError, match="no teacher was given"):
        es.fit(student, _tiny(mnist), es.TrainConfig(epochs=1, distill=es.KD()))
    with pytest.raises(es.ConfigError, match="separate teacher"):
        es.distill(student, student, _tiny(mnist), es.KD(), epochs=1)


def test_student_learns_the_teacher_not_the_labels(mnist):
    """With alpha = 1 and every label wrong, only the teacher can teach the student."""
    data = _tiny(mnist, 1000)
    torch.manual_seed(0)
    teacher = es.load_model("zoo:lenet300")
    es.fit(teacher, data, epochs=3, lr=2e-3)
    teacher_acc = es.evaluate(teacher, data)
    before = copy.deepcopy(teacher.state_dict())
    wrong = copy.copy(data)
    wrong.train = Split(data.train.x, (data.train.y + 1) % 10)
    student = es.load_model("zoo:lenet300")
    es.distill(student, teacher, wrong, es.KD(temperature=4, alpha=1.0), epochs=2, lr=2e-3)
    assert teacher_acc > 0.8 and es.evaluate(student, data) > 0.7
    # and the hard-label term alone (alpha = 0) learns the wrong labels
    fooled = es.load_model("zoo:lenet300")
    es.distill(fooled, teacher, wrong, es.KD(alpha=0.0), epochs=2, lr=2e-3, keep_best=False)
    assert es.evaluate(fooled, data) < 0.2
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training  # fit leaves models in eval mode; the teacher stays so


class _Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width * 14 * 14, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(torch.flatten(x, 1))


def test_hints_train_an_adapter_and_leave_no_trace(mnist):
    data = _tiny(mnist, 300)
    torch.manual_seed(0)
    teacher, student = _Net(16), _Net(4)
    keys = set(student.state_dict())
    cfg = es.KD(hints={"conv": "conv"}, hint_weight=10.0, alpha=0.5)
    history = es.distill(student, teacher, data, cfg, epochs=2, lr=1e-3)
    assert len(history) == 2 and history[1]["loss"] < history[0]["loss"]
    assert set(student.state_dict()) == keys  # adapters dropped
    assert not student.conv._forward_hooks and not teacher.conv._forward_hooks

    with pytest.raises(es.ConfigError, match=r"student has no layer 'conv9'.*conv"):
        es.distill(student, teacher, data, es.KD(hints={"conv9": "conv"}), epochs=1)
    with pytest.raises(es.ShapeError, match="different ranks"):
        es.distill(student, teacher, data, es.KD(hints={"conv": "fc"}), epochs=1)


@pytest.mark.parametrize(
    "body",
    [
        {"prune": {"method": "magnitude", "sparsity": 0.8}},
        {"quantize": {"method": "qat", "calib_size": 32}},
        {"quantize": {"method": "int8_ptq", "calib_size": 32}},
    ],
    ids=["prune", "qat", "ptq+finetune"],
)
def test_pipeline_stage_distils_from_the_model_before_it(tmp_path, monkeypatch, body):
    recipe = {
        "name": "kd",
        "model": "zoo:lenet300",
        "data": {"source": "mnist", "max_train": 300},
        "train": {"epochs": 1},
        "stages": [
            {**body, "finetune": {"epochs": 1, "distill": {"temperature": 4, "alpha": 0.5}}}
        ],
    }
    seen = []

    def spy(student, teacher, cfg, probe, hard_loss=None):
        seen.append((teacher, cfg))
        return kd.distillation(student, teacher, cfg, probe, hard_loss)

    monkeypatch.setattr(train_module, "distillation", spy)
    result = es.run_recipe(es.Recipe.from_dict(recipe), tmp_path / "run")
    ((teacher, cfg),) = seen
    assert cfg.temperature == 4 and cfg.alpha == 0.5
    assert teacher is not result.model and not teacher.training
    # the teacher is the model before the stage: the dense float baseline
    baseline = es.load_model(tmp_path / "run" / "stage-0" / "model.pt2")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(teacher(x), baseline(x), atol=1e-5)
