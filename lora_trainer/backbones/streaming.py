"""Read a .safetensors checkpoint one tensor at a time, straight into the dtype and device it is
trained in: never two copies of the model, never an fp32 copy of a half-precision base.

Why not ``safetensors.torch.load_file``: it materialises the whole file (2 GB for SD1.5, 7 GB for
SDXL) before the key conversion and the cast to the training dtype make a second full copy. Why
not a memory map either: the pages of a mapped file count in the process's RSS for as long as the
mapping lives, so converting a mapped fp16 file to fp32 holds file + model. Here each tensor is
read with ``readinto`` into its own buffer (the OS page cache, which is not this process's
memory, does the caching), converted, and the buffer is dropped before the next one.

The key conversion (``ldm_keys``) is run on *meta* tensors of the file's shapes: its output
tensors are the file's tensors or views of them (renames, ``[:, :, 0, 0]``, ``.t()``, the chunks
of OpenCLIP's fused q/k/v), and a view remembers its base, stride and offset. ``plan_from_meta``
turns that into "file key -> (output key, view geometry)", so the real conversion is the same
code as the meta one and nothing is written twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from .safetensors_header import SafetensorsFormatError, read_header

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


@dataclass(frozen=True)
class TensorEntry:
    key: str
    dtype: torch.dtype
    shape: tuple
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsIndex:
    path: Path
    entries: dict  # key -> TensorEntry, in file order
    metadata: dict

    def meta_state_dict(self) -> dict:
        """key -> a meta tensor of the file's shape and dtype (no data)."""
        return {key: torch.empty(e.shape, dtype=e.dtype, device="meta") for key, e in self.entries.items()}


def read_index(path: str | Path) -> SafetensorsIndex:
    """The header of a .safetensors file: every tensor's dtype, shape and byte range, and the metadata."""
    path = Path(path)
    header, metadata, data_start = read_header(path)
    entries = {}
    for key, spec in header.items():
        try:
            dtype = _DTYPES[spec["dtype"]]
            begin, end = spec["data_offsets"]
            shape = tuple(int(s) for s in spec["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsFormatError(f"{path}: tensor {key!r} has an unsupported entry {spec!r}") from e
        entries[key] = TensorEntry(key, dtype, shape, data_start + begin, data_start + end)
    return SafetensorsIndex(path, dict(sorted(entries.items(), key=lambda kv: kv[1].start)), metadata)


def read_tensor(handle, entry: TensorEntry, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor from an open (unbuffered) file: into a fresh CPU buffer of exactly its size, or
    into ``scratch`` (uint8, at least ``entry.nbytes``) when the caller converts it right away."""
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8) if scratch is None else scratch[:entry.nbytes]
    handle.seek(entry.start)
    view = buffer.numpy().data   # the buffer's bytes, writable in place
    done = 0
    while done < entry.nbytes:   # readinto may return short counts
        got = handle.readinto(view[done:])
        if not got:
            raise SafetensorsFormatError(f"{entry.key}: the file ends before the tensor's data")
        done += got
    return buffer.view(entry.dtype).reshape(entry.shape)


@dataclass(frozen=True)
class Placement:
    """One output tensor: ``key`` in its component, made from a file tensor by ``as_strided``."""
    component: str
    key: str
    size: tuple
    stride: tuple
    offset: int


def plan_from_meta(meta_sources: Mapping[str, torch.Tensor],
                   converted: Mapping[str, Mapping[str, torch.Tensor]]) -> dict:
    """file key -> [Placement] from a conversion run on ``meta_sources``.

    ``converted``: component -> {key: meta tensor}; each must be one of ``meta_sources`` or a view
    of one (ValueError otherwise: the conversion computed something a plan cannot replay).
    """
    by_identity = {id(tensor): key for key, tensor in meta_sources.items()}
    plan: dict = {}
    for component, state_dict in converted.items():
        for key, tensor in state_dict.items():
            base = tensor._base if tensor._base is not None else tensor
            source = by_identity.get(id(base))
            if source is None:
                raise ValueError(f"{component}.{key} is computed by the key conversion, not a view of a file "
                                 "tensor; it cannot be streamed")
            plan.setdefault(source, []).append(
                Placement(component, key, tuple(tensor.shape), tuple(tensor.stride()), int(tensor.storage_offset())))
    return plan


def stream_tensors(index: SafetensorsIndex, plan: Mapping[str, list], dtype_for: Callable[[str], torch.dtype],
                   device: torch.device) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(component, key, tensor) for every placement, file tensor by file tensor in file order.

    Floating-point tensors become ``dtype_for(component)``; all go to ``device``. Each result owns
    exactly its storage (no view keeps a larger file tensor alive; safetensors can save it later).
    A tensor that needs a cast is read into one reused scratch buffer, not a fresh one: freed
    per-tensor buffers would stay in the allocator's heap, and in RSS, as holes between the
    converted tensors (measured: +20% of the weights for an fp16 file loaded as fp32).
    """
    scratch = None
    with open(index.path, "rb", buffering=0) as handle:
        for key, entry in index.entries.items():
            placements = plan.get(key)
            if not placements:
                continue
            target = dtype_for(placements[0].component) if entry.dtype.is_floating_point else entry.dtype
            converts = target != entry.dtype or device.type != "cpu"
            if converts and (scratch is None or scratch.numel() < entry.nbytes):
                scratch = None   # free the old one first
                scratch = torch.empty(max(entry.nbytes, 1 << 20), dtype=torch.uint8)
            source = read_tensor(handle, entry, scratch if converts else None)
            for p in placements:
                tensor = source.as_strided(p.size, p.stride, p.offset).to(device=device, dtype=target)
                if not _owns_exactly(tensor):   # a part of the file tensor, or a strided copy
                    tensor = tensor.clone(memory_format=torch.contiguous_format)
                yield p.component, p.key, tensor
            del source


def _owns_exactly(tensor: torch.Tensor) -> bool:
    """Contiguous and alone in its storage: the file buffer itself (reshaped) or a fresh cast."""
    return bool(tensor.is_contiguous() and tensor.storage_offset() == 0
                and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())

