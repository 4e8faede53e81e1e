"""Lightning glue shared by pretraining and fine-tuning: the LightningModule, LR schedule, callbacks.

The training loop, gradient accumulation, clipping, precision, checkpointing and logging are Lightning's
(Trainer flags); this file only says what one step computes and what to save beside each checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy

from gpt.checkpoint import copy_atomically, holds_lora
from gpt.errors import GPTError, check_seed, is_number
from gpt.model import GPTConfig
from gpt.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def quiet_lightning() -> None:
    """Drop Lightning's advertising and warnings that do not apply to how we use it."""
    class _NoTips(logging.Filter):
        def filter(self, record):
            return "Tip:" not in record.getMessage()

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoTips())
    for pattern in (".*IterableDataset.*has `__len__` defined.*",  # one stream per rank, by design
                    ".*Experiment logs directory.*exists and is not empty.*",  # the run dir holds .hydra/
                    ".*isinstance\\(treespec, LeafSpec\\).*",
                    ".*does not have many workers.*",  # memmap batches need no worker processes
                    # Our train stream does resume: it starts at the batch of trainer.global_step (gpt.data).
                    ".*resuming from a checkpoint that ended before the epoch ended.*",
                    ".*when logging on epoch level in distributed setting.*",  # val/loss is all-gathered by hand
                    ".*all_gather is deprecated.*"):  # inside Lightning's all_gather
        warnings.filterwarnings("ignore", message=pattern)


def rng_states() -> dict:
    """Every random generator a training step may draw from (dropout: torch), as plain tensors and tuples so
    a .ckpt holding them still loads with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def writes_logs_now(trainer: "L.Trainer") -> bool:
    """Whether Lightning writes this training step's metrics to the loggers (every trainer.log_every_n_steps).
    Per-step values are logged only then: each self.log is 0.3-0.6 ms of Python (Lightning's profiler), and
    three of them were ~5% of the CPU recipe's 21 ms step. The loggers get the same rows; the progress bar
    shows the latest of them."""
    return trainer._logger_connector.should_update_logs


def lr_multiplier(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at decay_steps, then flat (nanoGPT's schedule)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


def lr_decay_steps(decay_steps, max_steps) -> int:
    """The steps the LR schedule decays over: optim.decay_steps, else trainer.max_steps (which must then end)."""
    steps = decay_steps or max_steps
    if not is_number(steps) or steps <= 0:
        raise GPTError(f"trainer.max_steps must be a positive number of steps (got {max_steps!r}); the LR schedule "
                       "decays over it (or over optim.decay_steps)")
    return steps


class LanguageModel(L.LightningModule):
    """Next-token prediction for any module that maps (input_ids, labels) to a GPTOutput.

    Batches are dicts: input_ids (B, T), labels (B, T) with -100 where no loss is wanted, and optionally
    attention_mask (B, T). Pretraining and LoRA fine-tuning (a PEFT-wrapped GPT) both use this class.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, lr: float = 6e-4, min_lr: float = 6e-5,
                 warmup_steps: int = 100, decay_steps: Optional[int] = None, weight_decay: float = 0.1,
                 betas: tuple = (0.9, 0.95), eps: float = 1e-8, fused: Optional[bool] = None,
                 compile: bool = False, export_fn: Optional[Callable[[Path], None]] = None):
        super().__init__()
        if lr <= 0 or min_lr < 0 or min_lr > lr:
            raise GPTError(f"need 0 <= optim.min_lr <= optim.lr and lr > 0 (got lr={lr}, min_lr={min_lr})")
        if warmup_steps < 0:
            raise GPTError(f"optim.warmup_steps must be >= 0 (got {warmup_steps})")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise GPTError(f"optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.95] (got {list(betas)})")
        if eps <= 0 or weight_decay < 0:
            raise GPTError(f"need optim.eps > 0 and optim.weight_decay >= 0 (got eps={eps}, weight_decay={weight_decay})")
        if decay_steps is not None and decay_steps <= 0:
            raise GPTError(f"optim.decay_steps must be a positive number of steps, or null for trainer.max_steps "
                           f"(got {decay_steps})")
        self.model, self.tokenizer = model, tokenizer
        self.lr, self.min_lr, self.warmup_steps, self.decay_steps = lr, min_lr, warmup_steps, decay_steps
        self.weight_decay, self.betas, self.eps, self.fused = weight_decay, tuple(betas), eps, fused
        self.compile_model = compile
        # How to write an exported model directory beside a checkpoint (set by pretrain / finetune).
        self.export_fn = export_fn
        self._val_sum = self._val_count = self._val_bytes = None
        self._token_bytes: Optional[torch.Tensor] = None  # UTF-8 bytes per token id, for bits per byte
        self._grad_norm: Optional[torch.Tensor] = None
        self._resumed_rng: Optional[dict] = None
        self.base: Optional[dict] = None  # fine-tuning: the base model's record (path, sha256), set by run.train

    @property
    def gpt_config(self):
        """The GPTConfig of the (possibly PEFT-wrapped) model."""
        return self.model.config

    def configure_model(self) -> None:
        if self.compile_model:
            self.model.compile()  # in place: parameter names (and checkpoints) stay the same

    def forward(self, batch: dict):
        return self.model(batch["input_ids"], batch["labels"], attention_mask=batch.get("attention_mask"))

    def on_train_batch_start(self, batch, batch_idx):
        # Resumed: continue the random streams (dropout) where the checkpointed run was. Done here, not in
        # on_load_checkpoint, because Lightning draws from them when it builds the dataloader iterator.
        if self._resumed_rng is not None:
            set_rng_states(self._resumed_rng)
            self._resumed_rng = None

    def training_step(self, batch, batch_idx):
        loss = self(batch).loss
        if writes_logs_now(self.trainer):
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)
        return loss

    def on_validation_epoch_start(self):
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_bytes = torch.zeros((), device=self.device, dtype=torch.float64)
        if self._token_bytes is None or self._token_bytes.device != self.device:
            self._token_bytes = torch.tensor(self.tokenizer.byte_lengths(), device=self.device)

    def validation_step(self, batch, batch_idx):
        loss = self(batch).loss
        labels = batch["labels"]
        target = labels != -100
        n = target.sum()
        # Weighted by tokens, so batches with more answer tokens (fine-tuning) count more.
        self._val_sum += loss.double() * n
        self._val_count += n
        self._val_bytes += (self._token_bytes[labels.clamp(min=0)] * target).sum()

    def on_validation_epoch_end(self):
        total = self.all_gather(torch.stack([self._val_sum, self._val_count, self._val_bytes]))
        if total.dim() > 1:
            total = total.sum(0)
        val_loss = (total[0] / total[1].clamp(min=1)).float()
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(val_loss), sync_dist=False)
        # Bits per byte of text: the loss per token in bits, spread over the bytes the tokens stand for. Unlike
        # the loss per token it does not depend on the tokenizer, so char and BPE models compare on it.
        if total[2] > 0:
            self.log("val/bpb", (total[0] / total[2] / math.log(2)).float(), sync_dist=False)

    def configure_optimizers(self):
        # Weight decay on matrices (Linear weights, embeddings) only; biases and LayerNorm gains are not
        # decayed. Frozen parameters (LoRA's base) are left out entirely.
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise GPTError("no trainable parameters: check the LoRA target modules")
        seen, decay, no_decay = set(), [], []
        for p in params:
            if id(p) in seen:  # tied weights appear once
                continue
            seen.add(id(p))
            (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        device_type = params[0].device.type
        fused = self.fused if self.fused is not None else device_type in ("cuda", "cpu")
        if fused and self.trainer.gradient_clip_val and getattr(self.trainer.precision_plugin, "scaler", None):
            fused = False  # fp16's loss scaling: a fused optimizer unscales inside its step, too late to clip
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps, fused=fused)
        decay_steps = lr_decay_steps(self.decay_steps, self.trainer.max_steps)
        if self.warmup_steps >= decay_steps:
            log.warning("optim.warmup_steps=%d is not below the %d steps the learning rate decays over: it stays in "
                        "warmup, below optim.lr, and never decays (lower optim.warmup_steps)", self.warmup_steps,
                        decay_steps)
        ratio = self.min_lr / self.lr
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, self.warmup_steps, decay_steps, ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_after_backward(self):
        self._grad_norm = None  # the gradients changed

    def grad_norm(self, optimizer) -> Optional[torch.Tensor]:
        """The total L2 norm of the gradients `optimizer` is about to apply (None: no gradients), computed
        once per step: the NaN guard checks it and norm clipping scales by it."""
        if self._grad_norm is None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self._grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None
        return self._grad_norm

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        plugin = self.trainer.precision_plugin
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")  # Lightning's default
        if (type(plugin) in (Precision, MixedPrecision) and getattr(plugin, "scaler", None) is None and gradient_clip_val
                and algorithm == GradClipAlgorithmType.NORM):
            # fp32 or bf16-mixed (no loss scaling: the gradients are true): clip by the norm in one foreach pass
            # (Lightning's clip loops over the tensors in Python on a CPU), and for a fused AdamW too: Lightning's
            # AMP plugin refuses to clip for any fused optimizer, a rule meant for fp16's scaled gradients.
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if params:  # none when the NaN guard dropped this step's gradients
                torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, self.grad_norm(optimizer), foreach=True)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain strings and dicts only, so the .ckpt loads with torch.load(weights_only=True).
        checkpoint["gpt"] = {"config": self.gpt_config.to_dict(), "tokenizer": self.tokenizer.to_str(),
                             "settings": self.resume_settings(), "base": self.base}
        checkpoint["rng"] = rng_states()

    def resume_settings(self) -> dict:
        """The settings a resumed run must share with its checkpoint, by config group: the optimizer's and
        the schedule's (the optimizer state and the schedule's position are restored, so a changed value
        would be dropped or mixed in), and LoRA's (the saved adapter weights have its shapes and scale)."""
        settings = {"optim": {"lr": self.lr, "min_lr": self.min_lr, "warmup_steps": self.warmup_steps,
                              "decay_steps": self.decay_steps, "weight_decay": self.weight_decay,
                              "betas": list(self.betas), "eps": self.eps}}
        peft_config = getattr(self.model, "peft_config", None)
        if peft_config:
            lora = peft_config["default"]
            settings["lora"] = {"rank": lora.r, "alpha": lora.lora_alpha, "targets": sorted(lora.target_modules)}
        return settings

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_resumable(checkpoint)
        self._resumed_rng = checkpoint.get("rng")

    def check_resumable(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of the other verb, another base, model, vocabulary or resume_settings() in one
        line, before Lightning's load_state_dict fails with a page of shape mismatches (or, for the optimizer's
        settings, silently keeps the saved ones). run.train asks before the Trainer
        exists (so before Lightning prints anything); on_load_checkpoint asks again."""
        saved, mine = checkpoint.get("gpt") or {}, self.gpt_config.to_dict()
        saved_lora = holds_lora(checkpoint.get("state_dict") or {})
        if saved_lora != holds_lora(name for name, _ in self.model.named_parameters()):
            raise GPTError("the checkpoint is a LoRA fine-tuning checkpoint: resume it with finetune.py ckpt_path=..."
                           if saved_lora else "the checkpoint is a pretraining checkpoint: finetune.py resumes only its "
                           "own runs; to fine-tune that model, pass base=<its exported directory> (the directory "
                           "beside the .ckpt)")
        base = saved.get("base")
        if base and self.base and base.get("sha256") != self.base.get("sha256"):
            raise GPTError(f"the checkpoint fine-tuned the base {base.get('path')} (weights sha256 "
                           f"{str(base.get('sha256'))[:12]}…), this run's base={self.base['path']} has sha256 "
                           f"{self.base['sha256'][:12]}…; resume with base={base.get('path')}")
        for key, value in GPTConfig.upgrade_dict(saved.get("config") or {}).items():
            if key not in ("dropout", "attn_impl") and mine.get(key) != value:
                raise GPTError(f"the checkpoint was trained with model.{key}={value}, this run has {mine.get(key)} "
                               "(a different model or data config?); resume with the settings it was trained with")
        if saved.get("tokenizer") not in (None, self.tokenizer.to_str()):
            raise GPTError("the checkpoint's tokenizer differs from this run's (another corpus or data.tokenizer?); "
                           "resume with the data settings it was trained with")
        settings = self.resume_settings()
        for group, values in (saved.get("settings") or {}).items():
            for key, value in values.items():
                if (settings.get(group) or {}).get(key, value) != value:
                    raise GPTError(f"the checkpoint was trained with {group}.{key}={value}, this run has "
                                   f"{settings[group][key]}; a resumed run continues its saved optimizer, schedule and "
                                   "weights: resume with the settings it was trained with")


class ExportingCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (last.ckpt + best by val loss) that also writes an exported model
    directory beside each checkpoint it saves: checkpoints/best.ckpt -> checkpoints/best/."""

    _carried_best: Optional[Path] = None

    def _save_checkpoint(self, trainer: "L.Trainer", filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        module = trainer.lightning_module
        if not trainer.is_global_zero or getattr(module, "export_fn", None) is None:
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            # No rank holds the whole model (and gathering it is a collective call that rank 0 cannot make
            # alone), but Lightning has just consolidated the full weights into the .ckpt: export those.
            from gpt.checkpoint import load_model, save_model_dir

            if not Path(filepath).is_file():
                raise GPTError("exporting needs one consolidated checkpoint file: set "
                               "trainer.strategy.state_dict_type=full (configs/trainer/fsdp.yaml does)")
            model, tokenizer = load_model(filepath)
            save_model_dir(model, tokenizer, Path(filepath).with_suffix(""), extra={"step": trainer.global_step})
        else:
            module.export_fn(Path(filepath).with_suffix(""))

    def load_state_dict(self, state_dict: dict) -> None:
        # Resumed into a new run directory (ckpt_path=last): Lightning would forget the best score, making
        # this directory's best.ckpt "the best since the resume". Carry the best over instead: its score
        # now, its files (best.ckpt, best/) when training starts.
        old_dir, best = state_dict.get("dirpath"), state_dict.get("best_model_path")
        if old_dir in (None, self.dirpath) or not best or not Path(best).is_file():
            return super().load_state_dict(state_dict)
        self._carried_best = Path(best)
        self.best_model_score = self.kth_value = state_dict["best_model_score"]
        self.best_model_path = self.kth_best_model_path = os.path.join(self.dirpath, self._carried_best.name)
        self.best_k_models = {self.best_model_path: self.best_model_score}

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        carried, self._carried_best = self._carried_best, None
        if carried is not None:
            if trainer.is_global_zero:
                copy_atomically(carried, Path(self.best_model_path))
                if carried.with_suffix("").is_dir():
                    copy_atomically(carried.with_suffix(""), Path(self.best_model_path).with_suffix(""))
            trainer.strategy.barrier()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Lightning validates (and so saves) every val_check_interval steps only: with a max_steps that is
        # not a multiple of it, the steps after the last validation would be trained and then lost, and a run
        # shorter than one interval would end with no best model at all. Asking the loop to stop at the last
        # step makes Lightning validate there (a stop request always does), and the checkpoints follow.
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True

    def save_last_now(self, trainer: "L.Trainer") -> Path:
        """Write last.ckpt (and last/) now, between validations (on SIGTERM)."""
        path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        self.last_model_path = path
        self._save_checkpoint(trainer, path)
        return Path(path)


class SaveOnInterrupt(Callback):
    """SIGTERM or Ctrl-C: finish the current step, save checkpoints/last.ckpt (+ last/), say where.

    Lightning's SIGTERM handler makes the loop raise SIGTERMException at the next step boundary; a first
    Ctrl-C is re-sent as SIGTERM so it stops the same way and the checkpoint holds whole steps. A second
    Ctrl-C interrupts at once, without saving. gpt.run.fit then exits with status 128 + the signal.
    """

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = None

    def on_train_start(self, trainer, pl_module):
        # Not in setup: Lightning records the handlers after setup and puts them back at teardown.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer, pl_module, stage):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = signal.SIGINT
        log.warning("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once, unsaved)")
        os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer, pl_module, exception):
        self.teardown(trainer, pl_module, "fit")
        if not isinstance(exception, SIGTERMException):
            return  # an error mid-step: the state may be half-updated, so the last good checkpoint stays
        self.signum = self.signum or signal.SIGTERM
        name, ckpt = signal.Signals(self.signum).name, trainer.checkpoint_callback
        if trainer.global_step == 0 or not isinstance(ckpt, ExportingCheckpoint):
            log.warning("%s: stopped before the first optimizer step; nothing to save", name)
            return
        path = ckpt.save_last_now(trainer)
        if trainer.is_global_zero:
            log.warning("%s: stopped after step %d; saved %s; resume with ckpt_path=%s (or ckpt_path=last)",
                        name, trainer.global_step, path, path)


class NonFiniteGuard(Callback):
    """A NaN/Inf training loss or gradient, found before the optimizer applies it (so the weights, and the
    last checkpoint, stay good). on_nan=stop: raise a GPTError naming the step. on_nan=skip: drop that
    optimizer step (no update, no moment change) and count it in train/skipped_steps; stop anyway after
    `max_consecutive_skips` skipped steps in a row, which no longer looks like a passing spike."""

    HINT = ("lower optim.lr, train in fp32 (trainer.precision=32-true) or clip gradients "
            "(trainer.gradient_clip_val=1.0)")

    def __init__(self, action: str = "stop", max_consecutive_skips: int = 50):
        if action not in ("stop", "skip"):
            raise GPTError(f"on_nan must be stop or skip (got {action!r})")
        self.action, self.max_consecutive_skips = action, max_consecutive_skips
        self.skipped = self._in_a_row = 0
        self._bad: Optional[torch.Tensor] = None  # any non-finite micro-batch loss since the last step

    def on_before_backward(self, trainer, pl_module, loss):
        bad = ~torch.isfinite(loss.detach())
        self._bad = bad if self._bad is None else self._bad | bad

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        bad, self._bad = self._bad, None
        # fp16's GradScaler expects inf gradients now and then and skips those steps itself.
        norm = pl_module.grad_norm(optimizer) if getattr(trainer.precision_plugin, "scaler", None) is None else None
        if norm is not None:  # the same norm that clipping then uses
            grad_bad = ~torch.isfinite(norm)
            bad = grad_bad if bad is None else bad | grad_bad
        if bad is None or not bool(bad):  # one device sync per optimizer step
            self._in_a_row = 0
            return
        step = trainer.global_step + 1
        if self.action == "stop" or self._in_a_row + 1 >= self.max_consecutive_skips:
            last = getattr(trainer.checkpoint_callback, "last_model_path", "")
            saved = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
            why, alt = ((f" for {self._in_a_row + 1} steps in a row", "") if self.action == "skip"
                        else ("", ", or set on_nan=skip to skip such steps"))
            raise GPTError(f"non-finite loss or gradients (NaN/Inf) at step {step}{why}; training stopped and "
                           f"{saved}; {self.HINT}{alt}")
        optimizer.zero_grad(set_to_none=True)  # no gradient: AdamW leaves the parameter and its moments alone
        self.skipped += 1
        self._in_a_row += 1
        log.warning("non-finite loss or gradients at step %d: optimizer step skipped (%d so far)", step, self.skipped)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.action == "skip" and writes_logs_now(trainer):
            pl_module.log("train/skipped_steps", float(self.skipped))

    def state_dict(self) -> dict:  # saved in the .ckpt: a resumed run keeps counting
        return {"skipped": self.skipped, "in_a_row": self._in_a_row}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self._in_a_row = state_dict.get("skipped", 0), state_dict.get("in_a_row", 0)


class StepProgressBar(TQDMProgressBar):
    """tqdm bar over optimizer steps, labelled "train" (one long epoch, so epoch numbers say nothing)."""

    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description("train")

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    _drawn = 0.0

    def _should_update(self, current: int, total) -> bool:
        # Redraw at most 10 times a second, and at the end: drawing the bar and its metrics after every step
        # cost ~0.4 ms, 2% of a small model's step on a CPU.
        now = time.monotonic()
        if current != total and now - self._drawn < 0.1:
            return False
        self._drawn = now
        return self.is_enabled

    def on_exception(self, trainer, pl_module, exception):
        # End the bars' line, so that the one-line error (or a traceback) starts on a line of its own.
        for bar in (self._val_progress_bar, self._train_progress_bar):
            if bar is not None and not bar.disable:
                bar.close()


class SpeedMonitor(Callback):
    """Training tokens per second and training seconds: wall clock from one optimizer-step batch to the next
    (data loading included), with the time spent in validation and in writing its checkpoints left out."""

    def __init__(self):
        self.tokens = 0
        self.seconds = 0.0
        self._last = None
        self._validated = False

    def on_train_start(self, trainer, pl_module):
        self._last = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        self._validated = True  # the checkpoint callbacks run after this hook: the clock restarts at the next batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._validated:
            self._last, self._validated = time.perf_counter(), False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        mask = batch.get("attention_mask")  # real tokens only: fine-tuning batches say how many they hold
        n = batch.get("n_tokens") or (int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        n *= trainer.world_size
        self.tokens += n
        self.seconds += dt
        if writes_logs_now(trainer):
            pl_module.log("train/tokens_per_s", n / max(dt, 1e-9), prog_bar=True)
            # Training time so far (this process's: a resumed run counts from its resume), so that the CSV
            # tells how long a run took to reach a val loss, not only after how many steps.
            pl_module.log("train/seconds", self.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class LeanAutocastForLoRA(Callback):
    """Under bf16-mixed (or 16-mixed), two conversions that autocast makes redundant are skipped while fitting
    a model with frozen layers (LoRA's base):

    - The weights of frozen Linear layers are held in the autocast dtype. Autocast converts an fp32 weight at
      every forward and keeps the copy only for weights that require grad, so a frozen base was converted
      again at each step. The fp32 originals are kept, written into every checkpoint in place of the copies,
      and put back when training ends (sampling, merging and export see them). A weight shared with another
      module (the LM head tied to the token embedding) keeps its dtype; FSDP's flat parameters are left alone.
    - PEFT's cast of each LoRA layer's input to the adapter's fp32 (peft.helpers.disable_input_dtype_casting):
      autocast casts it straight back to bf16 for the adapter's matmul, in forward and backward.

    On a 6L/384 LoRA step on a CPU the two took 15% of the time. The matmuls see the same bf16 values either
    way: losses and adapters are bit-identical (with lora.dropout > 0 LoRA's dropout then draws its masks on
    the bf16 input, as every other dropout under autocast does).
    """

    def __init__(self):
        self.held: list[tuple[torch.nn.Module, str, str, torch.nn.Parameter]] = []  # module, attr, state key, fp32
        self.casts = contextlib.ExitStack()

    def on_fit_start(self, trainer, pl_module):
        plugin = trainer.precision_plugin
        if (type(plugin) is not MixedPrecision or isinstance(trainer.strategy, FSDPStrategy)
                or all(p.requires_grad for p in pl_module.parameters())):  # pretraining: nothing is frozen
            return
        from peft.helpers import disable_input_dtype_casting

        self.casts.enter_context(disable_input_dtype_casting(pl_module))
        dtype = torch.bfloat16 if plugin.precision == "bf16-mixed" else torch.float16
        shared = {id(p) for m in pl_module.modules() if not isinstance(m, torch.nn.Linear)
                  for p in m.parameters(recurse=False)}
        for prefix, module in pl_module.named_modules():
            params = list(module.named_parameters(recurse=False))
            if (isinstance(module, torch.nn.Linear) and params and not any(p.requires_grad for _, p in params)
                    and all(p.dtype == torch.float32 and id(p) not in shared for _, p in params)):
                for attr, p in params:
                    self.held.append((module, attr, f"{prefix}.{attr}", p))
                    setattr(module, attr, torch.nn.Parameter(p.detach().to(dtype), requires_grad=False))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        state = checkpoint.get("state_dict", {})
        for _, _, key, original in self.held:
            if key in state:
                state[key] = original.detach()

    def restore(self) -> None:
        for module, attr, _, original in self.held:
            setattr(module, attr, original)
        self.held = []
        self.casts.close()

    def on_train_end(self, trainer, pl_module):
        self.restore()

    def on_exception(self, trainer, pl_module, exception):
        self.restore()


def csv_log_path(trainer: "L.Trainer") -> Optional[Path]:
    """The run's metrics.csv, flushed to disk (Lightning's CSV logger writes it in batches)."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            logger.save()
            return Path(logger.experiment.metrics_file_path)
    return None


class LossCurve(Callback):
    """At the end of fitting, draw loss.png (train/val loss and lr vs step) beside the run's metrics.csv."""

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        path = csv_log_path(trainer)
        if path is None or not path.is_file():
            return
        from gpt.viz import loss_curve  # matplotlib: imported only when a run ends

        try:
            loss_curve(path, path.with_name("loss.png"))
        except GPTError as e:  # e.g. a run stopped before its first logged step: nothing to draw
            log.info("no loss curve: %s", e)
            return
        log.info("loss curve: %s", path.with_name("loss.png"))


class FinalSamples(Callback):
    """At the end of training, sample `n` texts from the final model: written to `path` (samples.txt) and
    logged to the loggers that show text (W&B: a table; TensorBoard: a text panel)."""

    def __init__(self, path: Path, n: int = 3, prompt: str = "\n", max_new_tokens: int = 200,
                 temperature: float = 0.8, top_k: Optional[int] = 200, top_p: Optional[float] = None, seed: int = 1337):
        from gpt.model import check_sampling_args

        check_sampling_args(max_new_tokens, temperature, top_k, top_p, prefix="log_samples.")
        check_seed(seed, "log_samples.seed")
        self.path, self.n, self.prompt, self.seed = Path(path), n, prompt, seed
        self.args = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)

    def on_fit_start(self, trainer, pl_module):
        # A prompt the model cannot take fails now, not after hours of training.
        from gpt.sample import encode_prompt, unescape

        try:
            n = len(encode_prompt(pl_module.tokenizer, unescape(self.prompt)))
        except GPTError as e:
            raise GPTError(f"log_samples.prompt={self.prompt!r}: {e}; or turn samples off with log_samples.n=0") from None
        if n >= pl_module.gpt_config.block_size:
            raise GPTError(f"log_samples.prompt is {n} tokens, too long for the context of "
                           f"{pl_module.gpt_config.block_size}; shorten it")

    def on_train_end(self, trainer, pl_module):
        if isinstance(trainer.strategy, FSDPStrategy):  # sharded weights: sample from the exported model instead
            log.info("log_samples: skipped under FSDP; sample from the exported model with sample.py")
            return
        if not trainer.is_global_zero or self.n <= 0:
            return
        from gpt.sample import generate_batch, unescape

        model = pl_module.model
        model = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: adapters stay in
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        prompt = unescape(self.prompt)
        was_training = model.training
        model.eval()
        stance = getattr(torch.compiler, "set_stance", None)  # a compiled model samples eagerly: no recompiles
        try:
            with torch.no_grad(), (stance("force_eager") if stance else contextlib.nullcontext()):
                texts = generate_batch(model, pl_module.tokenizer, [prompt] * self.n, generator=generator, **self.args)
        except GPTError as e:  # e.g. a diverged model's NaN logits: the run's checkpoints and metrics still count
            log.warning("log_samples: no samples from the final model: %s", e)
            return
        finally:
            model.train(was_training)
        samples = [prompt + t for t in texts]
        self.path.write_text("".join(s + "\n---------------\n" for s in samples), encoding="utf-8")
        step = trainer.global_step
        for logger in trainer.loggers:
            if hasattr(logger, "log_text"):  # W&B
                logger.log_text(key="samples", columns=["step", "sample"], data=[[step, s] for s in samples], step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", "\n\n".join("    " + s.replace("\n", "\n    ") for s in samples), step)
        log.info("%d samples from the final model: %s", self.n, self.path)
