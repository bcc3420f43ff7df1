"""Real English text that every machine has: the Python standard library's docstrings.

    sentences = english_sentences(200)     # the same 200 sentences on every run

The docstrings of a fixed list of standard-library modules (and of their public classes and
functions, in name order) are split into sentences; sentences that look like prose (start with
a capital letter, end with a full stop, 6..40 words, mostly letters, no code) are kept, in
order, without duplicates. The result is deterministic for a given Python version (docstrings
change a little between Python releases).

:class:`TextCorpus` (``load_text("stdlib")``) is the larger corpus for language models: every
docstring of every standard-library source file, read with :mod:`ast` (nothing imported or
executed), as paragraphs, split by *module* into train / val / test so that the
calibration/training text and the evaluation text never share a module: a module goes to
``test`` when the first byte of sha256(its dotted name) is below 26 (about 10%), to ``val``
when it is below 52, else to ``train``. :meth:`TextCorpus.manifest` records the Python
version, the module names of each split and a sha256 of each split's text. :class:`TextTask`
binds it to a transformers model's tokenizer for the pipeline.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import re
import sys
import sysconfig
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from edgeslim.core.errors import DataError

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


# --------------------------------------------------------------------------------------
# the module-split corpus for language models
# --------------------------------------------------------------------------------------

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


def _file_docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
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

    def sentences(self, split: str, *, min_words: int = 6, max_words: int = 40) -> list[str]:
        """The prose sentences of one split, in corpus order, without duplicates.

        The same prose rule as :func:`english_sentences` (capitalised, ends with a full stop,
        ``min_words..max_words`` words, no code), so sentence-level tasks (embedding fidelity,
        calibration of an encoder) get disjoint train / test text from the module split.
        """
        seen: dict[str, None] = {}
        for paragraph in self.split(split):
            for sentence in _SENTENCE_END.split(paragraph):
                if _is_prose(sentence, min_words, max_words):
                    seen.setdefault(sentence, None)
        return list(seen)

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


@functools.lru_cache(maxsize=4)
def _module_paragraphs(root: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(module, paragraphs) for every module under ``root`` that has any (parsed once)."""
    found = []
    for module, path in _modules(root):
        paragraphs = tuple(p for doc in _file_docstrings(path) for p in clean_paragraphs(doc))
        if paragraphs:
            found.append((module, paragraphs))
    return tuple(found)


def module_paragraphs(root: str | Path | None = None) -> list[tuple[str, list[str]]]:
    """``(dotted module name, its English docstring paragraphs)`` for every module of the
    standard library at ``root`` (default: this Python's) that has any, in name order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"standard library directory {root} does not exist")
    return [(m, list(ps)) for m, ps in _module_paragraphs(root.resolve())]


def stdlib_corpus(root: str | Path | None = None) -> TextCorpus:
    """The docstrings of the standard library at ``root`` (default: this Python's)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"standard library directory {root} does not exist")
    corpus = TextCorpus(name="stdlib", modules={"train": [], "val": [], "test": []})
    for module, paragraphs in _module_paragraphs(root.resolve()):
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


# --------------------------------------------------------------------------------------
# text bound to a language model: calibration batches and an evaluation metric
# --------------------------------------------------------------------------------------


def spread(items: list, n: int | None) -> list:
    """About ``n`` items evenly spread over ``items``: every ``len // n``-th, at most ``n``
    (all when ``n`` is None; deterministic)."""
    if n is None or n >= len(items):
        return list(items)
    return list(items[:: max(1, len(items) // n)][:n])


def is_causal_lm(model) -> bool:
    """Whether ``model`` predicts the next token (GPT-2, OPT, Llama ... with an LM head)."""
    return type(model).__name__.endswith(("LMHeadModel", "ForCausalLM"))


def perplexity(model, tokens, seq_len: int, batch: int = 16) -> float:
    """WikiText-style perplexity, as in the SparseGPT / Wanda evaluation code.

    ``tokens`` (T,) is the evaluation text tokenized as one stream; it is cut into
    non-overlapping windows of ``seq_len`` (the remainder dropped) and the result is
    exp(mean next-token cross-entropy over every predicted token of every window).
    """
    import math

    import torch
    import torch.nn.functional as F

    n = tokens.numel() // seq_len
    if n == 0:
        raise DataError(f"evaluation text has {tokens.numel()} tokens, fewer than {seq_len}")
    windows = tokens[: n * seq_len].reshape(n, seq_len)  # (n, seq)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, n, batch):
            x = windows[i : i + batch]
            logits = model(x).logits[:, :-1]  # (B, seq-1, vocab)
            target = x[:, 1:]
            nll += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
                )
            )
            count += target.numel()
    return math.exp(nll / count)


def sentence_embeddings(model, tokenizer, texts: list[str], max_length: int = 128, batch: int = 64):
    """Mean-pooled, L2-normalised last hidden states (the sentence-transformers recipe)."""
    import torch
    import torch.nn.functional as F

    outs = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tokenizer(
                texts[i : i + batch],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            h = model(**enc).last_hidden_state  # (B, T, hidden)
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            outs.append(F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(outs)  # (N, hidden)


class TextTask:
    """A text corpus bound to a transformers model and its tokenizer, for the pipeline.

    - causal LM: calibration = ``calib(n)`` windows of ``seq_len`` tokens at seeded random
      offsets of the train stream; metric = ``perplexity`` of the split (lower is better);
    - encoder (MiniLM): calibration = ``n`` train paragraphs, one per batch (no padding);
      metric = ``embedding_cosine``: mean cosine between each paragraph's embedding and the
      one the model gave when this task was built (the dense model).

    ``max_eval`` caps the val / test paragraphs (evenly spread) for quick runs.
    """

    def __init__(
        self,
        corpus: TextCorpus,
        model,
        *,
        seq_len: int = 128,
        max_eval: int | None = None,
        tokenizer=None,
    ):
        from edgeslim.core.hooks import eval_mode

        self.name = f"text:{corpus.name}"
        self.corpus = corpus
        self.seq_len = seq_len
        self.causal = is_causal_lm(model)
        config = getattr(model, "config", None)
        if getattr(config, "use_cache", None):
            config.use_cache = False  # measured forward passes return logits, not caches
        self.metric = "perplexity" if self.causal else "embedding_cosine"
        self.texts = {s: spread(corpus.split(s), max_eval) for s in ("val", "test")}
        self.tokenizer = tokenizer or _tokenizer_of(model)
        self.reference = {}
        if not self.causal:
            with eval_mode(model):
                self.reference = {
                    s: sentence_embeddings(model, self.tokenizer, t, seq_len)
                    for s, t in self.texts.items()
                }

    def _stream(self, texts: list[str]):
        import torch

        eos = self.tokenizer.eos_token_id
        ids: list[int] = []
        for text in texts:
            ids.extend(self.tokenizer(text)["input_ids"])
            if eos is not None:
                ids.append(eos)
        return torch.tensor(ids, dtype=torch.long)

    def calib(self, n: int = 128, seed: int = 0):
        """Calibration batches from the train split (see the class docstring)."""
        import torch

        if n < 1:
            raise DataError(f"calib(n={n}): n must be >= 1")
        if not self.causal:
            return [
                dict(
                    self.tokenizer(t, truncation=True, max_length=self.seq_len, return_tensors="pt")
                )
                for t in spread(self.corpus.train, n)
            ]
        tokens = self._stream(self.corpus.train)
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, tokens.numel() - self.seq_len, (n,), generator=g)
        return torch.stack([tokens[s : s + self.seq_len] for s in starts.tolist()])  # (n, seq)

    def example(self, batch: int = 1):
        """Token ids (batch, seq_len) of the first test text: for profiling."""
        tokens = self._stream(self.texts["test"])[: self.seq_len]
        return tokens.unsqueeze(0).expand(batch, -1).clone()

    def evaluate(self, model, split: str = "test") -> float:
        """The metric of ``model`` on ``split`` (``val`` or ``test``)."""
        from edgeslim.core.hooks import eval_mode

        if split not in self.texts:
            raise DataError(f"text tasks evaluate on 'val' or 'test', not {split!r}")
        with eval_mode(model):
            if self.causal:
                return perplexity(model, self._stream(self.texts[split]), self.seq_len)
            emb = sentence_embeddings(model, self.tokenizer, self.texts[split], self.seq_len)
            return float((emb * self.reference[split]).sum(1).mean())

    def limit(self, train: int | None = None) -> TextTask:
        return self


def _tokenizer_of(model):
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(
            f"no tokenizer found for the model (looked in {path!r}): save tokenizer files "
            "(tokenizer.json ...) next to its config.json"
        ) from exc
