"""Where things live: the bundled evaluation data and harpq's cache (no torch import: --help reads this).

The zero-shot task files sit beside the checkout in `shared/data/tasks`; `HARPQ_TASKS_DIR` (the folder
itself) or `HARPQ_SHARED` (the folder holding `data/tasks`) point elsewhere. The default is resolved from
the package's location, never from the working directory, so `harpq eval` works from any folder.
"""

from __future__ import annotations

import os
from pathlib import Path

TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "lambada_openai")


def default_tasks_dir() -> Path:
    if os.environ.get("HARPQ_TASKS_DIR"):
        return Path(os.environ["HARPQ_TASKS_DIR"])
    if os.environ.get("HARPQ_SHARED"):
        return Path(os.environ["HARPQ_SHARED"]) / "data" / "tasks"
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks"


DEFAULT_TASKS_DIR = default_tasks_dir()


def cache_root() -> Path:
    """Compiled kernels and cached baselines: `$HARPQ_CACHE`, else `~/.cache/harpq`."""
    return Path(os.environ.get("HARPQ_CACHE") or Path.home() / ".cache" / "harpq")
