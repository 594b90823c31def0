"""LoKr (LyCORIS): delta = kron(w1, w2), a Kronecker product of a small full matrix w1 and a larger
w2 that is itself low-rank (w2_a @ w2_b) unless that would not save anything.

Shapes, as LyCORIS builds them: out = a*b and in = c*d are split by `factorization(dim, factor)`
(factor -1: as balanced as possible, else the divisor nearest `factor`); w1 is (a, c), w2 is
(b, d) for a Linear and (b, d, kh, kw) for a Conv2d. Full-matrix fallback (LyCORIS's rule): w2 is
stored whole (`lokr_w2`) when rank >= max(b, d) / 2, i.e. when the low-rank pair would be as big as
the matrix; otherwise `lokr_w2_a` (b, r) and `lokr_w2_b` (r, d*kh*kw). w1 is always whole
(`lokr_w1`; LyCORIS's `decompose_both` is not supported, nor Tucker `lokr_t2`: such files are
refused by name; `lokr_w1_a/_b` files are refused too).

Scale (the WebUI's rule): alpha / rank while w2 is decomposed, 1 when it is stored whole (the
file's alpha is then ignored by every loader, so we write alpha = rank as LyCORIS does).
Initialisation as LyCORIS: w1 and w2_a kaiming-uniform, w2_b (or the whole w2) zero.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter, AdapterError, AdapterSpec, file_alpha, weight_shape


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n == dimension and m <= n: the divisor pair LyCORIS picks. factor > 0 that
    divides `dimension` gives (factor, dimension // factor) ordered; otherwise the pair with m as
    large as allowed (m <= factor when factor > 0) while m + n keeps shrinking."""
    if factor > 0 and dimension % factor == 0:
        small, large = sorted((factor, dimension // factor))
        return small, large
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    candidate = 2
    while candidate <= limit and candidate * candidate <= dimension:
        if dimension % candidate == 0:
            m, n = candidate, dimension // candidate
        candidate += 1
    return m, n


class LoKrAdapter(Adapter):
    kind = "lokr"
    signature = (("lokr_w1", "lokr_w2"), ("lokr_w1", "lokr_w2_a", "lokr_w2_b"),
                 ("lokr_w1_a", "lokr_w1_b", "lokr_w2"), ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"))

    def __init__(self, base, spec: AdapterSpec):
        super().__init__(base, spec)
        out_dim, in_dim, kernel = self.shape[0], self.shape[1], self.shape[2:]
        self.factor = spec.factor
        a, b = factorization(out_dim, spec.factor)
        c, d = factorization(in_dim, spec.factor)
        self.full_w2 = spec.rank >= max(b, d) / 2
        if self.full_w2:
            self.alpha.fill_(float(spec.rank))   # ignored by every loader (scale 1): LyCORIS writes rank
        self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if self.full_w2:
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d, *kernel))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, spec.rank))
            self.lokr_w2_b = nn.Parameter(torch.zeros(spec.rank, d * math.prod(kernel)))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        self._add_dora(spec)

    @property
    def dim(self) -> int | None:
        return None if self.full_w2 else self.rank

    def w2(self) -> torch.Tensor:
        return self.lokr_w2.flatten(1) if self.full_w2 else self.lokr_w2_a @ self.lokr_w2_b

    def updown(self) -> torch.Tensor:
        # kron of (a, c) and (b, d*k*k) laid out as (a*b, c*d*k*k) is exactly the conv kernel's
        # (out, in, kh, kw) in row-major order, so one reshape gives the weight shape
        return torch.kron(self.lokr_w1, self.w2()).reshape(self.shape)

    def zero_factor(self) -> torch.Tensor:
        return self.lokr_w2 if self.full_w2 else self.lokr_w2_b

    def network_args(self) -> dict[str, str]:
        return {**super().network_args(), "factor": str(self.factor)}

    @classmethod
    def spec_from_file(cls, base, tensors) -> AdapterSpec:
        for unsupported in ("lokr_w1_a", "lokr_t2"):
            if unsupported in tensors:
                raise AdapterError(f"'{unsupported}' (LyCORIS decompose_both / Tucker) is not supported")
        w1 = tensors["lokr_w1"]
        out_dim, in_dim = weight_shape(base)[:2]
        factor = _factor_for(out_dim, in_dim, tuple(w1.shape))
        if "lokr_w2" in tensors:
            b, d = tensors["lokr_w2"].shape[:2]
            rank = max(1, math.ceil(max(b, d) / 2))   # the smallest rank that keeps w2 whole
            return AdapterSpec("lokr", rank, float(rank), "dora_scale" in tensors, factor)
        rank = tensors["lokr_w2_b"].shape[0]
        return AdapterSpec("lokr", rank, file_alpha(tensors, rank), "dora_scale" in tensors, factor)


def _factor_for(out_dim: int, in_dim: int, w1_shape: tuple[int, int]) -> int:
    """The `factor` that reproduces a file's w1 shape: -1 when it is the balanced split, else the
    larger side of w1 (as LyCORIS reads a factor back)."""
    if w1_shape == (factorization(out_dim)[0], factorization(in_dim)[0]):
        return -1
    for factor in sorted(set(w1_shape)):
        if (factorization(out_dim, factor)[0], factorization(in_dim, factor)[0]) == w1_shape:
            return factor
    raise AdapterError(f"'lokr_w1' has shape {w1_shape}, which no LoKr factor gives for a "
                       f"{out_dim}x{in_dim} layer")
