"""Checks on a serialized ``torch.export`` program before torch deserializes it.

torch's deserializer is not safe on hostile input: it hands every symbolic shape expression
(``SymExpr.expr_str``) to ``sympy.sympify``, which evaluates it; it resolves node targets by
``getattr`` chains on ``torch``, ``_operator`` and ``math``; it imports any module a pytree
spec names; and it retries a pickle that ``weights_only`` loading rejects with the full
unpickler. Every reader of edgeslim that hands a program to torch (``.pt2`` archives, the
graph stream of a ``.slim`` file) calls :func:`check_program_json` on the program's JSON
first, and :func:`check_pickle` on every pickle that torch will see, so that only:

- expressions built from symbol names (``s0``, ``u3``), integers, ``+ - * // %``, unary
  minus, comparisons and the sympy/torch functions of :data:`EXPR_FUNCTIONS` (the ``srepr``
  form torch writes: ``Mul(Integer(2), Symbol('s0', positive=True, integer=True))``),
- node targets that are ATen/prims operator overloads or plain arithmetic operators,
- pytree specs of tuples, lists, dicts, leaves and transformers' ``ModelOutput``
  dataclasses (of ``transformers.modeling_outputs`` or a ``transformers.models.<x>.
  modeling_<x>`` module, looked up by name, see :func:`_is_model_output`), and
- pickles whose globals are the few torch uses to rebuild plain tensors

ever reach torch. Anything else is a :class:`~edgeslim.core.errors.CheckpointError` that
names the file and the place in it. The checks parse and walk; they never evaluate.
"""

from __future__ import annotations

import ast
import functools
import pickletools
import re
from collections.abc import Iterator

from edgeslim.core.errors import CheckpointError
from edgeslim.core.fileio import strict_json_loads

MAX_EXPR_CHARS = 4096
MAX_EXPR_DEPTH = 64
MAX_INT_DIGITS = 40

# names torch's printer (sympy ``srepr``) and the torch sympy functions use
EXPR_FUNCTIONS = frozenset(
    {
        "Symbol",
        "Integer",
        "Add",
        "Mul",
        "Max",
        "Min",
        "Mod",
        "PythonMod",
        "FloorDiv",
        "CleanDiv",
        "CeilDiv",
        "Eq",
        "Ne",
        "StrictLessThan",
        "LessThan",
        "StrictGreaterThan",
        "GreaterThan",
        "And",
        "Or",
        "Not",
        "max",
        "min",
    }
)
# assumptions torch attaches to shape symbols
SYMBOL_ASSUMPTIONS = frozenset(
    {"integer", "positive", "nonnegative", "negative", "nonpositive", "real", "finite"}
)
_SYMBOL_NAME = re.compile(r"[a-z]{1,4}[0-9]{1,9}\Z")
_BIN_OPS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)
_CMP_OPS = (ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq)

# node targets: ``torch.ops.<namespace>.<op>.<overload>`` and a few builtin operators
_OP_NAMESPACES = ("aten", "prims")
_OP_TARGET = re.compile(r"torch\.ops\.(aten|prims)\.([a-z_][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\Z")
_BUILTIN_TARGETS = frozenset(
    {f"_operator.{n}" for n in ("getitem", "add", "sub", "mul", "floordiv", "mod", "neg")}
    | {f"_operator.{n}" for n in ("truediv", "pow", "eq", "ne", "lt", "le", "gt", "ge")}
    | {f"_operator.{n}" for n in ("and_", "or_", "not_")}
    | {f"math.{n}" for n in ("ceil", "floor", "trunc", "sqrt")}
    | {f"torch.{n}" for n in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not")}
    | {"torch.sym_ite", "torch.sym_sqrt", "torch._sym_sqrt"}
)

# pytree node types a program's input/output spec may name
_TREESPEC_TYPES = frozenset(
    {None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"}
)

# globals a ``torch.save`` pickle of plain tensors (in tuples, lists, dicts) refers to
TENSOR_PICKLE_GLOBALS = frozenset(
    {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("collections", "OrderedDict"),
        ("torch", "device"),
    }
    | {
        ("torch", f"{kind}Storage")
        for kind in (
            "Float",
            "Double",
            "Half",
            "BFloat16",
            "Long",
            "Int",
            "Short",
            "Char",
            "Byte",
            "Bool",
        )
    }
)
_STRING_PUSHES = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})
_BANNED_OPCODES = frozenset({"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID"})


def _refuse(where: str, what: str) -> CheckpointError:
    return CheckpointError(f"refusing to load {where}: {what}")


# --------------------------------------------------------------------------------------
# symbolic expressions
# --------------------------------------------------------------------------------------


def check_sym_expr(text: object, where: str) -> None:
    """Refuse a symbolic shape expression that is not plain integer arithmetic on symbols.

    Accepts the ``srepr`` form torch writes (``Add(Symbol('s0', integer=True),
    Integer(1))``) and infix (``s0 + 2*s1``, ``Max(s0, 2) // 3``). Raises
    :class:`CheckpointError` naming ``where`` (the file and the field) otherwise.
    """
    if not isinstance(text, str):
        raise _refuse(where, f"symbolic expression is a {type(text).__name__}, not a string")
    if len(text) > MAX_EXPR_CHARS:
        raise _refuse(where, f"symbolic expression of {len(text)} characters")
    shown = text if len(text) <= 80 else text[:77] + "..."
    depth = 0
    for ch in text:
        depth += ch in "([{"
        if depth > MAX_EXPR_DEPTH:
            raise _refuse(where, f"symbolic expression nested deeper than {MAX_EXPR_DEPTH}")
        depth -= ch in ")]}"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise _refuse(where, f"symbolic expression {shown!r} does not parse") from exc
    try:
        _check_expr_node(tree.body)
    except _Disallowed as exc:
        raise _refuse(where, f"symbolic expression {shown!r}: {exc}") from None


class _Disallowed(Exception):
    pass


def _check_int(value: object) -> None:
    if type(value) is not int:
        raise _Disallowed(f"constant {value!r} is not an integer")
    if len(str(abs(value))) > MAX_INT_DIGITS:
        raise _Disallowed(f"integer of more than {MAX_INT_DIGITS} digits")


def _check_expr_node(node: ast.AST) -> None:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool):
            return
        _check_int(node.value)
    elif isinstance(node, ast.Name):
        if not _SYMBOL_NAME.match(node.id):
            raise _Disallowed(f"name {node.id!r} is not a shape symbol")
    elif isinstance(node, ast.BinOp):
        if not isinstance(node.op, _BIN_OPS):
            raise _Disallowed(f"operator {type(node.op).__name__} is not allowed")
        _check_expr_node(node.left)
        _check_expr_node(node.right)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, (ast.USub, ast.UAdd)):
            raise _Disallowed(f"operator {type(node.op).__name__} is not allowed")
        _check_expr_node(node.operand)
    elif isinstance(node, ast.Compare):
        if not all(isinstance(op, _CMP_OPS) for op in node.ops):
            raise _Disallowed("only comparisons < <= > >= == != are allowed")
        for part in (node.left, *node.comparators):
            _check_expr_node(part)
    elif isinstance(node, ast.Call):
        _check_call(node)
    else:
        raise _Disallowed(f"{type(node).__name__} is not allowed")


def _check_call(node: ast.Call) -> None:
    if not isinstance(node.func, ast.Name) or node.func.id not in EXPR_FUNCTIONS:
        what = node.func.id if isinstance(node.func, ast.Name) else type(node.func).__name__
        raise _Disallowed(f"call of {what!r} is not allowed")
    name = node.func.id
    if name == "Symbol":
        if len(node.args) != 1 or not isinstance(node.args[0], ast.Constant):
            raise _Disallowed("Symbol() takes one symbol name")
        sym = node.args[0].value
        if not isinstance(sym, str) or not _SYMBOL_NAME.match(sym):
            raise _Disallowed(f"symbol name {sym!r} is not a shape symbol")
        for kw in node.keywords:
            ok = kw.arg in SYMBOL_ASSUMPTIONS and isinstance(kw.value, ast.Constant)
            if not ok or not isinstance(kw.value.value, bool):
                raise _Disallowed(f"Symbol() assumption {kw.arg!r} is not allowed")
        return
    if node.keywords:
        raise _Disallowed(f"{name}() takes no keyword arguments")
    if name == "Integer" and (
        len(node.args) != 1 or not isinstance(node.args[0], (ast.Constant, ast.UnaryOp))
    ):
        raise _Disallowed("Integer() takes one integer")
    for arg in node.args:
        if isinstance(arg, ast.Starred):
            raise _Disallowed("starred arguments are not allowed")
        _check_expr_node(arg)


# --------------------------------------------------------------------------------------
# node targets and pytree specs
# --------------------------------------------------------------------------------------


def check_op_target(text: object, where: str) -> None:
    """Refuse a graph node target other than an ATen/prims overload or a plain operator."""
    if not isinstance(text, str):
        raise _refuse(where, f"node target is a {type(text).__name__}, not a string")
    if text in _BUILTIN_TARGETS:
        return
    match = _OP_TARGET.match(text)
    if match is None or not _is_op_overload(*match.groups()):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise _refuse(
            where,
            f"node target {shown!r} is not an operator of torch.ops.{{{','.join(_OP_NAMESPACES)}}}"
            " or a plain arithmetic operator",
        )


@functools.lru_cache(maxsize=4096)
def _is_op_overload(namespace: str, op: str, overload: str) -> bool:
    """Whether ``torch.ops.<namespace>.<op>.<overload>`` is a registered operator overload
    (looking one up only consults the operator registry; ``__class__`` and the like are
    not overloads and are refused)."""
    import torch

    try:
        packet = getattr(getattr(torch.ops, namespace), op)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            return False
        return isinstance(getattr(packet, overload), torch._ops.OpOverload)
    except Exception:  # AttributeError and RuntimeError for unknown names
        return False


def check_treespec(text: object, where: str) -> None:
    """Refuse a serialized pytree spec naming anything but tuples, lists, dicts and leaves
    (torch imports the module a spec's context names)."""
    if not isinstance(text, str):
        raise _refuse(where, f"pytree spec is a {type(text).__name__}, not a string")
    spec = strict_json_loads(text, where)
    if not (isinstance(spec, list) and len(spec) == 2 and type(spec[0]) is int):
        raise _refuse(where, "pytree spec is not [protocol, tree]")
    stack = [spec[1]]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > 100_000:
            raise _refuse(where, "pytree spec has more than 100,000 nodes")
        if not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
            raise _refuse(where, "pytree spec node is not {type, context, children_spec}")
        if node["type"] not in _TREESPEC_TYPES and not _is_model_output(node["type"]):
            raise _refuse(where, f"pytree node type {str(node['type'])[:80]!r} is not allowed")
        context = node["context"]
        if context is not None:
            if not isinstance(context, str):
                raise _refuse(where, "pytree context is not a JSON string")
            for value in _walk(strict_json_loads(context, where)):
                if isinstance(value, dict):
                    raise _refuse(where, "pytree context holds an object (an enum or a type)")
        if not isinstance(node["children_spec"], list):
            raise _refuse(where, "pytree children_spec is not a list")
        stack.extend(node["children_spec"])


_MODEL_OUTPUT = re.compile(r"transformers\.modeling_outputs\.([A-Z][A-Za-z0-9]{0,80})")
_MODEL_OUTPUT_OF_MODEL = re.compile(
    r"transformers\.models\.([a-z][a-z0-9_]{0,40})\.modeling_\1\.([A-Z][A-Za-z0-9]{0,80})"
)


def _is_model_output(name: object) -> bool:
    """A transformers output class: a dataclass of tensors that transformers registers as a
    pytree node, either of ``transformers.modeling_outputs`` (``CausalLMOutputWithPast``
    ...) or of one model's module ``transformers.models.<x>.modeling_<x>``
    (``SwinImageClassifierOutput`` ...). The name must match one of those two fixed
    patterns (a model module's name repeats its package's); the module is imported by that
    name only if it is a module of the installed ``transformers.models`` package, and the
    class must be defined in it and subclass ``transformers.utils.ModelOutput``. Nothing
    the file names is unpickled or called."""
    if not isinstance(name, str):
        return False
    plain, of_model = _MODEL_OUTPUT.fullmatch(name), _MODEL_OUTPUT_OF_MODEL.fullmatch(name)
    if plain is None and of_model is None:
        return False
    try:
        from transformers.utils import ModelOutput
    except ImportError:
        return False
    module_name, cls_name = name.rsplit(".", 1)
    module = _transformers_module(module_name, of_model.group(1) if of_model else None)
    cls = module.__dict__.get(cls_name) if module is not None else None
    return (
        isinstance(cls, type)
        and cls.__module__ == module_name
        and issubclass(cls, ModelOutput)
        and cls is not ModelOutput
    )


def _transformers_module(module_name: str, model: str | None) -> object | None:
    """``transformers.modeling_outputs``, or the installed model module
    ``transformers.models.<model>.modeling_<model>`` (``None`` when there is none)."""
    import importlib
    import importlib.util
    import sys

    try:
        if model is None:
            return importlib.import_module("transformers.modeling_outputs")
        package = importlib.import_module("transformers.models")
        if model not in _model_packages(tuple(package.__path__)):
            return None
        if module_name not in sys.modules and importlib.util.find_spec(module_name) is None:
            return None
        return importlib.import_module(module_name)
    except Exception:  # a broken optional model module: not an allowed type
        return None


@functools.lru_cache(maxsize=8)
def _model_packages(paths: tuple[str, ...]) -> frozenset[str]:
    """The model package names under ``transformers.models`` (the directories on disk)."""
    import pkgutil

    return frozenset(m.name for m in pkgutil.iter_modules(list(paths)) if m.ispkg)


def _walk(value: object) -> Iterator[object]:
    stack = [value]
    while stack:
        item = stack.pop()
        yield item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _walk_keys(value: object) -> Iterator[tuple[str, object]]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, sub in item.items():
                yield key, sub
                stack.append(sub)
        elif isinstance(item, list):
            stack.extend(item)


def check_program_json(program: object, where: str) -> None:
    """Refuse a serialized ``torch.export`` program (the parsed JSON of ``model.json`` or
    of a ``.slim`` graph stream) with anything torch would evaluate, import or exec:
    every ``expr_str`` must pass :func:`check_sym_expr`, every node ``target``
    :func:`check_op_target`, every ``in_spec``/``out_spec`` :func:`check_treespec`;
    ``guards_code`` (Python source torch compiles) must be empty."""
    if not isinstance(program, dict):
        raise _refuse(where, "the program is not a JSON object")
    if program.get("guards_code"):
        raise _refuse(where, "the program carries guards_code (Python source)")
    graph_module = program.get("graph_module", program)
    if isinstance(graph_module, dict) and graph_module.get("treespec_namedtuple_fields"):
        raise _refuse(where, "the program declares namedtuple types")
    for key, value in _walk_keys(program):
        if key == "expr_str":
            check_sym_expr(value, f"{where} (expr_str)")
        elif key == "target":
            check_op_target(value, f"{where} (node target)")
        elif key in ("in_spec", "out_spec") and value is not None:
            check_treespec(value, f"{where} ({key})")
        elif key == "guards_code" and value:
            raise _refuse(where, "the program carries guards_code (Python source)")


def load_program_json(data: bytes | str, where: str) -> dict:
    """Parse a serialized program strictly (:func:`strict_json_loads`) and check it with
    :func:`check_program_json`; returns the parsed object."""
    program = strict_json_loads(data, where)
    check_program_json(program, where)
    return program


# --------------------------------------------------------------------------------------
# pickles
# --------------------------------------------------------------------------------------


def check_pickle(
    data: bytes, where: str, allowed: frozenset[tuple[str, str]] = TENSOR_PICKLE_GLOBALS
) -> None:
    """Refuse a pickle that refers to any global outside ``allowed`` (by default the few a
    ``torch.save`` of plain tensors uses), or uses opcodes that import by other routes.

    Only opcodes are read (:mod:`pickletools`); nothing is unpickled. With every global
    allowed, ``REDUCE``/``NEWOBJ``/``BUILD`` can only call those.
    """
    recent: list[str | None] = []  # strings pushed by the last opcodes (for STACK_GLOBAL)
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in _BANNED_OPCODES:
                raise _refuse(where, f"pickle uses opcode {name}")
            if name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                _check_global(module, attr, allowed, where)
            elif name == "STACK_GLOBAL":
                if len(recent) < 2 or recent[-1] is None or recent[-2] is None:
                    raise _refuse(where, "pickle builds a global from computed strings")
                _check_global(recent[-2], recent[-1], allowed, where)
            if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                continue  # memoizing leaves the stack as it was
            recent.append(arg if name in _STRING_PUSHES else None)
            del recent[:-2]
    except CheckpointError:
        raise
    except Exception as exc:  # pickletools raises ValueError and others on garbage
        raise _refuse(where, f"not a readable pickle ({type(exc).__name__}: {exc})") from exc


def _check_global(module: str, attr: str, allowed, where: str) -> None:
    if (module, attr) not in allowed:
        raise _refuse(where, f"pickle refers to {module}.{attr}, which is not allowed")


def pickle_members(names: list[str]) -> list[str]:
    """Members of a ``torch.save`` zip that are pickles (``data.pkl``, ``*.pkl``)."""
    return [n for n in names if n.endswith(".pkl")]


def check_torch_save(data: bytes, where: str) -> None:
    """Check a ``torch.save`` archive (a zip with a ``data.pkl``) with :func:`check_pickle`:
    all members stored uncompressed under one folder, every ``.pkl`` member scanned."""
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise _refuse(where, "the archive has duplicate members")
            tops = {n.split("/", 1)[0] for n in names}
            if len(tops) != 1 or any("/" not in n for n in names):
                raise _refuse(where, "the archive's members are not under one folder")
            pkls = pickle_members(names)
            if [n.split("/", 1)[1] for n in pkls] != ["data.pkl"]:
                raise _refuse(where, f"expected one data.pkl, found {pkls}")
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED:
                    raise _refuse(where, f"member {info.filename!r} is compressed")
            for name in pkls:
                check_pickle(zf.read(name), f"{where} ({name})")
    except CheckpointError:
        raise
    except Exception as exc:  # zipfile raises many types on garbage (NotImplementedError...)
        raise _refuse(where, f"not a valid torch.save archive: {exc}") from exc


__all__ = [
    "EXPR_FUNCTIONS",
    "TENSOR_PICKLE_GLOBALS",
    "check_op_target",
    "check_pickle",
    "check_program_json",
    "check_sym_expr",
    "check_torch_save",
    "check_treespec",
    "load_program_json",
    "strict_json_loads",
]
