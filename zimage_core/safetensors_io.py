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


class SafetensorsFile:
    """Header of one ``.safetensors`` file, checked against the file size, and reads of single tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ZImageError(f"file not found: {self.path}. Check the path, or put the file there.")
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ZImageError(f"{self.path} is not a safetensors file (only {size} bytes). Download it again.")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER or header_len + 8 > size:
                raise ZImageError(
                    f"{self.path} is not a valid safetensors file (bad header length): it is truncated or of "
                    "another format. Only .safetensors files are loaded; download the file again."
                )
            try:
                header = json.loads(fh.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ZImageError(f"{self.path} has a corrupt safetensors header ({err}). Download it again.") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = {}
        end = 0
        for key, info in header.items():
            dtype = _DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ZImageError(f"{self.path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}.")
            start, stop = info["data_offsets"]
            self._entries[key] = (dtype, tuple(info["shape"]), start, stop)
            end = max(end, stop)
        if self._data_start + end > size:
            missing = self._data_start + end - size
            raise ZImageError(
                f"{self.path} is truncated: its header promises {self._data_start + end} bytes but the file has "
                f"{size} ({missing} missing). The download or copy did not finish; download the file again."
            )

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
        fh = open(self.path, "rb") if own else fh
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
        with open(self.path, "rb") as fh:
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
            files = sorted(path.glob("*.safetensors"))
            if not files:
                extra = " (.bin/.pt pickles are not loaded: convert them to safetensors)" if any(
                    path.glob("*.bin")) or any(path.glob("*.pt")) else ""
                raise ZImageError(f"no .safetensors files in {path}{extra}.")
            return cls(files)
        if not path.exists():
            raise ZImageError(f"file not found: {path}. Check the path, or put the file there.")
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
