"""The training loop. It sees a config, a dataset index, a base model and the task's training side
(tasks/protocol.py: batches -> loss, adapter export) — never diffusers, transformers, gradio or the
WebUI — so the same loop trains an SD model loaded from disk, the one the WebUI already holds, or a
causal language model."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..contracts.backbone import Backbone
from ..lora.adapters import adapter_setup
from ..lora.network import LoRANetwork
from ..storage import train_state
from ..storage.checkpoints import CheckpointStore, checkpoint_dirname
from . import resume as resume_mod
from .distributed import SINGLE, DistContext
from .control import ObserverGroup, StepReport, TrainingControl, TrainingObserver
from .outputs import LoraWriteFailed, ensure_run_id, lora_file_step, set_aside_foreign_file
from .oom import OutOfMemoryStop, is_out_of_memory, next_oom_action, oom_advice, release_failed_step
from .optim import build_optimizer, build_scheduler
from .plan import TrainingPlan, count_batches, iterate_steps
from .state import TrainingState

log = logging.getLogger("lora_trainer")


@dataclass
class TrainResult:
    status: str               # "finished" | "stopped" | "already_finished"
    step: int
    total_steps: int
    lora_path: Path
    run_dir: Path
    last_checkpoint: Path | None
    message: str = ""


class Trainer:
    def __init__(self, cfg, backbone: Backbone, index, control: TrainingControl | None = None,
                 observers: Sequence[TrainingObserver] = (), previewer=None, force_resume: bool = False,
                 dist: DistContext = SINGLE, *, task, phases):
        """`task`: the task's training side (tasks/protocol.py TrainingTask), built by the
        composition root (app/session.py) so the loop imports no task package. `phases`: the
        memory/time per phase record (monitor.system.PhasePeaks, from the composition root too)."""
        self.cfg, self.backbone, self.index = cfg, backbone, index
        self.phases = phases
        self.dist = dist
        if not dist.is_main:  # only rank 0 reports, previews and writes
            observers, previewer = (), None
        self.control = control or TrainingControl()
        self.observer = ObserverGroup(observers)
        self.previewer = previewer
        self.force_resume = force_resume
        self.run_dir = Path(cfg.run_dir)
        self.task = task
        self.lora_path = task.output_path
        self.store = CheckpointStore(self.run_dir)
        self.batch_keys = task.batch_keys()
        # written into every LoRA: tells this run's own files from anyone else's (outputs.py)
        self.run_id = ensure_run_id(self.run_dir) if dist.is_main else ""
        # a step takes `accumulation` batches per rank, from all ranks together
        self.plan = TrainingPlan(index.num_samples, cfg.batch_size,
                                 cfg.gradient_accumulation_steps * dist.world_size,
                                 cfg.epochs, cfg.max_train_steps,
                                 count_batches(index, cfg.batch_size, self.batch_keys))
        self._checkpointing_forced = False
        self.last_checkpoint: Path | None = None
        self._build_network()
        self.state = self._build_state()   # what training changes: saved and restored as one

    # ---- setup -------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        log.info(text)
        self.observer.on_message(text)

    def _build_network(self) -> None:
        cfg = self.cfg
        self.backbone.freeze()
        self.backbone.set_gradient_checkpointing(cfg.gradient_checkpointing)
        # kohya-name order: the seeded RNG initialises the adapters in this order, so backbones that
        # list the same layers in another order (diffusers vs the WebUI's LDM tree) train the same LoRA
        spec, preset = adapter_setup(cfg)
        targets = sorted(self.task.lora_targets(preset), key=lambda t: t.name)
        # torch's global RNG initialises the adapters: seed it so a fresh run is reproducible
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.network = LoRANetwork(targets, conv_rank=cfg.conv_rank, conv_alpha=cfg.conv_alpha, spec=spec)
        self.task.init_network(self.network, self.say)
        self.network.to(self.backbone.device, torch.float32)
        self.network.attach()

    def _build_state(self) -> TrainingState:
        """The optimizer, scheduler and scaler over the network's trainable parameters."""
        cfg = self.cfg
        unet = self.network.trainable_parameters(text_encoder=False)
        te = self.network.trainable_parameters(text_encoder=True)
        named_params = unet + te   # fixed order: the optimizer state is mapped by these names
        groups = [{"params": [p for _, p in unet], "lr": cfg.learning_rate}]
        if te:
            groups.append({"params": [p for _, p in te], "lr": cfg.text_encoder_lr or cfg.learning_rate})
        # the fast path also takes the fused optimizer kernel (see build_optimizer)
        optimizer = build_optimizer(cfg.optimizer, groups, cfg.weight_decay, fused=cfg.compile)
        scheduler = build_scheduler(optimizer, cfg.lr_scheduler, cfg.lr_warmup_steps, self.plan.total_steps)
        scaler = None
        if cfg.mixed_precision == "fp16":
            if self.backbone.device.type != "cuda":
                raise ValueError("mixed_precision: fp16 needs a CUDA GPU; use 'no' or 'bf16' on CPU")
            scaler = torch.amp.GradScaler("cuda")
        return TrainingState(named_params, optimizer, scheduler, scaler, micro_batch_size=cfg.batch_size)

    def _autocast(self):
        if self.cfg.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.cfg.mixed_precision == "fp16" else torch.bfloat16
        return torch.autocast(self.backbone.device.type, dtype=dtype)

    # ---- resume ------------------------------------------------------------------------------------
    def _maybe_resume(self) -> bool:
        if self.dist.is_main:
            self.store.cleanup_temp()
        self.dist.barrier()
        if not self.cfg.resume:
            return False
        info, warnings = self.store.latest_valid()
        for w in warnings:
            log.warning(w)
            self.observer.on_message(w)
        if info is None:
            if warnings:  # there were checkpoints, none usable: say so rather than start over silently
                self.say(f"Every checkpoint in {self.store.checkpoints_dir} is damaged (see the warnings "
                         f"above); starting over from step 0. The existing LoRA {self.lora_path} stays "
                         "as it is until this run's first save.")
            return False
        tensors, state = self.store.load(info)
        for note in resume_mod.check_compatible(state, self._run_facts(), self.cfg, self.force_resume):
            self.say(note)
        self._keep_step_composition(state)
        for note in train_state.apply_determinism_settings(state.get("determinism", {})):
            self.say(note)
        self.state.load_state_dict(tensors, state)
        self._apply_config_learning_rates(state)
        self.last_checkpoint = info.path
        self.say(f"Resuming from step {self.state.position.global_step} of {self.plan.total_steps} "
                 f"({info.path.name})")
        self._reexport_lora_if_behind()
        return True

    def _reexport_lora_if_behind(self) -> None:
        """The LoRA file is written after its checkpoint: a crash (or a full or read-only output
        folder) between the two, or a deleted file, leaves it missing or older than the
        checkpoint. Write it again from the restored weights."""
        if not self.dist.is_main:
            return
        if self.lora_path.is_dir():   # a folder output (PEFT) carries no step: only a missing one
            return
        step = lora_file_step(self.lora_path, self.run_id)
        if step is not None and step >= self.state.position.global_step:
            return
        why = "is missing" if not self.lora_path.exists() else \
            f"holds step {step}" if step is not None else "was not written by this run"
        self.save_lora()
        self.say(f"The LoRA file {why}; re-exported it from the checkpoint of step "
                 f"{self.state.position.global_step}: {self.lora_path}")

    def _keep_step_composition(self, state: dict) -> None:
        """Resuming on another number of processes: keep the batches per optimizer step (and so the
        effective batch, the step count and the schedule) by changing the accumulation per rank."""
        saved = state.get("batches_per_step")
        same_config = state.get("config", {}).get("gradient_accumulation_steps") == \
            self.cfg.gradient_accumulation_steps
        if not saved or saved == self.plan.accumulation or not same_config:
            return
        if saved % self.dist.world_size:
            raise resume_mod.ResumeRefused(
                f"the checkpoint takes {saved} batches per step, which {self.dist.world_size} processes "
                "cannot share evenly; set gradient_accumulation_steps so that gradient_accumulation_steps "
                f"x processes = {saved}, and force the resume (--force-resume; in the tab 'Continue "
                "the run with changed settings')")
        self.plan = dataclasses.replace(self.plan, accumulation=saved)
        self.state.scheduler = build_scheduler(self.state.optimizer, self.cfg.lr_scheduler,
                                               self.cfg.lr_warmup_steps, self.plan.total_steps)
        self.say(f"Checkpoint written by {state.get('world_size', '?')} process(es), resuming on "
                 f"{self.dist.world_size}: gradient accumulation per process is now "
                 f"{saved // self.dist.world_size} so the effective batch stays {self.plan.effective_batch}")

    def _apply_config_learning_rates(self, state: dict) -> None:
        """After --force-resume with a new learning rate, the restored scheduler still holds the old
        base rates; switch them to the config's. Untouched when unchanged (keeps resume bit-exact)."""
        old = state.get("config", {})
        wanted = [self.cfg.learning_rate, self.cfg.text_encoder_lr or self.cfg.learning_rate]
        before = [old.get("learning_rate"), old.get("text_encoder_lr") or old.get("learning_rate")]
        if wanted[:len(self.state.optimizer.param_groups)] == before[:len(self.state.optimizer.param_groups)]:
            return
        factor = self.state.scheduler.lr_lambdas[0](self.state.scheduler.last_epoch)
        for i, group in enumerate(self.state.optimizer.param_groups):
            group["initial_lr"] = wanted[i]
            self.state.scheduler.base_lrs[i] = wanted[i]
            group["lr"] = wanted[i] * factor

    def _run_facts(self) -> dict:
        """What a checkpoint stores about the run beside the training state: what a resume must
        match (base model, data, config) or knows how to adapt to (processes, runtime settings)."""
        return resume_mod.run_facts(self.cfg, self.plan, self.dist.world_size, self.index.manifest_hash(),
                                    self.backbone, self.lora_path)

    # ---- saving ------------------------------------------------------------------------------------
    def save_lora(self, path: Path | None = None) -> Path:
        path = path or self.lora_path
        if not self.dist.is_main:
            return path
        set_aside_foreign_file(path, self.run_dir, self.run_id)
        self.task.export(self, path)
        self.observer.on_lora_saved(path)
        return path

    def save_checkpoint(self) -> Path:
        """The checkpoint first, then the LoRA file: a LoRA write that fails (a read-only or full
        output folder) or a crash between the two loses no training — the resume re-exports a
        LoRA that is missing or older than its checkpoint (_reexport_lora_if_behind)."""
        step = self.state.position.global_step
        path = self.store.path_for(step)
        if self.dist.is_main:
            tensor_files, state = self.state.state_dict()
            state.update(self._run_facts())
            path = self.store.save(step, tensor_files, state)
            self.store.prune(self.cfg.keep_last_n_checkpoints)
            self._export_lora_after_checkpoint(step, path)
            self.observer.on_checkpoint(step, path)
        self.last_checkpoint = path
        self.dist.barrier()  # nobody runs ahead of (or exits before) a save
        return path

    def _export_lora_after_checkpoint(self, step: int, checkpoint: Path) -> None:
        try:
            self.save_lora()
            if self.cfg.save_snapshots and step < self.plan.total_steps:
                self.save_lora(self.task.snapshot_path(step))
        except OSError as error:
            raise LoraWriteFailed(f"could not write the LoRA file in {self.lora_path.parent} "
                                  f"({error.strerror or error}). The training is safe in {checkpoint}: "
                                  "fix the folder (permissions, free space) and start the run again; "
                                  "it resumes there and writes the LoRA.") from error

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        resumed = self._maybe_resume()
        total = self.plan.total_steps
        if resumed and self.state.position.global_step >= total:
            msg = (f"This run already finished at step {self.state.position.global_step}; the LoRA is "
                   f"{self.lora_path}. To train it further, raise max_train_steps (epochs when it "
                   "is not set) and force the resume (--force-resume; in the tab 'Continue the run with changed "
                   "settings'); to train again from scratch, turn resume off (--no-resume).")
            self.say(msg)
            return self._result("already_finished", msg)
        self.say(self.plan.describe_length())
        self._describe_data()
        self.phases.enter("caching")
        if self.dist.is_main:  # rank 0 fills the disk cache once; the others then read it
            self.task.prepare()
        self.dist.barrier()
        self.task.prepare()
        self._release_cached_inputs(announce=True)
        self.phases.enter("steps")
        self.observer.on_start(self._start_info(resumed))
        if self.previewer and not resumed:
            self._preview()
        steps = iterate_steps(self.plan, self.index, self.cfg.seed, self.state.position.epoch,
                              self.state.position.batch_in_epoch, self.batch_keys)
        for step_slice in steps:
            if self.state.position.global_step >= total:
                break
            self._train_step(step_slice)
            if self._after_step():
                break
        return self._finish()

    def _train_step(self, step_slice) -> None:
        t0 = time.perf_counter()
        items = [item for batch in step_slice.batches for item in batch]
        while True:
            try:
                loss_sum = self._accumulate(step_slice, items)
                break
            except Exception as error:  # only out-of-memory is recovered; anything else propagates
                if not is_out_of_memory(error):
                    raise
                self._recover_from_oom(error)
        self.dist.sum_gradients([p for _, p in self.state.named_params])
        loss_sum = self.dist.sum_float(loss_sum, self.backbone.device)
        grad_norm = self._stepped_optimizer()
        self.state.position.global_step += 1
        self.state.position.epoch = step_slice.epoch
        self.state.position.batch_in_epoch = step_slice.first_batch + len(step_slice.batches)
        if self.state.position.batch_in_epoch >= self.plan.batches_per_epoch:
            self.state.position.epoch += 1
            self.state.position.batch_in_epoch = 0
        self.state.position.samples_seen += len(items)
        self.state.last_loss = loss_sum
        self.state.recent_losses.append(loss_sum)
        self.observer.on_step(StepReport(
            step=self.state.position.global_step, total_steps=self.plan.total_steps, epoch=step_slice.epoch,
            loss=loss_sum, lr=self.state.optimizer.param_groups[0]["lr"], grad_norm=grad_norm,
            seconds=time.perf_counter() - t0, samples=len(items)))

    def _accumulate(self, step_slice, items) -> float:
        """Forward/backward over the step's batches in micro-batches of `micro_batch_size`: after
        an OOM the same samples are split finer, so the step's gradient stays the same."""
        loss_sum = 0.0
        for batch in step_slice.batches[self.dist.rank::self.dist.world_size]:
            for start in range(0, len(batch), self.state.micro_batch_size):
                chunk = batch[start:start + self.state.micro_batch_size]
                loss_sum += self._forward_backward(step_slice.epoch, chunk, weight=len(chunk) / len(items))
        return loss_sum

    def _stepped_optimizer(self):
        """The optimizer step. Out of memory here is not a batch-size matter (AdamW allocates two
        fp32 copies of every LoRA weight at its first step): smaller micro-batches would not help,
        so the run stops with the levers that do instead of a bare CUDA error."""
        try:
            return self._optimizer_step()
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            release_failed_step(error, self.backbone.device)
            raise OutOfMemoryStop(oom_advice(self.cfg, "in the optimizer step (its state is allocated "
                                                       "at the first step)", self.task.size_lever())) from error

    def _recover_from_oom(self, error) -> None:
        self.state.optimizer.zero_grad(set_to_none=True)
        release_failed_step(error, self.backbone.device)
        action = next_oom_action(self.state.micro_batch_size, self.cfg.gradient_checkpointing
                                 or self._checkpointing_forced)
        if action == "halve":
            self.state.micro_batch_size //= 2
            self.say(f"Out of memory at step {self.state.position.global_step + 1}: micro-batch halved to "
                     f"{self.state.micro_batch_size} (gradient accumulation doubled; effective batch "
                     f"unchanged). Retrying the step.")
        elif action == "checkpointing":
            self._checkpointing_forced = True
            self.backbone.set_gradient_checkpointing(True)
            self.say("Out of memory at micro-batch 1: gradient checkpointing enabled. Retrying the step.")
        else:
            raise OutOfMemoryStop(oom_advice(self.cfg, size_lever=self.task.size_lever())) from error

    def _forward_backward(self, epoch: int, chunk, weight: float) -> float:
        """Loss of one micro-batch, scaled so the step's gradient is the mean over all its samples
        however the samples are split into micro-batches."""
        loss = self.task.loss(epoch, chunk, self._autocast) * weight
        (self.state.scaler.scale(loss) if self.state.scaler else loss).backward()
        return float(loss.detach())

    def _optimizer_step(self) -> float | None:
        params = [p for _, p in self.state.named_params]
        grad_norm = None
        if self.state.scaler:
            self.state.scaler.unscale_(self.state.optimizer)
        if self.cfg.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        if self.state.scaler:
            self.state.scaler.step(self.state.optimizer)
            self.state.scaler.update()
        else:
            self.state.optimizer.step()
        self.state.scheduler.step()
        self.state.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _after_step(self) -> bool:
        """Checkpoints, previews and stop requests, between steps. Returns True to stop."""
        step, cfg = self.state.position.global_step, self.cfg
        finished = step >= self.plan.total_steps
        save_now = self.dist.any(self.control.save_now.is_set(), self.backbone.device)
        if not finished and ((cfg.save_steps and step % cfg.save_steps == 0) or save_now):
            self.control.save_now.clear()
            self.save_checkpoint()
        if self.previewer and not finished and (
                (cfg.preview_every_n_steps and step % cfg.preview_every_n_steps == 0)
                or self.control.preview_now.is_set()):
            self.control.preview_now.clear()
            self._preview()
        return self.dist.any(self.control.stop.is_set(), self.backbone.device) and not finished

    def _describe_data(self) -> None:
        self.task.describe(self.say, log.warning)

    def _release_cached_inputs(self, announce: bool = False) -> None:
        """Model parts whose outputs are all cached leave memory (a task's optional
        `release_cached_inputs`: the SD task's text encoders / VAE, read back for previews)."""
        release = getattr(self.task, "release_cached_inputs", None)
        parked = release() if release else []
        if announce and parked:
            self.say(f"Cached outputs cover the training: {', '.join(parked)} out of memory until a preview "
                     "needs them (free_text_encoders_after_caching, offload_vae_after_caching)")

    def _preview(self) -> None:
        """Render previews. A failing preview (out of memory at the preview size, a LoRA file a
        prompt names was deleted, a WebUI error) costs its images, never the run: the previewers
        put the model and the RNG back whatever happens, and hours of training go on."""
        with self.phases.during("previews"):
            self._render_previews()
        self._release_cached_inputs()

    def _render_previews(self) -> None:
        step = self.state.position.global_step
        try:
            paths = self.previewer.render(self, step)
        except Exception as error:   # noqa: BLE001 - see the docstring
            if is_out_of_memory(error):
                release_failed_step(error, self.backbone.device)
            message = f"Previews at step {step} failed ({type(error).__name__}: {error}); training goes on."
            log.warning(message)
            log.warning("the preview failure's stack", exc_info=True, extra={"file_only": True})
            self.observer.on_message(message)
            return
        self.observer.on_preview(step, paths)

    def _finish(self) -> TrainResult:
        step, total = self.state.position.global_step, self.plan.total_steps
        if self.last_checkpoint is None or self.last_checkpoint.name != checkpoint_dirname(step):
            self.save_checkpoint()
        if step >= total:
            if self.previewer:
                self._preview()
            result = self._result("finished", f"Finished {step} steps. LoRA: {self.lora_path} "
                                              f"- {self.task.finish_hint()}")
        else:
            result = self._result("stopped", f"Stopped at step {step} of {total} "
                                             f"({self.control.stop_reason}); checkpoint saved. Start the "
                                             "same run again (same command, or Resume) to continue.")
        self.say(result.message)
        self.phases.enter(None)
        self.say(self.phases.describe())
        self.observer.on_end(result)
        return result

    def _result(self, status: str, message: str) -> TrainResult:
        return TrainResult(status, self.state.position.global_step, self.plan.total_steps, self.lora_path,
                           self.run_dir, self.last_checkpoint, message)

    def _start_info(self, resumed: bool) -> dict:
        trainable = sum(p.numel() for _, p in self.state.named_params)
        return {"resumed": resumed, "start_step": self.state.position.global_step,
                "total_steps": self.plan.total_steps, "epochs": self.plan.epochs_to_run,
                "steps_per_epoch": self.plan.steps_per_epoch, "num_images": self.index.num_images,
                "num_samples": self.index.num_samples, "data_unit": self.task.data_unit,
                "effective_batch": self.plan.effective_batch,
                "trainable_parameters": trainable, "lora_layers": len(self.network.adapters),
                "run_dir": str(self.run_dir), "lora_path": str(self.lora_path)}
