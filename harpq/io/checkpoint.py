"""Quantized model directories: sharded safetensors, config with `quantization_config`, a manifest.

Everything is written into a working directory beside OUT and renamed into place only when complete
(an OUT being replaced is renamed aside first and removed last), so an interrupted or failed run never
leaves an output that looks finished, and never loses the old one. An OUT that is, contains or lies in
what the run reads, or contains the working directory, is refused whatever --overwrite says. `harpq_manifest.json`
holds the SHA-256 of every file; loading checks it and refuses a corrupt or modified checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import HarpqError

MANIFEST = "harpq_manifest.json"
SHARD_BYTES = 2 * 1024**3
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
             "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


PARTIAL = ".{}.harpq-partial"  # the run's working directory beside OUT (kept by a killed run: resumable)
OLD = ".{}.harpq-old-{}"  # an OUT being replaced, renamed aside until the new one is in place
OWNER = "owner.pid"


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def check_output(out: Path, overwrite: bool, reads: Sequence[str | Path] = ()) -> None:
    """Refuse an OUT whose writing or replacing could destroy what the run reads or the working directory,
    whatever --overwrite says; and an existing OUT without --overwrite."""
    if out.is_symlink():
        raise HarpqError(f"output {out} is a symbolic link: give the real directory")
    target = _real(out)
    for src in reads:
        real = _real(Path(src))
        if target == real or target in real.parents:
            raise HarpqError(f"output {out} would replace {src}, which this run reads")
        if real in target.parents:
            raise HarpqError(f"output {out} is inside {src}, which this run reads")
    cwd = _real(Path.cwd())
    if target == cwd or target in cwd.parents:
        raise HarpqError(f"output {out} is or contains the working directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise HarpqError(f"output {out} exists and is not empty (pass --overwrite to replace it)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(partial: Path) -> int | None:
    try:
        return int((partial / OWNER).read_text())
    except (OSError, ValueError):
        return None


def recover_stale(out: Path) -> None:
    """Undo what killed runs left beside OUT: an OUT renamed aside but never replaced is put back, older
    leftovers are removed. (A partial directory is left to the next run, which resumes or clears it.)"""
    prefix = f".{out.name}.harpq-old-"
    for p in out.parent.glob(f"{prefix}*"):
        pid = p.name[len(prefix):]
        if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
            continue
        if not out.exists():
            p.rename(out)
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{out.name}.harpq-partial-*"):  # per-process names of earlier versions
        shutil.rmtree(p, ignore_errors=True)


def replace_dir(new: Path, out: Path) -> None:
    """Put the finished `new` at `out`: an old OUT is renamed aside first and removed only after."""
    if out.exists() or out.is_symlink():
        old = out.parent / OLD.format(out.name, os.getpid())
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        new.rename(out)


@contextlib.contextmanager
def staging_dir(out: str | Path, overwrite: bool = False, reads: Sequence[str | Path] = (),
                resumable: bool = False) -> Iterator[Path]:
    """Yield the run's working directory, which becomes `out` on success.

    It is `.OUT.harpq-partial` beside OUT, owned by this process. A failure removes it, except that a
    `resumable` run interrupted from the keyboard keeps it (a killed run keeps it too), so the same
    command continues; a live run that owns it is never touched."""
    out = Path(out)
    check_output(out, overwrite, reads)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HarpqError(f"cannot create the folder of {out}: {e.strerror or e}") from None
    recover_stale(out)
    tmp = out.parent / PARTIAL.format(out.name)
    owner = _owner(tmp) if tmp.exists() else None
    if owner is not None and owner != os.getpid() and _alive(owner):
        raise HarpqError(f"another harpq run (process {owner}) is writing {out}")
    if tmp.exists() and not resumable:
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(exist_ok=True)
        (tmp / OWNER).write_text(str(os.getpid()))
    except OSError as e:
        raise HarpqError(f"cannot write beside {out}: {e.strerror or e}") from None
    try:
        yield tmp
    except BaseException as e:
        if not (resumable and isinstance(e, KeyboardInterrupt)):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / OWNER).unlink(missing_ok=True)
    try:
        replace_dir(tmp, out)
    except OSError as e:
        raise HarpqError(f"cannot put the result at {out}: {e.strerror or e}") from None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _untied_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without second names of shared tensors (tied embeddings are re-tied on load)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return out


class ShardWriter:
    """Writes tensors into ~2 GiB safetensors shards as they come, so a streamed model never sits in
    memory whole; `close()` names the shards model-0000i-of-0000N (or model.safetensors) and indexes them."""

    def __init__(self, directory: Path, shard_bytes: int = SHARD_BYTES):
        self.directory = directory
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self.written)}.safetensors"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.size = {}, 0

    def close(self) -> list[str]:
        if self.pending or not self.written:
            self._flush()
        count = len(self.written)
        if count == 1:
            self.written[0][0].rename(self.directory / "model.safetensors")
            return ["model.safetensors"]
        weight_map = {}
        names = []
        for i, (path, keys) in enumerate(self.written):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            path.rename(self.directory / name)
            weight_map.update({k: name for k in keys})
            names.append(name)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return [*names, "model.safetensors.index.json"]


def save_weights(model: nn.Module, directory: Path) -> list[str]:
    """Sharded safetensors (with an index when there is more than one shard); returns the file names."""
    writer = ShardWriter(directory)
    for name, tensor in _untied_state_dict(model).items():
        writer.add(name, tensor)
    return writer.close()


def save_quantized(model: nn.Module, source: str | Path, directory: Path, quantization_config: dict) -> None:
    """Write weights, config (with `quantization_config`), tokenizer files and the manifest."""
    save_weights(model, directory)
    finish_checkpoint(directory, model.config.to_dict(), source, quantization_config)


def finish_checkpoint(directory: Path, config: dict, source: str | Path, quantization_config: dict) -> None:
    """Everything after the weights: config.json, tokenizer and generation files, the manifest."""
    config = {**config, "quantization_config": quantization_config}
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in AUX_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, directory / name)
    write_manifest(directory)


def write_manifest(directory: Path) -> None:
    files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in (MANIFEST, OWNER))
    manifest = {"format_version": 1, "sha256": {name: sha256(directory / name) for name in files}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def verify_manifest(directory: str | Path) -> None:
    """Raise `HarpqError` unless every file listed in the manifest is present and unchanged."""
    d = Path(directory)
    path = d / MANIFEST
    if not path.is_file():
        raise HarpqError(f"{d} has no {MANIFEST}: not a complete harpq checkpoint")
    try:
        listed = json.loads(path.read_text())["sha256"]
        if not isinstance(listed, dict):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise HarpqError(f"{path} is damaged") from None
    needed = ["config.json", *(p.name for p in d.glob("*.safetensors")), *(p.name for p in d.glob("*.index.json"))]
    unlisted = [n for n in needed if n not in listed]
    if unlisted:
        raise HarpqError(f"{d / unlisted[0]} is not in {MANIFEST}: the checkpoint was modified")
    for name, digest in listed.items():
        f = d / name
        if not f.is_file():
            raise HarpqError(f"{f} is missing from the checkpoint")
        if sha256(f) != digest:
            raise HarpqError(f"checksum mismatch for {f}: the file is corrupt or was modified")
