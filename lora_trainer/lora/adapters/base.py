"""What every adapter variant shares: the scaling rule, the weight delta, the forward through a host,
DoRA, and the names its tensors have in the file.

A variant (lora.py, loha.py, lokr.py) only says how its factors make the raw weight update
(`updown`), how big they are, and which file keys they use. Everything else follows the rule the
WebUI's Lora extension applies when it loads the file (extensions-builtin/Lora/network.py,
`NetworkModule.finalize_updown`), so what we train is what it renders:

    delta = multiplier * dora(scale * updown)        scale = alpha / dim, or 1 when dim is None

where `dim` is the rank of the decomposed factors (None when a variant has only full matrices, as
LoKr can) and `dora` is the identity unless the adapter carries a `dora_scale` (dora.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..host import LinearSlot
from ..targets import is_linear
from . import dora


class AdapterError(ValueError):
    """A file's tensors or an option that does not fit an adapter (the message names what)."""


@dataclass(frozen=True)
class AdapterSpec:
    """The options one adapter is built from."""
    kind: str = "lora"            # registry key: lora | loha | lokr
    rank: int = 8
    alpha: float | None = None    # None: alpha = rank (scale 1)
    dora: bool = False            # weight-decomposed (DoRA) magnitude vector on top
    factor: int = -1              # LoKr's Kronecker factor (-1: as balanced as possible)


def weight_shape(base) -> tuple[int, ...]:
    if isinstance(base, nn.Conv2d):
        return (base.out_channels, base.in_channels, *base.kernel_size)
    if isinstance(base, LinearSlot) or is_linear(base):   # a slot: e.g. MultiheadAttention's q (lora.mha)
        return (base.out_features, base.in_features)
    raise TypeError(f"adapters support Linear and Conv2d layers, not {type(base).__name__}")


def input_for(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The layer input as the adapter's own layers take it. Without autocast (a 16-bit model with
    the fp32 adapter, as in the WebUI) it must be cast to the adapter's dtype. Under autocast the
    layers cast for themselves, so casting here would only add two copies of the activation per
    layer and step (bf16 -> fp32 -> bf16, which gives the same values back): measured ~8% of a bf16
    step at the real SD1.5 size."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)


class Adapter(nn.Module):
    kind: ClassVar[str]
    # file key suffix -> state_dict key, for tensors whose names differ (the rest are identical)
    file_keys: ClassVar[dict[str, str]] = {}
    # the keys that identify a layer of this variant in a file
    signature: ClassVar[tuple[tuple[str, ...], ...]] = ()
    # registered in __init__ / _add_dora (declared here: nn.Module's __getattr__ types them loosely)
    alpha: torch.Tensor
    dora_scale: nn.Parameter    # only when has_dora

    def __init__(self, base, spec: AdapterSpec):
        super().__init__()
        if spec.rank < 1:
            raise AdapterError(f"adapter rank must be >= 1, got {spec.rank}")
        self.shape = weight_shape(base)
        self.is_conv = isinstance(base, nn.Conv2d)
        self.conv_args = (dict(stride=base.stride, padding=base.padding, dilation=base.dilation,
                               groups=base.groups) if self.is_conv else None)
        self.rank = spec.rank
        self._base = (base,)   # a tuple: the base layer is not a submodule (state_dict stays ours)
        self.multiplier = 1.0
        # alpha is saved in the file as a 0-dim tensor; a buffer keeps it in state_dict()
        self.register_buffer("alpha", torch.tensor(float(spec.rank if spec.alpha is None else spec.alpha)))
        self._remember_alpha()

    def _remember_alpha(self) -> None:
        """Keep alpha as a Python number too: reading the tensor in every forward is a host sync
        per layer per step (and a graph break under torch.compile). Refreshed wherever the buffer
        is written: on load_state_dict and load_file_tensors."""
        self._alpha_value = float(self.alpha)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._remember_alpha()

    def _add_dora(self, spec: AdapterSpec) -> None:
        """Subclasses call this after their own parameters, so the parameter order is stable."""
        if spec.dora:
            self.dora_scale = nn.Parameter(dora.initial_magnitude(self.base_weight()))

    # ---- what a variant provides ----------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        """The rank alpha is divided by (the WebUI's `dim`); None when no factor is decomposed."""
        return self.rank

    def updown(self) -> torch.Tensor:
        """The raw weight update (before scale, DoRA and multiplier), shaped like the base weight;
        differentiable in the adapter's parameters."""
        raise NotImplementedError

    def zero_factor(self) -> torch.Tensor:
        """The factor initialised to zero: while it is all zero the adapter changes nothing."""
        raise NotImplementedError

    @classmethod
    def spec_from_file(cls, base, tensors: dict[str, torch.Tensor]) -> AdapterSpec:
        raise NotImplementedError

    @staticmethod
    def cut_to_rank(tensors: dict[str, torch.Tensor], dyn: int) -> dict[str, torch.Tensor]:
        """The WebUI's `dyn=` for this variant's file tensors; it only applies to LoRA."""
        return tensors

    # ---- shared rules -----------------------------------------------------------------------------
    @property
    def has_dora(self) -> bool:
        return "dora_scale" in self._parameters

    @property
    def scale(self) -> float:
        return self._alpha_value / self.dim if self.dim is not None else 1.0

    def base_weight(self) -> torch.Tensor:
        return self._base[0].weight

    def delta(self) -> torch.Tensor:
        """The weight update at the current multiplier, differentiable: what a host adds to the
        base weight (lora.mha) or what forward applies to the input."""
        update = self.updown() * self.scale
        if self.has_dora:
            update = dora.decomposed_update(update, self.base_weight(), self.dora_scale)
        return update * self.multiplier

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The weight update at the current multiplier (for merging)."""
        return self.delta()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.delta()
        x = input_for(x, weight.dtype)
        if self.conv_args is not None:   # set exactly when the base is a Conv2d
            return F.conv2d(x, weight, None, **self.conv_args)
        return F.linear(x, weight)

    @torch.no_grad()
    def is_untrained(self) -> bool:
        return not self.zero_factor().any()

    # ---- the file -------------------------------------------------------------------------------------
    @classmethod
    def state_key(cls, file_key: str) -> str:
        return cls.file_keys.get(file_key, file_key)

    @classmethod
    def recognises(cls, file_keys) -> bool:
        return any(all(k in file_keys for k in keys) for keys in cls.signature)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """{file key suffix: tensor} in the layout the WebUI / LyCORIS / ComfyUI read."""
        to_file = {state: file for file, state in self.file_keys.items()}
        return {to_file.get(k, k): v for k, v in self.state_dict().items()}

    @torch.no_grad()
    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a file's tensors in; a missing key or another shape raises AdapterError naming it."""
        own = self.state_dict()
        wanted = {file: self.state_key(file) for file in self.file_tensors()}
        for file_key, state_key in wanted.items():
            if file_key not in tensors:
                if file_key == "alpha":
                    continue   # kohya: no alpha means alpha = rank, which the buffer already holds
                raise AdapterError(f"the file has no '{file_key}'")
            if tensors[file_key].shape != own[state_key].shape:
                raise AdapterError(f"'{file_key}' has shape {tuple(tensors[file_key].shape)}, this run "
                                   f"expects {tuple(own[state_key].shape)}")
        extra = sorted(set(tensors) - set(wanted))
        if extra:
            raise AdapterError(f"the file has '{extra[0]}', which this {self.describe()} has not")
        for file_key, state_key in wanted.items():
            if file_key in tensors:
                own[state_key].copy_(tensors[file_key])
        self._remember_alpha()

    # ---- metadata (what kohya/LyCORIS write, so tools that read it recognise the type) -----------------
    def network_module(self) -> str:
        """`ss_network_module`: LyCORIS's kohya entry point for the LyCORIS types."""
        return "lycoris.kohya"

    def network_args(self) -> dict[str, str]:
        """`ss_network_args` entries of this type (strings, as kohya records --network_args)."""
        args = {"algo": self.kind}
        if self.has_dora:
            args["dora_wd"] = "True"
        return args

    def describe(self) -> str:
        return f"{self.kind}{' + DoRA' if self.has_dora else ''} adapter"

    @classmethod
    def from_file(cls, base, tensors: dict[str, torch.Tensor]) -> "Adapter":
        adapter = cls(base, cls.spec_from_file(base, tensors))
        adapter.load_file_tensors(tensors)
        return adapter


def file_alpha(tensors: dict[str, torch.Tensor], rank: int | None) -> float | None:
    alpha = tensors.get("alpha")
    return float(alpha) if alpha is not None else (float(rank) if rank is not None else None)

