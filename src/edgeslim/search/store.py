"""A search's run directory: every finished trial persisted, so a killed search resumes.

    run/meta.json        what the search is (space, budget, target, settings): a resume must
                         match it, else RunDirError (nothing is overwritten)
    run/trials.jsonl     one JSON line per finished trial, appended with one write + fsync
    run/final.jsonl      one line per fine-tuned finalist (+ final/trial-N.pt, its weights)
    run/calibration.json the cost model's measured constants, reused on resume
    run/premeasured.jsonl the measured cost of the trials checked before fine-tuning
    run/anchors.json     the candidates tried first (chosen with measurements; reused)

A line cut short by a kill (no final newline) is ignored on reading: that trial runs again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgeslim.core.errors import RunDirError
from edgeslim.core.fileio import atomic_path, atomic_write_text


class RunStore:
    """The files of one search run in ``directory`` (created when missing)."""

    def __init__(self, directory: str | os.PathLike, meta: dict[str, Any]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "meta.json"
        text = json.dumps(meta, indent=1, sort_keys=True, default=str)
        if path.exists():
            old = path.read_text(encoding="utf-8")
            if json.loads(old) != json.loads(text):
                differ = sorted(
                    k
                    for k in {**json.loads(old), **json.loads(text)}
                    if json.loads(old).get(k) != json.loads(text).get(k)
                )
                raise RunDirError(
                    f"{self.dir} holds a different search (differs in: {', '.join(differ)}); "
                    "use another --out directory or delete it"
                )
        else:
            atomic_write_text(path, text)

    def _read(self, name: str) -> dict[int, dict[str, Any]]:
        path = self.dir / name
        out: dict[int, dict[str, Any]] = {}
        if not path.exists():
            return out
        for line in path.read_text(encoding="utf-8").split("\n")[:-1]:  # last: cut or empty
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a torn line from a killed writer
                out[int(record["number"])] = record
        return out

    def _append(self, name: str, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)  # one write: a line is there whole or (cut) ignored
            os.fsync(fd)
        finally:
            os.close(fd)

    def trials(self) -> dict[int, dict[str, Any]]:
        return self._read("trials.jsonl")

    def add_trial(self, record: dict[str, Any]) -> None:
        self._append("trials.jsonl", record)

    def premeasured(self) -> dict[int, dict[str, Any]]:
        """``{number: record}`` of the trials measured on the target before fine-tuning."""
        return self._read("premeasured.jsonl")

    def add_premeasured(self, record: dict[str, Any]) -> None:
        self._append("premeasured.jsonl", record)

    def finals(self) -> dict[int, dict[str, Any]]:
        return {n: r for n, r in self._read("final.jsonl").items() if self.model_path(n).exists()}

    def model_path(self, number: int) -> Path:
        return self.dir / "final" / f"trial-{number}.pt"

    def add_final(self, record: dict[str, Any], state: dict[str, Any]) -> None:
        """A finalist's record and its weights (a state dict: the structure is rebuilt from
        the candidate, so graph-mode quantized models need no pickling)."""
        import torch

        path = self.model_path(int(record["number"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        self._append("final.jsonl", record)

    def load_state(self, number: int) -> dict[str, Any]:
        import torch

        return torch.load(self.model_path(number), weights_only=True)

    def anchors(self) -> list[dict[str, Any]] | None:
        """The candidates the search tries first, when already chosen (they may depend on
        measurements, so a resume reads them instead of choosing again)."""
        path = self.dir / "anchors.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def save_anchors(self, anchors: list[dict[str, Any]]) -> None:
        atomic_write_text(self.dir / "anchors.json", json.dumps(anchors, indent=1))

    def calibration(self) -> dict[str, Any] | None:
        path = self.dir / "calibration.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def save_calibration(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.dir / "calibration.json", json.dumps(data, indent=1))
