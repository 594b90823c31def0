"""Previews: the WebUI's prompt syntax and LoRA name resolution, the sampler and LoRA stacking
(checked against weights merged by hand), cards, and that previews never change what is trained."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.config import load_config
from lora_trainer.lora import host
from lora_trainer.lora.kohya_file import (network_from_tensors, network_tensors, read_lora_file,
                                          save_lora_file)
from lora_trainer.lora.network import LoRANetwork
from lora_trainer.lora.targets import select_targets
from lora_trainer.preview.cards import RECORD_KEY, card_json_path, update_card, write_card
from lora_trainer.preview.engine import Previewer, preserved_training_state
from lora_trainer.preview.lora_library import LoraLibrary, LoraNotFoundError
from lora_trainer.preview.networks import truncate_rank
from lora_trainer.preview.prompt_syntax import PromptSyntaxError, parse_prompt_line, parse_prompt_lines


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two torch threads on two shared cores spin against each other (100x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- prompt syntax --------------------------------------------------------------------------------

def only_tag(line):
    prompt = parse_prompt_line(line)
    assert len(prompt.loras) == 1
    tag = prompt.loras[0]
    return tag.name, tag.te, tag.unet, tag.dyn


@pytest.mark.parametrize("line, expected", [
    ("<lora:n:0.8>", ("n", 0.8, 0.8, None)),
    ("<lora:n:0.8:0.5>", ("n", 0.8, 0.5, None)),
    ("<lora:n:te=0.3:unet=1>", ("n", 0.3, 1.0, None)),
    ("<lora:n:te=0.3>", ("n", 0.3, 0.3, None)),          # unet defaults to te, after te=
    ("<lora:n:0.5:unet=0.2>", ("n", 0.5, 0.2, None)),
    ("<lora:n:1:dyn=8>", ("n", 1.0, 1.0, 8)),
    ("<lora:n:1:0.5:4>", ("n", 1.0, 0.5, 4)),
    ("<lora:n>", ("n", 1.0, 1.0, None)),
    ("<lyco:n:-0.5>", ("n", -0.5, -0.5, None)),
    ("<lora:{name}:0.7>", ("{name}", 0.7, 0.7, None)),
    ("<lora:sub dir name:0.7>", ("sub dir name", 0.7, 0.7, None)),
])
def test_lora_tags_parse_like_the_webui(line, expected):
    assert only_tag(line) == expected


def test_tags_are_cut_out_of_the_text_and_other_networks_are_noted():
    prompt = parse_prompt_line("a cat <lora:a:0.5> on a mat<hypernet:h:1>, sunny")
    assert prompt.text == "a cat  on a mat, sunny"       # the WebUI leaves the spaces alone
    assert prompt.prompt == "a cat <lora:a:0.5> on a mat<hypernet:h:1>, sunny"
    assert [t.name for t in prompt.loras] == ["a"]
    assert any("<hypernet:h:1>" in note for note in prompt.notes)


def test_a_lora_named_twice_uses_its_last_weights():
    prompt = parse_prompt_line("<lora:a:0.2> x <lora:a:0.9>")
    assert prompt.lora_named(lambda t: t.name == "a").te == 0.9


@pytest.mark.parametrize("line, named", [
    ("cat <lora:n:abc>", "<lora:n:abc>"),
    ("cat <lora::0.7>", "<lora::0.7>"),
    ("cat <lora:n:0.5:x>", "<lora:n:0.5:x>"),
    ("cat <lora:n:te=high>", "<lora:n:te=high>"),
    ("cat <lora:n:1:dyn=0>", "<lora:n:1:dyn=0>"),
    ("cat <lyco:=1>", "<lyco:=1>"),
])
def test_malformed_tags_give_an_error_naming_the_tag(line, named):
    with pytest.raises(PromptSyntaxError, match=named.replace("(", r"\(")):
        parse_prompt_line(line)


def test_kohya_inline_options():
    p = parse_prompt_line("a cat <lora:a:1> --n ugly, blurry --W 512 --h 768 --s 12 --l 5.5 --d 42 "
                          "--ss k_euler_a --cn x")
    assert (p.text, p.negative, p.width, p.height, p.steps, p.cfg_scale, p.seed, p.sampler) == \
        ("a cat ", "ugly, blurry", 512, 768, 12, 5.5, 42, "euler_a")
    assert p.prompt == "a cat <lora:a:1>"
    assert any("--cn" in note for note in p.notes)
    plain = parse_prompt_line("a dog")
    assert (plain.negative, plain.width, plain.steps, plain.seed) == (None, None, None, None)
    with pytest.raises(PromptSyntaxError, match="--s 'many'"):
        parse_prompt_line("a cat --s many")
    with pytest.raises(PromptSyntaxError, match="at least 64"):
        parse_prompt_line("a cat --w 32")
    assert [p.text for p in parse_prompt_lines(["# comment", "", "one", "  "])] == ["one"]


# ---- name resolution --------------------------------------------------------------------------------

def write_lora(path: Path, targets, seed: int, alias: str | None = None, rank: int = 2) -> Path:
    """A small random kohya LoRA over `targets` (non-zero up, so it changes the output)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = LoRANetwork(targets, rank, alpha=1.0)
        for adapter in network.adapters.values():
            torch.nn.init.normal_(adapter.up.weight, std=0.05)
    metadata = {"ss_output_name": alias} if alias else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_lora_file(path, network_tensors(network), metadata)


@pytest.fixture(scope="module")
def backbone(tiny_sd1):
    from lora_trainer.backbones.diffusers_sd import load_backbone
    return load_backbone(str(tiny_sd1["single_file"]))


@pytest.fixture(scope="module")
def few_targets(backbone):
    """A few UNet attention and text-encoder layers: enough to change the image, quick to build."""
    targets = backbone.lora_targets()
    return [t for t in targets if t.name.endswith(("attn2_to_k", "attn2_to_v", "self_attn_q_proj"))]


def test_names_resolve_like_the_webui(tmp_path, few_targets):
    root = tmp_path / "Lora"
    write_lora(root / "a.safetensors", few_targets, 1, alias="alpha_out")
    write_lora(root / "sub" / "b.safetensors", few_targets, 2)
    write_lora(root / "sub2" / "a.safetensors", few_targets, 3)               # same stem: last wins
    write_lora(root / "c.safetensors", few_targets, 4, alias="shared")
    write_lora(root / "d.safetensors", few_targets, 5, alias="shared")        # alias taken: forbidden
    write_lora(root / ".hidden" / "h.safetensors", few_targets, 6)
    (root / "old.pt").write_bytes(b"not loaded")
    library = LoraLibrary(root).scan()

    assert library.resolve("b", "<lora:b:1>").path == root / "sub" / "b.safetensors"
    assert library.resolve("alpha_out", "<lora:alpha_out:1>").path == root / "a.safetensors"
    assert library.resolve("a", "<lora:a:1>").path == root / "sub2" / "a.safetensors"
    assert library.resolve("c", "<lora:c:1>").path == root / "c.safetensors"
    with pytest.raises(LoraNotFoundError, match="several files"):
        library.resolve("shared", "<lora:shared:1>")
    with pytest.raises(LoraNotFoundError, match="<lora:h:1>"):
        library.resolve("h", "<lora:h:1>")                                    # hidden folder
    with pytest.raises(LoraNotFoundError, match="pickle"):
        library.resolve("old", "<lora:old:1>")
    with pytest.raises(LoraNotFoundError, match=r"<lora:alpah_out:0.5>.*Close names: alpha_out"):
        library.resolve("alpah_out", "<lora:alpah_out:0.5>")


def test_unknown_names_fail_when_the_previewer_is_built(make_config, tmp_path, few_targets):
    write_lora(tmp_path / "loras" / "style.safetensors", few_targets, 1)
    cfg = load_config(make_config(preview_prompts=["x <lora:styel:0.5>"], lora_dir=str(tmp_path / "loras")))
    with pytest.raises(LoraNotFoundError, match=r"<lora:styel:0.5>.*Close names: style"):
        Previewer(cfg)


# ---- rendering against hand-merged weights -------------------------------------------------------

@pytest.fixture
def preview_setup(make_config, tmp_path, backbone, few_targets):
    """A 'trainer' with a LoRA in training (random, non-zero) attached, and a folder with a second
    LoRA file 'style'."""
    lora_dir = tmp_path / "loras"
    write_lora(lora_dir / "style.safetensors", few_targets, 7, rank=3)
    cfg = load_config(make_config(output_name="trained", lora_dir=str(lora_dir), preview_steps=3,
                                  preview_cfg_scale=3.0))
    targets = select_targets(backbone.lora_targets(), "attn", train_text_encoder=True)
    with torch.random.fork_rng():
        torch.manual_seed(11)
        network = LoRANetwork(targets, 2, alpha=2.0)
        for adapter in network.adapters.values():
            torch.nn.init.normal_(adapter.up.weight, std=0.1)
    network.attach()
    said = []
    trainer = SimpleNamespace(cfg=cfg, backbone=backbone, network=network, run_dir=tmp_path / "run",
                              lora_path=tmp_path / "out" / "trained.safetensors", say=said.append)
    yield SimpleNamespace(cfg=cfg, trainer=trainer, lora_dir=lora_dir, said=said)
    network.detach()


def render(setup, line):
    previewer = Previewer(setup.cfg, prompts=[line])
    with preserved_training_state(setup.trainer.network, setup.trainer.backbone.device):
        image, _ = previewer.render_tensor(setup.trainer, previewer.prompts[0])
    return image


def render_merged(setup, line, merges):
    """Reference: the networks merged into the base weights by hand, no adapter active."""
    trained = setup.trainer.network
    saved = {n: a.multiplier for n, a in trained.adapters.items()}
    trained.set_multipliers(0.0, 0.0)
    done = []
    try:
        for network, unet, te in merges:
            network.set_multipliers(unet=unet, te=te)
            network.merge()
            done.append(network)
            if network is trained:   # merged at 0.7, then switched off as an adapter
                trained.set_multipliers(0.0, 0.0)
        return render(setup, line)
    finally:
        for network in reversed(done):
            network.unmerge()
        for n, a in trained.adapters.items():
            a.multiplier = saved[n]


def style_network(setup):
    tensors, _ = read_lora_file(setup.lora_dir / "style.safetensors")
    network, unmatched = network_from_tensors(setup.trainer.backbone.lora_targets(), tensors)
    assert unmatched == []
    return network


def test_trained_lora_at_a_weight_equals_the_hand_merge(preview_setup):
    base = render(preview_setup, "a red circle")
    with_lora = render(preview_setup, "a red circle <lora:trained:0.7>")
    reference = render_merged(preview_setup, "a red circle", [(preview_setup.trainer.network, 0.7, 0.7)])
    assert (with_lora - base).abs().max() > 1e-3
    assert (with_lora - reference).abs().max() <= 1e-4
    # `{name}` is the same LoRA; weight 0 and no tag both leave it off: bitwise the base model
    assert torch.equal(render(preview_setup, "a red circle <lora:{name}:0.7>"), with_lora)
    assert torch.equal(render(preview_setup, "a red circle <lora:trained:0>"), base)
    assert not torch.equal(render(preview_setup, "a red circle --d 99"), base)   # seeded per prompt
    # dyn at the full rank (2) is the same LoRA; a rank cut changes it
    full_rank = render(preview_setup, "a red circle <lora:trained:0.7:dyn=2>")
    assert (full_rank - with_lora).abs().max() <= 1e-5
    assert (render(preview_setup, "a red circle <lora:trained:0.7:dyn=1>") - with_lora).abs().max() > 1e-4
    preview_setup.trainer.network.detach()
    try:
        assert torch.equal(render(preview_setup, "a red circle"), base)
    finally:
        preview_setup.trainer.network.attach()


def test_stacked_loras_equal_the_hand_merge(preview_setup):
    line = "a red circle <lora:trained:0.7> <lora:style:0.5:1.5>"
    stacked = render(preview_setup, line)
    reference = render_merged(preview_setup, "a red circle",
                              [(style_network(preview_setup), 1.5, 0.5),
                               (preview_setup.trainer.network, 0.7, 0.7)])
    only_trained = render(preview_setup, "a red circle <lora:trained:0.7>")
    assert (stacked - only_trained).abs().max() > 1e-3
    assert (stacked - reference).abs().max() <= 1e-4


def test_dyn_keeps_the_full_rank_scale(few_targets, tmp_path):
    tensors, _ = read_lora_file(write_lora(tmp_path / "x.safetensors", few_targets, 3, rank=3))
    cut = truncate_rank(tensors, 1)
    full, _ = network_from_tensors(few_targets, tensors)
    one, _ = network_from_tensors(few_targets, cut)
    name = next(iter(full.adapters))
    a, b = full.adapters[name], one.adapters[name]
    expected = (a.up.weight[:, :1] @ a.down.weight[:1]) * a.scale     # WebUI: alpha / full rank
    assert torch.allclose(b.delta_weight(), expected, atol=1e-7)


def test_a_preview_leaves_model_rng_and_grad_mode_exactly_as_before(preview_setup):
    trainer = preview_setup.trainer
    trainer.network.set_multipliers(unet=0.9, te=0.8)
    modules = [trainer.backbone.unet, trainer.backbone.text_encoder, trainer.backbone.vae]
    weights = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    modes = [[sub.training for sub in m.modules()] for m in modules + [trainer.network]]
    hosted = [host.has_adapters(t.module) for t in trainer.backbone.lora_targets()]
    rng = torch.get_rng_state()
    previewer = Previewer(preview_setup.cfg, prompts=["a <lora:trained:0.3> <lora:style:0.5>", "b"])
    paths = previewer.render(trainer, 0)
    assert torch.equal(torch.get_rng_state(), rng) and torch.is_grad_enabled()
    assert all(torch.equal(m.state_dict()[k], v) for m, w in zip(modules, weights) for k, v in w.items())
    assert modes == [[sub.training for sub in m.modules()] for m in modules + [trainer.network]]
    assert hosted == [host.has_adapters(t.module) for t in trainer.backbone.lora_targets()]
    assert {a.multiplier for n, a in trainer.network.adapters.items()
            if trainer.network.targets[n].is_text_encoder} == {0.8}
    assert {a.multiplier for n, a in trainer.network.adapters.items()
            if not trainer.network.targets[n].is_text_encoder} == {0.9}
    assert [p.name for p in paths] == ["0.png", "1.png", "grid.png"]


# ---- cards --------------------------------------------------------------------------------------------

def test_card_fields_and_hand_edits_are_kept(make_config, tmp_path, few_targets, shapes_dataset):
    from lora_trainer.data.discovery import discover

    cfg = load_config(make_config(trigger_word="lt_demo", lora_rank=4))
    index = discover(cfg.train_data_dir)
    lora = tmp_path / "out" / "test_lora.safetensors"
    save_lora_file(lora, {}, {"ss_output_name": "test_lora", "ss_steps": "30", "ss_epoch": "2",
                              "ss_max_train_steps": "60", "ss_network_dim": "4",
                              "ss_sd_model_name": "tiny-sd1.safetensors"})
    card = write_card(lora, cfg, "SD1", index)
    on_disk = json.loads(card_json_path(lora).read_text(encoding="utf-8"))
    assert on_disk == card
    assert on_disk["sd version"] == "SD1" and on_disk["activation text"] == "lt_demo"
    assert on_disk["preferred weight"] == 0.7
    assert "30 of 60 steps" in on_disk["notes"] and "rank 4" in on_disk["notes"]
    assert "tiny-sd1.safetensors" in on_disk["notes"] and "6 images" in on_disk["notes"]
    assert set(on_disk) >= {"description", "sd version", "activation text", "preferred weight", "notes"}

    # the user edits the description and clears the activation text, then training goes on
    on_disk["description"] = "My own words"
    on_disk["activation text"] = ""
    on_disk["negative text"] = "users may add keys too"
    card_json_path(lora).write_text(json.dumps(on_disk), encoding="utf-8")
    save_lora_file(lora, {}, {"ss_output_name": "test_lora", "ss_steps": "60", "ss_epoch": "4",
                              "ss_max_train_steps": "60"})
    after = write_card(lora, cfg, "SD1", index)
    assert after["description"] == "My own words" and after["activation text"] == ""
    assert after["negative text"] == "users may add keys too"
    assert "60 of 60 steps" in after["notes"]          # never edited: still ours, so updated
    assert after[RECORD_KEY]["description"] != "My own words"


def test_a_card_that_is_not_json_is_left_alone(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{ broken", encoding="utf-8")
    assert update_card(path, {"notes": "n"}) is None
    assert path.read_text(encoding="utf-8") == "{ broken"


# ---- training with previews ---------------------------------------------------------------------

def test_previews_during_training_change_nothing_that_is_trained(make_config):
    from lora_trainer.app.session import train_from_config

    common = dict(epochs=1, learning_rate=3e-2, train_text_encoder=True, num_threads=1, save_steps=3,
                  output_name="shapes")
    plain = train_from_config(load_config(make_config("plain", **common)))
    previewed = train_from_config(load_config(make_config(
        "previewed", preview_prompts=["lt_demo, a red circle <lora:shapes:1> --d 5", "a cat --l 1"],
        preview_every_n_steps=2, preview_steps=3, preview_weight_sweep=[0, 0.5, 1],
        preview_sampler="ddim", **common)))
    a, _ = read_lora_file(plain.lora_path)
    b, _ = read_lora_file(previewed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    steps = sorted(p.name for p in (previewed.run_dir / "previews").iterdir())
    assert steps == ["000000", "000002", "000004", "000006"]
    first = Image.open(previewed.run_dir / "previews" / "000000" / "0.png")
    info = first.info["parameters"]
    assert info.startswith("lt_demo, a red circle <lora:shapes:1>\n")
    assert "Steps: 3, Sampler: DDIM, CFG scale: 7.0, Seed: 5, Size: 64x64" in info
    assert "Training step: 0" in info
    last = Image.open(previewed.run_dir / "previews" / "000006" / "0.png")
    assert not np.array_equal(np.asarray(first), np.asarray(last))     # the LoRA learned something
    for name in ("1.png", "grid.png", "sweep.png"):
        assert (previewed.run_dir / "previews" / "000006" / name).exists()

    lora = previewed.lora_path
    assert lora.with_suffix(".preview.png").exists()
    card = json.loads(lora.with_suffix(".json").read_text(encoding="utf-8"))
    assert card["sd version"] == "SD1" and card["activation text"] == "lt_demo"
    assert "6 of 6 steps" in card["notes"]


# ---- sampler ------------------------------------------------------------------------------------------

class OracleBackbone:
    """Predicts exactly the noise (or v) that leads to a fixed x0: every sampler must end on x0."""

    def __init__(self, prediction_type, x0, alphas_cumprod):
        self.prediction_type, self.x0, self.alphas_cumprod = prediction_type, x0, alphas_cumprod
        self.device = torch.device("cpu")

    def predict(self, noisy, timesteps, cond):
        from lora_trainer.preview.sampler import sigma_at

        alpha = (1 / (1 + sigma_at(self.alphas_cumprod, timesteps) ** 2)).float().view(-1, 1, 1, 1)
        eps = (noisy - alpha.sqrt() * self.x0) / (1 - alpha).sqrt()
        if self.prediction_type == "epsilon":
            return eps
        return alpha.sqrt() * eps - (1 - alpha).sqrt() * self.x0


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_samplers_land_on_the_oracle_x0(sampler, prediction_type):
    from lora_trainer.preview.sampler import SampleSettings, sample_latents
    from lora_trainer.diffusion.objective import alphas_cumprod_from_schedule

    x0 = torch.randn(1, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    oracle = OracleBackbone(prediction_type, x0, alphas_cumprod_from_schedule(0.00085, 0.012, 1000))
    cond = {"crossattn": torch.zeros(1, 2, 3)}
    settings = SampleSettings(steps=7, cfg_scale=4.0, width=24, height=16, seed=3, sampler=sampler)
    rng = torch.get_rng_state()
    out = sample_latents(oracle, cond, cond, settings)
    assert torch.equal(torch.get_rng_state(), rng)
    assert (out - x0).abs().max() <= 1e-4


def test_a_run_without_preview_prompts_renders_one_card_thumbnail_at_the_end(make_config, tmp_path):
    """write_card on, no preview prompts: one render when the run finishes, of the trained LoRA at
    the card's weight with the trigger word; none before the first step or every N steps."""
    from lora_trainer.app.session import train_from_config

    cfg = load_config(make_config("thumb", trigger_word="lt_demo", max_train_steps=3, epochs=1,
                                  preview_every_n_steps=1, preview_steps=2, learning_rate=5e-2))
    result = train_from_config(cfg)
    folder = Path(cfg.run_dir) / "previews"
    assert sorted(p.name for p in folder.iterdir()) == ["000003"]
    final = folder / "000003" / "0.png"
    assert "lt_demo, <lora:test_lora:0.7>" in Image.open(final).info["parameters"]
    card = Path(result.lora_path).with_suffix(".preview.png")
    assert np.array_equal(np.asarray(Image.open(card).convert("RGB")), np.asarray(Image.open(final).convert("RGB")))

    off = load_config(make_config("nothumb", max_train_steps=2, epochs=1, write_card=False))
    result = train_from_config(off)
    assert not Path(result.lora_path).with_suffix(".preview.png").exists()
    assert not (Path(off.run_dir) / "previews").exists()
