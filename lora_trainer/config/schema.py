"""The one config schema: YAML keys, CLI help, UI fields and docs/config-reference.md all come from here.

Each field carries metadata (see `setting`) instead of living in four places:
  help     - one line for --help, the UI tooltip and the docs
  group    - the UI section / docs heading
  choices  - allowed values for strings
  min/max  - numeric range (inclusive)
  path     - "dir" | "file" | "dir_or_file" | "out": resolved against the YAML's folder;
             the first three must exist
  resume   - what a changed value means for an existing run:
             "free"  - harmless (logging, save cadence, previews)
             "force" - continuing makes sense but the user must say so (--force-resume)
             "fixed" - the checkpoint cannot continue with a different value
  advanced - folded away in the UI
  tasks    - the task types (task_type) the field applies to; None: all. A field of another task is
             not checked against the disk and, when set, only warned about
  task_choices - per task type, the subset of `choices` it accepts
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Optional

TASK_TYPES = ("sd", "causal_lm")
SD, LM = ("sd",), ("causal_lm",)

GROUPS = ("Data", "Model/Output", "LoRA", "Training", "Checkpoints", "Previews", "Advanced")


def setting(default: Any, help: str, group: str, *, choices=None, min=None, max=None, path=None,
            resume: str = "force", advanced: bool = False, factory=None, item: str = "str",
            tasks=None, task_choices=None):
    """`item` is the type of a list field's entries: "str" (default) or "float"."""
    meta = dict(help=help, group=group, choices=choices, min=min, max=max, path=path,
                resume=resume, advanced=advanced, item=item, tasks=tasks, task_choices=task_choices or {})
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # ---- Data -------------------------------------------------------------------------------
    train_data_dir: str = setting(
        "", "Folder of training images (png/jpg/jpeg/webp/bmp). Sub-folders named 'N_name' repeat "
        "their images N times per epoch (kohya layout). causal_lm: a .jsonl/.txt file or a folder of them "
        "(jsonl lines: {\"messages\": [...]}, {\"prompt\", \"completion\"} or {\"text\"}; .txt: samples "
        "separated by blank lines).", "Data", path="dir_or_file", resume="fixed")
    metadata_path: Optional[str] = setting(
        None, "Optional metadata.csv with columns file_name,text (captions). Overrides .txt sidecars.",
        "Data", path="file", tasks=SD, resume="fixed")
    caption_extension: str = setting(".txt", "Extension of caption sidecar files next to each image.",
                                     "Data", tasks=SD, resume="fixed", advanced=True)
    repeats: int = setting(1, "Default repeats per image for folders without an 'N_' prefix.", "Data",
                           min=1, max=10000, tasks=SD, resume="fixed")
    resolution: int = setting(512, "Training resolution in pixels (images are resized and cropped to it). "
                              "A YAML config without it gets the base model's native size: 1024 for "
                              "SDXL, 768 for SD2-768-v, 512 for SD1 and SD2-base.",
                              "Data", min=64, max=4096, tasks=SD, resume="fixed")
    random_crop: bool = setting(False, "Crop at a random (seeded) position instead of the centre.", "Data",
                                tasks=SD, resume="fixed")
    enable_bucket: bool = setting(True, "Aspect-ratio buckets: keep each image's shape (resized to cover "
                                  "the closest bucket of about resolution² pixels) instead of a square "
                                  "crop.", "Data", tasks=SD, resume="fixed")
    min_bucket_reso: Optional[int] = setting(None, "Smallest bucket side (default: resolution/2).", "Data",
                                             min=64, max=8192, tasks=SD, resume="fixed", advanced=True)
    max_bucket_reso: Optional[int] = setting(None, "Largest bucket side (default: 2 x resolution).", "Data",
                                             min=64, max=8192, tasks=SD, resume="fixed", advanced=True)
    bucket_reso_steps: int = setting(64, "Bucket sides are multiples of this (64 is safe for every model "
                                     "family).", "Data", min=8, max=512, tasks=SD, resume="fixed", advanced=True)
    max_upscale_factor: float = setting(2.0, "Warn about images enlarged more than this to fill their "
                                        "bucket (they come out blurry).", "Data", min=1.0, max=100.0,
                                        tasks=SD, resume="free", advanced=True)
    cache_latents_to_disk: bool = setting(True, "Keep VAE latents (and fixed caption embeddings) in an "
                                          "on-disk cache reused by later runs; entries are keyed by image "
                                          "content, crop and model, and checksummed.", "Data",
                                          tasks=SD, resume="free", advanced=True)
    cache_dir: Optional[str] = setting(None, "Cache folder (default: $LORA_TRAINER_CACHE or "
                                       "~/.cache/lora_trainer).", "Data", path="out", tasks=SD, resume="free",
                                       advanced=True)
    free_text_encoders_after_caching: bool = setting(
        True, "When every caption's embedding is cached before the first step (text encoder not "
        "trained, no shuffle_caption, no random_crop), drop the text encoders' weights from memory; "
        "they are read back from base_model for a preview and dropped again. Cannot change the "
        "result. Headless only (the WebUI's own model is never touched).", "Data", resume="free",
        tasks=SD, advanced=True)
    offload_vae_after_caching: bool = setting(
        True, "When every latent is cached (no random_crop), take the VAE out of memory (on a GPU: "
        "moved to the CPU; on the CPU: dropped and read back from base_model when a preview needs "
        "it). Cannot change the result. Headless only.", "Data", resume="free", tasks=SD, advanced=True)
    vae_tile_size: int = setting(
        2048, "Images with a side longer than this many pixels are VAE-encoded in tiles of this size, "
        "which bounds the encoder's memory at very large sizes; 0: never tile. Tiled latents differ "
        "slightly from whole-image ones at the seams, so the default only tiles beyond the largest "
        "bucket of any family at its native resolution (SDXL: 2 x 1024).", "Data", min=0, max=16384,
        resume="fixed", tasks=SD, advanced=True)
    shuffle_caption: bool = setting(False, "Shuffle comma-separated caption tags each time an image is used.",
                                    "Data", tasks=SD, resume="fixed")
    keep_tokens: int = setting(0, "With shuffle_caption: keep this many leading tags in place (e.g. the "
                               "trigger word).", "Data", min=0, max=1000, tasks=SD, resume="fixed")
    caption_dropout_rate: float = setting(0.0, "Probability of training an image with an empty caption.",
                                          "Data", min=0.0, max=1.0, tasks=SD, resume="fixed")
    bad_image_policy: str = setting("fail", "What to do with unreadable images: 'fail' (list them all and "
                                    "stop) or 'skip' (warn and train without them).", "Data",
                                    choices=("fail", "skip"), tasks=SD, resume="fixed", advanced=True)
    max_image_megapixels: float = setting(100.0, "Refuse images larger than this many megapixels: one "
                                          "such file (a decompression bomb, an absurd scan) can take "
                                          "gigabytes of memory to decode. Raise it for huge images "
                                          "you trust.", "Data", min=1.0, max=100000.0, tasks=SD, resume="free",
                                          advanced=True)
    check_data: bool = setting(True, "Check the dataset before training (tiny images, missing or "
                               "over-long captions): refuse to start on errors, log warnings. "
                               "`lora-trainer check-data` writes the full report.", "Data",
                               resume="free")

    max_seq_length: int = setting(512, "causal_lm: most tokens per sequence (a packed row, or one sample).",
                                  "Data", min=8, max=1_000_000, tasks=LM, resume="fixed")
    overlong_samples: str = setting("fail", "causal_lm: a sample longer than max_seq_length is an error "
                                    "naming its file and line ('fail'), or is cut to max_seq_length and "
                                    "counted in the data check and train.log ('truncate').", "Data",
                                    choices=("fail", "truncate"), tasks=LM, resume="fixed", advanced=True)
    train_on: str = setting("completion", "causal_lm: which tokens the loss is computed on: "
                            "'completion' (assistant turns, completions; plain text entirely) or 'all'.",
                            "Data", choices=("completion", "all"), tasks=LM, resume="fixed")
    packing: bool = setting(False, "causal_lm: concatenate consecutive samples into rows of up to "
                            "max_seq_length tokens (each keeps its own attention); off: batches of "
                            "samples of similar length.", "Data", tasks=LM, resume="fixed", advanced=True)

    # ---- Model / output ---------------------------------------------------------------------------
    task_type: str = setting("sd", "What to train: 'sd' (a Stable Diffusion LoRA: images + captions) or "
                             "'causal_lm' (a LoRA for a Hugging Face causal language model: .jsonl/.txt "
                             "text, PEFT adapter output). Settings of the other task are ignored.",
                             "Model/Output", choices=TASK_TYPES, resume="fixed")
    base_model: str = setting(
        "", "Base model: a diffusers folder or a single-file .safetensors checkpoint (WebUI layout). "
        "Inside the WebUI the loaded model is used instead. causal_lm: a local Hugging Face model folder "
        "(config.json, tokenizer, *.safetensors; pickle .bin weights are refused).", "Model/Output",
        path="dir_or_file",
        resume="fixed")
    base_model_config: Optional[str] = setting(
        None, "Diffusers-format config folder for a single-file checkpoint whose architecture is not a "
        "standard one (the shipped SD1.5 configs are used otherwise).", "Model/Output", path="dir",
        tasks=SD, resume="fixed", advanced=True)
    output_dir: str = setting("output", "Where the finished LoRA (.safetensors) is written, e.g. the "
                              "WebUI's models/Lora.", "Model/Output", path="out", resume="free")
    output_name: str = setting("my_lora", "File name (without extension) of the LoRA; also the name used "
                               "in <lora:name:0.7>.", "Model/Output", resume="free")
    run_dir: Optional[str] = setting(
        None, "Folder for checkpoints, logs and previews (default: runs/<output_name> next to the YAML). "
        "Kept outside output_dir so the WebUI never lists training state as a LoRA.", "Model/Output",
        path="out", resume="free", advanced=True)
    overwrite_output: bool = setting(False, "Replace a <output_name>.safetensors in output_dir that "
                                     "this run did not write (another run's, a download). Its old file "
                                     "and card files are moved to <run_dir>/replaced/ first. Off: such a "
                                     "run stops before training and says so.", "Model/Output",
                                     resume="free")
    save_precision: str = setting("fp16", "Precision of the saved LoRA file.", "Model/Output",
                                  choices=("fp32", "fp16", "bf16"), resume="free")
    trigger_word: Optional[str] = setting(None, "Optional trigger word recorded as the LoRA's activation "
                                          "text.", "Model/Output", tasks=SD, resume="free")

    # ---- LoRA ---------------------------------------------------------------------------------------
    lora_rank: int = setting(8, "LoRA rank (network dim).", "LoRA", min=1, max=1024, resume="fixed")
    lora_alpha: Optional[float] = setting(None, "LoRA alpha; the update is scaled by alpha/rank. "
                                          "Default: equal to lora_rank (scale 1).", "LoRA", min=0.0,
                                          resume="fixed")
    adapter_type: str = setting(
        "lora", "Adapter math: 'lora' (kohya LoRA), 'locon' (LoRA on the ResNet/sampler convolutions too: "
        "the same as target_modules: locon), 'loha' (LyCORIS Hadamard product) or 'lokr' (LyCORIS "
        "Kronecker product). Every type loads in the WebUI as <lora:name:w>. causal_lm: 'lora' only (what "
        "a PEFT adapter folder holds).", "LoRA",
        choices=("lora", "locon", "loha", "lokr"), resume="fixed", task_choices={"causal_lm": ("lora",)})
    dora: bool = setting(False, "DoRA (weight-decomposed): also train a magnitude per input channel, as "
                         "LyCORIS's dora_wd; written as dora_scale, which the WebUI applies.", "LoRA",
                         tasks=SD, resume="fixed", advanced=True)
    target_modules: str = setting(
        "attn-mlp", "Which UNet layers get an adapter: 'attn' (attention q/k/v/out), 'attn-mlp' (+ "
        "feed-forward and proj_in/out, kohya's default) or 'locon' (+ ResNet and sampler convolutions; "
        "adapter_type: locon selects it too). causal_lm: 'attn' (q/k/v/o_proj) or 'attn-mlp' (+ "
        "gate/up/down_proj).", "LoRA",
        choices=("attn", "attn-mlp", "locon"), resume="fixed",
        task_choices={"causal_lm": ("attn", "attn-mlp")})
    conv_rank: Optional[int] = setting(None, "Rank for 3x3 convolutions with target_modules: locon or "
                                       "adapter_type: locon (default lora_rank).", "LoRA", min=1, max=1024,
                                       tasks=SD, resume="fixed", advanced=True)
    conv_alpha: Optional[float] = setting(None, "Alpha for 3x3 convolutions (default: conv_rank when "
                                          "conv_rank is set, else lora_alpha).", "LoRA", min=0.0,
                                          tasks=SD, resume="fixed", advanced=True)
    lokr_factor: int = setting(-1, "LoKr: split each layer's sides as close to this factor as they divide "
                               "(-1: as balanced as possible, LyCORIS's default). Where lora_rank is at "
                               "least half the larger factor, the factor is stored whole (full matrix, "
                               "scale 1) as LyCORIS does.", "LoRA", min=-1, max=8192, tasks=SD, resume="fixed",
                               advanced=True)
    train_text_encoder: bool = setting(False, "Also train LoRA on the text encoder(s).", "LoRA",
                                       tasks=SD, resume="fixed")
    init_lora_from: Optional[str] = setting(
        None, "Start from an existing LoRA file of the same adapter_type (incremental training). Its ranks "
        "must equal lora_rank / conv_rank (and its LoKr factor lokr_factor); alphas come from the file.",
        "LoRA", path="file", tasks=SD, resume="fixed")

    # ---- Training -----------------------------------------------------------------------------------
    batch_size: int = setting(1, "Images per micro-batch.", "Training", min=1, max=1024, resume="fixed")
    gradient_accumulation_steps: int = setting(1, "Micro-batches per optimizer step (effective batch = "
                                               "batch_size x this).", "Training", min=1, max=4096)
    epochs: int = setting(10, "Passes over the dataset (with repeats).", "Training", min=1, max=100000)
    max_train_steps: Optional[int] = setting(None, "Train exactly this many optimizer steps, however "
                                             "many epochs that takes (as in kohya: when set, it "
                                             "overrides epochs, more or fewer).", "Training", min=1)
    learning_rate: float = setting(1e-4, "UNet LoRA learning rate.", "Training", min=0.0, max=1.0)
    text_encoder_lr: Optional[float] = setting(None, "Text-encoder LoRA learning rate (default "
                                               "learning_rate).", "Training", min=0.0, max=1.0, tasks=SD, resume="force")
    optimizer: str = setting("adamw", "Optimizer: 'adamw' or 'adamw8bit' (needs bitsandbytes).",
                             "Training", choices=("adamw", "adamw8bit"), resume="fixed")
    weight_decay: float = setting(1e-2, "AdamW weight decay.", "Training", min=0.0, max=1.0,
                                  advanced=True)
    lr_scheduler: str = setting("constant", "Learning-rate schedule after warm-up.", "Training",
                                choices=("constant", "cosine", "linear"))
    lr_warmup_steps: int = setting(0, "Optimizer steps of linear warm-up from 0.", "Training", min=0)
    max_grad_norm: Optional[float] = setting(1.0, "Clip the gradient norm to this (empty: no clipping).",
                                             "Training", min=0.0)
    mixed_precision: str = setting("no", "'no' (fp32), 'fp16' (CUDA only; uses a grad scaler) or 'bf16'.",
                                   "Training", choices=("no", "fp16", "bf16"), resume="fixed")
    base_dtype: str = setting(
        "auto", "Precision the frozen base weights (UNet, text encoders) are held in: 'auto' follows "
        "mixed_precision (fp16/bf16 weights under fp16/bf16, else fp32); 'fp16'/'bf16' halve the model's "
        "memory and need the same mixed_precision; 'fp32' keeps full-precision weights under autocast. "
        "The LoRA, optimizer and loss stay fp32; the VAE stays fp32. Headless only: in the WebUI the "
        "loaded model is trained as the WebUI holds it.", "Training",
        choices=("auto", "fp32", "fp16", "bf16"), resume="force", advanced=True)
    compile: bool = setting(
        False, "Run the training step through torch.compile: faster steps after a first step that "
        "compiles for minutes (cached on disk for later runs; each new image shape compiles again, so "
        "it pays most with one bucket), and with the fused AdamW kernel. Needs a C++ compiler on the "
        "CPU, triton on a GPU. Results agree with eager ones within float rounding; a run resumes "
        "exactly in the mode it ran in. Headless only (the WebUI's model is shared with generation).",
        "Training", tasks=SD, resume="force", advanced=True)
    compile_backend: str = setting(
        "inductor", "torch.compile backend when compile is on: 'inductor' (generated fused kernels: the "
        "speed-up) or 'aot_eager' (the same graph capture with torch's own kernels: no speed-up, but "
        "tells a compiler problem from a model problem).", "Training", choices=("inductor", "aot_eager"),
        tasks=SD, resume="force", advanced=True)
    gradient_checkpointing: bool = setting(False, "Trade compute for memory (recompute activations).",
                                           "Training", resume="free")
    seed: int = setting(42, "Seed for data order, crops, captions, noise and timesteps.", "Training",
                        min=0, max=2**31 - 1, resume="fixed")
    noise_offset: float = setting(0.0, "Noise offset (helps very dark/bright images; 0.05-0.1 typical).",
                                  "Training", min=0.0, max=1.0, tasks=SD, resume="fixed", advanced=True)
    min_snr_gamma: Optional[float] = setting(None, "Min-SNR loss weighting gamma (5 is typical; empty: "
                                             "off).", "Training", min=0.0, tasks=SD, resume="fixed", advanced=True)
    prediction_type: Optional[str] = setting(None, "Override the model's prediction target (default: "
                                             "detected).", "Training", choices=("epsilon", "v_prediction"),
                                             tasks=SD, resume="fixed", advanced=True)
    device: str = setting("auto", "'auto' (CUDA if available), 'cuda', 'cuda:N' or 'cpu'.", "Training",
                          resume="free", advanced=True)

    # ---- Checkpoints --------------------------------------------------------------------------------
    save_steps: int = setting(100, "Write a crash-safe checkpoint (and refresh the LoRA file) every N "
                              "optimizer steps (0: only at the end and on stop).", "Checkpoints", min=0,
                              resume="free")
    keep_last_n_checkpoints: int = setting(3, "Checkpoints kept in the run folder (older ones are pruned "
                                           "after a newer one is valid).", "Checkpoints", min=1,
                                           resume="free")
    save_snapshots: bool = setting(False, "Also keep <name>-<step>.safetensors next to the LoRA at every "
                                   "save_steps.", "Checkpoints", resume="free")
    resume: bool = setting(True, "Continue from the newest valid checkpoint in run_dir when one exists.",
                           "Checkpoints", resume="free")

    # ---- Previews -----------------------------------------------------------------------------------
    preview_prompts: list = setting(None, "Prompts rendered during training, in the WebUI's syntax: "
                                    "<lora:{name}:0.7> (or <lora:OUTPUT_NAME:0.7>) is the LoRA being "
                                    "trained - a prompt without it shows the base model; other "
                                    "<lora:NAME:w> come from lora_dir. kohya's --n/--w/--h/--s/--l/--d "
                                    "options work too. causal_lm: plain prompts, continued with the adapter "
                                    "(a chat model's template is applied to each as a user message).", "Previews", resume="free", factory=list)
    preview_max_new_tokens: int = setting(32, "causal_lm: tokens generated (greedily) per preview prompt.",
                                          "Previews", min=1, max=4096, tasks=LM, resume="free", advanced=True)
    preview_every_n_steps: int = setting(0, "Render previews every N optimizer steps (0: off). causal_lm: "
                                         "each preview prompt's continuation, in train.log and TensorBoard.",
                                         "Previews", min=0, resume="free")
    preview_steps: int = setting(20, "Sampling steps per preview image (a prompt's --s overrides it).",
                                 "Previews", min=1, max=1000, tasks=SD, resume="free")
    preview_width: Optional[int] = setting(None, "Preview width in pixels, rounded down to a multiple "
                                           "of 8 (default: resolution; a prompt's --w overrides it).",
                                           "Previews", min=64, max=4096, tasks=SD, resume="free")
    preview_height: Optional[int] = setting(None, "Preview height in pixels, rounded down to a multiple "
                                            "of 8 (default: resolution; a prompt's --h overrides it).",
                                            "Previews", min=64, max=4096, tasks=SD, resume="free")
    preview_cfg_scale: float = setting(7.0, "Classifier-free guidance scale (a prompt's --l overrides "
                                       "it).", "Previews", min=0.0, max=100.0, tasks=SD, resume="free")
    preview_sampler: str = setting("euler", "Preview sampler ('euler_a' is Euler ancestral).",
                                   "Previews", choices=("euler", "euler_a", "ddim"), tasks=SD, resume="free")
    preview_seed: int = setting(1234, "Seed of every preview image (a prompt's --d overrides it); the "
                                "same seed at every step shows how the LoRA changes.", "Previews",
                                min=0, max=2**32 - 1, tasks=SD, resume="free")
    preview_negative_prompt: str = setting("", "Negative prompt for previews (a prompt's --n overrides "
                                           "it).", "Previews", tasks=SD, resume="free")
    preview_weight_sweep: list = setting(None, "Render the first preview prompt at each of these LoRA "
                                         "weights in one labelled grid, e.g. [0, 0.4, 0.7, 1.0] "
                                         "(empty: off).", "Previews", tasks=SD, resume="free", factory=list,
                                         item="float")
    lora_dir: Optional[str] = setting(None, "Folder (with sub-folders) of other LoRAs that preview "
                                      "prompts name, e.g. the WebUI's models/Lora (default: "
                                      "output_dir).", "Previews", path="dir", tasks=SD, resume="free",
                                      advanced=True)
    write_card: bool = setting(True, "Write the WebUI card files next to the LoRA: <name>.preview.png "
                               "and <name>.json (description, activation text, notes). Fields you "
                               "edited by hand are never overwritten.", "Previews", tasks=SD, resume="free")

    # ---- Advanced -----------------------------------------------------------------------------------
    log_every_n_steps: int = setting(10, "Write loss/lr/speed/memory to logs/train.log every N steps.",
                                     "Advanced", min=1, resume="free", advanced=True)
    tensorboard: bool = setting(True, "Write TensorBoard events to <run_dir>/tensorboard when "
                                "tensorboard is installed.", "Advanced", resume="free", advanced=True)
    num_threads: Optional[int] = setting(None, "CPU threads for torch (default: torch's choice). Stored "
                                         "in checkpoints so a CPU resume is bit-identical.", "Advanced",
                                         min=1, max=1024, resume="free", advanced=True)

    @property
    def run_path(self) -> Path:
        """`run_dir` as a path: load_config fills it in (runs/<output_name>) when the YAML leaves it out."""
        if self.run_dir is None:
            raise ValueError("run_dir is not set: load the config with load_config, which fills it in")
        return Path(self.run_dir)


def fields_of(cls=TrainConfig):
    return [f for f in dataclasses.fields(cls)]


def field_meta(name: str) -> Mapping[str, Any]:
    return next(f.metadata for f in dataclasses.fields(TrainConfig) if f.name == name)
