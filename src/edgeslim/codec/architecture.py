"""How a ``.slim`` file stores and rebuilds a model's structure (``docs/format.md``).

Two forms: ``zoo`` names an edgeslim zoo network (with its hashed-layer replacements), the
smallest; ``graph`` is the model's ``torch.export`` program (any exportable model).
:func:`describe` picks the form when packing; :func:`rebuild` makes the module again from a
validated header and its decoded tensors when unpacking.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

from edgeslim.codec.header import DEFAULT_MAX_BYTES, Header, ZooArchitecture
from edgeslim.core.errors import ContainerError, EdgeslimError
from edgeslim.core.masks import add_mask_buffers_, remove_masks_
from edgeslim.core.models import zoo
from edgeslim.core.models.storage import MASK_SUFFIX
from edgeslim.share.hashed import HASHED_MODULES


def restorable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a ``.slim`` file restores: the state without pruning masks (codes and centroids
    of shared weights included)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith(MASK_SUFFIX)}


def _layout_of(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


# --------------------------------------------------------------------------------------
# zoo form
# --------------------------------------------------------------------------------------


def zoo_architecture(model: nn.Module) -> dict[str, Any] | None:
    """The zoo form of ``model``'s architecture, when it is exactly a zoo network."""
    modules = {
        name: {"class": type(m).__name__, "args": m.slim_args()}
        for name, m in model.named_modules()
        if type(m).__name__ in HASHED_MODULES and name
    }
    state = restorable_state(model)
    want = _layout_of(state)
    kwargs = {"num_classes": model.num_classes} if hasattr(model, "num_classes") else {}
    for name in zoo.names():
        try:
            arch = {"kind": "zoo", "name": name, "kwargs": kwargs, "modules": modules}
            ref = build_zoo(arch, state)
        except (EdgeslimError, TypeError, AttributeError, ValueError):
            continue
        if type(ref) is type(model) and _layout_of(restorable_state(ref)) == want:
            return arch
    return None


def build_zoo(
    arch: dict[str, Any], state: dict[str, torch.Tensor], max_bytes: int = DEFAULT_MAX_BYTES
) -> nn.Module:
    """The zoo network of ``arch`` with its module replacements and sharing tensors added.

    The network is first built on the meta device (no memory) to check that it and its
    replacement modules fit in ``max_bytes`` before anything is allocated.
    """
    with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
        with torch.device("meta"):
            probe = zoo.create(arch["name"], **arch["kwargs"])
        need = sum(t.numel() * t.element_size() for t in probe.state_dict().values())
        classes = {}
        for path, spec in arch["modules"].items():
            classes[path] = HASHED_MODULES.get(spec["class"])
            if classes[path] is None:
                raise ContainerError(f"unknown module class {spec['class']!r} at {path!r}")
            need += classes[path].build_bytes(spec["args"])
        if need > max_bytes:
            raise ContainerError(
                f"building zoo network {arch['name']!r} as described would allocate {need:,} "
                f"bytes, over the limit of {max_bytes:,}"
            )
        model = zoo.create(arch["name"], **arch["kwargs"])
        for path, spec in arch["modules"].items():
            model.get_submodule(path)  # raises AttributeError when there is no such module
            model.set_submodule(path, classes[path](**spec["args"]))
    add_mask_buffers_(model, state)
    return model


# --------------------------------------------------------------------------------------
# packing: which form, and what it stores
# --------------------------------------------------------------------------------------


def describe(
    model: nn.Module, form: Literal["auto", "zoo", "graph"], example: torch.Tensor | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor], bytes | None]:
    """``(architecture, state, constants, graph JSON or None)`` of ``model`` in ``form``.

    ``"auto"`` is the zoo form when the model is exactly a zoo network, else the graph form,
    which exports the model on ``example``. The graph architecture's ``stream`` is a
    placeholder for the packer to fill in.
    """
    if form in ("auto", "zoo"):
        arch = zoo_architecture(model)
        if arch is not None:
            return arch, restorable_state(model), {}, None
        if form == "zoo":
            raise ContainerError(
                f"{type(model).__name__} is not a zoo network (or its layers changed); "
                "use architecture='graph'"
            )
    if example is None:
        raise ContainerError(
            f"packing {type(model).__name__} with its graph needs an example input: pass "
            "example=... (or give the model an 'input_shape' attribute)"
        )
    from torch._export.serde.serialize import serialize

    from edgeslim.core.models.io import export_program

    ep = export_program(_without_masks(model), example)
    art = serialize(
        ep, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False
    )
    arch = {"kind": "graph", "stream": 0, "torch": torch.__version__}
    constants = {k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}
    if len(constants) != len(ep.constants):
        raise ContainerError(f"{type(model).__name__} holds non-tensor constants (script objects)")
    return arch, dict(ep.state_dict), constants, art.exported_program


def _without_masks(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode without pruning masks (training state, not part of
    the deployed graph). A graph module (a loaded ``.pt2``) also loses its unused reads of
    them; a model whose forward really uses a mask keeps its masks."""
    stripped = copy.deepcopy(model).eval()
    remove_masks_(stripped)
    if isinstance(stripped, torch.fx.GraphModule):
        graph = stripped.graph
        for node in list(graph.nodes):
            if node.op == "get_attr" and str(node.target).endswith(MASK_SUFFIX):
                if node.users:
                    return copy.deepcopy(model).eval()
                graph.erase_node(node)
        stripped.recompile()
    return stripped


# --------------------------------------------------------------------------------------
# unpacking: the module again
# --------------------------------------------------------------------------------------


def rebuild(
    header: Header, tensors: dict[str, torch.Tensor], graph: bytes | None, max_bytes: int
) -> nn.Module:
    """The module a validated ``header`` describes, holding ``tensors``.

    ``graph`` is the inflated graph JSON of a graph-form file (``None`` for the zoo form).
    Raises :class:`ContainerError` when the description does not build.
    """
    arch = header.architecture
    constant = {r.name for r in header.tensors if r.constant}
    if isinstance(arch, ZooArchitecture):
        spec = arch.model_dump(by_alias=True)
        try:
            model = build_zoo(spec, tensors, max_bytes)
            model.load_state_dict(tensors, strict=True)
        except (
            EdgeslimError,
            TypeError,
            AttributeError,
            ValueError,
            KeyError,
            RuntimeError,
        ) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ContainerError(f"cannot rebuild zoo network {arch.name!r}: {first}") from None
    else:
        model = _build_graph(header, tensors, constant, graph)
    if header.input_shape:
        model.input_shape = tuple(header.input_shape)
    if header.num_classes is not None:
        model.num_classes = header.num_classes
    return model


def _build_graph(header: Header, tensors, constant: set[str], graph: bytes) -> nn.Module:
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    from edgeslim.core.models.io import module_from_program

    params = {r.name for r in header.tensors if r.parameter}
    params |= {r.name + "_centroids" for r in header.tensors if r.layout == "shared"}
    state = {
        k: nn.Parameter(v, requires_grad=v.is_floating_point()) if k in params else v
        for k, v in tensors.items()
        if k not in constant
    }
    consts = {k: v for k, v in tensors.items() if k in constant}
    try:
        ep = deserialize(SerializedArtifact(graph, state, consts, b""))
        return module_from_program(ep)
    except Exception as exc:  # torch's deserializer raises many types; all mean "bad graph"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ContainerError(f"cannot rebuild the model from its graph: {first[:300]}") from None
