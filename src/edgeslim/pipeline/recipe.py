"""Recipes: a model source, data, baseline training and ordered compression stages.

A recipe is YAML whose pieces are the same config objects the Python API takes::

    name: han2015_lenet300
    seed: 0
    device: cpu                      # where the model runs: cpu (default), cuda, cuda:1, mps
    model: zoo:lenet300
    data: mnist                      # or {source: npz:data.npz, max_train: 500}
    train: {epochs: 20, lr: 0.001}   # baseline training; omit to keep the loaded weights
    stages:
      - prune: {method: magnitude, layer_sparsity: {fc1: 0.93, fc2: 0.91, fc3: 0.74}, steps: 5}
        finetune: {epochs: 6, lr: 0.001}

Each stage is a mapping with exactly one *stage kind* key (``prune``, ...) whose body the
kind validates, plus the optional common keys ``name`` and ``finetune``. Every mistake --
unknown key, wrong type, value out of range -- is a :class:`ConfigError` that names the
key's path, e.g. ``stages[0].prune.layer_sparsity.fc1``.

``device`` is where every stage computes (training, calibration, one-shot statistics,
latency); a device this machine does not have (``cuda`` without a GPU) is a ConfigError
naming it. ``edgeslim compress --device`` overrides it. It is not part of a stage's identity
(:meth:`Recipe.prefix_hash`): a run may be resumed on another device.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgeslim.core.device_check import check_device
from edgeslim.core.errors import ConfigError
from edgeslim.core.options import validate
from edgeslim.core.train import TrainConfig
from edgeslim.pipeline import stages as _stages  # noqa: F401  (registers the built-in stage kinds)
from edgeslim.pipeline.stages.base import STAGE_KINDS


class DataConfig(BaseModel):
    """Which dataset, how it is read and scored, and optionally fewer training examples.

    ``source`` is ``mnist``, ``npz:PATH``, ``folder:PATH`` (an image folder, one sub-folder per
    class, read lazily) or ``py:package.module:factory`` (the user's own datasets); see
    :func:`edgeslim.core.data.datasets.load_data`. ``image_size``, ``channels``, ``mean`` and
    ``std`` say how ``folder:`` images become tensors; ``num_workers`` worker processes read a
    streamed source (it does not change the results). ``metric`` scores every stage
    (:mod:`edgeslim.core.metrics`: ``top1`` by default, ``top5``, ``mse`` -- a regression
    task, fine-tuned on the squared error --, ``cosine`` to the baseline's outputs,
    ``perplexity``, or ``py:module:function``).

    ``source: text:stdlib`` is English text for language models (``hf:`` models): it is
    tokenized with the model's tokenizer into ``seq_len``-token examples, and evaluated with a
    language-model metric (perplexity, or embedding cosine to the dense model for encoders)
    on at most ``max_eval`` paragraphs. ``calib`` is the number of calibration examples that
    calibrated stages (Wanda, SparseGPT, GPTQ, SmoothQuant) receive.
    """

    model_config = ConfigDict(extra="forbid")

    source: str = "mnist"
    max_train: int | None = Field(None, ge=1)
    transform: Literal["haar"] | None = Field(
        None, description="input transform (edgeslim.core.data.transforms), e.g. haar sub-bands"
    )
    calib: int = Field(128, ge=1, description="calibration examples for calibrated stages")
    seq_len: int | None = Field(None, ge=2, description="text: tokens per example (128)")
    max_eval: int | None = Field(None, ge=1, description="text: evaluation paragraphs")
    metric: str | None = Field(None, description="how stages are scored (default top1)")
    image_size: int | list[int] | None = Field(
        None, description="folder: resize images to N x N or [H, W]"
    )
    channels: Literal[1, 3] | None = Field(None, description="folder: 1 grey, 3 RGB")
    mean: float | list[float] | None = Field(None, description="folder: subtract (per channel)")
    std: float | list[float] | None = Field(None, description="folder: divide (per channel)")
    num_workers: int = Field(0, ge=0, description="worker processes reading streamed data")

    @property
    def is_text(self) -> bool:
        return self.source.startswith("text:")

    @model_validator(mode="after")
    def _text_only_keys(self) -> DataConfig:
        if not self.is_text:
            for key in ("seq_len", "max_eval"):
                if getattr(self, key) is not None:
                    raise ValueError(f"'{key}' applies to text sources (text:NAME) only")
        elif self.transform is not None:
            raise ValueError("'transform' applies to image data, not to text sources")
        elif self.metric is not None:
            raise ValueError(
                "'metric': a text source is scored by the model's own metric (perplexity for "
                "a causal LM, embedding cosine for an encoder); leave it unset"
            )
        if not self.source.startswith("folder:"):
            for key in ("image_size", "channels", "mean", "std"):
                if getattr(self, key) is not None:
                    raise ValueError(f"'{key}' applies to image folders (folder:PATH) only")
        if isinstance(self.image_size, list) and (
            len(self.image_size) != 2 or min(self.image_size) < 1
        ):
            raise ValueError(f"'image_size' must be N or [H, W], got {self.image_size}")
        if isinstance(self.image_size, int) and self.image_size < 1:
            raise ValueError(f"'image_size' must be positive, got {self.image_size}")
        if self.metric is not None:
            from edgeslim.core.metrics import check_name

            try:
                check_name(self.metric)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return self

    def load_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~edgeslim.core.data.datasets.load_data`."""
        keys = ("image_size", "channels", "mean", "std", "num_workers", "metric")
        return {k: getattr(self, k) for k in keys}


# keys added to DataConfig after recipes were first hashed: left out of a recipe's dump while
# at their defaults, so run directories made before them still resume
_LATER_DATA_KEYS = {
    "metric": None,
    "image_size": None,
    "channels": None,
    "mean": None,
    "std": None,
    "num_workers": 0,
}
# keys that never change the results (left out of the prefix hash)
_UNHASHED_DATA_KEYS = ("num_workers",)


class Stage(BaseModel):
    """One validated stage: its kind, its config, an optional display name and fine-tuning."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    kind: str
    config: BaseModel
    name: str | None = None
    finetune: Any = None  # TrainConfig | None (typed loosely to keep this module light)

    @property
    def label(self) -> str:
        return self.name or self.kind


class Recipe(BaseModel):
    """A validated recipe. Build with :meth:`from_yaml` or :meth:`from_dict`."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str
    description: str = ""
    seed: int = 0
    device: str = "cpu"
    model: str
    data: DataConfig = Field(default_factory=DataConfig)
    train: Any = None  # TrainConfig | None
    stages: list[Stage] = Field(default_factory=list)
    raw: dict = Field(default_factory=dict, exclude=True, repr=False)

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, *, device: str | None = None) -> Recipe:
        """Read and validate a recipe file (``device``, when given, replaces its ``device``)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        try:
            return cls.from_dict(data, device=device)
        except ConfigError as exc:
            raise ConfigError(f"{path}:\n{exc}") from None

    @classmethod
    def from_dict(cls, data: Any, *, device: str | None = None) -> Recipe:
        """Validate a recipe given as plain data (as parsed from YAML); ``device``, when given,
        replaces the recipe's ``device`` (``--device`` on the command line)."""

        if not isinstance(data, dict):
            raise ConfigError(f"a recipe must be a mapping, got {type(data).__name__}")
        header = {k: v for k, v in data.items() if k not in ("stages", "data", "train")}
        if device is not None:
            header["device"] = device
        base = validate(_Header, header, "")
        base.device = str(check_device(base.device, "device"))
        raw_data = data.get("data", "mnist")
        if isinstance(raw_data, str):
            raw_data = {"source": raw_data}
        data_cfg = validate(DataConfig, raw_data, "data")
        train = None if data.get("train") is None else validate(TrainConfig, data["train"], "train")
        if train is not None and train.distill is not None:
            raise ConfigError(
                "train.distill: baseline training has no teacher; set distill in a stage's "
                "finetune, where the model before the stage is the teacher"
            )
        if train is not None and data_cfg.is_text:
            raise ConfigError("train: baseline training is not supported with text data")
        raw_stages = data.get("stages", [])
        if not isinstance(raw_stages, list):
            raise ConfigError(f"stages: must be a list, got {type(raw_stages).__name__}")
        stages = [_parse_stage(s, f"stages[{i}]") for i, s in enumerate(raw_stages)]
        return cls(**base.model_dump(), data=data_cfg, train=train, stages=stages, raw=data)

    # -- identity -------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain data that :meth:`from_dict` accepts (defaults filled in)."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "device": self.device,
            "model": self.model,
            "data": _dump_data(self.data),
            "train": None if self.train is None else self.train.model_dump(),
            "stages": [],
        }
        for s in self.stages:
            entry: dict[str, Any] = {s.kind: _dump_stage_config(s)}
            if s.name:
                entry["name"] = s.name
            if s.finetune is not None:
                entry["finetune"] = s.finetune.model_dump()
            out["stages"].append(entry)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def prefix_hash(self, n_stages: int) -> str:
        """Hash of everything that determines the model after the first ``n_stages`` stages.

        The device is left out: where a stage ran is not what it computes (a run started on a
        GPU may be resumed on the CPU; the numbers agree to float rounding, not bit for bit).
        """
        d = self.to_dict()
        d.pop("name"), d.pop("description"), d.pop("device", None)
        for key in _UNHASHED_DATA_KEYS:
            d["data"].pop(key, None)
        d["stages"] = d["stages"][:n_stages]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class _Header(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    seed: int = 0
    device: str = Field("cpu", description="where the model runs: cpu, cuda, cuda:1, mps ...")
    model: str


_COMMON_STAGE_KEYS = {"name", "finetune"}


def _parse_stage(entry: Any, where: str) -> Stage:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: a stage must be a mapping, got {entry!r}")
    kinds = [k for k in entry if k not in _COMMON_STAGE_KEYS]
    known = ", ".join(sorted(STAGE_KINDS)) or "(none registered)"
    if len(kinds) != 1:
        raise ConfigError(
            f"{where}: a stage needs exactly one stage kind key ({known}) besides "
            f"{sorted(_COMMON_STAGE_KEYS)}; got {kinds or 'none'}"
        )
    kind = kinds[0]
    if kind not in STAGE_KINDS:
        raise ConfigError(f"{where}.{kind}: unknown stage kind; known kinds: {known}")
    config = STAGE_KINDS[kind].parse(entry[kind], f"{where}.{kind}")
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{where}.name: must be a string (got {name!r})")
    ft = entry.get("finetune")
    finetune = None if ft is None else validate(TrainConfig, ft, f"{where}.finetune")
    return Stage(kind=kind, config=config, name=name, finetune=finetune)


def _dump_data(data: DataConfig) -> dict[str, Any]:
    dump = data.model_dump()
    for key, default in _LATER_DATA_KEYS.items():
        if dump.get(key) == default:
            dump.pop(key)
    return dump


def _dump_stage_config(stage: Stage) -> Any:
    dump = getattr(stage.config, "to_recipe", None)
    return dump() if dump else stage.config.model_dump()
