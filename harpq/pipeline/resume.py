"""Resuming an interrupted layer-wise quantization where it stopped.

Each finished decoder layer is committed to the run's working directory (`resume/` inside
`.OUT.harpq-partial`): its tensors as safetensors, then one small JSON record (written to a temporary
file and renamed, so a commit is all or nothing) with the layer count, every module spec so far, the
length of `quant_log.jsonl` at that point and the RNG state. The same command (same recipe, model files,
calibration settings, device kind, batch size) finds the record and continues with the first unfinished
layer: finished layers are loaded, not quantized again, and the calibration activations are recomputed
through them exactly as the first run computed them, so the result is bit-identical. Any other command
starts fresh and says why. Model and calibration files are known by their content, so a copy of them (new
file times) resumes too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..io.hf_integration import module_from_spec
from ..nn import tie_input_sides

log = logging.getLogger(__name__)
RECORD = "state.json"


#: the digests below name their scheme, so that a record written under an older one is told apart from a change
DIGEST_SCHEME = "content1"
_SAMPLE, _SAMPLES = 1 << 16, 16


def _content_digest(path: Path) -> str:
    """Identity of a file's content without reading all of it: its size, its first and last MiB (a safetensors
    header and the tensors around it) and 16 blocks of 64 KiB spread over the rest. Unlike times, it survives
    a copy of the same files; unlike a full hash, it costs milliseconds on a 70B model."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if size <= 4 << 20:
            h.update(f.read())
        else:
            h.update(f.read(1 << 20))
            for i in range(1, _SAMPLES + 1):
                f.seek((1 << 20) + (size - (3 << 20)) * i // (_SAMPLES + 1))
                h.update(f.read(_SAMPLE))
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()


def model_digest(model: str | Path) -> str:
    """Identity of a model directory from its files' contents (`_content_digest`), not their times."""
    h = hashlib.sha256()
    for p in sorted(Path(model).iterdir()):
        if p.is_file():
            h.update(_content_digest(p).encode())
    return f"{DIGEST_SCHEME}:{h.hexdigest()}"


def file_digest(path: str | Path) -> str:
    return f"{DIGEST_SCHEME}:{_content_digest(Path(path))}"


class LayerCheckpoints:
    """The committed layers of one run, keyed by everything that decides its result."""

    def __init__(self, directory: Path, fingerprint: dict[str, Any]):
        self.dir = directory / "resume"
        self.log_path = directory / "quant_log.jsonl"
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.record: dict[str, Any] = {"fingerprint": self.fingerprint, "layers": 0, "specs": {}, "log_bytes": 0}
        found = self._read()
        if found is not None and found.get("fingerprint") == self.fingerprint:
            self.record = found
            self._truncate_log(found["log_bytes"])
            if found["layers"]:
                log.warning("resuming: %d decoder layers already quantized by an interrupted run of this "
                            "command", found["layers"])
        else:
            if found is not None:
                log.warning("an interrupted run of a different command left work here: starting fresh")
            shutil.rmtree(self.dir, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def done(self) -> int:
        """Decoder layers finished and committed."""
        return int(self.record["layers"])

    @property
    def extra(self) -> dict[str, Any]:
        """Choices made along the way that later layers depend on (e.g. a swept codebook scale)."""
        return self.record.setdefault("extra", {})

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / RECORD).read_text())
        except (OSError, ValueError):
            return None

    def _truncate_log(self, size: int) -> None:
        if self.log_path.exists() and self.log_path.stat().st_size > size:
            with self.log_path.open("r+b") as f:
                f.truncate(size)

    def commit(self, index: int, layer: nn.Module, specs: dict[str, dict]) -> None:
        """Layer `index` is finished: store its tensors, then the record that says so."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}
        tmp = self.dir / f"layer-{index:05d}.tmp"
        save_file(tensors, tmp)
        tmp.replace(self.dir / f"layer-{index:05d}.safetensors")
        save_file({"cpu": torch.get_rng_state()}, self.dir / "rng.tmp")
        (self.dir / "rng.tmp").replace(self.dir / "rng.safetensors")
        self.record.update(layers=index + 1, specs=specs,
                           log_bytes=self.log_path.stat().st_size if self.log_path.exists() else 0)
        record = self.dir / f"{RECORD}.tmp"
        record.write_text(json.dumps(self.record))
        os.replace(record, self.dir / RECORD)

    def restore(self, index: int, layer: nn.Module, prefix: str) -> dict[str, dict]:
        """Put committed layer `index` back into `layer` (quantized modules and all); returns its specs."""
        mine = {name: spec for name, spec in self.record["specs"].items() if name.startswith(f"{prefix}.{index}.")}
        for name, spec in mine.items():
            rel = name[len(f"{prefix}.{index}."):]
            parent, _, child = rel.rpartition(".")
            owner = layer.get_submodule(parent) if parent else layer
            setattr(owner, child, module_from_spec(spec))
        layer.load_state_dict(load_file(self.dir / f"layer-{index:05d}.safetensors"), strict=True)
        tie_input_sides(layer, f"{prefix}.{index}.")
        return mine

    def restore_rng(self) -> None:
        path = self.dir / "rng.safetensors"
        if path.is_file():
            torch.set_rng_state(load_file(path)["cpu"])

    def finish(self) -> None:
        """The run is complete: the resume state does not belong in the output."""
        shutil.rmtree(self.dir, ignore_errors=True)
