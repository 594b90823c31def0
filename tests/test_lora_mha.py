"""LoRA on nn.MultiheadAttention (lora.mha): the OpenCLIP text encoders inside the WebUI (SD2's,
SDXL's second) keep q/k/v fused in `in_proj_weight` and use `out_proj.weight` directly. Checked
against explicit math: four ordinary Linear LoRAs on the q/k/v/out projections (what the headless
trainer trains on transformers' CLIP and what the file means), and the merged weights the WebUI's
Lora extension computes from the file."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.lora import host
from lora_trainer.lora.kohya_file import network_from_tensors, network_tensors
from lora_trainer.lora.kohya_names import webui_compvis_name
from lora_trainer.lora.mha import SLOTS, MhaProjection, MultiheadAttentionHost, mha_projections
from lora_trainer.lora.network import LoRANetwork
from lora_trainer.lora.targets import TEXT, LoraTarget
from lora_trainer.webui import names
from lora_trainer.webui.backbone import WebuiBackbone
from lora_trainer.webui.lora_state import ModelGuard

E, HEADS = 16, 2


def attention(batch_first=False, seed=0):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
    with torch.no_grad():   # non-zero biases, so a slot mix-up could not hide behind zeros
        m.in_proj_bias.normal_()
        m.out_proj.bias.normal_()
    m.requires_grad_(False)
    return m


def layer_name(slot, i=0, prefix="lora_te"):
    return f"{prefix}_text_model_encoder_layers_{i}_self_attn_{slot}_proj"


def network_on(m, rank=4, alpha=2.0, seed=1, i=0):
    targets = [LoraTarget(layer_name(p.slot, i), p, "te", TEXT) for p in mha_projections(m)]
    net = LoRANetwork(targets, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def causal_mask(length):
    return torch.full((length, length), float("-inf")).triu(1)


def explicit_lora_attention(m, net, x, mask, multiplier=1.0):
    """Multi-head attention written out, each projection an nn.Linear plus its own LoRA applied to
    the activations, y = W x + b + multiplier * alpha/rank * up(down(x)): the headless trainer's math
    on transformers' CLIP q_proj/k_proj/v_proj/out_proj. x: (L, N, E)."""
    def proj(inp, weight, bias, slot):
        a = net.adapters[layer_name(slot)]
        return F.linear(inp, weight, bias) + multiplier * a.scale * F.linear(F.linear(inp, a.down.weight),
                                                                             a.up.weight)

    wq, wk, wv = m.in_proj_weight.chunk(3)
    bq, bk, bv = m.in_proj_bias.chunk(3)
    q, k, v = proj(x, wq, bq, "q"), proj(x, wk, bk, "k"), proj(x, wv, bv, "v")
    length, batch, _ = x.shape
    d = E // HEADS

    def heads(t):   # (L, N, E) -> (N, H, L, d)
        return t.reshape(length, batch, HEADS, d).permute(1, 2, 0, 3)

    scores = heads(q) @ heads(k).transpose(-1, -2) / d ** 0.5 + mask
    o = (scores.softmax(-1) @ heads(v)).permute(2, 0, 1, 3).reshape(length, batch, E)
    return proj(o, m.out_proj.weight, m.out_proj.bias, "out")


def merged_copy(m, nets):
    """What the WebUI's Lora extension does with the file: each update added into its third of
    in_proj_weight, the out update into out_proj.weight."""
    ref = attention()
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        for net in nets:
            d = {s: net.adapters[layer_name(s)].delta_weight() for s in SLOTS}
            ref.in_proj_weight += torch.cat([d["q"], d["k"], d["v"]])
            ref.out_proj.weight += d["out"]
    return ref


def test_forward_is_four_linear_loras_and_the_merged_weights():
    m = attention()
    x, mask = torch.randn(5, 3, E), causal_mask(5)
    base = m(x, x, x, attn_mask=mask, need_weights=False)[0]
    net = network_on(m).attach()
    net.set_multipliers(te=0.7)
    y = m(x, x, x, attn_mask=mask, need_weights=False)[0]
    explicit = explicit_lora_attention(m, net, x, mask, multiplier=0.7)
    merged = merged_copy(m, [net])(x, x, x, attn_mask=mask, need_weights=False)[0]
    print(f"MHA LoRA vs explicit {float((y - explicit).abs().max().detach()):.3g}, vs merged "
          f"{float((y - merged).abs().max().detach()):.3g}, effect {float((y - base).abs().max().detach()):.3g}")
    assert (y - base).abs().max() > 0.1
    torch.testing.assert_close(y, explicit, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(y, merged, atol=2e-5, rtol=1e-5)
    # the attention weights it returns are the LoRA'd ones too; batch_first layouts work the same
    _, w = m(x, x, x, attn_mask=mask)
    torch.testing.assert_close(w, merged_copy(m, [net])(x, x, x, attn_mask=mask)[1], atol=1e-6, rtol=1e-5)


def test_batch_first_and_stacked_networks():
    m = attention(batch_first=True)
    x = torch.randn(3, 5, E)
    a, b = network_on(m, seed=1).attach(), network_on(m, seed=2, rank=2).attach()   # a preview's stack
    ref = nn.MultiheadAttention(E, HEADS, batch_first=True)
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        for net in (a, b):
            d = {s: net.adapters[layer_name(s)].delta_weight() for s in SLOTS}
            ref.in_proj_weight += torch.cat([d["q"], d["k"], d["v"]])
            ref.out_proj.weight += d["out"]
    torch.testing.assert_close(m(x, x, x)[0], ref(x, x, x)[0], atol=2e-5, rtol=1e-5)
    b.detach()
    a.set_multipliers(te=0.0)      # multiplier 0: bitwise the base output
    m2 = attention(batch_first=True)
    assert torch.equal(m(x, x, x)[0], m2(x, x, x)[0])


def test_gradients_reach_all_four_adapters_and_a_fresh_lora_changes_nothing():
    m = attention()
    x, mask = torch.randn(5, 3, E), causal_mask(5)
    base = m(x, x, x, attn_mask=mask, need_weights=False)[0]
    targets = [LoraTarget(layer_name(p.slot), p, "te", TEXT) for p in mha_projections(m)]
    net = LoRANetwork(targets, rank=4, alpha=4.0).attach()      # kohya init: every up is 0
    y = m(x, x, x, attn_mask=mask, need_weights=False)[0]
    assert torch.equal(y, base)
    y.square().sum().backward()
    for slot in SLOTS:
        a = net.adapters[layer_name(slot)]
        assert a.up.weight.grad is not None and a.up.weight.grad.abs().max() > 0, slot
    assert m.in_proj_weight.grad is None and m.out_proj.weight.grad is None
    # with non-zero ups, down gets gradients as well
    net.detach()
    net = network_on(m).attach()
    m(x, x, x, attn_mask=mask, need_weights=False)[0].square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_detach_gives_the_module_back_exactly():
    m = attention()

    def someone_elses_forward(*args, **kwargs):      # an instance patch that was there before
        return nn.MultiheadAttention.forward(m, *args, **kwargs)

    m.forward = someone_elses_forward
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = {k: id(v) for k, v in m.named_parameters()}
    modules = [n for n, _ in m.named_modules()]
    x = torch.randn(5, 3, E)
    out = m(x, x, x)[0]
    net = network_on(m).attach()
    assert isinstance(m.__dict__["forward"], MultiheadAttentionHost) and host.has_adapters(m)
    assert all(host.has_adapters(p) for p in mha_projections(m))
    m(x, x, x)[0].sum().backward()
    # while attached: the same module tree, parameters and state_dict keys
    assert [n for n, _ in m.named_modules()] == modules
    assert {k: id(v) for k, v in m.named_parameters()} == params and list(m.state_dict()) == list(before)
    net.detach()
    assert m.__dict__["forward"] is someone_elses_forward and not host.has_adapters(m)
    assert {k: id(v) for k, v in m.named_parameters()} == params
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert torch.equal(m(x, x, x)[0], out)


def test_a_class_level_forward_patch_runs_once_inside_with_the_lora_weights(monkeypatch):
    """The WebUI patches nn.MultiheadAttention.forward at class level (its Lora extension merges
    loaded networks there): the instance host must call it once per forward, on the LoRA'd weights."""
    original = nn.MultiheadAttention.forward
    seen = []

    def patched(self, *args, **kwargs):
        seen.append(self.in_proj_weight)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.MultiheadAttention, "forward", patched)
    m = attention()
    x = torch.randn(5, 3, E)
    net = network_on(m).attach()
    y = m(x, x, x)[0]
    assert len(seen) == 1 and not isinstance(seen[0], nn.Parameter) and seen[0].requires_grad
    monkeypatch.setattr(nn.MultiheadAttention, "forward", original)
    torch.testing.assert_close(y, merged_copy(m, [net])(x, x, x)[0], atol=2e-5, rtol=1e-5)
    net.detach()
    assert isinstance(m.in_proj_weight, nn.Parameter) and "forward" not in m.__dict__


def test_merge_unmerge_and_the_file_of_mha_projections():
    m = attention()
    x = torch.randn(5, 3, E)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    net = network_on(m)
    net.attach()
    attached = m(x, x, x)[0].detach()
    net.detach()
    net.merge()
    torch.testing.assert_close(m(x, x, x)[0], attached, atol=2e-5, rtol=1e-5)
    net.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    # the file: ordinary Linear LoRA keys and shapes (down r x E, up E x r), read back onto the slots
    tensors = network_tensors(net)
    assert tensors[f"{layer_name('q')}.lora_down.weight"].shape == (4, E)
    assert tensors[f"{layer_name('out')}.lora_up.weight"].shape == (E, 4)
    again, unmatched = network_from_tensors(
        [LoraTarget(layer_name(p.slot), p, "te", TEXT) for p in mha_projections(m)], tensors)
    assert unmatched == []
    again.attach()
    torch.testing.assert_close(m(x, x, x)[0], attached, atol=1e-6, rtol=1e-6)
    again.detach()


# ---- the WebUI backbone's OpenCLIP towers ----------------------------------------------------------------

def open_clip_tower(blocks=3):
    """The module names of open_clip's text transformer under the WebUI's embedder (`.wrapped.model`)."""
    tower = nn.Module()
    tower.transformer = nn.Module()
    tower.transformer.resblocks = nn.ModuleList()
    for _ in range(blocks):
        block = nn.Module()
        block.attn = nn.MultiheadAttention(8, 2)
        block.mlp = nn.Module()
        block.mlp.c_fc, block.mlp.c_proj = nn.Linear(8, 16), nn.Linear(16, 8)
        tower.transformer.resblocks.append(block)
    return tower


class FakeSd2(nn.Module):
    is_sd1, is_sd2, is_sdxl = False, True, False
    parameterization = "v"

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = nn.Linear(2, 2)
        self.cond_stage_model = nn.Module()
        self.cond_stage_model.wrapped = nn.Module()       # LDM FrozenOpenCLIPEmbedder
        self.cond_stage_model.wrapped.model = open_clip_tower(3)
        self.cond_stage_model.wrapped.layer_idx = 1        # "penultimate": the last block never runs
        self.alphas_cumprod = torch.linspace(0.99, 0.01, 1000)


class FakeSdxl(nn.Module):
    is_sd1, is_sd2, is_sdxl = False, False, True

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = nn.Linear(2, 2)
        self.conditioner = nn.Module()
        self.conditioner.embedders = nn.ModuleList([nn.Module(), nn.Module()])
        self.conditioner.embedders[1].wrapped = nn.Module()   # SGM FrozenOpenCLIPEmbedder2: all blocks run
        self.conditioner.embedders[1].wrapped.model = open_clip_tower(2)
        self.alphas_cumprod = torch.linspace(0.99, 0.01, 1000)


def _expected(prefix, blocks):
    return sorted(f"{prefix}_text_model_encoder_layers_{i}_{part}" for i in blocks
                  for part in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                               "mlp_fc1", "mlp_fc2"))


def test_webui_backbone_targets_openclip_attention_under_the_headless_names():
    model = FakeSd2()
    backbone = WebuiBackbone(model)
    targets = [t for t in backbone.lora_targets() if t.component == "te"]
    # the names transformers' CLIP (the headless trainer) gives these layers; not the block SD2 skips
    assert [t.name for t in targets] == _expected("lora_te", (0, 1))
    table = backbone.name_table()
    webui_names = backbone.webui_layer_names()
    attn0 = model.cond_stage_model.wrapped.model.transformer.resblocks[0].attn
    for slot in SLOTS:
        kohya = layer_name(slot)
        target = next(t for t in targets if t.name == kohya)
        assert isinstance(target.module, MhaProjection) and target.module.module is attn0
        assert target.module.slot == slot and target.role == TEXT
        layer = table.by_kohya[kohya]
        # the WebUI keeps it under the converted name, which its MultiheadAttention code looks up
        assert layer.webui == f"model_transformer_resblocks_0_attn_{slot}_proj" == webui_compvis_name(kohya, True)
        assert layer.ldm_path == f"cond_stage_model.wrapped.model.transformer.resblocks.0.attn.{slot}_proj"
        assert table.ldm_of(kohya) == layer.ldm_path and table.kohya_of(layer.ldm_path) == kohya
        # and finds the module: q/k/v on the attention (its _[qkv]_proj fallback), out on out_proj
        lands = "model_transformer_resblocks_0_attn" + ("_out_proj" if slot == "out" else "")
        assert names.resolve_in_webui(kohya, webui_names, backbone.layout) == lands
    q = next(t for t in targets if t.name == layer_name("q")).module
    assert q.weight.data_ptr() == attn0.in_proj_weight.data_ptr()
    assert next(t for t in targets if t.name == layer_name("v")).module.weight.data_ptr() == \
        attn0.in_proj_weight[16:].data_ptr()


def test_webui_backbone_sdxl_te2_attention_and_model_guard():
    model = FakeSdxl()
    model.requires_grad_(False)
    backbone = WebuiBackbone(model, resolution=64)
    targets = backbone.lora_targets()
    assert [t.name for t in targets if t.component == "te2"] == _expected("lora_te2", (0, 1))
    layer = backbone.name_table().by_kohya[layer_name("k", 1, "lora_te2")]
    assert layer.webui == "1_model_transformer_resblocks_1_attn_k_proj" == webui_compvis_name(layer.kohya)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 2, 8)
    attn = model.conditioner.embedders[1].wrapped.model.transformer.resblocks[1].attn
    out = attn(x, x, x)[0]
    with ModelGuard(model) as guard:
        net = LoRANetwork(targets, rank=2).attach()
        with torch.no_grad():
            for a in net.adapters.values():
                a.up.weight.normal_()
        assert not torch.equal(attn(x, x, x)[0], out)
        assert guard.remove_adapters() > 0       # what the job's finally does, hosts on MHAs included
    assert "forward" not in attn.__dict__ and not host.has_adapters(attn)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(attn(x, x, x)[0], out)
