"""Real English text that every machine has: the Python standard library's docstrings.

    sentences = english_sentences(200)     # the same 200 sentences on every run

The docstrings of a fixed list of standard-library modules (and of their public classes and
functions, in name order) are split into sentences; sentences that look like prose (start with
a capital letter, end with a full stop, 6..40 words, mostly letters, no code) are kept, in
order, without duplicates. The result is deterministic for a given Python version (docstrings
change a little between Python releases).
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from functools import lru_cache

# a fixed, ordered list: the corpus must not depend on what else happens to be importable
MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum",
    "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "html", "inspect", "io",
    "ipaddress", "itertools", "json", "logging", "math", "operator", "os", "pathlib",
    "pickle", "pprint", "queue", "random", "re", "shutil", "socket", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "typing",
    "unittest", "uuid", "warnings", "zipfile",
)  # fmt: skip

_SENTENCE_END = re.compile(r"(?<=[a-z0-9\)][.!?])\s+(?=[A-Z])")
_CODE = re.compile(r">>>|::|\(\)|[{}\[\]=<>_`*#@\\|]")


def _docstrings(module_name: str) -> list[str]:
    """The module's docstring, then its public members' docstrings in name order."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # pragma: no cover - every name above is in the standard library
        return []
    docs = [inspect.getdoc(module) or ""]
    with warnings.catch_warnings():  # e.g. typing.io and typing.re are deprecated
        warnings.simplefilter("ignore")
        for name in sorted(vars(module)):
            member = getattr(module, name)
            own = getattr(member, "__module__", None) or ""
            kind_ok = inspect.isclass(member) or inspect.isfunction(member)
            if not name.startswith("_") and kind_ok and own.startswith(module_name):
                docs.append(inspect.getdoc(member) or "")
    return docs


def _is_prose(sentence: str, min_words: int, max_words: int) -> bool:
    words = sentence.split()
    if not min_words <= len(words) <= max_words:
        return False
    if not (sentence[0].isupper() and sentence.endswith(".")) or _CODE.search(sentence):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in sentence)
    return letters >= 0.9 * len(sentence)


@lru_cache(maxsize=4)
def _all_sentences(min_words: int, max_words: int) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for module_name in MODULES:
        for doc in _docstrings(module_name):
            for paragraph in doc.split("\n\n"):
                text = " ".join(paragraph.split())  # one line, single spaces
                for sentence in _SENTENCE_END.split(text):
                    if _is_prose(sentence, min_words, max_words):
                        seen.setdefault(sentence, None)
    return tuple(seen)


def english_sentences(
    n: int | None = None, *, min_words: int = 6, max_words: int = 40
) -> list[str]:
    """The first ``n`` prose sentences of the standard library's docstrings (all when None)."""
    sentences = _all_sentences(min_words, max_words)
    return list(sentences if n is None else sentences[:n])
