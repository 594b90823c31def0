"""Every adapter type (LoRA/LoCon, LoHa, LoKr, each with or without DoRA) on small plain modules:
the weight update equals the WebUI's own formula (tests/kohya_reference.py, written from the Lora
extension's rules, not from our adapters), the forward through the host equals that update merged
into the weights, the file has the exact LyCORIS/kohya keys and round-trips, and unsupported
options are refused by name."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_trainer.lora.adapters import AdapterSpec
from lora_trainer.lora.kohya_file import (LoraFileError, file_layers, load_into_network, network_from_tensors,
                                          network_tensors, read_lora_file, save_lora_file)
from lora_trainer.lora.mha import mha_projections
from lora_trainer.lora.network import LoRANetwork
from lora_trainer.lora.targets import ATTENTION, RESNET, TEXT, LoraTarget

sys.path.insert(0, str(Path(__file__).parent))
from kohya_reference import layer_delta  # noqa: E402

SPECS = {
    "lora": AdapterSpec("lora", 3, 1.5),
    "lora-dora": AdapterSpec("lora", 3, 1.5, dora=True),
    "loha": AdapterSpec("loha", 3, 1.5),
    "loha-dora": AdapterSpec("loha", 3, 1.5, dora=True),
    "lokr": AdapterSpec("lokr", 2, 1.5),    # q: w2 low-rank (2 < 6/2); conv: w2 whole (2 >= 4/2)
    "lokr-factor": AdapterSpec("lokr", 1, 0.5, factor=2),
    "lokr-dora": AdapterSpec("lokr", 1, 0.5, dora=True),
}

FILE_KEYS = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 24)
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.proj = nn.Conv2d(8, 8, 1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x, img):
        return self.q(x), self.attn(x, x, x, need_weights=False)[0], self.conv(img) + self.proj(img).sum(1, keepdim=True)


def targets_of(m: Tiny) -> list[LoraTarget]:
    slots = [LoraTarget(f"lora_te_attn_{p.slot}_proj", p, "te", TEXT) for p in mha_projections(m.attn)]
    return [LoraTarget("lora_unet_q", m.q, "unet", ATTENTION),
            LoraTarget("lora_unet_conv", m.conv, "unet", RESNET),
            LoraTarget("lora_unet_proj", m.proj, "unet", ATTENTION), *slots]


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = Tiny()
    return m, torch.randn(2, 5, 16), torch.randn(2, 8, 6, 6)


def randomised(net: LoRANetwork) -> LoRANetwork:
    """Every factor non-zero (a fresh adapter adds nothing) and DoRA magnitudes moved off the norms."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def reference_weights(model: Tiny, net: LoRANetwork, multiplier: float) -> dict[str, torch.Tensor]:
    """{parameter name of the model: weight + the WebUI's update for the file's layer}."""
    layers = file_layers(network_tensors(net, "fp32"))
    out = {}
    for name, target in net.targets.items():
        delta = layer_delta(layers[name], target.module.weight, multiplier)
        if hasattr(target.module, "slot"):
            key = "attn.out_proj.weight" if target.module.slot == "out" else "attn.in_proj_weight"
            i = "qkv".find(target.module.slot) if target.module.slot != "out" else None
            whole = out.get(key, dict(model.named_parameters())[key].detach().double().clone())
            if i is None:
                whole += delta
            else:
                whole[i * 16:(i + 1) * 16] += delta
            out[key] = whole
        else:
            out[f"{[n for n, m in model.named_modules() if m is target.module][0]}.weight"] = \
                target.module.weight.detach().double() + delta
    return out


@pytest.mark.parametrize("kind", list(SPECS))
def test_update_and_forward_equal_the_webui_formula(model, kind):
    m, x, img = model
    net = randomised(LoRANetwork(targets_of(m), spec=SPECS[kind]))
    net.set_multipliers(unet=0.7, te=0.7)
    layers = file_layers(network_tensors(net, "fp32"))
    for name, adapter in net.adapters.items():
        expected = layer_delta(layers[name], net.targets[name].module.weight, 0.7)
        assert expected.abs().max() > 1e-3, name            # the update is not trivially zero
        assert (adapter.delta_weight().double() - expected).abs().max() <= 1e-6, name
    # the forward through the hosts (what training runs) == the reference update merged in
    with torch.no_grad():
        base = m(x, img)
        net.attach()
        ours = m(x, img)
        net.detach()
        merged = copy.deepcopy(m)
        state = merged.state_dict()
        state.update({k: v.float() for k, v in reference_weights(m, net, 0.7).items()})
        merged.load_state_dict(state)
        theirs = merged(x, img)
    for a, b, c in zip(ours, theirs, base):
        assert (a - c).abs().max() > 1e-3
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", list(SPECS))
def test_a_16_bit_model_trains_its_fp32_adapters_without_copying_activations(model, kind):
    """mixed_precision bf16 holds the base in bf16 and the adapters in fp32. Under autocast the
    layers cast for themselves; an adapter that also cast its input to fp32 made two extra copies
    of every activation per layer (~8% of a real-size SD1.5 step). Without autocast (the WebUI's
    16-bit model) the adapter must still take the 16-bit input."""
    from torch.utils._python_dispatch import TorchDispatchMode

    m, x, img = model
    m.to(torch.bfloat16)
    x, img = x.to(torch.bfloat16), img.to(torch.bfloat16)
    net = randomised(LoRANetwork(targets_of(m), spec=SPECS[kind]))
    net.attach()
    activations = {tuple(x.shape), tuple(img.shape)}
    upcasts = []

    class RecordUpcasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.float32
                    and tuple(args[0].shape) in activations):
                upcasts.append(tuple(args[0].shape))
            return func(*args, **kwargs)

    with RecordUpcasts(), torch.autocast("cpu", dtype=torch.bfloat16):
        trained = m(x, img)
    assert upcasts == []
    with torch.no_grad():
        plain = m(x, img)   # no autocast: bf16 input into fp32 adapters, bf16 out
    net.detach()
    for a, b in zip(trained, plain):
        assert b.dtype == torch.bfloat16
        assert torch.isfinite(a.float()).all()


@pytest.mark.parametrize("kind", list(SPECS))
def test_file_has_the_ecosystems_keys_and_round_trips(model, tmp_path, kind):
    m, _, _ = model
    spec = SPECS[kind]
    net = randomised(LoRANetwork(targets_of(m), spec=spec))
    path = save_lora_file(tmp_path / "x.safetensors", network_tensors(net, "fp32"), {"ss_output_name": "x"})
    tensors, _ = read_lora_file(path)
    for name, keys in file_layers(tensors).items():
        plain = keys.keys() - {"dora_scale"}
        if spec.kind == "lokr":
            assert plain in ({"lokr_w1", "lokr_w2", "alpha"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"})
        else:
            assert plain == FILE_KEYS[spec.kind], name
        assert ("dora_scale" in keys) == spec.dora
    again, unmatched = network_from_tensors(targets_of(m), tensors)
    assert unmatched == []
    for name, adapter in net.adapters.items():
        assert type(again.adapters[name]) is type(adapter)
        assert torch.equal(again.adapters[name].delta_weight(), adapter.delta_weight()), name
    fresh = LoRANetwork(targets_of(m), spec=spec)          # init_lora_from: same type, same shapes
    load_into_network(fresh, tensors, "x")
    assert all(torch.equal(fresh.adapters[n].delta_weight(), a.delta_weight()) for n, a in net.adapters.items())


def test_dora_scale_is_the_webuis_per_input_channel_norm(model):
    m, x, img = model
    net = LoRANetwork(targets_of(m), spec=SPECS["lora-dora"])
    linear, conv = net.adapters["lora_unet_q"], net.adapters["lora_unet_conv"]
    assert linear.dora_scale.shape == (1, 16) and conv.dora_scale.shape == (1, 8, 1, 1)
    w = m.conv.weight.detach()
    per_input = torch.stack([w[:, i].norm() for i in range(8)])
    assert torch.allclose(conv.dora_scale.flatten(), per_input)
    # a fresh DoRA adapter changes nothing (up = 0, magnitude = the weight's own norms)
    assert all(a.delta_weight().abs().max() <= 1e-6 for a in net.adapters.values())
    assert net.is_untrained()


def test_lokr_factorisation_and_full_matrix_fallback():
    from lora_trainer.lora.adapters.lokr import LoKrAdapter

    layer = nn.Linear(320, 640)          # out 640 = 20 x 32, in 320 = 16 x 20 (balanced split)
    low = LoKrAdapter(layer, AdapterSpec("lokr", 4, 2.0))
    keys = low.file_tensors()
    assert keys["lokr_w1"].shape == (20, 16) and keys["lokr_w2_a"].shape == (32, 4)
    assert keys["lokr_w2_b"].shape == (4, 20) and low.scale == 0.5
    full = LoKrAdapter(layer, AdapterSpec("lokr", 16, 2.0))     # 16 >= max(32, 20) / 2: whole w2
    keys = full.file_tensors()
    assert set(keys) == {"lokr_w1", "lokr_w2", "alpha"} and keys["lokr_w2"].shape == (32, 20)
    assert full.scale == 1.0 and float(keys["alpha"]) == 16     # every loader ignores alpha here
    four = LoKrAdapter(layer, AdapterSpec("lokr", 4, 2.0, factor=4)).file_tensors()
    assert four["lokr_w1"].shape == (4, 4) and four["lokr_w2_a"].shape == (160, 4)
    conv = LoKrAdapter(nn.Conv2d(64, 128, 3), AdapterSpec("lokr", 2)).file_tensors()
    assert conv["lokr_w1"].shape == (8, 8) and conv["lokr_w2_b"].shape == (2, 8 * 9)


def test_mismatched_and_unsupported_files_are_refused_by_name(model):
    m, _, _ = model
    loha = network_tensors(randomised(LoRANetwork(targets_of(m), spec=SPECS["loha"])))
    with pytest.raises(LoraFileError, match="is a loha file, but this run trains lora"):
        load_into_network(LoRANetwork(targets_of(m), spec=SPECS["lora"]), loha, "x")
    with pytest.raises(LoraFileError, match=r"is a lora file, but this run trains lora \+ DoRA"):
        load_into_network(LoRANetwork(targets_of(m), spec=SPECS["lora-dora"]),
                          network_tensors(LoRANetwork(targets_of(m), spec=SPECS["lora"])), "x")
    tucker = dict(loha, **{"lora_unet_conv.hada_t1": torch.zeros(3, 3, 3, 3)})
    with pytest.raises(LoraFileError, match="hada_t1"):
        network_from_tensors(targets_of(m), tucker)
    oft = {"lora_unet_q.oft_blocks": torch.zeros(2, 4, 4)}
    with pytest.raises(LoraFileError, match="oft_blocks"):
        network_from_tensors(targets_of(m), oft)


def test_config_maps_types_and_names_unsupported_or_contradicting_options(tmp_path):
    from lora_trainer.config.load import ConfigError, config_from_dict
    from lora_trainer.lora.adapters import adapter_setup

    def cfg(**values):
        return config_from_dict(values, tmp_path, required=())

    with pytest.raises(ConfigError, match="use_tucker.*Tucker decomposition is not supported"):
        cfg(adapter_type="loha", use_tucker=True)
    with pytest.raises(ConfigError, match="lokr_factor.*only applies to adapter_type: lokr"):
        cfg(lokr_factor=4)
    with pytest.raises(ConfigError, match="adapter_type"):
        cfg(adapter_type="oft")
    assert adapter_setup(cfg(adapter_type="lokr", lokr_factor=4, dora=True)) == \
        (AdapterSpec("lokr", 8, None, True, 4), "attn-mlp")
    # an older config's LoCon (target_modules: locon) and the new word mean the same network
    assert adapter_setup(cfg(target_modules="locon")) == adapter_setup(cfg(adapter_type="locon")) == \
        (AdapterSpec("lora", 8, None, False, -1), "locon")
