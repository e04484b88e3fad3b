"""CUDA C++ kernels compiled at first use by NVRTC (through NVIDIA's `cuda-core`), cached, launched on
torch's current stream.

No build step at install: a `.cu` source of `kernels/cuda` plus its compile-time defines is compiled to
a cubin for the GPU's architecture on first use, kept on disk (keyed by the sources, the defines, the
architecture and the NVRTC version) and in memory. Launches go to torch's current stream, so a CUDA graph
that torch captures captures them too. Compiling needs no GPU (`compile_cubin`), which is how CI checks
that every source compiles for sm_80 and sm_90.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..paths import cache_root

SOURCE_DIR = Path(__file__).parent / "cuda"
log = logging.getLogger("harpq.kernels")


def _cuda_core() -> Any:
    """cuda-core's API (`cuda.core` from 0.4 on, `cuda.core.experimental` before)."""
    try:
        import cuda.core as cc

        cc.Program  # noqa: B018
    except (ImportError, AttributeError):
        import cuda.core.experimental as cc
    return cc


@functools.cache
def available() -> str | None:
    """None if the CUDA C++ kernels can run here, else the reason they cannot."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        _cuda_core()
    except ImportError:
        return "cuda-core is not installed (pip install 'harpq[cuda]')"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return f"compute capability {major}.x (the kernels need 8.0 or newer: mma.m16n8k16)"
    return None


def decode_unusable(x: torch.Tensor, max_batch: int) -> str | None:
    """Why the CUDA decode GEMVs cannot take activations x (B, n), whatever the format, or None."""
    if not x.is_cuda:
        return "input not on a CUDA device"
    why = available()
    if why:
        return why
    if x.dtype != torch.float16:
        return f"{x.dtype} activations (the CUDA kernels take float16)"
    if x.shape[0] > max_batch:
        return f"batch {x.shape[0]} > {max_batch}"
    return None


def residual_arg(residual: torch.Tensor | None, batch: int, m: int) -> torch.Tensor | None:
    """The residual a GEMV adds in its store: (batch, m) fp16, contiguous."""
    if residual is None:
        return None
    if residual.shape != (batch, m) or residual.dtype != torch.float16:
        raise ValueError(f"residual of shape {tuple(residual.shape)} {residual.dtype}, expected ({batch}, {m}) fp16")
    return residual.contiguous()


def norm_shared(batch: int, n: int) -> int:
    """Bytes of shared memory a GEMV takes to hold RMSNorm(x) of `batch` rows of n fp16 values and the weight."""
    return (batch + 1) * n * 2


def norm_fits(batch: int, n: int, max_batch: int) -> bool:
    """Whether a GEMV can fold the RMSNorm of `batch` rows of n values into its shared memory."""
    return batch <= max_batch and norm_shared(batch, n) <= NORM_SHARED_LIMIT


def norm_arg(weight: torch.Tensor, batch: int, n: int, max_batch: int) -> torch.Tensor:
    """The RMSNorm weight a GEMV folds into its input: (n,) fp16, contiguous, for rows that `norm_fits`."""
    if not norm_fits(batch, n, max_batch):
        raise ValueError(f"a folded RMSNorm takes at most {max_batch} rows and {NORM_SHARED_LIMIT // 2} values "
                         f"with its weight, got {batch} rows of {n}")
    if weight.shape != (n,) or weight.dtype != torch.float16:
        raise ValueError(f"norm weight of shape {tuple(weight.shape)} {weight.dtype}, expected ({n},) fp16")
    return weight if weight.is_contiguous() and weight.data_ptr() % 16 == 0 else weight.contiguous().clone()


def _sources_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(SOURCE_DIR.glob("*")):
        if path.suffix in (".cu", ".cuh"):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _nvrtc_version() -> str:
    try:
        from cuda.bindings import nvrtc

        _, major, minor = nvrtc.nvrtcVersion()
        return f"{major}.{minor}"
    except Exception:  # noqa: BLE001 - only part of a cache key
        return "unknown"


def compile_cubin(source: str, defines: dict[str, int], arch: str) -> bytes:
    """Compile `kernels/cuda/<source>` with `-D` defines for `arch` (e.g. "sm_90"); needs no GPU."""
    cc = _cuda_core()
    options = cc.ProgramOptions(
        name=source, arch=arch, std="c++17", include_path=[str(SOURCE_DIR)],
        define_macro=[(k, str(v)) for k, v in sorted(defines.items())] or None,
    )
    code = (SOURCE_DIR / source).read_text()
    return bytes(cc.Program(code, code_type="c++", options=options).compile("cubin").code)


def _cache_dir() -> Path:
    return cache_root() / "kernels"


@functools.cache
def kernel(source: str, entry: str, defines: tuple[tuple[str, int], ...], device_index: int) -> Any:
    """The loaded kernel `entry` of `source` built with `defines` for the device's architecture."""
    cc = _cuda_core()
    cc.Device(device_index).set_current()  # the primary context, the one torch uses
    major, minor = torch.cuda.get_device_capability(device_index)
    arch = f"sm_{major}{minor}"
    key = hashlib.sha256(repr((_sources_digest(), source, defines, arch, _nvrtc_version())).encode()).hexdigest()[:24]
    path = _cache_dir() / f"{Path(source).stem}-{arch}-{key}.cubin"
    if path.exists():
        cubin = path.read_bytes()
    else:
        cubin = compile_cubin(source, dict(defines), arch)
        try:  # a cache that cannot be written only costs a recompile next time
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(cubin)
            tmp.replace(path)
        except OSError as e:
            log.warning("kernel cache %s not writable (%s): kernels recompile in every process", path.parent, e)
    from_cubin = getattr(cc.ObjectCode, "from_cubin", None)
    code = from_cubin(cubin) if from_cubin else cc.ObjectCode(cubin, "cubin")
    return code.get_kernel(entry)


class _TorchStream:
    """A stream handle in the `__cuda_stream__` protocol, for cuda-core versions without `from_handle`."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self.handle


@functools.cache
def _stream(handle: int) -> Any:
    stream = _cuda_core().Stream
    if hasattr(stream, "from_handle"):
        return stream.from_handle(handle)
    return stream._init(_TorchStream(handle))


def ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


#: programmatic dependent launch (see `gemv_common.cuh`): None = as HARPQ_PDL says ("1": on where it works,
#: sm_90 on and a cuda-core that can ask for it; off by default: it speeds chains of GEMVs, but not a
#: decode step, whose GEMVs follow other kernels); a benchmark sets it to compare.
PDL: bool | None = None


@functools.cache
def _pdl_supported(device_index: int) -> bool:
    if os.environ.get("HARPQ_PDL", "0") != "1" or torch.cuda.get_device_capability(device_index)[0] < 9:
        return False
    from cuda.core import LaunchConfig

    try:
        LaunchConfig(grid=1, block=32, programmatic_stream_serialization=True)
    except TypeError:  # a cuda-core without the option
        return False
    return True


#: dynamic shared memory a folded RMSNorm may take: of the 48 KB a kernel gets without opting in to more (static
#: and dynamic together), the GEMV's own reduction buffer takes up to 8 KB at batch ≤ 8
NORM_SHARED_LIMIT = 40 * 1024


#: most row blocks and parts per block a tail split takes (`tuning.tail_split` splits fewer blocks than the GPU
#: has SMs), and the floats of one part's sums (32 lanes · MT · NT · 4 accumulators at most)
SPLIT_MAX_BLOCKS, SPLIT_MAX_PARTS, SPLIT_PART_FLOATS = 256, 8, 32 * 16
_split_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_workspace(device_index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The tail split's slots and zeroed counters on the device (`cuda/gemv_common.cuh`, TailSplit), which the
    kernels leave zeroed; None while a CUDA graph is being captured and they do not exist yet (an allocation
    there would belong to the graph's pool)."""
    if device_index not in _split_buffers:
        if torch.cuda.is_current_stream_capturing():
            return None
        dev = torch.device("cuda", device_index)
        _split_buffers[device_index] = (
            torch.empty(SPLIT_MAX_BLOCKS * SPLIT_MAX_PARTS * SPLIT_PART_FLOATS, dtype=torch.float32, device=dev),
            torch.zeros(SPLIT_MAX_BLOCKS, dtype=torch.int32, device=dev))
    return _split_buffers[device_index]


@functools.cache
def _resident(kern: Any, block: int, shared: int) -> int:
    """Blocks of `kern` an SM holds at once (0 where cuda-core cannot say)."""
    occupancy = getattr(kern, "occupancy", None)
    return occupancy.max_active_blocks_per_multiprocessor(block, shared) if occupancy is not None else 0


def gemv_split(kern: Any, blocks: int, block: int, steps: int, shared: int = 0, allowed: bool = True,
               default: bool = True) -> tuple[int, tuple[Any, ...]]:
    """The grid of a decode GEMV of `blocks` row blocks and its tail-split arguments (split blocks, parts, slots,
    counters): the split `tuning.tail_split` picks where `allowed` (not with the TMA ring) and switched on: by
    `default` (the format measured faster with it) unless HARPQ_TAIL_SPLIT=0 or tuning.OVERRIDE["TAIL_SPLIT"]
    says otherwise; tuning.OVERRIDE["SPLIT_K"] = q splits every row block into q parts (up to 256 blocks)."""
    from . import tuning

    device = torch.cuda.current_device()
    split, q = 0, 1
    on = tuning.OVERRIDE.get("TAIL_SPLIT", int(tuning.TAIL_SPLIT and default))
    buffers = _split_workspace(device) if allowed and on else None
    if buffers is not None:
        split, q = tuning.tail_split(blocks, tuning._sm_count(device), _resident(kern, block, shared), steps,
                                     block // 32, most=SPLIT_MAX_PARTS)
        if "SPLIT_K" in tuning.OVERRIDE:  # every row block in parts (a measurement's setting)
            split, q = blocks, tuning.OVERRIDE["SPLIT_K"]
        if split > SPLIT_MAX_BLOCKS or q > SPLIT_MAX_PARTS:
            split, q = 0, 1
    work, counters = buffers if buffers is not None else (None, None)
    return blocks + split * (q - 1), (np.int32(split), np.int32(q), ptr(work), ptr(counters))


def launch(kern: Any, grid: int, block: int, *args: Any, shared: int = 0) -> None:
    """Launch on torch's current stream (captured by an active CUDA graph), overlapping the kernel before
    it where programmatic dependent launch is on; `shared`: bytes of dynamic shared memory."""
    from cuda.core import LaunchConfig
    from cuda.core import launch as cu_launch

    pdl = _pdl_supported(torch.cuda.current_device()) if PDL is None else PDL
    extra = {"shmem_size": shared} if shared else {}
    config = LaunchConfig(grid=grid, block=block, programmatic_stream_serialization=True, **extra) if pdl else \
        LaunchConfig(grid=grid, block=block, **extra)
    cu_launch(_stream(torch.cuda.current_stream().cuda_stream), config, kern, *args)
