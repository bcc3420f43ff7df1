"""benchmarks/_tasks.py's standard-library topic task (MiniLM rows of benchmarks/search.py)."""

from __future__ import annotations

import hashlib

import pytest

from conftest import import_benchmark


@pytest.fixture(scope="module")
def tasks():
    return import_benchmark("_tasks")  # benchmarks/_tasks.py


FAKE = [
    ("asyncio.events", [f"Event loop paragraph number {i} about tasks." for i in range(40)]),
    ("json.decoder", [f"Decode a JSON document, variant {i}." for i in range(40)]),
    ("tkinter.ttk", ["Shared text in two modules.", *[f"Widget {i} draws." for i in range(40)]]),
    ("mailbox", ["Shared text in two modules."]),
    ("antigravity", ["A module in no topic group at all."]),
]


def test_topics_are_deterministic_disjoint_and_labelled_by_module(tasks):
    a = tasks.topic_paragraphs(FAKE)
    assert a == tasks.topic_paragraphs(FAKE)  # deterministic
    texts = {s: {t for t, _ in a[s]} for s in a}
    assert not (texts["train"] & texts["test"] or texts["train"] & texts["val"])
    assert not texts["val"] & texts["test"]
    everything = set().union(*texts.values())
    assert "Shared text in two modules." not in everything  # in two modules: dropped
    assert "A module in no topic group at all." not in everything  # no topic: dropped
    assert len(everything) == 120
    topic = {t: y for s in a for t, y in a[s]}
    names = list(tasks.TOPICS)
    assert names[topic["Widget 3 draws."]] == "gui"
    assert names[topic["Decode a JSON document, variant 0."]] == "data formats and text"
    assert names[topic["Event loop paragraph number 5 about tasks."]] == "concurrency"
    for s, items in a.items():  # each paragraph's split is a function of its text alone
        assert all(tasks.topic_split(t) == s for t, _ in items)
    first = {t: hashlib.sha256(t.encode()).digest()[0] for t in everything}
    assert texts["test"] == {t for t, b in first.items() if b < 90}  # ~35%
    assert texts["val"] == {t for t, b in first.items() if 90 <= b < 116}
    assert {s: len(v) for s, v in a.items()} == {"train": 71, "val": 13, "test": 36}


def test_topic_groups_do_not_overlap(tasks):
    modules = [m for mods in tasks.TOPICS.values() for m in mods]
    assert len(modules) == len(set(modules)) and len(tasks.TOPICS) == 10


@pytest.mark.slow
def test_the_stdlib_task_is_big_and_balanced(tasks):
    parts = tasks.topic_paragraphs()
    assert len(parts["test"]) >= 2000 and len(parts["train"]) >= 2000
    for s in ("train", "test"):
        counts = [sum(y == k for _, y in parts[s]) for k in range(10)]
        assert min(counts) >= 0.05 * len(parts[s]) and max(counts) <= 0.2 * len(parts[s])
