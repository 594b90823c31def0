"""Contract tests of the WebUI backbone (lora_trainer.webui) against a STAND-IN of the WebUI's
loaded model (tests/webui_standin.py: the tiny SD1 checkpoint in diffusers modules, hung under the
LDM names the WebUI's model has) and a stand-in of its Lora extension. No WebUI needed; the same
code against the real WebUI is tests/webui/."""
from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora_trainer.backbones.diffusers_sd import fingerprint_file, load_backbone
from lora_trainer.backbones.ldm_keys import unet_diffusers_module_name
from lora_trainer.config import config_to_dict, load_config
from lora_trainer.lora.kohya_file import read_lora_file
from lora_trainer.lora.kohya_names import webui_candidate_names
from lora_trainer.lora.network import LoRANetwork
from lora_trainer.lora import host
from lora_trainer.training.control import TrainingControl, TrainingObserver
from lora_trainer.diffusion.objective import alphas_cumprod_from_schedule
from lora_trainer.app.session import train_from_config
from lora_trainer.webui import job, lora_state, names, paths
from lora_trainer.webui.backbone import WebuiBackbone
from lora_trainer.webui.env import WebuiEnv, lora_extension_module
from lora_trainer.webui.progress import WebuiProgress

sys.path.insert(0, str(Path(__file__).parent))
from webui_standin import (StandInSD1, StateStandIn,  # noqa: E402
                           standin_env)


@pytest.fixture
def standin(tiny_sd1):
    return StandInSD1(tiny_sd1["single_file"])


@pytest.fixture
def env(standin, tmp_path):
    return standin_env(standin, tmp_path / "models" / "Lora")


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert changed == []


def assert_no_leftovers(model):
    assert not any(host.has_adapters(m) for m in model.modules())
    assert [type(m).__name__ for m in model.modules() if "forward" in m.__dict__] == []


def webui_cfg(make_config, tmp_path, name, **values):
    values.setdefault("output_dir", str(tmp_path / name / "lora"))
    values.setdefault("run_dir", str(tmp_path / name / "run"))
    return load_config(make_config(name, **values))


# ---- the stand-in is what it claims ---------------------------------------------------------------------

def test_standin_has_the_checkpoints_ldm_names(standin, tiny_sd1):
    with safe_open(str(tiny_sd1["single_file"]), "pt") as f:
        keys = set(f.keys())
    prefix = "model.diffusion_model."
    ldm = {k[len(prefix):] for k in keys if k.startswith(prefix)}
    exposed = {f"{path}.{p}".lstrip(".") for path, m in standin.model.diffusion_model.named_modules()
               for p, _ in m.named_parameters(recurse=False)}
    assert exposed == ldm
    te = {k[len("cond_stage_model."):] for k in keys if k.startswith("cond_stage_model.")}
    exposed_te = {f"{path}.{p}" for path, m in standin.cond_stage_model.wrapped.named_modules()
                  for p, _ in m.named_parameters(recurse=False)}
    assert exposed_te == te - {"transformer.text_model.embeddings.position_ids"}   # a buffer
    assert "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q" in standin.network_layer_mapping
    assert "transformer_text_model_encoder_layers_0_self_attn_q_proj" in standin.network_layer_mapping


# ---- names ------------------------------------------------------------------------------------------------

def test_targets_are_the_headless_layers_with_the_same_names_and_roles(standin, tiny_sd1):
    ours = WebuiBackbone(standin).lora_targets()
    headless = load_backbone(str(tiny_sd1["single_file"])).lora_targets()
    assert [t.name for t in ours] == sorted(t.name for t in headless)
    roles = {t.name: (t.role, t.component) for t in headless}
    assert {t.name: (t.role, t.component) for t in ours} == roles
    assert {t.role for t in ours} == {"attn", "ff", "proj", "resnet", "sampler", "text"}


def test_every_layer_converts_both_ways(standin, tiny_sd1):
    backbone = WebuiBackbone(standin)
    table = backbone.name_table()
    unet_config = dict(load_backbone(str(tiny_sd1["single_file"])).unet.config)
    mapping = standin.network_layer_mapping
    assert len(table.layers) == 129
    for layer in table.layers:
        # kohya -> WebUI: the WebUI's own lookup order lands on exactly this layer
        hits = [c for c in webui_candidate_names(layer.kohya) if c in mapping]
        assert hits and hits[0] == layer.webui, layer
        assert mapping[layer.webui] is backbone._modules[layer.kohya]
        # both directions of the table
        assert table.kohya_of(layer.ldm_path) == layer.kohya
        assert table.ldm_of(layer.kohya + ".lora_down.weight") == layer.ldm_path
        assert table.webui_of(layer.kohya) == layer.webui
        if layer.component == "unet":
            # an independent route: ldm_keys' config-driven table gives the same diffusers path
            diffusers_path = unet_diffusers_module_name(layer.ldm_path, unet_config)
            assert layer.kohya == "lora_unet_" + diffusers_path.replace(".", "_")


def test_sd2_and_sdxl_names_resolve_in_the_webui():
    sd2, sdxl = names.LAYOUTS["sd2"], names.LAYOUTS["sdxl"]
    te = sd2.text_encoders[0]
    assert names.text_encoder_kohya_name("model.transformer.resblocks.3.mlp.c_fc", te) == \
        "lora_te_text_model_encoder_layers_3_mlp_fc1"
    # the attention's out_proj Linear is not a target of its own (MultiheadAttention uses its weight
    # directly): the attention's four projections are (lora.mha), under transformers' CLIP names
    assert names.text_encoder_kohya_name("model.transformer.resblocks.3.attn.out_proj", te) is None
    assert names.open_clip_attention_kohya_names("model.transformer.resblocks.3.attn", te) == {
        s: f"lora_te_text_model_encoder_layers_3_self_attn_{s}_proj" for s in ("q", "k", "v", "out")}
    assert names.open_clip_attention_kohya_names("transformer.text_model.encoder.layers.0.self_attn",
                                                 sdxl.text_encoders[0]) is None
    webui = {"model_transformer_resblocks_3_mlp_c_fc", "model_transformer_resblocks_3_mlp_c_proj"}
    assert names.resolve_in_webui("lora_te_text_model_encoder_layers_3_mlp_fc2", webui, sd2) == \
        "model_transformer_resblocks_3_mlp_c_proj"
    te1, te2 = sdxl.text_encoders
    assert names.text_encoder_kohya_name("transformer.text_model.encoder.layers.0.self_attn.q_proj", te1) == \
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    webui = {"0_transformer_text_model_encoder_layers_0_self_attn_q_proj", "1_model_transformer_resblocks_0_mlp_c_fc",
             "diffusion_model_output_blocks_2_2_conv"}
    assert names.resolve_in_webui("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", webui, sdxl) == \
        "0_transformer_text_model_encoder_layers_0_self_attn_q_proj"
    kohya = names.text_encoder_kohya_name("model.transformer.resblocks.0.mlp.c_fc", te2)
    assert names.resolve_in_webui(kohya, webui, sdxl) == "1_model_transformer_resblocks_0_mlp_c_fc"
    # SDXL's first up level has attention, so its upsampler is slot 2: LDM-style names land right
    kohya = names.unet_kohya_name("output_blocks.2.2.conv", sdxl)
    assert kohya == "lora_unet_output_blocks_2_2_conv"
    assert names.resolve_in_webui(kohya, webui, sdxl) == "diffusion_model_output_blocks_2_2_conv"


# ---- the backbone's methods -------------------------------------------------------------------------------

def test_backbone_matches_the_headless_backbone(standin, tiny_sd1):
    ours = WebuiBackbone(standin)
    ref = load_backbone(str(tiny_sd1["single_file"]))
    assert ours.identity()["hash"] == fingerprint_file(Path(tiny_sd1["single_file"]))
    assert ours.prediction_type == "epsilon" and ours.family.name == "sd1"
    # the LDM schedule (float64 -> float32) is the diffusers one to float32 rounding
    assert (ours.alphas_cumprod - ref.alphas_cumprod).abs().max() < 1e-6
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    a = ours.encode_image(pixels, torch.Generator().manual_seed(5))
    b = ref.encode_image(pixels, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with torch.no_grad():
        ca, cb = ours.encode_text(["a red circle"]), ref.encode_text(["a red circle"])
        assert torch.equal(ca["crossattn"], cb["crossattn"])
        t = torch.tensor([10])
        assert torch.equal(ours.predict(a, t, ca), ref.predict(b, t, cb))
        images = ours.decode_latents(a)
        assert images.shape == (1, 3, 64, 64) and 0 <= images.min() and images.max() <= 1


def test_device_is_the_webuis_not_where_medvram_parked_the_weights(standin):
    """--medvram parks the UNet/VAE/text encoders on the CPU between uses (hooks move them to the GPU
    when called): the backbone must run on the WebUI's device whatever the weights' place now. A
    CPU-only machine has one real device, so the parked place is played by the meta device."""
    standin.model.to("meta")
    webui_devices = types.SimpleNamespace(device=torch.device("cpu"))
    assert WebuiBackbone(standin, env=WebuiEnv(devices=webui_devices)).device == torch.device("cpu")
    assert WebuiBackbone(standin).device == torch.device("meta")   # no WebUI: the weights' device


def test_long_captions_keep_their_first_chunk(standin):
    backbone = WebuiBackbone(standin)
    standin.get_learned_conditioning = lambda texts: torch.ones(len(texts), 154, 32)
    assert backbone.encode_text(["x"])["crossattn"].shape == (1, 77, 32)


class FakeSdxlBase(torch.nn.Module):
    """The least of an SDXL model the backbone reads: flags, a UNet slot, a schedule."""
    is_sd1, is_sd2, is_sdxl = False, False, True

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.diffusion_model = torch.nn.Linear(2, 2)
        self.alphas_cumprod = torch.linspace(0.99, 0.01, 1000)


def test_sdxl_conditioning_gets_each_samples_size_in_order():
    """SDXL's `vector` encodes the image size: the WebUI's get_learned_conditioning reads it from
    the prompt list's width/height (prompt_parser.SdConditioning), one call per distinct size."""
    calls = []

    class FakeSdxl(FakeSdxlBase):
        def get_learned_conditioning(self, batch):
            calls.append((list(batch), batch.width, batch.height))
            n = len(batch)
            return {"crossattn": torch.zeros(n, 77, 4),
                    "vector": torch.tensor([[float(batch.width), float(batch.height)]] * n)}

    backbone = WebuiBackbone(FakeSdxl(), resolution=64)
    assert backbone.family.name == "sdxl" and backbone.conditioning_uses_sizes
    cond = backbone.encode_text(["a", "b", "c"], [{"target": (64, 128)}, {"target": (96, 96)},
                                                  {"target": (64, 128)}])
    assert cond["vector"].tolist() == [[128, 64], [96, 96], [128, 64]]
    assert calls == [(["a", "c"], 128, 64), (["b"], 96, 96)]
    assert backbone.encode_text(["d"])["vector"].tolist() == [[64, 64]]


def test_sdxl_text_encoders_get_gradients_through_sgms_conditioner():
    """SGM's GeneralConditioner runs embedders with is_trainable=False (all of them in an inference
    config) under torch.no_grad(): text-encoder LoRA on SDXL got no gradient and stayed zero in the
    real WebUI. While training records gradients the text embedders are trainable; the flag is put
    back, and encoding without gradients (latent/text caches) is unchanged."""

    class Embedder(torch.nn.Module):        # the WebUI's hijacked embedder around the SGM one
        def __init__(self):
            super().__init__()
            self.wrapped = torch.nn.Linear(4, 4)
            self.is_trainable = False

        def forward(self, texts):
            return self.wrapped(torch.ones(len(texts), 77, 4))

    class SizeEmbedder(torch.nn.Module):    # ConcatTimestepEmbedderND: no text, stays as it is
        is_trainable = False

        def forward(self, sizes):
            return sizes.float()

    class Conditioner(torch.nn.Module):     # sgm.modules.GeneralConditioner.forward, reduced
        def __init__(self):
            super().__init__()
            self.embedders = torch.nn.ModuleList([Embedder(), Embedder(), SizeEmbedder()])

        def forward(self, batch):
            out = {}
            for e in self.embedders:
                with contextlib.nullcontext() if e.is_trainable else torch.no_grad():
                    emb = e(batch["txt"] if not isinstance(e, SizeEmbedder) else batch["size"])
                out.setdefault("crossattn" if emb.dim() == 3 else "vector", []).append(emb)
            return {k: torch.cat(v, dim=-1) for k, v in out.items()}

    class FakeSdxl(FakeSdxlBase):
        def __init__(self):
            super().__init__()
            self.conditioner = Conditioner()

        def get_learned_conditioning(self, batch):
            size = torch.tensor([[batch.height, batch.width]] * len(batch))
            return self.conditioner({"txt": list(batch), "size": size})

    model = FakeSdxl()
    model.requires_grad_(False)
    backbone = WebuiBackbone(model, resolution=64)
    te1, te2, sizes = model.conditioner.embedders
    te2.wrapped.weight.requires_grad_(True)           # stands for a LoRA adapter's weight
    cond = backbone.encode_text(["a", "b"])
    assert cond["crossattn"].requires_grad
    cond["crossattn"].sum().backward()
    assert te2.wrapped.weight.grad is not None and te2.wrapped.weight.grad.abs().max() > 0
    assert (te1.is_trainable, te2.is_trainable, sizes.is_trainable) == (False, False, False)
    with torch.no_grad():
        assert not backbone.encode_text(["a"])["crossattn"].requires_grad
    assert te2.is_trainable is False


def test_sd2_text_layers_the_model_never_runs_are_not_targets():
    """LDM's FrozenOpenCLIPEmbedder (SD2) runs its resblocks up to `len - layer_idx` ("penultimate":
    all but the last). The last one got LoRA layers that never trained (zero in every real-WebUI
    file) and are not in the headless SD2 file (diffusers' SD2 text encoder lacks that layer)."""

    def resblock():
        block = torch.nn.Module()
        block.mlp = torch.nn.Module()
        block.mlp.c_fc, block.mlp.c_proj = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)
        return block

    class FakeSd2(torch.nn.Module):
        is_sd1, is_sd2, is_sdxl = False, True, False
        parameterization = "v"

        def __init__(self, layer_idx):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.diffusion_model = torch.nn.Linear(2, 2)
            self.cond_stage_model = torch.nn.Module()
            self.cond_stage_model.wrapped = torch.nn.Module()    # the LDM FrozenOpenCLIPEmbedder
            self.cond_stage_model.wrapped.model = torch.nn.Module()
            self.cond_stage_model.wrapped.model.transformer = torch.nn.Module()
            self.cond_stage_model.wrapped.model.transformer.resblocks = torch.nn.ModuleList(
                [resblock() for _ in range(3)])
            self.cond_stage_model.wrapped.layer_idx = layer_idx
            self.alphas_cumprod = torch.linspace(0.99, 0.01, 1000)

    def text_targets(layer_idx):
        return sorted(t.name for t in WebuiBackbone(FakeSd2(layer_idx)).lora_targets() if t.component == "te")

    penultimate = text_targets(1)
    assert penultimate == [f"lora_te_text_model_encoder_layers_{i}_mlp_{fc}"
                           for i in (0, 1) for fc in ("fc1", "fc2")]
    assert len(text_targets(0)) == 6          # "last": every resblock runs


def test_gradient_checkpointing_wraps_blocks_and_keeps_gradients(standin):
    backbone = WebuiBackbone(standin)
    backbone.freeze()
    targets = [t for t in backbone.lora_targets() if t.role == "attn"]
    torch.manual_seed(0)
    net = LoRANetwork(targets, 4)
    with torch.no_grad():
        for a in net.adapters.values():
            a.up.weight.normal_()
    net.attach()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    cond = {"crossattn": torch.randn(1, 77, 32)}

    def grads():
        net.zero_grad()
        backbone.predict(x, t, cond).square().mean().backward()
        return [p.grad.clone() for _, p in net.trainable_parameters(False)]

    plain = grads()
    backbone.set_gradient_checkpointing(True)
    wrapped = [m for m in standin.modules() if "forward" in m.__dict__ and not host.has_adapters(m)]
    blocks = [m for m in standin.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(blocks) == 6 and {id(m) for m in wrapped} == {id(m) for m in blocks}
    checkpointed = grads()
    backbone.release()
    net.detach()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))
    assert_no_leftovers(standin)


# ---- cleaning the Lora extension's merges --------------------------------------------------------------------

def random_lora_file(backbone, path: Path) -> Path:
    from lora_trainer.lora.kohya_file import network_tensors, save_lora_file

    torch.manual_seed(1)
    net = LoRANetwork(backbone.lora_targets(), 4)
    with torch.no_grad():
        for a in net.adapters.values():
            a.up.weight.normal_(std=0.1)
    save_lora_file(path, network_tensors(net, "fp16"), {"ss_output_name": path.stem})
    return path


def test_merged_lora_is_undone_bit_exactly(env, standin, tiny_sd1, tmp_path):
    clean = weights(standin)
    backbone = WebuiBackbone(standin)
    merged = env.networks.merge_file(random_lora_file(backbone, tmp_path / "other.safetensors"), 0.7)
    assert merged == 129
    now = standin.state_dict()
    assert sum(not torch.equal(now[k], clean[k]) for k in clean) == 129
    # the WebUI's restore outside no_grad fails on parameters that require grad (prototype obstacle 1)
    some = standin.network_layer_mapping["diffusion_model_input_blocks_1_1_proj_in"]
    with pytest.raises(RuntimeError, match="leaf Variable"):
        env.networks.network_restore_weights_from_backup(some)

    report = lora_state.clean_base_weights(standin, env.networks)
    assert report.unloaded == ["other"] and report.restored_layers == 129
    assert report.verified_layers == 129 * 2 - sum(m.bias is None for m in backbone._modules.values())
    assert env.networks.loaded_networks == []
    assert all(getattr(m, "network_current_names", ()) == () for m in standin.network_layer_mapping.values())
    assert_same_weights(standin, clean)
    # ... and equal to the checkpoint file itself
    with safe_open(str(tiny_sd1["single_file"]), "pt") as f:
        for path, module in standin.model.diffusion_model.named_modules():
            for p, value in module.named_parameters(recurse=False):
                assert torch.equal(value, f.get_tensor(f"model.diffusion_model.{path}.{p}"))


def test_merge_without_backup_is_refused(env, standin):
    module = standin.network_layer_mapping["diffusion_model_input_blocks_1_1_proj_in"]
    module.network_current_names = (("x", 1.0, 1.0, None),)
    with pytest.raises(lora_state.BaseWeightsError, match="no backup"):
        lora_state.clean_base_weights(standin, env.networks)


def test_forge_networks_module_is_refused(standin):
    forge_like = types.SimpleNamespace(loaded_networks=[])
    with pytest.raises(lora_state.BaseWeightsError, match="Forge"):
        lora_state.clean_base_weights(standin, forge_like)


def test_lora_extension_module_is_found_in_sys_modules(monkeypatch, env):
    assert lora_extension_module() is None or hasattr(lora_extension_module(), "loaded_networks")
    monkeypatch.setitem(sys.modules, "networks", env.networks)
    assert lora_extension_module() is env.networks


def test_model_guard_detects_changed_weights_and_puts_back_forwards(standin):
    with pytest.raises(lora_state.BaseWeightsError, match="weights changed"):
        with lora_state.ModelGuard(standin):
            with torch.no_grad():
                getattr(standin.model.diffusion_model.out, "2").weight.add_(1)
    layer = getattr(standin.model.diffusion_model.out, "2")
    with lora_state.ModelGuard(standin, check_weights=False):
        layer.forward = lambda x: x
    assert "forward" not in layer.__dict__


# ---- whole jobs ------------------------------------------------------------------------------------------------

def run_headless_and_webui(make_config, tmp_path, env, **values):
    values = dict(dict(epochs=1, max_train_steps=3, train_text_encoder=True, target_modules="locon",
                       cache_latents_to_disk=False, resume=False, preview_prompts=[], write_card=False),
                  **values)
    headless = train_from_config(webui_cfg(make_config, tmp_path, "headless", **values))
    webui = job.train_on_loaded_model(webui_cfg(make_config, tmp_path, "webui", **values), env=env)
    return read_lora_file(headless.lora_path)[0], read_lora_file(webui.lora_path)[0], webui


def test_webui_and_headless_runs_do_not_share_text_embeddings(make_config, tmp_path, env):
    """Both hosts give the same model the same identity hash (resume carries over), and the default
    cache folder is per user: the WebUI read the CLI's cached caption embeddings (and the CLI the
    WebUI's: on SDXL a KeyError 'text_embeds', seen in the real WebUI). Text entries are per host;
    latents stay shared."""
    cache = tmp_path / "cache"
    values = dict(epochs=1, max_train_steps=2, train_text_encoder=False, cache_latents_to_disk=True,
                  cache_dir=str(cache), resume=False, preview_prompts=[], write_card=False)
    train_from_config(webui_cfg(make_config, tmp_path, "headless", **values))

    def entries(kind):
        return sorted(p.name for p in (cache / kind).rglob("*.safetensors"))

    headless_text, latents = entries("text"), entries("latents")
    assert headless_text and latents
    job.train_on_loaded_model(webui_cfg(make_config, tmp_path, "webui", **values), env=env)
    assert entries("latents") == latents
    webui_text = sorted(set(entries("text")) - set(headless_text))
    assert len(webui_text) == len(headless_text)


def test_webui_file_equals_the_headless_file(make_config, tmp_path, env, standin):
    # the stand-in's noise schedule computed like diffusers: the two runs must be bit-identical
    standin.alphas_cumprod_original = alphas_cumprod_from_schedule(0.00085, 0.012, 1000)
    a, b, result = run_headless_and_webui(make_config, tmp_path, env)
    assert result.status == "finished" and result.step == 3
    assert set(a) == set(b) and len(a) == 129 * 3
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_webui_file_with_the_ldm_schedule_differs_only_by_rounding(make_config, tmp_path, env, tiny_sd1):
    """The WebUI's schedule is LDM's (float64 then float32): ~1e-8 from diffusers' float32 one. Adam
    turns that into small weight differences (largest on near-zero-gradient layers, where its update
    is a sign); what the LoRA does to the model is the same to 1e-3 of its effect."""
    from lora_trainer.lora.kohya_file import network_from_tensors

    a, b, _ = run_headless_and_webui(make_config, tmp_path, env)
    assert set(a) == set(b)
    diff = {s: max(float((a[k] - b[k]).abs().max()) for k in a if k.endswith(s))
            for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    ref = load_backbone(str(tiny_sd1["single_file"]))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([100, 400, 700, 999])
    with torch.no_grad():
        cond = ref.encode_text(["lt_demo, a red circle"] * 4)
        base = ref.predict(x, t, cond)
        outs = []
        for tensors in (a, b):
            net, unmatched = network_from_tensors(ref.lora_targets(), tensors)
            assert unmatched == []
            net.attach()
            outs.append(ref.predict(x, t, ref.encode_text(["lt_demo, a red circle"] * 4)))
            net.detach()
    effect = float((outs[0] - base).abs().max())
    between = float((outs[0] - outs[1]).abs().max())
    print(f"LDM vs diffusers schedule: weight max |diff| {diff}; probe: LoRA effect {effect:.3g}, "
          f"headless vs WebUI LoRA {between:.3g}")
    assert diff["alpha"] == 0 and 0 < diff["lora_up.weight"] < 1e-3 and diff["lora_down.weight"] < 1e-4
    assert between < 1e-3 * effect


def test_every_key_of_the_webui_file_lands_on_a_webui_layer(make_config, tmp_path, env, standin):
    cfg = webui_cfg(make_config, tmp_path, "keys", max_train_steps=2, train_text_encoder=True,
                    target_modules="locon", preview_prompts=[], write_card=False)
    result = job.train_on_loaded_model(cfg, env=env)
    tensors, meta = read_lora_file(result.lora_path)
    layers = {k.partition(".")[0] for k in tensors}
    for layer in layers:
        hits = [c for c in webui_candidate_names(layer) if c in standin.network_layer_mapping]
        assert hits, layer
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_sd_model_hash"] == fingerprint_file(Path(standin.sd_checkpoint_info.filename))
    # and the stand-in Lora extension merges every layer of it
    assert env.networks.merge_file(result.lora_path, 1.0) == len(layers)


def test_model_is_bitwise_as_before_after_a_run(make_config, tmp_path, env, standin):
    clean = weights(standin)
    flags = {n: p.requires_grad for n, p in standin.named_parameters()}
    backbone = WebuiBackbone(standin)
    env.networks.merge_file(random_lora_file(backbone, tmp_path / "prev.safetensors"), 1.0)
    cfg = webui_cfg(make_config, tmp_path, "clean", max_train_steps=2, gradient_checkpointing=True,
                    preview_prompts=[], write_card=False)
    result = job.train_on_loaded_model(cfg, env=env)
    assert result.status == "finished"
    assert_same_weights(standin, clean)          # trained on clean weights, handed back clean
    assert_no_leftovers(standin)
    assert {n: p.requires_grad for n, p in standin.named_parameters()} == flags
    assert env.networks.loaded_networks == []
    # the WebUI sees the new file and forgets cached conditionings
    cls = env.processing.StableDiffusionProcessing
    assert cls.cached_c == [None, None] and cls.cached_uc == [None, None]
    assert "list_available_networks" in env.networks.calls
    assert not job.is_training()


def test_half_precision_weights_train_in_place_and_come_back_bit_identical(make_config, tmp_path, standin):
    """A WebUI without --no-half holds the model in 16-bit: the job trains on those weights in
    place (no fp32 copy) with mixed precision switched on to match, the LoRA itself in fp32, and
    the 16-bit weights come back bit for bit. bf16 stands in for the GPU's fp16: CPU autocast has
    only bf16."""
    standin.to(torch.bfloat16)
    env = standin_env(standin, tmp_path / "models" / "Lora")
    clean = weights(standin)
    cfg = webui_cfg(make_config, tmp_path, "half", max_train_steps=3, learning_rate=5e-2,
                    train_text_encoder=True, preview_prompts=[], write_card=False)
    assert cfg.mixed_precision == "no"
    result = job.train_on_loaded_model(cfg, env=env)
    assert result.status == "finished"
    assert_same_weights(standin, clean)
    assert all(p.dtype == torch.bfloat16 for p in standin.parameters())
    tensors, metadata = read_lora_file(result.lora_path)
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.isfinite(u).all() for u in ups)
    assert sum(bool(u.any()) for u in ups) == len(ups)            # every layer trained
    assert "mixed_precision: bf16" in (Path(cfg.run_dir) / "config.yaml").read_text()


def test_a_failing_run_still_hands_the_model_back(make_config, tmp_path, env, standin):
    clean = weights(standin)

    class Boom(TrainingObserver):
        def on_step(self, report):
            if report.step == 2:
                raise RuntimeError("boom")

    cfg = webui_cfg(make_config, tmp_path, "boom", max_train_steps=4, preview_prompts=[], write_card=False)
    with pytest.raises(RuntimeError, match="boom"):
        job.train_on_loaded_model(cfg, env=env, observers=[Boom()])
    assert_same_weights(standin, clean)
    assert_no_leftovers(standin)
    assert all(p.requires_grad for p in standin.parameters())
    assert not job.is_training()


def test_headless_previews_and_card_work_on_the_webui_model(make_config, tmp_path, env, standin):
    """The project's own previewer (not the WebUI's process_images) renders through the WebUI
    backbone; the model is still handed back bit for bit."""
    clean = weights(standin)
    cfg = webui_cfg(make_config, tmp_path, "previews", max_train_steps=2, preview_every_n_steps=1,
                    preview_steps=2, preview_prompts=["lt_demo, a red circle <lora:test_lora:0.7>"],
                    write_card=True)
    result = job.train_on_loaded_model(cfg, env=env)
    assert result.status == "finished"
    assert (Path(cfg.run_dir) / "previews" / "000002" / "0.png").exists()
    assert (Path(cfg.output_dir) / "test_lora.preview.png").exists()
    assert_same_weights(standin, clean)
    assert_no_leftovers(standin)


# ---- progress and interrupt ---------------------------------------------------------------------------------

def test_progress_observer_fields_and_interrupt():
    from lora_trainer.training.control import StepReport

    state, control, now = StateStandIn(), TrainingControl(), [0.0]
    progress = WebuiProgress(control, state, clock=lambda: now[0])
    progress.on_start({"total_steps": 10, "start_step": 2, "resumed": True, "lora_layers": 5})
    assert (state.job_count, state.job_no, state.job) == (10, 2, "train-lora")
    now[0] = 4.0
    progress.on_step(StepReport(step=4, total_steps=10, epoch=0, loss=0.25, lr=1e-4, grad_norm=None,
                                seconds=2.0, samples=2))
    assert state.job_no == 4
    assert state.textinfo == "Step 4/10 · loss 0.2500 · 0.50 it/s · ETA 0:00:12"
    assert not control.stop.is_set()
    state.interrupt()
    progress.on_message("hello")
    assert control.stop.is_set() and control.stop_reason == "interrupted from the WebUI"
    assert "Stopping" in state.textinfo


def test_webui_interrupt_is_a_clean_stop_with_checkpoint(make_config, tmp_path, env):
    class ClickInterrupt(TrainingObserver):
        def on_step(self, report):
            if report.step == 2:
                env.state.interrupt()

    cfg = webui_cfg(make_config, tmp_path, "interrupt", max_train_steps=6, preview_prompts=[],
                    write_card=False)
    result = job.train_on_loaded_model(cfg, env=env, observers=[ClickInterrupt()])
    assert result.status == "stopped" and result.step < 6
    assert result.last_checkpoint is not None and result.last_checkpoint.exists()
    assert result.lora_path.exists()
    assert env.state.job_count == 6 and env.state.job_no == result.step
    # the same job again resumes from the checkpoint and finishes
    env.state.interrupted = False
    again = job.train_on_loaded_model(cfg, env=env)
    assert again.status == "finished" and again.step == 6


# ---- checks, paths, config ------------------------------------------------------------------------------------

def test_refusals(env, standin, tmp_path):
    env.cmd_opts.lowvram = True
    with pytest.raises(job.CannotTrain, match="--lowvram"):
        job.check_can_train(env)
    env.cmd_opts.lowvram = False
    standin.model.diffusion_model.in_channels = 9
    with pytest.raises(job.CannotTrain, match="inpainting"):
        job.check_can_train(env)
    standin.model.diffusion_model.in_channels = 4
    with pytest.raises(job.CannotTrain, match="neither AUTOMATIC1111's"):
        job.check_can_train(WebuiEnv(sd_model=types.SimpleNamespace(model=None)))
    with pytest.raises(job.CannotTrain, match="No Stable Diffusion model"):
        job.check_can_train(WebuiEnv())
    with pytest.raises(ValueError, match="inside the WebUI's LoRA folder"):
        paths.check_run_dir(Path(env.cmd_opts.lora_dir) / "runs" / "x", env)


def test_config_from_the_tab_uses_webui_folders(env, shapes_dataset):
    env.opts.lora_trainer_preview_steps = 12
    cfg = job.build_webui_config({"train_data_dir": str(shapes_dataset), "output_name": "mine"}, env)
    assert cfg.output_dir == env.cmd_opts.lora_dir
    assert cfg.lora_dir == env.cmd_opts.lora_dir
    assert Path(cfg.run_dir) == paths.runs_dir() / "mine"
    assert not paths.is_inside(cfg.run_dir, env.cmd_opts.lora_dir)
    assert cfg.base_model == env.sd_model.sd_checkpoint_info.filename
    assert cfg.preview_steps == 12
    env.opts.lora_trainer_output_dir = "/somewhere/else"
    assert job.build_webui_config({"train_data_dir": str(shapes_dataset)}, env).output_dir == "/somewhere/else"
    assert config_to_dict(cfg)["train_data_dir"] == str(shapes_dataset)


def test_invalidate_caches_resets_merge_cache(env, standin, tmp_path):
    clean = weights(standin)
    backbone = WebuiBackbone(standin)
    env.networks.merge_file(random_lora_file(backbone, tmp_path / "x.safetensors"), 1.0)
    done = lora_state.invalidate_webui_lora_caches(env, names=["x"])
    assert "reset the per-layer LoRA cache" in done and "cleared the conditioning cache" in done
    assert_same_weights(standin, clean)
    page = types.SimpleNamespace(name="lora", refreshed=0)
    page.refresh = lambda: setattr(page, "refreshed", page.refreshed + 1)
    env.extra_pages = [page]
    assert "refreshed the Lora cards" in lora_state.invalidate_webui_lora_caches(env)
    assert page.refreshed == 1


# ---- the extension's entry point (scripts/lora_trainer_tab.py) ---------------------------------------------

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "lora_trainer_tab.py"


class FakeGradio(types.ModuleType):
    """Just what the entry point touches: Blocks (a context manager), Markdown and setting widgets."""

    def __init__(self):
        super().__init__("gradio")
        self.markdown = []

        class Blocks:
            def __init__(self, **kwargs):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        self.Blocks = Blocks
        self.Markdown = lambda text: self.markdown.append(text)
        self.Textbox, self.Number, self.Dropdown = "Textbox", "Number", "Dropdown"


@pytest.fixture
def fake_webui(monkeypatch, tmp_path):
    """A `modules` package with the two things the entry point uses: script_callbacks and shared."""
    registered = {}
    callbacks = types.ModuleType("modules.script_callbacks")
    callbacks.on_ui_tabs = lambda fn: registered.setdefault("ui_tabs", fn)
    callbacks.on_ui_settings = lambda fn: registered.setdefault("ui_settings", fn)
    shared = types.ModuleType("modules.shared")
    shared.OptionInfo = lambda default, label, component, args, section: types.SimpleNamespace(
        default=default, label=label, component=component, args=args, section=section)
    shared.opts = types.SimpleNamespace(added={})
    shared.opts.add_option = lambda key, info: shared.opts.added.setdefault(key, info)
    modules = types.ModuleType("modules")
    modules.script_callbacks, modules.shared = callbacks, shared
    for name, mod in {"modules": modules, "modules.script_callbacks": callbacks,
                      "modules.shared": shared, "gradio": FakeGradio()}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    env = WebuiEnv(cmd_opts=types.SimpleNamespace(lora_dir=str(tmp_path / "Lora")), opts=types.SimpleNamespace())
    monkeypatch.setattr(WebuiEnv, "current", classmethod(lambda cls, with_model=True: env))
    import importlib.util
    spec = importlib.util.spec_from_file_location("lora_trainer_tab_under_test", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script, registered, shared


def test_entry_point_registers_only_the_tab_and_its_settings(fake_webui, monkeypatch):
    script, registered, shared = fake_webui
    assert set(registered) == {"ui_tabs", "ui_settings"}
    registered["ui_settings"]()
    added = shared.opts.added
    assert set(added) == {s.key for s in paths.SETTINGS}
    assert added["lora_trainer_output_dir"].default == "" and "Lora" in added["lora_trainer_output_dir"].label
    assert added["lora_trainer_preview_steps"].default == 20
    assert added["lora_trainer_preview_sampler"].component == "Dropdown"
    assert {info.section for info in added.values()} == {paths.SETTINGS_SECTION}

    # the tab module is missing: a placeholder tab that says so, the WebUI still starts
    monkeypatch.setitem(sys.modules, "lora_trainer.ui.tab", None)
    (blocks, title, elem_id), = registered["ui_tabs"]()
    assert (title, elem_id) == ("Train LoRA", "lora_trainer")
    assert "build_tab is missing" in sys.modules["gradio"].markdown[-1]

    # a tab module: called with mode="webui" and the WebUI's defaults
    calls = []
    tab = types.ModuleType("lora_trainer.ui.tab")
    tab.build_tab = lambda mode, defaults: calls.append((mode, defaults)) or "BLOCKS"
    monkeypatch.setitem(sys.modules, "lora_trainer.ui.tab", tab)
    (blocks, title, _), = registered["ui_tabs"]()
    assert blocks == "BLOCKS" and calls[0][0] == "webui"
    assert calls[0][1]["output_dir"].endswith("Lora") and calls[0][1]["preview_steps"] == 20


def test_package_imports_from_an_extension_folder_of_any_name(tmp_path):
    import shutil
    import subprocess

    repo = SCRIPT.parent.parent
    ext = tmp_path / "extensions" / "my renamed-extension"
    shutil.copytree(repo / "lora_trainer", ext / "lora_trainer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "scripts", ext / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    # the WebUI loads scripts with the extension folder at the front of sys.path, cwd = its own folder
    code = ("import sys, importlib.util; sys.path.insert(0, sys.argv[1]);"
            "spec = importlib.util.spec_from_file_location('s', sys.argv[2]);"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); sys.path.pop(0);"
            "import lora_trainer.webui.job as j; print(j.__file__)")
    out = subprocess.run([sys.executable, "-c", code, str(ext), str(ext / "scripts" / "lora_trainer_tab.py")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().is_relative_to(ext.resolve())
