"""Saved weights readable like every other file the user writes.

safetensors 0.8 writes its files with mode 0600, whatever the umask, while the config, tokenizer and JSON files
beside them follow the umask (usually 0644). A model or teacher-output store then cannot be read by another user
or a serving process under another account, on a shared machine or cluster, although its folder can."""

from __future__ import annotations

import os
from pathlib import Path


def follow_umask(path: Path) -> None:
    """Give `path` (a file, or every file under a folder) the mode a new file gets under the current umask
    (0666 & ~umask), where it is stricter than that. Errors are ignored: permissions are a courtesy here."""
    mask = os.umask(0)
    os.umask(mask)
    mode = 0o666 & ~mask
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        try:
            if f.stat().st_mode & 0o777 != mode:
                os.chmod(f, mode)
        except OSError:
            pass
