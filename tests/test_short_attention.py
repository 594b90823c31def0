"""Short attention as plain matmuls in the compiled CPU training step (backbones/short_attention.py):
same values and gradients as torch's kernel, used only where it is faster (short 16-bit score
matrices without mask, causality or dropout), and only inside the compiled training call."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_trainer.backbones import short_attention
from lora_trainer.backbones.short_attention import PLAIN_SCORES_LIMIT, ShortAttentionAsMatmuls

FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"


def _aten_ops(fn) -> set[str]:
    """The aten operators `fn` runs (forward and backward), as the profiler sees them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def _qkv(batch_heads=(2, 4), queries=64, keys=77, dim=16, seed=0, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*batch_heads, n, dim, generator=generator).to(dtype).requires_grad_()
            for n in (queries, keys, keys)]


# bf16: the plain form rounds the scores to bf16 before the softmax (as autocast does for any matmul),
# flash keeps them in fp32; measured up to 0.7% of the largest value on these inputs
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, {}),
                                              (torch.bfloat16, {"rtol": 0, "atol": 0.02})])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_plain_attention_gives_the_values_and_gradients_of_torchs_kernel(scale, dtype, tolerance):
    q, k, v = _qkv(dtype=dtype)
    expected = F.scaled_dot_product_attention(q, k, v, scale=scale)
    expected_grads = torch.autograd.grad(expected.float().square().sum(), (q, k, v))
    got = short_attention.plain_attention(q, k, v, scale=scale)
    got_grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))

    def relative(t, reference):   # against the largest value, so the tolerance reads as a share
        return t.float() / reference.float().abs().max()
    torch.testing.assert_close(relative(got, expected), relative(expected, expected), **tolerance)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(relative(g, e), relative(e, e), **tolerance)


def test_short_unmasked_attention_runs_as_matmuls_under_the_mode():
    q, k, v = _qkv()

    def step():
        with ShortAttentionAsMatmuls():
            out = F.scaled_dot_product_attention(q, k, v)
        out.sum().backward()

    ops = _aten_ops(step)
    assert FLASH not in ops and "aten::_softmax" in ops


@pytest.mark.parametrize("case", ["long", "fp32", "mask", "causal", "dropout", "positional mask"])
def test_what_the_plain_form_does_not_cover_stays_on_torchs_kernel(case):
    side = int(PLAIN_SCORES_LIMIT ** 0.5) + 1   # a self-attention just over the limit
    q, k, v = (_qkv(batch_heads=(1, 1), queries=side, keys=side, dim=8) if case == "long" else
               _qkv(dtype=torch.float32) if case == "fp32" else _qkv())
    calls = {
        "long": lambda: F.scaled_dot_product_attention(q, k, v),
        "fp32": lambda: F.scaled_dot_product_attention(q, k, v),
        "mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(64, 77, dtype=torch.bool)),
        "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "dropout": lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5),
        "positional mask": lambda: F.scaled_dot_product_attention(q, k, v, None, 0.0, True),
    }
    seen = []
    real = short_attention.plain_attention
    short_attention.plain_attention = lambda *a, **kw: seen.append(1) or real(*a, **kw)
    try:
        with ShortAttentionAsMatmuls():
            calls[case]()
    finally:
        short_attention.plain_attention = real
    assert seen == []


def test_only_the_compiled_cpu_training_call_uses_the_plain_form(tiny_sd1):
    """Previews (no_grad, eager module) and eager training keep torch's kernel. bf16 autocast, as the
    fast path runs it (fp32 attention is left to flash everywhere)."""
    from lora_trainer.backbones.diffusers_sd import load_backbone

    backbone = load_backbone(str(tiny_sd1["single_file"]), device="cpu")
    latents, timesteps = torch.randn(1, 4, 8, 8), torch.tensor([10])
    with torch.no_grad():
        cond = backbone.encode_text(["a"])

    def training_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = backbone.predict(latents, timesteps, cond)
        prediction.float().sum().backward()

    def preview():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            backbone.predict(latents, timesteps, cond)

    assert FLASH in _aten_ops(training_step)
    backbone.compile_training_step("aot_eager")
    compiled_training = _aten_ops(training_step)
    assert FLASH not in compiled_training and "aten::_softmax" in compiled_training
    assert FLASH in _aten_ops(preview)
