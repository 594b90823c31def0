"""Probes of the machine a run is on: package versions, device, memory, GPU utilisation, free space.

Every probe answers "unknown" (None) instead of raising: a missing /proc, an absent pynvml or an
odd driver must never stop a training run that only wanted to log a number.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

try:
    import torch
except ImportError:   # `lora-trainer doctor` still runs and reports it; nothing else here is called
    pass

MIB = 1 << 20


# ---- versions and environment ----------------------------------------------------------------------
def package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_info(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> dict:
    """What a bug report needs to reproduce a run, in a stable key order."""
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "diffusers": package_version("diffusers"),
            "transformers": package_version("transformers"), "safetensors": package_version("safetensors"),
            "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device is not None:
        info["device"] = str(device)
        if torch.device(device).type == "cuda":
            info["gpu"] = gpu_name(torch.device(device))
    if dtype is not None:
        info["dtype"] = str(dtype).replace("torch.", "")
    return info


def cpu_native_bf16() -> str | None:
    """The CPU feature that runs bf16 matrix maths natively ("AMX", "AVX512-BF16"), "" when it has
    none (bf16 is then emulated: slower than fp32), None when this torch cannot tell."""
    try:
        if torch.cpu._is_amx_tile_supported():
            return "AMX"
        return "AVX512-BF16" if torch.cpu._is_avx512_bf16_supported() else ""
    except AttributeError:   # (private probes: absent in some torch versions)
        return None


def gpu_name(device: torch.device) -> str | None:
    try:
        return torch.cuda.get_device_name(device)
    except Exception:
        return None


# ---- memory ----------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int | None:
    """A `VmXXX:  1234 kB` line of /proc/self/status (Linux), in KiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss_from_resource() -> int | None:
    try:
        import resource
    except ImportError:   # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024   # macOS reports bytes, Linux KiB


def cpu_memory() -> dict:
    """Resident set size now and its peak, in bytes (None where the OS does not say)."""
    rss, peak = _proc_status_kib("VmRSS"), _proc_status_kib("VmHWM")
    return {"rss": rss * 1024 if rss is not None else None,
            "rss_peak": peak * 1024 if peak is not None else _peak_rss_from_resource()}


def cuda_memory(device: torch.device) -> dict:
    return {"allocated": torch.cuda.memory_allocated(device),
            "reserved": torch.cuda.memory_reserved(device),
            "peak": torch.cuda.max_memory_allocated(device)}


def device_memory(device: torch.device | str) -> dict:
    """Bytes: allocated/reserved/peak on CUDA, rss/rss_peak of this process otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return cuda_memory(device)
        except Exception:
            return {}
    return cpu_memory()


def reset_peak_memory(device: torch.device | str) -> bool:
    """Start a new peak measurement. On Linux, writing 5 to clear_refs resets VmHWM; where that is
    not possible, returns False and callers fall back to a before/after difference."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """The memory high-water mark and the wall time of each phase of a run (load, setup, caching,
    steps, previews): RSS on the CPU, the allocator's peak on CUDA. ``enter(name)`` closes the
    current phase and restarts the peak counter (where that is impossible a phase's figure is the
    process peak so far). A phase entered again (steps between previews) adds up its time."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peaks: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.at_start: dict[str, int] = {}   # memory in use when the phase was first entered
        self._current: str | None = None
        self._since = 0.0

    def enter(self, phase: str | None) -> None:
        self._close()
        self._current = phase
        if phase is not None:
            memory = device_memory(self.device)
            in_use = memory.get("allocated", memory.get("rss"))
            if in_use is not None:
                self.at_start.setdefault(phase, in_use)
            reset_peak_memory(self.device)
            self._since = time.perf_counter()

    def _peak_now(self) -> int | None:
        memory = device_memory(self.device)
        return memory.get("peak", memory.get("rss_peak"))

    def _close(self) -> None:
        if self._current is None:
            return
        name, peak = self._current, self._peak_now()
        if peak is not None:
            self.peaks[name] = max(peak, self.peaks.get(name, 0))
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._since
        self._current = None

    @contextlib.contextmanager
    def during(self, phase: str):
        """A phase inside another (previews between steps); the outer one goes on afterwards."""
        outer = self._current
        self.enter(phase)
        try:
            yield
        finally:
            self.enter(outer)

    def snapshot(self) -> dict[str, int]:
        """The closed phases' peaks plus the running one's so far, in bytes."""
        peaks = dict(self.peaks)
        if self._current is not None and (peak := self._peak_now()) is not None:
            peaks[self._current] = max(peak, peaks.get(self._current, 0))
        return peaks

    def describe(self) -> str:
        """One line for train.log, e.g. 'Memory per phase (peak RSS): load 4.02 GiB (from 0.45) in
        12.1 s, ...': each phase's peak, what was in use when it began, and its time."""
        kind = "peak RSS" if self.device.type == "cpu" else "peak allocated"
        gib = 1 << 30
        parts = ", ".join(f"{name} {value / gib:.2f} GiB (from {self.at_start.get(name, 0) / gib:.2f}) in "
                          f"{self.seconds.get(name, 0.0):.1f} s" for name, value in self.snapshot().items())
        return f"Memory per phase ({kind}): {parts or 'unknown'}"


def format_memory(memory: dict) -> str:
    return " ".join(f"{name} {value / MIB:.0f}MiB" for name, value in memory.items() if value is not None)


# ---- GPU utilisation (NVML) ------------------------------------------------------------------------
_nvml_handles: dict = {}


def gpu_utilisation(device: torch.device | str) -> int | None:
    """Percent of time the GPU was busy over the driver's last sample period; None without pynvml."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        handle = _nvml_handle(device)
        import pynvml
        return int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:   # no pynvml, no driver, no permission: utilisation is simply not logged
        return None


def _nvml_handle(device: torch.device):
    import pynvml

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _nvml_handles:
        pynvml.nvmlInit()
        try:   # by PCI bus id: NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES, torch does not
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(_pci_bus_id(index))
        except Exception:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        _nvml_handles[index] = handle
    return _nvml_handles[index]


def _pci_bus_id(index: int) -> str:
    # Any: torch's stubs lack the pci_* fields its device properties have at run time
    props: Any = torch.cuda.get_device_properties(index)
    return f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"


# ---- free resources --------------------------------------------------------------------------------
def free_ram() -> int | None:
    """Bytes the OS could give this process without swapping (MemAvailable on Linux)."""
    kib = _meminfo_kib("MemAvailable")
    if kib is not None:
        return kib * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _meminfo_kib(field: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_disk(path) -> int | None:
    """Free bytes on the disk that holds `path`, or would hold it once created."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def free_vram(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes on a CUDA device, as the driver sees it (other processes included)."""
    try:
        return torch.cuda.mem_get_info(device)
    except Exception:
        return None
