"""Each adapter type trained end to end on the tiny SD1: the file's metadata says what its tensors
are (conv settings included, issue #15), the WebUI stand-in's merge of the file equals the adapters'
effect in training, stop-and-resume gives the byte-identical file, and init_lora_from continues it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lora_trainer.config import load_config
from lora_trainer.lora.kohya_file import file_layers, network_from_tensors, read_lora_file
from lora_trainer.training.control import TrainingControl
from lora_trainer.app.session import train_from_config
from lora_trainer.webui import job
from lora_trainer.webui.backbone import WebuiBackbone

sys.path.insert(0, str(Path(__file__).parent))
from test_resume import StopAt  # noqa: E402
from webui_standin import StandInSD1, standin_env  # noqa: E402

RUN = dict(max_train_steps=3, save_steps=1, learning_rate=2e-2, keep_last_n_checkpoints=5,
           preview_prompts=[], write_card=False)
TYPES = {
    "locon-dora": dict(adapter_type="locon", dora=True, conv_rank=2),
    "loha": dict(adapter_type="loha", target_modules="locon", lora_rank=2, lora_alpha=1.0),
    "lokr": dict(adapter_type="lokr", target_modules="locon", lora_rank=2, lokr_factor=4),
}
MODULE = {"locon-dora": ("lycoris.kohya", "lora"), "loha": ("lycoris.kohya", "loha"),
          "lokr": ("lycoris.kohya", "lokr")}


def train(cfg_path, stop_at=None, **overrides):
    control = TrainingControl()
    observers = [StopAt(control, stop_at)] if stop_at else []
    return train_from_config(load_config(cfg_path, overrides), control, observers)


def assert_standin_merge_equals_training_effect(tiny_sd1, tmp_path, path: Path):
    """The stand-in Lora extension (tests/kohya_reference.py: the WebUI's rules) merges the file;
    our adapters built from the same file run through the hosts as in training: same prediction."""
    standin = StandInSD1(tiny_sd1["single_file"])
    env = standin_env(standin, tmp_path / "Lora")
    backbone = WebuiBackbone(standin)
    tensors, _ = read_lora_file(path)
    network, unmatched = network_from_tensors(backbone.lora_targets(), tensors)
    assert unmatched == []
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([200, 800])
    cond = {"crossattn": torch.randn(2, 77, 32, generator=g)}
    with torch.no_grad():
        base = backbone.predict(x, t, cond)
        network.attach()
        ours = backbone.predict(x, t, cond)
        network.detach()
        assert env.networks.merge_file(path, 1.0) == len(file_layers(tensors))
        theirs = backbone.predict(x, t, cond)
    effect = float((ours - base).abs().max())
    assert effect > 1e-4
    assert float((ours - theirs).abs().max()) <= 1e-4 * effect + 1e-6


def test_conv_settings_metadata_equals_the_tensors_and_the_webui_merge(make_config, tmp_path, tiny_sd1):
    """conv_rank set, conv_alpha empty: the conv layers get alpha = conv_rank (kohya's rule) and the
    metadata says so (it used to say lora_alpha)."""
    cfg = make_config(target_modules="locon", lora_rank=4, lora_alpha=2.0, conv_rank=2, **RUN)
    result = train(cfg)
    tensors, meta = read_lora_file(result.lora_path)
    args = json.loads(meta["ss_network_args"])
    layers = file_layers(tensors)
    convs = {n: k for n, k in layers.items() if k["lora_down.weight"].shape[2:] == (3, 3)}
    others = {n: k for n, k in layers.items() if n not in convs}
    assert convs and others
    assert meta["ss_network_module"] == "networks.lora"
    assert args == {"conv_dim": "2", "conv_alpha": "2"}
    assert all(k["lora_down.weight"].shape[0] == 2 and float(k["alpha"]) == 2.0 for k in convs.values())
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0
    assert all(k["lora_down.weight"].shape[0] == 4 and float(k["alpha"]) == 2.0 for k in others.values())
    assert_standin_merge_equals_training_effect(tiny_sd1, tmp_path, result.lora_path)


@pytest.mark.parametrize("kind", list(TYPES))
def test_each_type_resumes_byte_identically_and_continues_with_init_lora_from(make_config, tmp_path,
                                                                              tiny_sd1, kind):
    whole = train(make_config("whole", **TYPES[kind], **RUN))
    cfg = make_config("stopped", **TYPES[kind], **RUN)
    assert train(cfg, stop_at=2).status == "stopped"
    resumed = train(cfg)
    a, meta = read_lora_file(whole.lora_path)
    b, _ = read_lora_file(resumed.lora_path)
    assert resumed.status == "finished" and a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # the metadata names the type as LyCORIS writes it, read from the adapters as built
    module, algo = MODULE[kind]
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == module and args["algo"] == algo
    assert args.get("dora_wd") == ("True" if TYPES[kind].get("dora") else None)
    assert "conv_dim" in args and float(args["conv_alpha"]) > 0
    assert_standin_merge_equals_training_effect(tiny_sd1, tmp_path / kind, whole.lora_path)
    # init_lora_from: the same type continues (lr 0: the file comes back unchanged) ...
    again = train(make_config("again", **TYPES[kind], **dict(RUN, max_train_steps=1, learning_rate=0.0,
                                                            init_lora_from=str(whole.lora_path))))
    c, _ = read_lora_file(again.lora_path)
    assert [k for k in a if not torch.equal(a[k], c[k])] == []
    # ... another type is refused naming both
    with pytest.raises(Exception, match=f"is a {algo}.* file, but this run trains lora"):
        train(make_config("other", adapter_type="lora", target_modules="locon", conv_rank=2,
                          **dict(RUN, init_lora_from=str(whole.lora_path))))


def test_the_webui_backbone_trains_a_loha_and_the_standin_renders_it(make_config, tmp_path, tiny_sd1):
    standin = StandInSD1(tiny_sd1["single_file"])
    env = standin_env(standin, tmp_path / "models" / "Lora")
    cfg = load_config(make_config("webui", adapter_type="loha", dora=True, lora_rank=2,
                                  output_dir=str(tmp_path / "models" / "Lora"), **RUN))
    result = job.train_on_loaded_model(cfg, env=env)
    assert result.status == "finished"
    tensors, meta = read_lora_file(result.lora_path)
    assert any(k.endswith(".hada_w1_a") for k in tensors) and any(k.endswith(".dora_scale") for k in tensors)
    assert_standin_merge_equals_training_effect(tiny_sd1, tmp_path, result.lora_path)


def test_headless_previews_stack_files_of_every_type(make_config, tmp_path, tiny_sd1):
    """`<lora:a:w>` of a LoKr + DoRA and a LoHa file in a preview prompt renders what the WebUI's
    rules merged into the weights render (the DoRA file first: the WebUI takes a DoRA norm over the
    weight as the LoRAs before it left it, our previews over the base weight)."""
    from types import SimpleNamespace

    from lora_trainer.backbones.diffusers_sd import load_backbone
    from lora_trainer.lora.adapters import AdapterSpec
    from lora_trainer.lora.kohya_file import network_tensors, save_lora_file
    from lora_trainer.lora.network import LoRANetwork
    from lora_trainer.preview.engine import Previewer, preserved_training_state

    from kohya_reference import layer_delta

    backbone = load_backbone(str(tiny_sd1["single_file"]))
    targets = [t for t in backbone.lora_targets()
               if t.name.endswith(("attn2_to_k", "attn2_to_v", "self_attn_q_proj", "resnets_0_conv1"))]
    g = torch.Generator().manual_seed(3)
    for name, spec in (("lokr", AdapterSpec("lokr", 2, 1.0, dora=True)), ("loha", AdapterSpec("loha", 2, 1.0))):
        network = LoRANetwork(targets, spec=spec)
        with torch.no_grad():
            for p in network.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        save_lora_file(tmp_path / "loras" / f"{name}.safetensors", network_tensors(network), {})
    cfg = load_config(make_config(output_name="trained", lora_dir=str(tmp_path / "loras"), preview_steps=3))
    trained = LoRANetwork(targets[:2], 2).attach()
    trainer = SimpleNamespace(cfg=cfg, backbone=backbone, network=trained, run_dir=tmp_path / "run",
                              lora_path=tmp_path / "out" / "trained.safetensors", say=lambda _: None)

    def render(line):
        previewer = Previewer(cfg, prompts=[line])
        with preserved_training_state(trained, backbone.device):
            return previewer.render_tensor(trainer, previewer.prompts[0])[0]

    stacked = render("a red circle <lora:lokr:0.8> <lora:loha:0.6>")
    trained.detach()
    backups = {t.name: t.module.weight.detach().clone() for t in targets}
    with torch.no_grad():
        for name, weight in (("lokr", 0.8), ("loha", 0.6)):
            layers = file_layers(read_lora_file(tmp_path / "loras" / f"{name}.safetensors")[0])
            for t in targets:
                t.module.weight += layer_delta(layers[t.name], t.module.weight, weight).float()
    trained.attach()
    merged = render("a red circle")
    with torch.no_grad():
        for t in targets:
            t.module.weight.copy_(backups[t.name])
    plain = render("a red circle")
    assert (stacked - plain).abs().max() > 1e-3
    assert (stacked - merged).abs().max() <= 1e-4
