"""Real English text available offline: the Python standard library's docstrings.

Every Python installation ships thousands of docstrings written by people, in English. They
are read here from the standard library's source files with :mod:`ast` (nothing is imported
or executed), split into paragraphs, and cleaned (doctest lines, tables and short fragments
are dropped).

Splits are by *module*, so the calibration/training text and the evaluation text never share
a module: a module goes to ``test`` when the first byte of sha256(its dotted name) is below
26 (about 10%), to ``val`` when it is below 52, else to ``train``. :meth:`TextCorpus.manifest`
records the Python version, the module names of each split and a sha256 of each split's
text, so a result can say exactly which text it was measured on.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__"}
_WORD = re.compile(r"[A-Za-z]+")


def split_of(module: str) -> str:
    """``train``, ``val`` or ``test`` for a module name (fixed: a hash of the name)."""
    b = hashlib.sha256(module.encode()).digest()[0]
    return "test" if b < 26 else "val" if b < 52 else "train"


def _modules(root: Path) -> list[tuple[str, Path]]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("test") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_"):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found.append((".".join(parts), path))
    return found


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(
            node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        ):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
    return out


def clean_paragraphs(doc: str, min_words: int = 8) -> list[str]:
    """English paragraphs of a docstring, one line each; code, tables and lists dropped."""
    out = []
    for block in re.split(r"\n\s*\n", doc):
        lines = [line.strip() for line in block.strip().splitlines()]
        if not lines or any(line.startswith((">>>", "...", "$", "|", "+-", "=")) for line in lines):
            continue
        if any(block_line.startswith(("    ", "\t")) for block_line in block.splitlines()[1:]):
            continue  # indented continuation: an example or a definition list
        text = " ".join(lines)
        words = _WORD.findall(text)
        if len(words) < min_words or sum(map(len, words)) < 0.6 * len(text):
            continue
        out.append(text)
    return out


@dataclass
class TextCorpus:
    """Paragraphs of text split by module into train / val / test."""

    name: str
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    modules: dict[str, list[str]] = field(default_factory=dict)  # split -> module names

    def split(self, name: str) -> list[str]:
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown text split {name!r}: expected train, val or test")
        return getattr(self, name)

    def manifest(self) -> dict[str, object]:
        """What this corpus is: source, Python version, modules and text hash per split."""
        return {
            "source": self.name,
            "python": sys.version.split()[0],
            "split_rule": "sha256(module name)[0]: < 26 test, < 52 val, else train",
            "splits": {
                s: {
                    "paragraphs": len(self.split(s)),
                    "characters": sum(map(len, self.split(s))),
                    "modules": self.modules.get(s, []),
                    "sha256": hashlib.sha256("\n".join(self.split(s)).encode()).hexdigest(),
                }
                for s in ("train", "val", "test")
            },
        }


def stdlib_corpus(root: str | Path | None = None) -> TextCorpus:
    """The docstrings of the standard library at ``root`` (default: this Python's)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"standard library directory {root} does not exist")
    corpus = TextCorpus(name="stdlib", modules={"train": [], "val": [], "test": []})
    for module, path in _modules(root):
        paragraphs = [p for doc in _docstrings(path) for p in clean_paragraphs(doc)]
        if not paragraphs:
            continue
        split = split_of(module)
        corpus.split(split).extend(paragraphs)
        corpus.modules[split].append(module)
    if not corpus.test or not corpus.train:
        raise DataError(f"no docstrings found under {root}")
    return corpus


def load_text(name: str = "stdlib") -> TextCorpus:
    """A text corpus by name; ``stdlib`` (the standard library's docstrings) is built in."""
    if name == "stdlib":
        return stdlib_corpus()
    raise DataError(f"unknown text corpus {name!r}: expected 'stdlib'")
