"""Console progress: a tqdm bar with loss, lr, it/s and ETA, plus messages printed above it."""
from __future__ import annotations

from tqdm import tqdm

from ..training.control import TrainingObserver


class ConsoleProgress(TrainingObserver):
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar = None

    def on_start(self, info):
        if info["resumed"]:
            print(f"Resuming from step {info['start_step']} of {info['total_steps']}")
        print(f"{info['num_images']} {info.get('data_unit', 'images')}, {info['num_samples']} samples/epoch, "
              f"{info['epochs']} epochs x {info['steps_per_epoch']} steps, effective batch "
              f"{info['effective_batch']}, {info['lora_layers']} LoRA layers "
              f"({info['trainable_parameters']:,} parameters)")
        if not self.quiet:
            self.bar = tqdm(total=info["total_steps"], initial=info["start_step"], unit="step",
                            dynamic_ncols=True)

    def on_step(self, r):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{r.loss:.4f}", lr=f"{r.lr:.2e}", refresh=False)
            self.bar.update(1)

    def on_message(self, text):
        (self.bar.write if self.bar is not None else print)(text)

    def on_checkpoint(self, step, path):
        self.on_message(f"checkpoint saved at step {step}: {path}")

    def on_end(self, result):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
