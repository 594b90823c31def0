"""LoHa (LyCORIS): delta = (w1_a @ w1_b) * (w2_a @ w2_b), a Hadamard product of two rank-r products,
scaled by alpha / rank.

File keys `hada_w1_a` (out, r), `hada_w1_b` (r, in), `hada_w2_a`, `hada_w2_b`, `alpha` (+ `dora_scale`).
On a convolution the `_b` factors hold the whole kernel flattened, (r, in*kh*kw), which is how
LyCORIS writes a conv without Tucker decomposition and how the WebUI rebuilds it. Tucker
(`hada_t1`/`hada_t2`) is not supported: such a file is refused by name.
Initialisation as LyCORIS: w1_a ~ N(0, 0.1), w1_b and w2_b ~ N(0, 1), w2_a = 0.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, AdapterSpec, file_alpha


class LoHaAdapter(Adapter):
    kind = "loha"
    signature = (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),)

    def __init__(self, base, spec: AdapterSpec):
        super().__init__(base, spec)
        out_dim, fan_in = self.shape[0], int(torch.tensor(self.shape[1:]).prod())
        r = spec.rank
        self.hada_w1_a = nn.Parameter(torch.empty(out_dim, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, fan_in))
        self.hada_w2_a = nn.Parameter(torch.empty(out_dim, r))
        self.hada_w2_b = nn.Parameter(torch.empty(r, fan_in))
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        self._add_dora(spec)

    def updown(self) -> torch.Tensor:
        product = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return product.reshape(self.shape)

    def zero_factor(self) -> torch.Tensor:
        return self.hada_w2_a

    @classmethod
    def spec_from_file(cls, base, tensors) -> AdapterSpec:
        rank = tensors["hada_w1_b"].shape[0]
        return AdapterSpec("loha", rank, file_alpha(tensors, rank), "dora_scale" in tensors)
