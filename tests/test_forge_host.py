"""The Forge host (lora_trainer.webui.forge*) against a Forge stand-in (tests/forge_standin.py).

The real Forge: tests/forge (docs/forge.md). Here: a job on Forge's model objects trains,
takes the LoRA patches of an earlier generation off first, hands the model back bit-identical with
inference-tensor weights as Forge made them, and refuses what cannot be trained.
"""
from __future__ import annotations

import functools
import types

import pytest
import torch

from lora_trainer.config import load_config
from lora_trainer.lora.kohya_file import read_lora_file
from lora_trainer.webui import forge, job
from lora_trainer.webui.lora_state import invalidate_webui_lora_caches
from tests.forge_standin import ForgeStandIn, MemoryManagementStandIn
from tests.webui_standin import standin_env


@pytest.fixture
def forge_model(tiny_sd1):
    return ForgeStandIn(tiny_sd1["single_file"])


@pytest.fixture
def env(forge_model, tmp_path):
    networks = types.SimpleNamespace(load_lora_state_dict=functools.lru_cache(maxsize=5)(lambda f: f))
    env = standin_env(forge_model, tmp_path / "models" / "Lora", networks=networks)
    env.is_forge, env.memory_management = True, MemoryManagementStandIn()
    return env


def unet_weights(model) -> dict[str, torch.Tensor]:
    unet = model.forge_objects_original.unet.model
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def cfg(make_config, tmp_path, **values):
    values.setdefault("output_dir", str(tmp_path / "lora"))
    values.setdefault("run_dir", str(tmp_path / "run"))
    values.update(max_train_steps=2, preview_prompts=[], write_card=False, cache_latents_to_disk=False)
    return load_config(make_config("forge", **values))


def test_job_on_forge_trains_after_removing_lora_patches_and_gives_the_model_back(make_config, tmp_path, env,
                                                                                  forge_model):
    clean = unet_weights(forge_model)
    key = "diffusion_model.input_blocks.1.1.proj_in.weight"
    forge_model.apply_lora({key: torch.ones_like(clean[key])})
    env.memory_management.load_models_gpu([forge_model.forge_objects.unet])   # a <lora:…> generation
    assert not torch.equal(unet_weights(forge_model)[key], clean[key])

    result = job.train_on_loaded_model(cfg(make_config, tmp_path, train_text_encoder=True), env=env)

    assert result.status == "finished" and result.step == 2
    tensors, _ = read_lora_file(result.lora_path)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q") for k in tensors)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in tensors)
    assert any(float(v.abs().sum()) > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))
    after = unet_weights(forge_model)
    assert all(torch.equal(after[k], clean[k]) for k in clean)        # the LoRA's patch is off, bit for bit
    assert forge_model.current_lora_hash == str([])                   # the next <lora:…> applies afresh
    # ...and a generation without one does not reuse the patched clones of the earlier <lora:…>
    assert forge_model.forge_objects_after_applying_lora.unet is forge_model.forge_objects_original.unet
    assert forge_model.forge_objects.unet is forge_model.forge_objects_original.unet
    unet = forge_model.forge_objects_original.unet
    assert not unet.lora_loader.backup
    assert all(p.is_inference() for p in unet.model.parameters())     # as Forge made them
    assert not any("forward" in m.__dict__ for m in unet.model.diffusion_model.modules()
                   if type(m).__name__ == "LayerNorm")


def test_gradient_checkpointing_on_blocks_that_add_into_their_input(make_config, tmp_path, env, forge_model):
    """What the job switches on for 16-bit storage computed in fp32 (Forge on the CPU): the checkpoint
    keeps each block's input for the recomputation, and Forge's blocks add into that input in place."""
    unet = forge_model.forge_objects_original.unet.model
    clean, forwards = unet_weights(forge_model), [m for m in unet.modules() if "forward" in m.__dict__]
    result = job.train_on_loaded_model(cfg(make_config, tmp_path, gradient_checkpointing=True), env=env)
    assert result.status == "finished" and result.step == 2
    after = unet_weights(forge_model)
    assert all(torch.equal(after[k], clean[k]) for k in clean)
    assert [m for m in unet.modules() if "forward" in m.__dict__] == forwards   # the checkpointing is off again


def test_forge_linear_layers_are_lora_targets(forge_model):
    from lora_trainer.webui.forge_backbone import ForgeBackbone

    backbone = ForgeBackbone(forge_model, memory_management=MemoryManagementStandIn())
    kinds = {type(t.module).__name__ for t in backbone.lora_targets()}
    assert "ForgeLinear" in kinds
    assert backbone.identity()["host"] == "forge"


def test_weights_autograd_can_use_only_during_the_job(forge_model):
    unet = forge_model.forge_objects_original.unet.model.diffusion_model
    layer = next(m for m in unet.modules() if type(m).__name__ == "ForgeLinear")
    x = torch.randn(2, layer.in_features, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        layer(x).sum().backward()
    with forge.AutogradWeights(unet):
        layer(x).sum().backward()
        assert x.grad is not None
    assert layer.weight.is_inference()


def test_refusals(forge_model):
    forge.check_can_train_forge(forge_model)
    forge_model.forge_objects_original.unet.model.storage_dtype = torch.float8_e4m3fn
    with pytest.raises(forge.CannotTrainOnForge, match="Diffusion in Low Bits"):
        forge.check_can_train_forge(forge_model)
    forge_model.forge_objects_original.unet.model.storage_dtype = torch.float16
    forge_model.is_sd1, forge_model.is_sd2 = False, True
    with pytest.raises(forge.CannotTrainOnForge, match="SD1 and SDXL checkpoints so far; the loaded model is SD2"):
        forge.check_can_train_forge(forge_model)
    with pytest.raises(forge.CannotTrainOnForge, match="SD1 and SDXL"):
        forge.model_view(forge_model)
    with pytest.raises(job.CannotTrain, match="No Stable Diffusion model is loaded"):
        job.check_can_train(types.SimpleNamespace(sd_model=None, is_forge=True))


def test_a_written_lora_is_reread_by_forge(env, forge_model):
    env.networks.load_lora_state_dict("a.safetensors")
    forge_model.current_lora_hash = "['a.safetensors', 0.7]"
    done = invalidate_webui_lora_caches(env, names=["a"])
    assert env.networks.load_lora_state_dict.cache_info().currsize == 0
    assert forge_model.current_lora_hash == str([])
    assert "cleared the conditioning cache" in done


@pytest.mark.parametrize("storage,computation,mixed_precision", [
    (torch.bfloat16, torch.float32, "no"),     # Forge on the CPU: 16-bit storage, each weight cast to fp32
    (torch.float16, torch.float16, "fp16"),    # Forge on a GPU: the LoRA trains in Forge's computation dtype
    (torch.bfloat16, torch.float16, "fp16"),
    (torch.float32, torch.float32, "no"),
])
def test_mixed_precision_follows_the_dtype_forge_computes_in(make_config, tmp_path, env, forge_model, storage,
                                                             computation, mixed_precision):
    from lora_trainer.webui.forge_backbone import ForgeBackbone

    unet = forge_model.forge_objects_original.unet.model
    unet.storage_dtype, unet.computation_dtype = storage, computation
    with torch.inference_mode():   # the weights in their storage dtype, as Forge loads them
        unet.to(storage)
    backbone = ForgeBackbone(forge_model, memory_management=env.memory_management)
    prepared = job.prepare_config(cfg(make_config, tmp_path), env, backbone)
    assert backbone.compute_dtype == computation
    assert prepared.mixed_precision == mixed_precision
    # Forge's fp32 casts of 16-bit weights are not kept for backward: the blocks recompute them
    assert prepared.gradient_checkpointing == (storage != computation and mixed_precision == "no")


def test_sdxl_text_encoders_are_named_the_transformers_way():
    """Forge holds SDXL's second text encoder as transformers CLIP (converted from OpenCLIP when it
    loads): the layout names it so, under the same kohya prefix lora_te2_."""
    from lora_trainer.diffusion.families import OPENAI_CLIP

    layout = forge.forge_layout("sdxl")
    assert [(e.kohya_prefix, e.clip_kind) for e in layout.text_encoders] == [("lora_te1", OPENAI_CLIP),
                                                                             ("lora_te2", OPENAI_CLIP)]
    from lora_trainer.webui.names import text_encoder_kohya_name
    te2 = layout.text_encoders[1]
    assert text_encoder_kohya_name("transformer.text_model.encoder.layers.3.self_attn.q_proj", te2) == \
        "lora_te2_text_model_encoder_layers_3_self_attn_q_proj"
