"""The benchmarks' JSON report: written whole (to a temporary file, then renamed), its folder created."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """Write `report` to `out` as indented JSON; a run stopped mid-write leaves the previous file whole."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
