"""The FP baseline beside a quantized result: the same evaluation of the model it was quantized from.

A quantized number alone cannot tell a good result from a broken one. A harpq checkpoint records its
source model; `harpq eval` evaluates that model with the same texts, context, windows, tasks and dtype,
and caches the result under `<cache>/baselines/`, keyed by all of them and by the model's and texts'
contents (sizes and times of the model's files, a hash of each text), so the second run costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import HarpqError
from ..io.model import read_config
from ..paths import cache_root

log = logging.getLogger(__name__)


def recorded_source(model: str | Path) -> tuple[Path | None, str | None]:
    """(the FP model `model` was quantized from, None) or (None, why there is no baseline)."""
    qc = read_config(model).get("quantization_config") or {}
    if not qc:
        return None, "the model is not quantized: it is its own baseline"
    source = (qc.get("source") or {}).get("path")
    if not source:
        return None, f"the checkpoint records no source model ({qc.get('quant_method', '?')}): pass --baseline PATH"
    if not Path(source).is_dir():
        return None, f"the source model {source} is not on this machine: pass --baseline PATH"
    from ..pipeline.resume import DIGEST_SCHEME, model_digest

    recorded = qc["source"].get("digest")
    if str(recorded).startswith(DIGEST_SCHEME + ":") and recorded != model_digest(source):
        log.warning("the source model %s changed since it was quantized (its files' contents differ)", source)
    return Path(source), None


def _text_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def baseline_key(model: str | Path, settings: dict[str, Any]) -> str:
    from .. import __version__
    from ..pipeline.resume import model_digest

    key = {"model": model_digest(model), "harpq": __version__,
           **{k: v for k, v in settings.items() if k != "ppl"},
           "ppl": [[Path(f).stem, _text_digest(f)] for f in settings.get("ppl", ())]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cached_baseline(model: str | Path, settings: dict[str, Any],
                    compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """(the evaluation of `model` under `settings`, whether it came from the cache)."""
    path = cache_root() / "baselines" / f"{baseline_key(model, settings)}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text()), True
        except ValueError:
            log.warning("unreadable cached baseline %s: evaluating again", path)
    result = compute()
    try:  # a cache that cannot be written only costs a second evaluation next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result) + "\n")
        tmp.replace(path)
    except OSError as e:
        log.info("baseline not cached (%s)", e)
    return result, False


def resolve_baseline(model: str | Path, baseline: str | Path | None) -> tuple[Path | None, str | None]:
    """The baseline to evaluate for `baseline` = "auto" (the recorded source), "none", or a model path."""
    if baseline is None or str(baseline) == "none":
        return None, "not asked for"
    if str(baseline) == "auto":
        return recorded_source(model)
    read_config(baseline)  # a bad path fails now, in one line, before any evaluation
    if Path(baseline).resolve() == Path(model).resolve():
        raise HarpqError(f"--baseline {baseline} is the evaluated model itself")
    return Path(baseline), None
