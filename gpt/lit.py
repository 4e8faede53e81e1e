"""Lightning glue shared by pretraining and fine-tuning: the LightningModule, LR schedule, callbacks.

The training loop, gradient accumulation, clipping, precision, checkpointing and logging are Lightning's
(Trainer flags); this file only says what one step computes and what to save beside each checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar

from gpt.errors import GPTError
from gpt.tokenizer import Tokenizer


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
                    ".*does not have many workers.*"):  # memmap batches need no worker processes
        warnings.filterwarnings("ignore", message=pattern)


def lr_multiplier(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at decay_steps, then flat (nanoGPT's schedule)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


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
        self.model, self.tokenizer = model, tokenizer
        self.lr, self.min_lr, self.warmup_steps, self.decay_steps = lr, min_lr, warmup_steps, decay_steps
        self.weight_decay, self.betas, self.eps, self.fused = weight_decay, tuple(betas), eps, fused
        self.compile_model = compile
        # How to write an exported model directory beside a checkpoint (set by pretrain / finetune).
        self.export_fn = export_fn
        self._val_sum = self._val_count = None

    @property
    def gpt_config(self):
        """The GPTConfig of the (possibly PEFT-wrapped) model."""
        return self.model.config

    def configure_model(self) -> None:
        if self.compile_model:
            self.model.compile()  # in place: parameter names (and checkpoints) stay the same

    def forward(self, batch: dict):
        return self.model(batch["input_ids"], batch["labels"], attention_mask=batch.get("attention_mask"))

    def training_step(self, batch, batch_idx):
        loss = self(batch).loss
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)
        return loss

    def on_validation_epoch_start(self):
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch, batch_idx):
        loss = self(batch).loss
        n = (batch["labels"] != -100).sum()
        # Weighted by tokens, so batches with more answer tokens (fine-tuning) count more.
        self._val_sum += loss.double() * n
        self._val_count += n

    def on_validation_epoch_end(self):
        total = self.all_gather(torch.stack([self._val_sum, self._val_count]))
        if total.dim() > 1:
            total = total.sum(0)
        val_loss = (total[0] / total[1].clamp(min=1)).float()
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(val_loss), sync_dist=False)

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
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps, fused=fused)
        decay_steps = self.decay_steps or self.trainer.max_steps
        if not decay_steps or decay_steps <= 0:
            raise GPTError("set trainer.max_steps (or optim.decay_steps) so the LR schedule knows when to end")
        ratio = self.min_lr / self.lr
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, self.warmup_steps, decay_steps, ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain strings and dicts only, so the .ckpt loads with torch.load(weights_only=True).
        checkpoint["gpt"] = {"config": self.gpt_config.to_dict(), "tokenizer": self.tokenizer.to_str()}


class ExportingCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (last.ckpt + best by val loss) that also writes an exported model
    directory beside each checkpoint it saves: checkpoints/best.ckpt -> checkpoints/best/."""

    def _save_checkpoint(self, trainer: "L.Trainer", filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        module = trainer.lightning_module
        if trainer.is_global_zero and getattr(module, "export_fn", None) is not None:
            module.export_fn(Path(filepath).with_suffix(""))


class StepProgressBar(TQDMProgressBar):
    """tqdm bar over optimizer steps, labelled "train" (one long epoch, so epoch numbers say nothing)."""

    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description("train")

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class SpeedMonitor(Callback):
    """Training tokens per second: wall clock from one optimizer-step batch to the next (data loading
    included), with the time spent in validation left out."""

    def __init__(self):
        self.tokens = 0
        self.seconds = 0.0
        self._last = None

    def on_train_start(self, trainer, pl_module):
        self._last = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        mask = batch.get("attention_mask")
        n = (int(mask.sum()) if mask is not None else batch["input_ids"].numel()) * trainer.world_size
        self.tokens += n
        self.seconds += dt
        pl_module.log("train/tokens_per_s", n / max(dt, 1e-9), prog_bar=True)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0
