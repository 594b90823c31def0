"""Checkpoint folders that are either complete and verified, or ignored.

Layout: run_dir/checkpoints/checkpoint-00000123/
    <name>.safetensors ...   one per entry of `tensor_files` (LoRA weights, optimizer, RNG, grads)
    state.json               everything that is not a tensor (counters, scheduler, RNG, ...)
    manifest.json            written LAST: format version, step, time, size + sha256 of every file

A checkpoint is built in a hidden ".tmp-checkpoint-<step>-<pid>" folder and renamed into place
only when complete, so a crash leaves at worst a stale temp folder (removed by cleanup_temp) and
never a half checkpoint under the real name. The manifest catches what rename cannot: later
truncation or bit rot, which validate() reports so resume falls back to an older checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Union

import safetensors.torch
import torch

from .hashing import file_sha256
from .atomic import (DiskFullError, fsync_dir, is_disk_full, json_bytes, safetensors_bytes,
                     write_file_synced)
from .processes import pid_is_running

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STATE_NAME = "state.json"
TENSOR_SUFFIX = ".safetensors"
CHECKPOINTS_DIRNAME = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
# Everything starting with this prefix inside checkpoints/ is scratch space of some save/prune.
TEMP_PREFIX = ".tmp-"

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_TEMP_OWNER_PID = re.compile(r"-(\d+)$")
_TENSOR_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupted."""


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    valid: bool
    problem: Optional[str]      # None when valid, else what is wrong (for the user)
    size_bytes: int
    created: Optional[float]    # unix time; from the manifest, else the folder's mtime
    loss: Optional[float] = None  # state.json "loss", only read for valid checkpoints


def checkpoint_dirname(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _folder_size(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.iterdir() if entry.is_file())


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _pid_is_running(pid: int) -> bool:
    # our own leftovers are stale: we are not saving while cleaning up
    return pid != os.getpid() and pid_is_running(pid)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class CheckpointStore:
    def __init__(self, run_dir: Union[str, os.PathLike]):
        self.run_dir = Path(run_dir)
        self.checkpoints_dir = self.run_dir / CHECKPOINTS_DIRNAME

    # ---- writing ---------------------------------------------------------------------------

    def save(self, step: int, tensor_files: Mapping[str, Mapping[str, torch.Tensor]],
             state: dict) -> Path:
        """Write checkpoint `step` crash-safely and return its folder. An existing checkpoint of
        the same step is replaced. On ENOSPC the partial checkpoint is removed and DiskFullError
        names what remains."""
        self._check_tensor_file_names(tensor_files)
        # Serialise everything before the first byte hits the disk: a bad state dict must not
        # leave debris behind, and json errors surface as what they are.
        payloads = {f"{name}{TENSOR_SUFFIX}": safetensors_bytes(tensors)
                    for name, tensors in tensor_files.items()}
        payloads[STATE_NAME] = json_bytes(state)

        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints_dir / checkpoint_dirname(step)
        tmp = self.checkpoints_dir / f"{TEMP_PREFIX}{checkpoint_dirname(step)}-{os.getpid()}"
        try:
            _remove_tree(tmp)  # a leftover of an earlier crashed process that had our pid
            tmp.mkdir()
            self._write_checkpoint_files(tmp, step, payloads)
            fsync_dir(tmp)
            self._move_into_place(tmp, final, step)
        except BaseException as exc:
            _remove_tree(tmp)
            if is_disk_full(exc):
                raise self._disk_full_error(step) from exc
            raise
        return final

    @staticmethod
    def _check_tensor_file_names(tensor_files: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        for name in tensor_files:
            if not _TENSOR_FILE_NAME.match(name) or name in ("state", "manifest"):
                raise ValueError(f"Invalid checkpoint tensor file name {name!r}: use letters, digits, "
                                 f"'_', '-', '.' (not 'state'/'manifest')")

    @staticmethod
    def _write_checkpoint_files(folder: Path, step: int, payloads: Mapping[str, bytes]) -> None:
        files = {}
        for filename, data in payloads.items():
            write_file_synced(folder / filename, data)
            files[filename] = {"size": len(data), "sha256": _sha256_hex(data)}
        manifest = {"format_version": FORMAT_VERSION, "step": step, "created": time.time(),
                    "files": files}
        # Last, so that a manifest exists only if every file it lists was fully written.
        write_file_synced(folder / MANIFEST_NAME, json_bytes(manifest))

    def _move_into_place(self, tmp: Path, final: Path, step: int) -> None:
        # A non-empty folder cannot be renamed over another, so an existing same-step checkpoint
        # is first moved aside under a temp name (cleanup_temp removes it if we die right here).
        replaced = None
        if final.exists():
            replaced = self.checkpoints_dir / f"{TEMP_PREFIX}replaced-{checkpoint_dirname(step)}-{os.getpid()}"
            _remove_tree(replaced)
            os.replace(final, replaced)
        try:
            os.replace(tmp, final)
        except BaseException:
            if replaced is not None:
                os.replace(replaced, final)  # put the old checkpoint back rather than lose it
            raise
        fsync_dir(self.checkpoints_dir)
        if replaced is not None:
            _remove_tree(replaced)

    def _disk_full_error(self, step: int) -> DiskFullError:
        newest, _ = self.latest_valid()
        remaining = f"the newest valid checkpoint is still {newest.path}" if newest else \
            "there is no earlier valid checkpoint"
        return DiskFullError(self.run_dir, (
            f"Disk full while saving checkpoint step {step} in run folder {self.run_dir}. "
            f"The partial checkpoint was removed; {remaining}. Free some space and resume."))

    # ---- checking --------------------------------------------------------------------------

    def validate(self, path: Union[str, os.PathLike]) -> Optional[str]:
        """None if the checkpoint folder is complete and intact, else what is wrong with it."""
        path = Path(path)
        manifest, problem = self._read_manifest(path)
        if manifest is None:
            return problem
        for filename, expected in manifest["files"].items():
            problem = self._check_file(path / filename, expected)
            if problem:
                return problem
        try:
            _read_json(path / STATE_NAME)
        except (OSError, ValueError) as exc:
            return f"{STATE_NAME} is not valid JSON ({exc})"
        return None

    @staticmethod
    def _read_manifest(path: Path) -> tuple[Optional[dict], Optional[str]]:
        if not (path / MANIFEST_NAME).is_file():
            return None, f"missing {MANIFEST_NAME} (the save did not finish)"
        try:
            manifest = _read_json(path / MANIFEST_NAME)
        except (OSError, ValueError) as exc:
            return None, f"{MANIFEST_NAME} is not valid JSON ({exc})"
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            return None, f"{MANIFEST_NAME} has no file list"
        if manifest.get("format_version") != FORMAT_VERSION:
            return None, (f"unsupported checkpoint format version {manifest.get('format_version')!r} "
                          f"(this version reads {FORMAT_VERSION})")
        if any(Path(name).name != name or name in ("", ".", "..") for name in manifest["files"]):
            return None, f"{MANIFEST_NAME} lists a file outside the checkpoint folder"
        if STATE_NAME not in manifest["files"]:
            return None, f"{MANIFEST_NAME} does not list {STATE_NAME}"
        match = _CHECKPOINT_NAME.match(path.name)
        if match and int(match.group(1)) != manifest.get("step"):
            return None, f"{MANIFEST_NAME} says step {manifest.get('step')!r} but the folder is {path.name}"
        return manifest, None

    @staticmethod
    def _check_file(file: Path, expected: dict) -> Optional[str]:
        if not file.is_file():
            return f"missing file {file.name}"
        size = file.stat().st_size
        if size != expected.get("size"):
            return f"{file.name} is {size} bytes but the manifest says {expected.get('size')} (truncated?)"
        if file_sha256(file) != expected.get("sha256"):
            return f"{file.name} checksum mismatch (the file is corrupted)"
        return None

    def path_for(self, step: int) -> Path:
        """Where the checkpoint of `step` is (or will be)."""
        return self.checkpoints_dir / checkpoint_dirname(step)

    # (`list` below names this method inside the class: annotations there use typing.List)
    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint-* folder, valid or not, sorted by step."""
        if not self.checkpoints_dir.is_dir():
            return []
        infos = []
        for entry in self.checkpoints_dir.iterdir():
            match = _CHECKPOINT_NAME.match(entry.name)
            if match and entry.is_dir():
                infos.append(self._describe(entry, int(match.group(1))))
        return sorted(infos, key=lambda info: info.step)

    def _describe(self, path: Path, step: int) -> CheckpointInfo:
        problem = self.validate(path)
        created, loss = path.stat().st_mtime, None
        if problem is None:
            created = _read_json(path / MANIFEST_NAME).get("created", created)
            loss = self._loss_from_state(path)
        return CheckpointInfo(step=step, path=path, valid=problem is None, problem=problem,
                              size_bytes=_folder_size(path), created=created, loss=loss)

    @staticmethod
    def _loss_from_state(path: Path) -> Optional[float]:
        state = _read_json(path / STATE_NAME)
        loss = state.get("loss") if isinstance(state, dict) else None
        return float(loss) if isinstance(loss, (int, float)) and not isinstance(loss, bool) else None

    def latest_valid(self) -> tuple[Optional[CheckpointInfo], List[str]]:
        """The newest valid checkpoint, and one warning for every newer one that is skipped."""
        warnings: List[str] = []
        for info in reversed(self.list()):
            if info.valid:
                return info, warnings
            warnings.append(f"Skipping checkpoint {info.path}: {info.problem}")
        return None, warnings

    # ---- reading ---------------------------------------------------------------------------

    def load(self, info: Union[CheckpointInfo, str, os.PathLike]
             ) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """(tensor_files, state) of a checkpoint. Each file is checked against the manifest
        and then parsed from the very bytes that were checked (no second read to race with)."""
        path = info.path if isinstance(info, CheckpointInfo) else Path(info)
        manifest, problem = self._read_manifest(path)
        if manifest is None:
            raise CheckpointError(f"Cannot load checkpoint {path}: {problem}")
        tensor_files: dict[str, dict[str, torch.Tensor]] = {}
        state: Optional[dict] = None
        for filename, expected in manifest["files"].items():
            data = self._read_verified(path, filename, expected)
            if filename == STATE_NAME:
                state = json.loads(data.decode("utf-8"))
            elif filename.endswith(TENSOR_SUFFIX):
                tensor_files[filename[:-len(TENSOR_SUFFIX)]] = safetensors.torch.load(data)
        assert state is not None   # _read_manifest refuses a manifest that does not list it
        return tensor_files, state

    @staticmethod
    def _read_verified(folder: Path, filename: str, expected: dict) -> bytes:
        try:
            data = (folder / filename).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"Cannot load checkpoint {folder}: missing file {filename}") from None
        if len(data) != expected.get("size") or _sha256_hex(data) != expected.get("sha256"):
            raise CheckpointError(f"Cannot load checkpoint {folder}: {filename} does not match "
                                  f"its manifest entry (truncated or corrupted)")
        return data

    # ---- housekeeping ----------------------------------------------------------------------

    def prune(self, keep_last_n: int) -> List[Path]:
        """Delete valid checkpoints older than the newest `keep_last_n` valid ones, and invalid
        ones older than the newest valid one. The newest valid checkpoint always stays (even for
        keep_last_n < 1); invalid ones newer than it stay for inspection. Call only after a save
        succeeded, so "newest valid" is the checkpoint just written. Returns deleted folders."""
        infos = self.list()
        valid = [info for info in infos if info.valid]
        if not valid:
            return []
        keep = max(1, keep_last_n)
        newest_step = valid[-1].step
        doomed = valid[:-keep] + [info for info in infos if not info.valid and info.step < newest_step]
        doomed.sort(key=lambda info: info.step)
        for info in doomed:
            self._delete_checkpoint(info.path)
        return [info.path for info in doomed]

    def _delete_checkpoint(self, path: Path) -> None:
        # Rename first: a deletion cut short must not leave a half folder under a checkpoint name.
        doomed = self.checkpoints_dir / f"{TEMP_PREFIX}deleting-{path.name}-{os.getpid()}"
        _remove_tree(doomed)
        os.replace(path, doomed)
        _remove_tree(doomed)

    def cleanup_temp(self) -> List[Path]:
        """Remove ".tmp-*" leftovers of killed saves/prunes. Folders of another process that is
        still running (pid in the name) are left alone."""
        if not self.checkpoints_dir.is_dir():
            return []
        removed: List[Path] = []
        for entry in self.checkpoints_dir.iterdir():
            if not entry.name.startswith(TEMP_PREFIX):
                continue
            owner = _TEMP_OWNER_PID.search(entry.name)
            if owner and _pid_is_running(int(owner.group(1))):
                continue
            if entry.is_dir() and not entry.is_symlink():
                _remove_tree(entry)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
        return removed
