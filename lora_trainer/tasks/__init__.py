"""Task types: what a run trains, chosen by the config's `task_type`.

The loop (training/trainer.py) and the composition root know only the two small interfaces in
`protocol.py`; everything that depends on the kind of model and data lives in one folder here:

  sd/         Stable Diffusion LoRA: images + captions, noise/timestep objective, kohya file
  causal_lm/  LoRA for a Hugging Face causal LM: jsonl/txt, masked next-token loss, PEFT folder

Adding a task is adding a folder whose package exposes `TASK` (a `protocol.Task`) and naming it
in TASK_MODULES (and in the schema's TASK_TYPES). Imported lazily: an SD run never imports
transformers' language models, a causal-LM run never imports diffusers.
"""
from __future__ import annotations

import importlib

TASK_MODULES = {
    "sd": "lora_trainer.tasks.sd",
    "causal_lm": "lora_trainer.tasks.causal_lm",
}


def task_for(task_type: str):
    """The `protocol.Task` of a task type."""
    try:
        module = TASK_MODULES[task_type]
    except KeyError:
        raise ValueError(f"task_type: unknown task {task_type!r}; known: {', '.join(TASK_MODULES)}") from None
    return importlib.import_module(module).TASK
