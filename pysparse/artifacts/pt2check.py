"""Refuses a ``torch.export`` archive (``.pt2``) that would run code when torch loads it, before
torch reads it. ``pysparse.load`` runs this on every ``program.pt2``.

Why a check of our own: ``torch.export.load`` documents that it "uses pickle under the hood" and
must never be given untrusted data, and a checksum only says that a file is the one the manifest
names, not who wrote both. What it would execute, read from torch 2.14's code
(``torch/export/__init__.py``, ``torch/export/pt2_archive/_package.py``,
``torch/_export/serde/serialize.py``, ``torch/export/_unlift.py``, ``torch/fx/graph.py``) is in
``pysparse/artifacts/store.py``'s docstring; in short: pickled weights and constants (``use_pickle``),
pickled or TorchBind objects, a sample-inputs pickle that torch retries without ``weights_only``,
AOTInductor shared libraries, and, without any pickle, Python source built from the program's own
strings (``sympify`` of shape expressions, names spliced into the code fx generates, guard code).

What is accepted is what a plain program of one model needs, and nothing else:
  * members: ``archive_format`` (``pt2``), ``archive_version`` (``0``), ``byteorder``,
    ``.data/version``, ``.data/serialization_id``, ``models/model.json``, the weights and
    constants configs, raw tensor files ``data/weights/weight_N`` / ``data/constants/tensor_N``,
    and an *empty* ``data/sample_inputs/model.pt``. Names may not repeat (the reader would take
    the last copy, which need not be the one checked);
  * every config entry is a raw tensor: ``use_pickle`` false, its file ``weight_N`` /
    ``tensor_N``;
  * in ``models/model.json``: no ``guards_code``; every ``expr_str`` a sympy ``srepr`` of integers,
    symbols and the functions torch's shape expressions use (no attribute, subscript, operator
    or string other than a symbol's name); the input/output treespecs' types dotted names and
    their context keys free of quotes, backslashes and control characters; call targets
    operators (``torch.ops.*``, ``_operator.*``, ``math.*``, ``torch.sym_*``); every other string
    and key a dotted name (``[A-Za-z0-9_]`` parts), except string *values* of arguments
    (``as_string``: fx writes them with ``repr``) and node metadata (stack traces, module paths:
    kept as data, only ever printed).
The archive is read with the reader ``torch.export.load`` itself uses
(``torch.export.pt2_archive.PT2ArchiveReader``) from the same bytes that are then handed to
torch, so the check and the load cannot see different files.

What torch checks itself, and this module relies on: every call in the graph must be an
operator or one of a few builtins (its verifier refuses, e.g., a node calling ``torch.os.system``
at load). Running the graph therefore runs registered operators only: aten's, pysparse's, and
those of any other extension loaded in the process, which this check cannot vouch for.
"""

from __future__ import annotations

import ast
import io
import json
import re
from collections import Counter
from typing import Any

from torch.export.pt2_archive import PT2ArchiveReader

MODEL = "model"  # the name torch.export.save gives the one program of an archive
MODEL_JSON = f"models/{MODEL}.json"
SAMPLE_INPUTS = f"data/sample_inputs/{MODEL}.pt"
WEIGHTS_CONFIG = f"data/weights/{MODEL}_weights_config.json"
CONSTANTS_CONFIG = f"data/constants/{MODEL}_constants_config.json"
_FIXED_MEMBERS = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    MODEL_JSON,
    SAMPLE_INPUTS,
    WEIGHTS_CONFIG,
    CONSTANTS_CONFIG,
}
_RAW_TENSOR = re.compile(r"data/weights/weight_\d+|data/constants/tensor_\d+")
_NAME = re.compile(r"[A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_VERSION = re.compile(r"[A-Za-z0-9_.+\-<=]*")
# What a graph may call: registered operators (aten, pysparse, higher-order ops, other
# extensions' ops) and the symbolic-size helpers torch itself emits.
_OPERATOR_PREFIXES = ("torch.ops.", "_operator.", "math.", "torch.sym_", "torch._sym_")

# What sympy.srepr writes for torch's shape expressions: sympy's numbers, arithmetic, relations
# and logic, and the functions of torch.utils._sympy.functions that torch's deserializer defines.
_SYMPY_CALLS = frozenset(
    {
        "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
        "floor", "ceiling", "Equality", "Unequality", "StrictLessThan", "LessThan",
        "StrictGreaterThan", "GreaterThan", "And", "Or", "Not", "Piecewise", "ExprCondPair",
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt",
        "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
        "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
        "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
    }
)  # fmt: skip
_SYMPY_CONSTANTS = frozenset({"true", "false", "oo", "zoo", "nan", "int_oo"})
_SYMBOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER_TEXT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
_ASSUMPTION = re.compile(r"[a-z_]+")


class UnsafeProgramError(ValueError):
    """A ``.pt2`` archive holds something that ``torch.export.load`` would unpickle or execute, or
    is not the plain program layout this module can vouch for."""


def check_program(data: bytes) -> None:
    """Raises ``UnsafeProgramError`` naming the member and the problem when the archive in
    ``data`` is anything but a plain program whose loading runs no code of its own."""
    try:
        reader = PT2ArchiveReader(io.BytesIO(data))
        names = reader.get_file_names()
    except Exception as exc:  # the reader raises RuntimeError / AssertionError on a bad file
        raise UnsafeProgramError(f"is not a torch.export archive ({exc})") from exc
    repeated = sorted(n for n, k in Counter(names).items() if k > 1)
    if repeated:
        raise UnsafeProgramError(
            f"holds members more than once ({', '.join(repeated)}); torch would read the last copy"
        )
    for name in names:
        if name not in _FIXED_MEMBERS and not _RAW_TENSOR.fullmatch(name):
            raise UnsafeProgramError(f"member {name} is not part of a plain program: {_why(name)}")
    present = set(names)
    for required in ("archive_version", MODEL_JSON, WEIGHTS_CONFIG, CONSTANTS_CONFIG):
        if required not in present:
            raise UnsafeProgramError(
                f"has no member {required}; torch would read it in an older format, whose "
                "weights are pickles"
            )
    version = reader.read_bytes("archive_version")
    if version != b"0":
        raise UnsafeProgramError(f"archive_version is {version[:20]!r}, expected b'0'")
    if SAMPLE_INPUTS in present and reader.archive_file.get_record_size(SAMPLE_INPUTS):
        raise UnsafeProgramError(
            f"member {SAMPLE_INPUTS} is not empty: it is a pickle, which torch unpickles without "
            "weights_only when the restricted unpickler refuses it (pysparse keeps example "
            "inputs outside the program)"
        )
    try:
        _check_config(_json(reader, WEIGHTS_CONFIG), WEIGHTS_CONFIG, "weight_", present)
        _check_config(_json(reader, CONSTANTS_CONFIG), CONSTANTS_CONFIG, "tensor_", present)
        _check_model(_json(reader, MODEL_JSON))
    except RecursionError as exc:
        raise UnsafeProgramError("nests its JSON too deeply to check") from exc


def _why(name: str) -> str:
    if name.startswith("data/aotinductor/"):
        return "AOTInductor code, a shared library that torch.export.load would load and run"
    if name.endswith(".pt"):
        return "a pickle (weights or constants of an older format), which torch would unpickle"
    if name.startswith("models/"):
        return f"a second program (torch.export.load only returns {MODEL!r})"
    return "pysparse loads no archive that carries more"


def _json(reader: PT2ArchiveReader, member: str) -> Any:
    try:
        return json.loads(reader.read_bytes(member))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsafeProgramError(f"member {member} is not JSON ({exc})") from exc


def _check_config(config: Any, member: str, prefix: str, present: set[str]) -> None:
    """Every entry of a weights / constants config must be a raw tensor file."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise UnsafeProgramError(f"member {member} has no 'config' table")
    folder = member.rsplit("/", 1)[0]
    for fqn, meta in entries.items():
        where = f"{member}: entry {fqn!r}"
        if not _NAME.fullmatch(fqn) or not isinstance(meta, dict):
            raise UnsafeProgramError(f"{where} is not a named tensor entry")
        path = meta.get("path_name")
        if meta.get("use_pickle") is not False:
            raise UnsafeProgramError(
                f"{where} is marked use_pickle: torch.export.load would unpickle "
                f"{folder}/{path} with weights_only=False, which runs any code the file carries"
            )
        if not (isinstance(path, str) and re.fullmatch(prefix + r"\d+", path)):
            raise UnsafeProgramError(
                f"{where} is stored as {path!r}, not as a raw tensor file ({prefix}N): torch "
                "unpickles custom_obj_ and opaque_obj_ entries"
            )
        if f"{folder}/{path}" not in present:
            raise UnsafeProgramError(f"{where} names {folder}/{path}, which is missing")
        if not isinstance(meta.get("tensor_meta"), dict):
            raise UnsafeProgramError(f"{where} has no tensor_meta")


def _check_model(model: Any) -> None:
    if not isinstance(model, dict):
        raise UnsafeProgramError(f"member {MODEL_JSON} is not a JSON object")
    if model.get("guards_code"):
        raise UnsafeProgramError(
            f"member {MODEL_JSON} carries guards_code: Python source that torch turns into a "
            "function and exec()s when it builds the module (pysparse programs carry none)"
        )
    _check_value(model, "")


def _refuse(where: str, value: Any, why: str) -> UnsafeProgramError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return UnsafeProgramError(f"member {MODEL_JSON}: {where or 'top level'} is {shown}: {why}")


def _check_value(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            at = f"{where}/{key}"
            if key == "metadata":
                continue  # node and graph metadata: stack traces, module paths; never code
            if not isinstance(key, str) or not _NAME.fullmatch(key):
                raise _refuse(at, key, "a key that is not a dotted name")
            if key == "expr_str":
                _check_sym_expr(item, at)
            elif key in ("in_spec", "out_spec"):
                _check_treespec(item, at)
            elif key in ("as_string", "as_strings"):
                strings = item if isinstance(item, list) else [item]
                if not all(isinstance(s, str) for s in strings):
                    raise _refuse(at, item, "not a string")
            elif key in ("target", "as_operator"):
                if not (
                    isinstance(item, str)
                    and _NAME.fullmatch(item)
                    and item.startswith(_OPERATOR_PREFIXES)
                ):
                    raise _refuse(at, item, "a call target that is not an operator")
            elif key == "torch_version":
                if not (isinstance(item, str) and _VERSION.fullmatch(item)):
                    raise _refuse(at, item, "not a version")
            else:
                _check_value(item, at)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]")
    elif isinstance(value, str):
        if not _NAME.fullmatch(value):
            raise _refuse(
                where,
                value,
                "not a dotted name; torch writes names into the Python source of the module it "
                "builds and runs",
            )
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise _refuse(where, value, "not JSON data")


def _check_sym_expr(text: Any, where: str) -> None:
    """``text`` must be what ``sympy.srepr`` writes for a shape expression: torch hands it to
    ``sympy.sympify``, which evaluates it as Python."""
    why = "not a plain sympy expression (torch evaluates it with sympy.sympify, i.e. eval)"
    if not isinstance(text, str):
        raise _refuse(where, text, why)
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError) as exc:
        raise _refuse(where, text, why) from exc
    nodes = [tree.body]
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            continue
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            nodes.append(node.operand)
            continue
        if isinstance(node, ast.Name) and node.id in _SYMPY_CONSTANTS:
            continue
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _SYMPY_CALLS
        ):
            raise _refuse(where, text, why)
        for i, arg in enumerate(node.args):
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                # Only a symbol's name and a Float's digits are strings; sympy functions would
                # sympify (eval) any other string argument.
                pattern = {"Symbol": _SYMBOL_NAME, "Float": _NUMBER_TEXT}.get(node.func.id)
                if i == 0 and pattern is not None and pattern.fullmatch(arg.value):
                    continue
                raise _refuse(where, text, why)
            nodes.append(arg)
        for kw in node.keywords:
            if not (
                kw.arg is not None
                and _ASSUMPTION.fullmatch(kw.arg)
                and isinstance(kw.value, ast.Constant)
                and type(kw.value.value) in (bool, int)
            ):
                raise _refuse(where, text, why)


def _check_treespec(text: Any, where: str) -> None:
    """A pytree spec (JSON in a string): types are looked up by dotted name; contexts see
    ``_check_context``."""
    try:
        spec = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError as exc:
        raise _refuse(where, text, "not a JSON treespec") from exc
    if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], int)):
        raise _refuse(where, text, "not a JSON treespec")
    nodes = [spec[1]]
    while nodes:
        node = nodes.pop()
        if not isinstance(node, dict) or not set(node) <= {"type", "context", "children_spec"}:
            raise _refuse(where, text, "not a JSON treespec")
        kind = node.get("type")
        if kind is not None and not (isinstance(kind, str) and _NAME.fullmatch(kind)):
            raise _refuse(where, kind, "a treespec type that is not a dotted name")
        if node.get("context") is not None:
            _check_context(node["context"], where)
        children = node.get("children_spec", [])
        if not isinstance(children, list):
            raise _refuse(where, text, "not a JSON treespec")
        nodes.extend(children)


def _check_context(context: Any, where: str) -> None:
    """A treespec node's context (JSON in a string: a dict's keys, a dataclass's fields). fx
    writes dict keys into the source of the module's ``forward`` between quotes, so no string in
    it may hold a quote, a backslash or a control character."""
    try:
        leaves = [json.loads(context)] if isinstance(context, str) else None
    except json.JSONDecodeError as exc:
        raise _refuse(where, context, "a treespec context that is not JSON") from exc
    if leaves is None:
        raise _refuse(where, context, "a treespec context that is not JSON")
    while leaves:
        leaf = leaves.pop()
        if isinstance(leaf, list):
            leaves.extend(leaf)
        elif isinstance(leaf, dict):
            leaves.extend(leaf)
            leaves.extend(leaf.values())
        elif isinstance(leaf, str):
            if not (leaf.isascii() and leaf.isprintable()) or any(c in "'\"\\" for c in leaf):
                raise _refuse(where, leaf, "a treespec key that would break out of a string")
        elif leaf is not None and not isinstance(leaf, (bool, int, float)):
            raise _refuse(where, leaf, "a treespec context that is not plain JSON")
