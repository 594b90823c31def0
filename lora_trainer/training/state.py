"""Everything a run changes as it trains, in one object: the LoRA's trainable parameters, the
optimizer, the LR scheduler, the fp16 grad scaler, where in the data the run is, the RNG, and the
loss history. `state_dict()` is what a checkpoint stores of it; `load_state_dict()` puts a
checkpoint back. What a checkpoint stores beside it (the config, hashes of data and base model,
settings that change floats) are facts about the run, checked by `resume.check_compatible`.

Nothing is pickled: tensors go to safetensors files, the rest to JSON (storage/train_state.py).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..storage import train_state

TensorFiles = dict[str, dict[str, torch.Tensor]]   # checkpoint file stem -> its tensors


@dataclass
class Position:
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0   # index of the next batch to train inside `epoch`
    samples_seen: int = 0


@dataclass
class TrainingState:
    # the LoRA's trainable parameters by name, in the fixed order the optimizer state is mapped by
    named_params: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: Any                    # torch.optim.lr_scheduler.LambdaLR (training/optim.py)
    scaler: Any = None                # torch.amp.GradScaler for fp16 on CUDA, else None
    micro_batch_size: int = 1         # halved by the OOM ladder; kept so a resume does not OOM again
    position: Position = field(default_factory=Position)
    last_loss: float | None = None
    recent_losses: list[float] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)

    @property
    def param_names(self) -> list[str]:
        return [name for name, _ in self.named_params]

    def state_dict(self) -> tuple[TensorFiles, dict[str, Any]]:
        """(tensor files, JSON) of everything above; the RNG is the process's global RNG now."""
        # copies, not views: on CPU `.cpu()` is the live parameter, which the next step changes
        lora = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in self.named_params}
        opt_tensors, opt_json = train_state.optimizer_state_to_files(self.optimizer, self.param_names)
        rng_tensors, rng_json = train_state.capture_rng_state()
        state = {
            "position": dataclasses.asdict(self.position),
            "loss": self.last_loss,
            "recent_losses": self.recent_losses[-200:],
            "micro_batch_size": self.micro_batch_size,
            "scheduler": train_state.scheduler_state_to_json(self.scheduler),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "optimizer": opt_json,
            "rng": rng_json,
            "started_at": self.started_at,
        }
        return {"lora": lora, "optimizer": opt_tensors, "rng": rng_tensors}, state

    def load_state_dict(self, tensors: TensorFiles, state: dict[str, Any]) -> None:
        """Back to the checkpoint's state, in place (the optimizer keeps pointing at the same
        parameters). The global RNG is restored last: nothing here draws from it afterwards."""
        for name, param in self.named_params:
            param.data.copy_(tensors["lora"][name])
        train_state.load_optimizer_state(self.optimizer, self.param_names, tensors["optimizer"],
                                         state["optimizer"])
        train_state.load_scheduler_state(self.scheduler, state["scheduler"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        train_state.restore_rng_state(tensors["rng"], state["rng"])
        self.position = Position(**state["position"])
        self.last_loss = state.get("loss")
        self.recent_losses = list(state.get("recent_losses", []))
        self.micro_batch_size = state.get("micro_batch_size", self.micro_batch_size)
        self.started_at = state.get("started_at", self.started_at)
