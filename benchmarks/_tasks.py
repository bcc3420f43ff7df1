"""Harder tasks generated from the bundled data, shared by the benchmarks.

**Shifted, cluttered MNIST** (:func:`cluttered_mnist`): the bundled 5,000-image subset,
each digit translated by up to 4 pixels (zero fill), six 7x7 patches cut from *other*
digits pasted at random places (clutter with digit-like strokes), Gaussian noise (sigma
0.15), clamped to [0, 1]; every test digit appears twice with different clutter (2,000 test
images), seeded. Dense nets reach 85-90% instead of 98-99%, so a one-point difference is
about 1.5 standard errors of the test estimate.

**Standard-library topics** (:func:`stdlib_topics`, for MiniLM): every English paragraph of
the docstrings of this Python's standard library (``edgeslim.core.data.text``: read with
:mod:`ast`, code/tables/lists dropped), labelled with the *topic* of the module it comes from:
10 hand-made groups of top-level modules (:data:`TOPICS`: GUI, concurrency, mail, web and
networking, files and OS, data formats and text, the language and its import system, testing
and debugging, logging / command line / platform, numbers and time); paragraphs of modules in
no group, and any paragraph text that occurs in more than one module, are dropped. Each
paragraph goes to test / val / train by sha256 of its text (first byte < 90: test, about 35%;
< 116: val; else train), so the split is fixed, disjoint and independent of the order. Input:
the first 64 WordPiece tokens (MiniLM's tokenizer, [CLS] ... [SEP], zero-padded; the model
masks the padding itself). Sizes (Python 3.12's library): 4,222 train / 800 val / 2,797 test
paragraphs, every topic 5-15% of each split. Why it is hard enough: the topics share
vocabulary (a "socket", "file" or "thread" is mentioned in half of them, many paragraphs are
generic: "Return the value of ...") and a paragraph is short (30 tokens on average), so it is
far from 99%: MiniLM fine-tuned 3 epochs on 2,000 train paragraphs (the benchmark's CPU
budget) reaches 68.4% on 2,000 test paragraphs, where one accuracy's standard error is ~1.0
point (0.9 on all 2,797).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

import edgeslim as es
from edgeslim.core.data.datasets import DataSplits, Split


def _clutter(x: torch.Tensor, pool: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = len(x)
    out = torch.zeros_like(x)
    shifts = torch.randint(-4, 5, (n, 2), generator=g)
    for i in range(n):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        out[i] = torch.roll(x[i], (dy, dx), (1, 2))
        if dy > 0:
            out[i, :, :dy] = 0
        elif dy < 0:
            out[i, :, dy:] = 0
        if dx > 0:
            out[i, :, :, :dx] = 0
        elif dx < 0:
            out[i, :, :, dx:] = 0
    src = torch.randint(0, len(pool), (n, 6), generator=g)
    pos = torch.randint(0, 21, (n, 6, 4), generator=g)
    for i in range(n):
        for k in range(6):
            sy, sx, ty, tx = (int(v) for v in pos[i, k])
            patch = pool[int(src[i, k]), :, sy : sy + 7, sx : sx + 7]
            out[i, :, ty : ty + 7, tx : tx + 7] = torch.maximum(
                out[i, :, ty : ty + 7, tx : tx + 7], patch
            )
    out += 0.15 * torch.randn(out.shape, generator=g)
    return out.clamp(0, 1)


def cluttered_mnist(seed: int = 0, test_copies: int = 2) -> DataSplits:
    """Shifted, cluttered MNIST from the bundled subset (see the module docstring).

    ``test_copies``: how many times each of the 1,000 test digits appears, each time with its
    own shift, clutter and noise (test image ``i`` is digit ``i % 1000``). The copies beyond
    the usual two are drawn *after* everything else from the same generator, so the training,
    validation and first 2,000 test images are the same for every ``test_copies >= 2`` (a
    larger test set for the same trained models, e.g. ``benchmarks/search_seeds.py``)."""
    if test_copies < 1:
        raise ValueError(f"test_copies must be >= 1, got {test_copies}")
    base = es.load_data("mnist")
    g = torch.Generator().manual_seed(seed)
    pool = base.train.x
    train = Split(_clutter(base.train.x, pool, g), base.train.y)
    val = Split(_clutter(base.val.x, pool, g), base.val.y)
    copies = [_clutter(base.test.x, pool, g) for _ in range(max(2, test_copies))]
    tx = torch.cat(copies[:test_copies])
    test = Split(tx, base.test.y.repeat(test_copies))
    return DataSplits("cluttered-mnist", train, val, test, base.num_classes)


# topic -> top-level standard-library modules (hand-made; a module in no group is dropped)
TOPICS: dict[str, tuple[str, ...]] = {
    "gui": ("tkinter", "turtle", "turtledemo", "curses"),
    "concurrency": ("asyncio", "multiprocessing", "threading", "concurrent", "subprocess",
                    "queue", "selectors", "sched", "_threading_local", "asynchat", "asyncore",
                    "signal"),
    "mail": ("email", "mailbox", "smtplib", "imaplib", "nntplib", "poplib", "smtpd",
             "mailcap", "quopri"),
    "web and networking": ("http", "urllib", "socket", "socketserver", "ssl", "wsgiref",
                           "xmlrpc", "telnetlib", "ftplib", "cgi", "cgitb", "webbrowser",
                           "mimetypes", "ipaddress"),
    "files and OS": ("os", "shutil", "pathlib", "tempfile", "glob", "fnmatch", "fileinput",
                     "stat", "_pyio", "io", "genericpath", "ntpath", "posixpath", "tarfile",
                     "zipfile", "gzip", "bz2", "lzma", "filecmp"),
    "data formats and text": ("xml", "json", "csv", "configparser", "plistlib", "dbm",
                              "shelve", "pickle", "pickletools", "base64", "codecs",
                              "encodings", "difflib", "textwrap", "re", "string", "pprint"),
    "language and imports": ("importlib", "typing", "inspect", "ast", "dis", "enum",
                             "functools", "collections", "_collections_abc", "dataclasses",
                             "abc", "types", "weakref", "copy", "operator", "contextlib",
                             "pkgutil", "runpy", "zipimport", "tokenize", "symtable", "pyclbr",
                             "py_compile", "imp", "__future__", "site", "sysconfig"),
    "testing and debugging": ("unittest", "doctest", "pdb", "bdb", "traceback", "timeit",
                              "trace", "profile", "cProfile", "pstats", "tracemalloc", "code",
                              "cmd", "rlcompleter", "pydoc"),
    "logging, CLI and platform": ("logging", "argparse", "optparse", "warnings", "getopt",
                                  "getpass", "shlex", "platform", "locale"),
    "numbers and time": ("_pydecimal", "decimal", "statistics", "random", "fractions",
                         "numbers", "math", "datetime", "calendar", "_strptime", "zoneinfo",
                         "heapq", "bisect", "secrets", "hmac", "hashlib", "graphlib"),
}  # fmt: skip
TOPIC_OF = {m: i for i, mods in enumerate(TOPICS.values()) for m in mods}


def topic_split(text: str) -> str:
    """``test`` / ``val`` / ``train`` for a paragraph (sha256 of its text; fixed)."""
    b = hashlib.sha256(text.encode()).digest()[0]
    return "test" if b < 90 else "val" if b < 116 else "train"


def topic_paragraphs(
    module_paragraphs: list[tuple[str, list[str]]] | None = None,
) -> dict[str, list[tuple[str, int]]]:
    """``{split: [(paragraph, topic)]}`` in corpus order (see the module docstring);
    ``module_paragraphs`` (``(dotted module, paragraphs)``) defaults to this Python's
    standard library."""
    if module_paragraphs is None:
        from edgeslim.core.data.text import module_paragraphs as stdlib_paragraphs

        module_paragraphs = stdlib_paragraphs()
    owners: dict[str, set[str]] = {}
    for module, paragraphs in module_paragraphs:
        for p in paragraphs:
            owners.setdefault(p, set()).add(module)
    out: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    done: set[str] = set()
    for module, paragraphs in module_paragraphs:
        topic = TOPIC_OF.get(module.split(".")[0])
        for p in paragraphs:
            if topic is None or len(owners[p]) > 1 or p in done:
                continue
            done.add(p)
            out[topic_split(p)].append((p, topic))
    return out


class TextClassifier(nn.Module):
    """A transformers encoder + mean pooling over the non-padding tokens + a linear head.
    Input: token ids (batch, seq), 0 = padding (the mask is computed here, so the model
    takes one tensor: search, export and ONNX Runtime see a plain ``ids -> logits`` net)."""

    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).long()
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1))


def stdlib_topics(
    tokenizer, seq_len: int = 64, max_train: int | None = None, max_test: int | None = None
) -> DataSplits:
    """The standard-library topic task as token ids (module docstring); ``max_train`` /
    ``max_test`` keep that many paragraphs evenly spread (CPU budget), val whole."""
    from edgeslim.core.data.text import spread

    parts = topic_paragraphs()
    parts["train"] = spread(parts["train"], max_train)
    parts["test"] = spread(parts["test"], max_test)

    def encode(items: list[tuple[str, int]]) -> Split:
        enc = tokenizer([t for t, _ in items], padding="max_length", truncation=True,
                        max_length=seq_len, return_tensors="pt")  # fmt: skip
        return Split(enc["input_ids"], torch.tensor([y for _, y in items]))

    train, val, test = (encode(parts[s]) for s in ("train", "val", "test"))
    return DataSplits("stdlib-topics", train, val, test, len(TOPICS))


def minilm_classifier(classes: int = len(TOPICS)) -> tuple[nn.Module, object]:
    """The real all-MiniLM-L6-v2 (offline, ``hf:minilm``) without its unused pooler, with a
    fresh head (seeded by the caller), and its tokenizer."""
    from transformers import AutoTokenizer

    from edgeslim.core.models.hf import minilm_path

    encoder = es.load_model("hf:minilm")
    encoder.pooler = None  # mean pooling instead; the pooler would be dead weight
    return TextClassifier(encoder, classes), AutoTokenizer.from_pretrained(minilm_path())
