"""metrics.jsonl: one JSON object per log step, appended and flushed, so a killed run keeps its history."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional


class MetricsWriter:
    def __init__(self, path: Optional[Path]) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")

    def drop_after(self, stage: str, step: int) -> None:
        """Forget `stage`'s lines past `step`: on resume from a checkpoint at `step`, the steps after it are
        trained (and logged) again, and the file should read as one uninterrupted run."""
        if self.path is None or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = [line for line in lines if not _past(line, stage, step)]
        if len(keep) != len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(keep), encoding="utf-8")
            os.replace(tmp, self.path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _past(line: str, stage: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by the kill
        return True
    return record.get("stage") == stage and int(record.get("step") or 0) > step
