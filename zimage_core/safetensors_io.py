"""Streaming safetensors reader: one tensor at a time with plain reads, no memory map.

``safetensors.safe_open`` memory-maps the file, and every page it touches stays counted in the process's
resident memory until the file is closed: loading a 24.6 GB fp32 checkpoint into bf16 that way peaks at
the size of the fp32 file. Reading each tensor with ``readinto`` into its own buffer and casting it at
once keeps the peak at the target size plus one tensor (measured in tests/test_loading_memory.py).
Writing still goes through ``safetensors.torch.save_file``.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import ZImageError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e8m0fnu"):  # mxfp8 block scales as comfy-kitchen writes them (safetensors >= 0.6)
    _DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
_MAX_HEADER = 100 * 1024 * 1024


class StagingBuffer:
    """One reusable read buffer for tensors that are cast or moved right after reading.

    Allocating and freeing a fresh buffer per tensor makes glibc's allocator keep freed blocks around
    (its mmap threshold grows): a 208 MiB bf16 load then peaked 370 MiB above the start instead of 232.
    Tensors that keep their stored dtype on the CPU are read into their own buffer instead, since they
    are used as they are.
    """

    def __init__(self, target_dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.target_dtype = target_dtype
        self.device = torch.device(device)
        self._buf = torch.empty(0, dtype=torch.uint8)

    def wants(self, stored: torch.dtype) -> bool:
        return stored != self.target_dtype or self.device.type != "cpu"

    def view(self, nbytes: int) -> torch.Tensor:
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(0, dtype=torch.uint8)  # free the old one first
            pin = self.device.type == "cuda"
            self._buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        return self._buf[:nbytes]


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I64": 8, "I32": 4,
             "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _open(path: Path):
    """``open(path, "rb")`` with the OS error turned into a message that names the file."""
    try:
        return open(path, "rb")
    except PermissionError:
        raise ZImageError(f"{path} cannot be read (permission denied): give this user read access "
                          f"(e.g. chmod a+r) or copy the file somewhere readable.") from None
    except IsADirectoryError:
        raise ZImageError(f"{path} is a folder, not a .safetensors file.") from None
    except OSError as err:
        raise ZImageError(f"{path} cannot be read: {err.strerror or err}.") from None


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def check_regular_file(path: str | os.PathLike, what: str = "", fix: str = "give a .safetensors file") -> Path:
    """``path`` as a ``Path`` when it names an existing regular file (a symlink to one counts); else a
    ``ZImageError`` saying what it is instead: missing, a folder, a FIFO, a device (``/dev/zero``), a socket.

    One ``stat`` call. Opening a FIFO would block until a writer comes and a device never ends, so nothing is
    opened before this check passes."""
    path = Path(path)
    named = f"{what} {path}" if what else str(path)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError) as err:
        missing = f"{named} not found" if what else f"file not found: {path}"
        why = " (a part of the path is a file, not a folder)" if isinstance(err, NotADirectoryError) else ""
        raise ZImageError(f"{missing}{why}. Check the path, or put the file there.") from None
    except OSError as err:
        raise ZImageError(f"{named} cannot be read: {err.strerror or err}.") from None
    if not stat.S_ISREG(mode):
        raise ZImageError(f"{named} is {_kind(mode)}, not a regular file: {fix}.")
    return path


def _is_uint(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_header(header, data_size: int, path) -> tuple[dict, dict]:
    """Check a decoded header with the rules of the safetensors library; return ``(entries, metadata)``.

    The rules: the header is an object; ``__metadata__`` maps strings to strings; every other entry is an
    object with a known ``dtype``, a ``shape`` of non-negative integers and ``data_offsets`` ``[begin, end]``
    whose length equals the shape's byte size; sorted by offset, the spans follow each other with no gap and
    no overlap, and together cover the data section exactly. Any failure names the file, the tensor and the rule.
    """
    def bad(key, rule):
        where = f"tensor {key!r}" if key is not None else "header"
        raise ZImageError(f"{path} is not a valid safetensors file: {where}: {rule}. The file is damaged or was "
                          "written by a broken tool; download or convert it again.")

    if not isinstance(header, dict):
        bad(None, f"the header must be a JSON object, got {type(header).__name__}")
    metadata = header.get("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        bad(None, "__metadata__ must map strings to strings")
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            bad(key, f"the entry must be an object with dtype, shape and data_offsets, got {type(info).__name__}")
        missing = [f for f in ("dtype", "shape", "data_offsets") if f not in info]
        if missing:
            bad(key, f"the entry has no {', '.join(missing)}")
        name = info["dtype"]
        if not isinstance(name, str) or name not in _DTYPES:
            bad(key, f"unknown dtype {name!r} (known: {', '.join(_DTYPES)})")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            bad(key, f"the shape must be a list of non-negative integers, got {shape!r}")
        offsets = info["data_offsets"]
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
            bad(key, f"data_offsets must be two non-negative integers [begin, end], got {offsets!r}")
        start, stop = offsets
        if stop < start:
            bad(key, f"data_offsets {offsets} are reversed (end before begin)")
        nbytes = _ITEMSIZE[name]
        for d in shape:
            nbytes *= d
        if nbytes != stop - start:
            bad(key, f"shape {shape} of {name} needs {nbytes} bytes but data_offsets {offsets} span {stop - start}")
        entries[key] = (_DTYPES[name], tuple(shape), start, stop)
    end = 0
    for key, (_, _, start, stop) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if start != end:
            rule = (f"its bytes {start}..{stop} overlap the previous tensor's, which end at {end}" if start < end
                    else f"a gap of {start - end} unused bytes before it (previous data ends at {end})")
            bad(key, rule)
        end = stop
    if end != data_size:
        if end > data_size:
            raise ZImageError(
                f"{path} is truncated: its header promises {end} bytes of data but the file has {data_size} "
                f"({end - data_size} missing). The download or copy did not finish; download the file again."
            )
        bad(None, f"the tensors cover {end} bytes but the data section has {data_size} (trailing bytes)")
    return entries, metadata


class SafetensorsFile:
    """Header of one ``.safetensors`` file, checked as strictly as the safetensors library, and reads of single tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = check_regular_file(path)
        size = self.path.stat().st_size
        with _open(self.path) as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ZImageError(f"{self.path} is not a safetensors file (only {size} bytes). Download it again.")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER or header_len + 8 > size:
                raise ZImageError(
                    f"{self.path} is not a valid safetensors file (bad header length): it is truncated or of "
                    "another format. Only .safetensors files are loaded; download the file again."
                )
            raw = fh.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ZImageError(f"{self.path} has a corrupt safetensors header ({err}). Download it again.") from None
        self._data_start = 8 + header_len
        self._entries, self.metadata = parse_header(header, size - self._data_start, self.path)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def nbytes(self, key: str) -> int:
        _, _, start, stop = self._entries[key]
        return stop - start

    def read(self, key: str, fh=None, staging: StagingBuffer | None = None) -> torch.Tensor:
        """Read one tensor in its stored dtype: into a fresh CPU buffer, or into ``staging`` when it wants it
        (then the result is only valid until the next read)."""
        dtype, shape, start, stop = self._entries[key]
        if staging is not None and staging.wants(dtype):
            buf = staging.view(stop - start)
        else:
            buf = torch.empty(stop - start, dtype=torch.uint8)
        own = fh is None
        fh = _open(self.path) if own else fh
        try:
            fh.seek(self._data_start + start)
            got = fh.readinto(memoryview(buf.numpy()))
        finally:
            if own:
                fh.close()
        if got != stop - start:
            raise ZImageError(f"{self.path}: short read of {key!r}; the file is damaged. Download it again.")
        return buf.view(dtype).reshape(shape)

    def iter_tensors(self, keys: list[str] | None = None,
                     staging: StagingBuffer | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` in file order; see ``read`` for ``staging``."""
        wanted = self.keys() if keys is None else keys
        order = sorted(wanted, key=lambda k: self._entries[k][2])
        with _open(self.path) as fh:
            for key in order:
                yield key, self.read(key, fh, staging)


class Checkpoint:
    """One or more safetensors files seen as a single key space (a sharded folder or a single file)."""

    def __init__(self, paths: list[str | os.PathLike]):
        if not paths:
            raise ZImageError("no checkpoint files given.")
        self.files = [SafetensorsFile(p) for p in paths]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for k in f.keys():
                self._where[k] = f

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "Checkpoint":
        """A ``.safetensors`` file, or a folder holding one or more (sharded with an index, or not)."""
        path = Path(path)
        if path.is_dir():
            files = sorted(f for f in path.glob("*.safetensors") if f.is_file())
            if not files:
                if path.suffix == ".safetensors":  # meant as one file
                    raise ZImageError(f"{path} is a folder, not a regular file: give the .safetensors file itself.")
                extra = " (.bin/.pt pickles are not loaded: convert them to safetensors)" if any(
                    path.glob("*.bin")) or any(path.glob("*.pt")) else ""
                raise ZImageError(f"no .safetensors files in {path}{extra}.")
            return cls(files)
        check_regular_file(path)
        if path.suffix != ".safetensors":
            raise ZImageError(
                f"{path.name}: only .safetensors files are loaded (pickled .ckpt/.pt/.bin files can run code). "
                "Use the .safetensors release of this model."
            )
        return cls([path])

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key].dtype(key)

    def read(self, key: str) -> torch.Tensor:
        return self._where[key].read(key)

    def iter_tensors(self, staging: StagingBuffer | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for f in self.files:
            yield from f.iter_tensors(staging=staging)

    @property
    def nbytes(self) -> int:
        return self.nbytes_of(self._where)

    def nbytes_of(self, keys) -> int:
        return sum(self._where[k].nbytes(k) for k in keys)

    @property
    def name(self) -> str:
        return self.files[0].path.name if len(self.files) == 1 else str(self.files[0].path.parent)


def check_loaded_tensor(name: str, tensor: torch.Tensor, expected: torch.Tensor, source: str) -> None:
    """A file tensor fits the model's parameter ``expected`` (dtype kind and shape), or a message naming both."""
    if not tensor.is_floating_point() or tensor.dtype == _DTYPES.get("F8_E8M0"):  # E8M0: powers of two, scales only
        raise ZImageError(
            f"{source}: tensor {name!r} is stored as {str(tensor.dtype).replace('torch.', '')}, but the model needs "
            "floating-point weights (bf16, fp16, fp32 or fp8). An integer tensor without the scales of a known "
            "quantized layout (ComfyUI's fp8/nvfp4/mxfp8/int8 files carry them) cannot be used; use the bf16, fp16 "
            "or fp8 release."
        )
    if tuple(tensor.shape) != tuple(expected.shape):
        raise ZImageError(
            f"{source}: tensor {name!r} has shape {list(tensor.shape)} but the model built from its config expects "
            f"{list(expected.shape)}. Likely cause: the file is a different model size or variant than its config "
            "(a config.json from another model next to it, or a mixed-up download); use the matching config.json "
            "or the file that belongs to this model."
        )


_PROBE_CHUNK = 1 << 20  # elements


def finite_probe(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-d float32 sum on the tensor's device: NaN or Inf in, non-finite out. Reading all the probes once at
    the end costs one synchronisation per model, not one per tensor.

    On the CPU a whole-tensor ``sum(dtype=float32)`` of a bf16 tensor makes an fp32 copy of it: a 208 MiB bf16
    load then peaked 370 MiB above the start instead of 234 (tests/test_loading_memory.py). Summing 1 M
    elements at a time keeps the temporaries at 4 MiB.
    """
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu" or flat.numel() <= _PROBE_CHUNK:
        return flat.sum(dtype=torch.float32)
    return torch.stack([part.sum(dtype=torch.float32) for part in flat.split(_PROBE_CHUNK)]).sum()


def check_finite(probes: list[tuple[str, torch.Tensor]], source: str) -> None:
    """Name the tensors whose probe is not finite. (An fp32 sum of finite weights overflows only with values
    near 1e38 per element: such a file is broken too.)"""
    if not probes:
        return
    ok = torch.isfinite(torch.stack([p.to(probes[0][1].device) for _, p in probes])).cpu()
    suspects = [name for (name, _), good in zip(probes, ok.tolist()) if not good]
    if not suspects:
        return
    raise ZImageError(
        f"{source}: tensor {suspects[0]!r} holds NaN or Inf values"
        + (f" ({len(suspects) - 1} more tensors too)" if len(suspects) > 1 else "")
        + ". The file is damaged or was saved from a diverged training run, and would give black images; "
        "download it again or use another checkpoint."
    )
