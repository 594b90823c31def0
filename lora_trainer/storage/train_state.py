"""Exact-resume helpers: turn RNG, optimizer, scheduler and scaler state into
(safetensors tensors, JSON) and back; nothing is pickled.

Byte-identical resume needs ALL of: the four RNG states, the optimizer state mapped by parameter
NAME (positions change when code changes, and same-shaped params would silently swap), the
scheduler restored with load_state_dict (rebuilding with last_epoch=... is off by one), and the
same thread count / mkldnn flag in both processes (oneDNN kernels are thread-count dependent).
docs/ARCHITECTURE.md ("Why the loop is exactly resumable") says how the loop relies on them.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

RNG_PREFIX = "rng."
OPTIMIZER_STATE_PREFIX = "state."
PARAM_GROUP_PREFIX = "param_groups."

Tensors = dict[str, torch.Tensor]


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    # A copy, not a view: the optimizer updates its state in place on the next step.
    return tensor.detach().to("cpu", copy=True)


def _as_json(value: Any, what: str) -> Any:
    """A plain-JSON deep copy of `value` (tuples become lists); TypeError names `what`."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} cannot be stored as JSON: {exc}") from None


# ---- RNG ------------------------------------------------------------------------------------

def capture_rng_state(generators: Optional[Mapping[str, torch.Generator]] = None
                      ) -> tuple[Tensors, dict]:
    """All global RNG states (python, numpy legacy, torch CPU, every CUDA device) plus any
    explicit torch.Generator objects the trainer uses, as (tensors, json_obj)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    tensors = {f"{RNG_PREFIX}torch_cpu": torch.get_rng_state()}
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for index, state in enumerate(cuda_states):
        tensors[f"{RNG_PREFIX}cuda.{index}"] = state.cpu()
    for name, generator in (generators or {}).items():
        tensors[f"{RNG_PREFIX}generator.{name}"] = generator.get_state()
    json_obj = {
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
        "numpy": {"name": np_name, "keys": np.asarray(np_keys).tolist(), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "cuda_devices": len(cuda_states),
        "generators": sorted(generators or {}),
    }
    return tensors, json_obj


def restore_rng_state(tensors: Mapping[str, torch.Tensor], json_obj: Mapping[str, Any],
                      generators: Optional[Mapping[str, torch.Generator]] = None) -> list[str]:
    """Inverse of capture_rng_state. Returns notes about state that could not be restored
    exactly (e.g. a different number of CUDA devices)."""
    notes = []
    py = json_obj["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = json_obj["numpy"]
    np.random.set_state((npy["name"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(tensors[f"{RNG_PREFIX}torch_cpu"].to(torch.uint8))
    notes += _restore_cuda_rng(tensors, int(json_obj.get("cuda_devices", 0)))
    notes += _restore_generators(tensors, list(json_obj.get("generators", [])), generators or {})
    return notes


def _restore_cuda_rng(tensors: Mapping[str, torch.Tensor], saved_devices: int) -> list[str]:
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index in range(min(saved_devices, present)):
        torch.cuda.set_rng_state(tensors[f"{RNG_PREFIX}cuda.{index}"].to(torch.uint8), index)
    if saved_devices != present:
        return [f"The checkpoint has RNG state for {saved_devices} CUDA device(s) but {present} "
                f"are present; random draws on the GPU will differ from an uninterrupted run."]
    return []


def _restore_generators(tensors: Mapping[str, torch.Tensor], saved_names: list[str],
                        generators: Mapping[str, torch.Generator]) -> list[str]:
    notes = []
    for name, generator in generators.items():
        if name in saved_names:
            generator.set_state(tensors[f"{RNG_PREFIX}generator.{name}"].to(torch.uint8))
        else:
            notes.append(f"The checkpoint has no state for RNG generator {name!r}; it keeps its seed.")
    return notes


# ---- optimizer ------------------------------------------------------------------------------

def _flat_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _check_param_names(optimizer: torch.optim.Optimizer, param_names: Sequence[str]) -> None:
    count = len(_flat_params(optimizer))
    if len(param_names) != count:
        raise ValueError(f"Got {len(param_names)} parameter names for an optimizer with {count} "
                         f"parameters (names must follow the optimizer's parameter order)")
    if len(set(param_names)) != len(param_names):
        duplicates = sorted(name for name, count in Counter(param_names).items() if count > 1)
        raise ValueError(f"Duplicate parameter names: {duplicates}")


def _group_names(state_dict: dict, param_names: Sequence[str]) -> list[list[str]]:
    """Names per param group. state_dict numbers params 0..n-1 in group order, which is the
    order `param_names` follows."""
    names, flat_index = [], 0
    for group in state_dict["param_groups"]:
        names.append(list(param_names[flat_index:flat_index + len(group["params"])]))
        flat_index += len(group["params"])
    return names


def _step_as_float32(value: torch.Tensor) -> torch.Tensor:
    # load_state_dict leaves 'step' uncast, so its saved dtype persists; a bf16 step would stall
    # at 256 (256 + 1 == 256). float32 counts exactly to 2**24 and is what torch uses itself.
    return value.detach().to("cpu", torch.float32, copy=True).reshape(())


def optimizer_state_to_files(optimizer: torch.optim.Optimizer, param_names: Sequence[str]
                             ) -> tuple[Tensors, dict]:
    """The optimizer's state keyed by parameter NAME: tensors as "state.<name>.<key>", Python
    scalars and param_groups (with names instead of positions) in JSON.
    `param_names[i]` names the i-th parameter of `for g in optimizer.param_groups for p in g["params"]`."""
    _check_param_names(optimizer, param_names)
    state_dict = optimizer.state_dict()
    names_by_index = dict(zip((i for g in state_dict["param_groups"] for i in g["params"]), param_names))
    tensors: Tensors = {}
    json_state = {}
    for index, param_state in state_dict["state"].items():
        name = names_by_index[index]
        json_state[name] = _param_state_to_files(name, param_state, tensors)
    groups = [_param_group_to_files(i, group, names, tensors)
              for i, (group, names) in enumerate(zip(state_dict["param_groups"],
                                                     _group_names(state_dict, param_names)))]
    return tensors, {"optimizer_class": type(optimizer).__name__, "state": json_state,
                     "param_groups": groups}


def _param_state_to_files(name: str, param_state: Mapping[str, Any], tensors: Tensors) -> dict:
    tensor_keys, scalars = [], {}
    for key, value in param_state.items():
        if isinstance(value, torch.Tensor):
            tensors[f"{OPTIMIZER_STATE_PREFIX}{name}.{key}"] = (
                _step_as_float32(value) if key == "step" else _cpu_copy(value))
            tensor_keys.append(key)
        else:
            scalars[key] = _as_json(value, f"Optimizer state {key!r} of parameter {name!r}")
    # The key list is stored explicitly: names and keys may both contain dots.
    return {"tensors": tensor_keys, "scalars": scalars}


def _param_group_to_files(index: int, group: Mapping[str, Any], names: list[str],
                          tensors: Tensors) -> dict:
    hyper, tensor_keys = {}, []
    for key, value in group.items():
        if key in ("params", "param_names"):  # positions / torch's own names: replaced by ours
            continue
        if isinstance(value, torch.Tensor):  # e.g. a tensor lr (capturable / compiled optimizers)
            tensors[f"{PARAM_GROUP_PREFIX}{index}.{key}"] = _cpu_copy(value)
            tensor_keys.append(key)
        else:
            hyper[key] = _as_json(value, f"Optimizer param_group {index} setting {key!r}")
    return {"param_names": names, "hyper": hyper, "tensor_keys": tensor_keys}


def load_optimizer_state(optimizer: torch.optim.Optimizer, param_names: Sequence[str],
                         tensors: Mapping[str, torch.Tensor], json_obj: Mapping[str, Any]) -> None:
    """Load state saved by optimizer_state_to_files into `optimizer`, whose parameters may be in
    a different order: `param_names` names them in the CURRENT order. Raises ValueError naming
    missing/extra parameters. (Keep the order fixed anyway: with gradient clipping active, a
    different order changes the summation order of the norm and thus the last bits.)"""
    _check_param_names(optimizer, param_names)
    saved_class = json_obj.get("optimizer_class")
    if saved_class and saved_class != type(optimizer).__name__:
        raise ValueError(f"The checkpoint holds {saved_class} state but the optimizer is "
                         f"{type(optimizer).__name__}")
    current = optimizer.state_dict()
    current_groups = _group_names(current, param_names)
    _check_same_params(json_obj["param_groups"], current_groups)
    index_by_name = dict(zip(param_names, (i for g in current["param_groups"] for i in g["params"])))
    state = {index_by_name[name]: _param_state_from_files(name, entry, tensors)
             for name, entry in json_obj["state"].items()}
    param_groups = [_param_group_from_files(i, saved, current_group, tensors)
                    for i, (saved, current_group) in enumerate(zip(json_obj["param_groups"],
                                                                   current["param_groups"]))]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _check_same_params(saved_groups: list[dict], current_groups: list[list[str]]) -> None:
    saved_all = {n for g in saved_groups for n in g["param_names"]}
    current_all = {n for g in current_groups for n in g}
    missing, extra = sorted(saved_all - current_all), sorted(current_all - saved_all)
    if missing or extra:
        raise ValueError("Optimizer parameters do not match the checkpoint: "
                         f"missing from the model (in checkpoint only): {missing}; "
                         f"new in the model (not in checkpoint): {extra}")
    if len(saved_groups) != len(current_groups):
        raise ValueError(f"The checkpoint has {len(saved_groups)} optimizer param groups, "
                         f"the optimizer has {len(current_groups)}")
    for index, (saved, current) in enumerate(zip(saved_groups, current_groups)):
        if set(saved["param_names"]) != set(current):
            raise ValueError(f"Optimizer param group {index} holds different parameters than in "
                             f"the checkpoint: {sorted(set(saved['param_names']) ^ set(current))}")


def _param_state_from_files(name: str, entry: Mapping[str, Any],
                            tensors: Mapping[str, torch.Tensor]) -> dict:
    param_state = dict(entry["scalars"])
    for key in entry["tensors"]:
        tensor_name = f"{OPTIMIZER_STATE_PREFIX}{name}.{key}"
        if tensor_name not in tensors:
            raise ValueError(f"Optimizer state tensor {tensor_name!r} is missing from the checkpoint")
        param_state[key] = tensors[tensor_name]
    return param_state


def _param_group_from_files(index: int, saved: Mapping[str, Any], current_group: Mapping[str, Any],
                            tensors: Mapping[str, torch.Tensor]) -> dict:
    group = {}
    for key, value in saved["hyper"].items():
        # JSON turned tuples (e.g. betas) into lists; give back the type the optimizer uses.
        group[key] = tuple(value) if isinstance(current_group.get(key), tuple) and isinstance(value, list) else value
    for key in saved["tensor_keys"]:
        group[key] = tensors[f"{PARAM_GROUP_PREFIX}{index}.{key}"]
    # Positions in the CURRENT order, so that torch maps each state entry to the right tensor.
    group["params"] = list(current_group["params"])
    if "param_names" in current_group:  # torch's optional names, in the current order
        group["param_names"] = list(current_group["param_names"])
    return group


# ---- scheduler / grad scaler ------------------------------------------------------------------

def scheduler_state_to_json(scheduler) -> dict:
    """LR scheduler state as JSON (LambdaLR: plain-function lr_lambdas are stored as None and
    come back from the code, which is what torch does too)."""
    return {"scheduler_class": type(scheduler).__name__,
            "state": _as_json(scheduler.state_dict(), f"{type(scheduler).__name__} state")}


def load_scheduler_state(scheduler, obj: Mapping[str, Any]) -> None:
    """Restore with load_state_dict: rebuilding with last_epoch=saved is off by one because the
    constructor itself calls step()."""
    saved_class = obj.get("scheduler_class")
    if saved_class and saved_class != type(scheduler).__name__:
        raise ValueError(f"The checkpoint holds {saved_class} state but the scheduler is "
                         f"{type(scheduler).__name__}")
    scheduler.load_state_dict(json.loads(json.dumps(obj["state"])))  # a copy: torch keeps references


def grad_scaler_state_to_json(scaler) -> dict:
    """GradScaler state (floats and ints; empty when the scaler is disabled)."""
    return _as_json(scaler.state_dict(), "GradScaler state")


def load_grad_scaler_state(scaler, obj: Mapping[str, Any]) -> None:
    if obj:  # torch raises on an empty dict; empty means it was saved disabled -> keep defaults
        scaler.load_state_dict(dict(obj))


# ---- determinism settings -------------------------------------------------------------------

def determinism_settings() -> dict:
    """Settings that change the bits of CPU/GPU results and must match on resume."""
    return {
        "num_threads": torch.get_num_threads(),
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
    }


def apply_determinism_settings(saved: Mapping[str, Any]) -> list[str]:
    """Re-apply the thread count and backend flags of the saved run (both processes must use the
    same ones; switching only at resume breaks exactness). Returns a note for everything that
    differed, including versions that cannot be changed from here."""
    now = determinism_settings()
    notes = []
    if "num_threads" in saved and saved["num_threads"] != now["num_threads"]:
        torch.set_num_threads(int(saved["num_threads"]))
        notes.append(f"Using {saved['num_threads']} CPU threads like the saved run (this process "
                     f"had {now['num_threads']}); a different count changes results slightly.")
    for key, flag_owner, attribute in (("mkldnn_enabled", torch.backends.mkldnn, "enabled"),
                                       ("cudnn_deterministic", torch.backends.cudnn, "deterministic"),
                                       ("cudnn_benchmark", torch.backends.cudnn, "benchmark")):
        if key in saved and bool(saved[key]) != now[key]:
            setattr(flag_owner, attribute, bool(saved[key]))
            notes.append(f"Set {key}={bool(saved[key])} like the saved run (was {now[key]}).")
    for key in ("torch_version", "cuda_version"):
        if key in saved and saved[key] != now[key]:
            notes.append(f"The checkpoint was written with {key.replace('_', ' ')} {saved[key]}, "
                         f"this is {now[key]}: the resumed run may not be byte-identical.")
    return notes
