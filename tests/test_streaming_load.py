"""The single-file loader streams tensors into their training dtype: same tensors as a whole-file
load + conversion, every tensor in the asked dtype and device, and a load peak of at most 1.2 x the
loaded weights (measured with the process's RSS high-water mark on a model of a few hundred MB)."""
from __future__ import annotations

import gc
import sys

import pytest
import torch

from lora_trainer.backbones import loading, tiny_files
from lora_trainer.backbones.ldm_keys import layout_for, ldm_to_components
from lora_trainer.backbones.streaming import plan_from_meta, read_index
from lora_trainer.backbones.tiny import build_models_from_configs
from lora_trainer.backbones.tiny_configs import load_config_dicts, tiny_sd1_configs
from lora_trainer.monitor import system
from lora_trainer.backbones.memory import release_free_memory

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")




def _whole_file_reference(path):
    """The loader before streaming: the whole file in memory, converted, cast to float32."""
    from safetensors.torch import load_file

    configs = load_config_dicts(path.with_suffix(".config"))
    split = ldm_to_components(load_file(str(path)), configs, layout_for("sdxl"))
    return {name: {k: v.float() for k, v in sd.items()} for name, sd in split.state_dicts.items()}


def test_streamed_sdxl_equals_the_whole_file_load(sdxl_file):
    reference = _whole_file_reference(sdxl_file)
    parts = loading.load_single_file(sdxl_file)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        loaded = {k: v for k, v in parts[name].state_dict().items() if not k.endswith("position_ids")}
        assert loaded.keys() == reference[name].keys(), name
        for key, tensor in loaded.items():
            assert tensor.dtype == torch.float32, (name, key)
            assert torch.equal(tensor, reference[name][key]), (name, key)
    # q/k/v chunks of OpenCLIP's fused in_proj own their storage (safetensors refuses shared memory)
    storages = [p.untyped_storage().data_ptr() for p in parts["text_encoder_2"].parameters()]
    assert len(storages) == len(set(storages))


def test_half_base_loads_unet_and_text_encoders_in_that_dtype_vae_in_fp32(sdxl_file):
    parts = loading.load_single_file(sdxl_file, dtype=torch.bfloat16)
    for name in MODELS:
        expected = torch.float32 if name == "vae" else torch.bfloat16
        for key, tensor in [*parts[name].named_parameters(), *parts[name].named_buffers()]:
            assert tensor.device.type == "cpu" and not tensor.is_meta, (name, key)
            if tensor.is_floating_point():
                assert tensor.dtype == expected, (name, key, tensor.dtype)


def test_a_conversion_that_computes_a_tensor_cannot_be_streamed():
    meta = {"a": torch.empty(4, 4, device="meta")}
    assert plan_from_meta(meta, {"unet": {"x": meta["a"].t()}})["a"][0].stride == (1, 4)
    with pytest.raises(ValueError, match="unet.y"):
        plan_from_meta(meta, {"unet": {"y": meta["a"] * 2}})


# ---- the memory probe ----------------------------------------------------------------------------

def _wide_sd1_file(folder):
    """An SD1-layout fp16 file of ~150 MB (UNet 320/640 channels): big enough for RSS to see a copy."""
    configs = tiny_sd1_configs()
    configs["unet"].update(block_out_channels=[320, 640], cross_attention_dim=64, attention_head_dim=8)
    configs["text_encoder"].update(hidden_size=64, projection_dim=64)
    models = build_models_from_configs(configs, rerandomise_zeros=False)
    components = {name: model.half() for name, model in models.items()}
    components.update(configs=configs, family="sd1")
    path = tiny_files.write_single_file(folder / "wide.safetensors", components)
    tiny_files.write_config_folder(folder / "wide.config", configs)
    del models, components
    gc.collect()
    return path


def _weight_bytes(parts) -> int:
    return sum(t.numel() * t.element_size() for name in MODELS if name in parts
               for t in parts[name].state_dict().values())


@pytest.fixture(scope="module")
def wide_file(tmp_path_factory):
    return _wide_sd1_file(tmp_path_factory.mktemp("wide"))


def _load_peak(load) -> tuple[int, object]:
    """(RSS high-water mark above the start, result) of ``load()``; freed heap is returned to the OS
    first so earlier tests' garbage cannot hide an allocation."""
    release_free_memory()
    start = system.cpu_memory()["rss"]
    assert system.reset_peak_memory("cpu")
    result = load()
    return system.cpu_memory()["rss_peak"] - start, result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resets the RSS peak through /proc (Linux)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_load_peak_is_at_most_1_2_times_the_loaded_weights(wide_file, dtype):
    loading.load_single_file(wide_file, dtype=dtype)   # warm-up: imports and lazy allocations
    peak, parts = _load_peak(lambda: loading.load_single_file(wide_file, dtype=dtype))
    weights = _weight_bytes(parts)
    assert weights > 100 * system.MIB   # the probe only means something on a model of this size
    assert peak <= 1.2 * weights, f"load peak +{peak / system.MIB:.0f} MiB for {weights / system.MIB:.0f} MiB"
    del parts
    if dtype == torch.float32:   # the probe sees a second copy: the whole file read, then cast (the old way)
        from safetensors.torch import load_file

        peak, _ = _load_peak(lambda: {k: v.float() for k, v in load_file(str(wide_file)).items()})
        assert peak > 1.3 * weights

