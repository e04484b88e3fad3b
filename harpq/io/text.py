"""Reading evaluation and calibration text: plain `.txt`, or `.jsonl` with a "text" field per line."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import HarpqError


def read_text(path: str | Path) -> str:
    """The whole text of a file; `.jsonl` documents are joined with a blank line."""
    p = Path(path)
    if not p.is_file():
        raise HarpqError(f"text file not found: {p}")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HarpqError(f"{p} is not UTF-8 text") from None
    if p.suffix != ".jsonl":
        return raw
    docs = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise HarpqError(f"{p}:{i}: expected a JSON object with a \"text\" field") from None
        if not isinstance(text, str):
            raise HarpqError(f"{p}:{i}: \"text\" is a {type(text).__name__}, not a string")
        docs.append(text)
    return "\n\n".join(docs)
