"""LoRA layer math on small plain modules: what would catch a wrong scale, a leaked adapter or a
merge that drifts."""
import pytest
import torch
from torch import nn

from lora_trainer.lora.kohya_file import (LoraFileError, load_into_network, network_tensors,
                                          read_lora_file, save_lora_file)
from lora_trainer.lora.network import LoRANetwork
from lora_trainer.lora.targets import ATTENTION, RESNET, TEXT, LoraTarget, select_targets


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.proj = nn.Conv2d(4, 4, 1)
        self.te = nn.Linear(8, 8)

    def forward(self, x, img):
        return self.q(x) + self.te(x), self.conv(img) + self.proj(img).sum(1, keepdim=True)


def targets_of(m):
    return [LoraTarget("lora_unet_q", m.q, "unet", ATTENTION),
            LoraTarget("lora_unet_conv", m.conv, "unet", RESNET),
            LoraTarget("lora_unet_proj", m.proj, "unet", ATTENTION),
            LoraTarget("lora_te_q", m.te, "te", TEXT)]


def randomise(network, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture
def model_and_inputs():
    torch.manual_seed(0)
    return Tiny(), torch.randn(3, 8), torch.randn(2, 4, 5, 5)


def test_fresh_network_leaves_output_unchanged(model_and_inputs):
    m, x, img = model_and_inputs
    base = m(x, img)
    net = LoRANetwork(targets_of(m), rank=2, alpha=1.0).attach()
    out = m(x, img)
    assert all(torch.equal(a, b) for a, b in zip(base, out))
    # ...but the adapter is live: its up matrices get gradients
    sum(o.sum() for o in m(x, img)).backward()
    assert all(a.up.weight.grad is not None and a.up.weight.grad.abs().sum() > 0 for a in net.adapters.values())


def test_scale_is_alpha_over_rank_times_multiplier(model_and_inputs):
    m, x, img = model_and_inputs
    base = m.q(x)
    net = LoRANetwork([targets_of(m)[0]], rank=4, alpha=2.0)
    randomise(net)
    net.attach()
    net.set_multipliers(unet=0.7)
    a = net.adapters["lora_unet_q"]
    expected = base + 0.7 * (2.0 / 4) * (x @ a.down.weight.T @ a.up.weight.T)
    assert torch.allclose(m.q(x), expected, atol=1e-6)


def test_scale_follows_an_alpha_loaded_from_a_checkpoint_or_a_file(model_and_inputs):
    """The scale is kept as a Python number (no host sync per layer per step): every way alpha is
    written must refresh it."""
    m, x, img = model_and_inputs
    source = LoRANetwork([targets_of(m)[0]], rank=4, alpha=1.0)
    randomise(source)
    net = LoRANetwork([targets_of(m)[0]], rank=4, alpha=4.0)
    net.load_state_dict(source.state_dict())
    assert net.adapters["lora_unet_q"].scale == pytest.approx(0.25)
    other = LoRANetwork([targets_of(m)[0]], rank=4, alpha=4.0)
    tensors = {k.split(".", 1)[1]: v for k, v in network_tensors(source, "fp32").items()}
    tensors["alpha"] = torch.tensor(2.0)
    other.adapters["lora_unet_q"].load_file_tensors(tensors)
    assert other.adapters["lora_unet_q"].scale == pytest.approx(0.5)


def test_merge_equals_wrapped_forward_and_unmerge_restores_bytes(model_and_inputs):
    m, x, img = model_and_inputs
    originals = {k: v.clone() for k, v in m.state_dict().items()}
    net = LoRANetwork(targets_of(m), rank=3, alpha=1.5)
    randomise(net)
    net.attach()
    net.set_multipliers(unet=0.8, te=0.5)
    wrapped = m(x, img)
    net.detach()
    net.merge()
    merged = m(x, img)
    for a, b in zip(wrapped, merged):
        assert torch.allclose(a, b, atol=1e-5)
    net.unmerge()
    assert all(torch.equal(originals[k], v) for k, v in m.state_dict().items())


def test_multiplier_zero_is_bitwise_base_and_detach_restores_forward(model_and_inputs):
    m, x, img = model_and_inputs
    base = m(x, img)
    net = LoRANetwork(targets_of(m), rank=2)
    randomise(net)
    net.attach()
    net.set_multipliers(unet=0.0, te=0.0)
    assert all(torch.equal(a, b) for a, b in zip(base, m(x, img)))
    net.set_multipliers(unet=1.0, te=1.0)
    assert not torch.equal(base[0], m(x, img)[0])
    net.detach()
    assert "forward" not in m.q.__dict__ and "forward" not in m.conv.__dict__
    assert all(torch.equal(a, b) for a, b in zip(base, m(x, img)))
    # the module tree and state dict keys never changed
    assert set(m.state_dict()) == {"q.weight", "q.bias", "conv.weight", "conv.bias", "proj.weight",
                                   "proj.bias", "te.weight", "te.bias"}


def test_two_networks_stack_like_a_hand_merge(model_and_inputs):
    m, x, img = model_and_inputs
    a = LoRANetwork(targets_of(m), rank=2)
    b = LoRANetwork(targets_of(m)[:2], rank=3, alpha=1.0)
    randomise(a, 1)
    randomise(b, 2)
    a.set_multipliers(0.7, 0.7)
    b.set_multipliers(0.5, 0.5)
    a.attach()
    b.attach()
    stacked = m(x, img)
    a.detach()
    b.detach()
    a.merge()
    b.merge()
    merged = m(x, img)
    for s, h in zip(stacked, merged):
        assert torch.allclose(s, h, atol=1e-5)
    b.unmerge()
    a.unmerge()


def test_kohya_file_round_trip_and_rank_mismatch_message(tmp_path, model_and_inputs):
    m, x, img = model_and_inputs
    net = LoRANetwork(targets_of(m), rank=2, alpha=1.0)
    randomise(net)
    path = save_lora_file(tmp_path / "x.safetensors", network_tensors(net, "fp32"), {"ss_output_name": "x"})
    tensors, meta = read_lora_file(path)
    assert set(tensors) == {f"{n}{s}" for n in net.adapters
                            for s in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    assert meta["ss_output_name"] == "x" and len(meta["sshs_model_hash"]) == 64
    assert tensors["lora_unet_q.lora_down.weight"].shape[0] == 2 and float(tensors["lora_unet_q.alpha"]) == 1.0
    fresh = LoRANetwork(targets_of(m), rank=2, alpha=1.0)
    load_into_network(fresh, tensors, "x")
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), net.parameters()))
    wrong_rank = LoRANetwork(targets_of(m), rank=4)
    with pytest.raises(LoraFileError, match="rank 2.*lora_rank"):
        load_into_network(wrong_rank, tensors, "x")
    fewer = LoRANetwork(targets_of(m)[:1], rank=2)
    with pytest.raises(LoraFileError, match="do not exist in this model"):
        load_into_network(fewer, tensors, "x")


def test_presets_select_roles():
    m = Tiny()
    all_targets = targets_of(m)
    assert [t.name for t in select_targets(all_targets, "attn", False)] == ["lora_unet_q", "lora_unet_proj"]
    assert "lora_te_q" in [t.name for t in select_targets(all_targets, "attn", True)]
    assert "lora_unet_conv" in [t.name for t in select_targets(all_targets, "locon", False)]
