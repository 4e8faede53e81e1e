"""Lightning glue shared by pretraining and fine-tuning: the LightningModule and its LR schedule (the
callbacks are gpt/callbacks.py; the optimizers, the time budget's clock and weight averaging gpt/optim.py).

The training loop, gradient accumulation, clipping, precision, checkpointing and logging are Lightning's
(Trainer flags); this file only says what one step computes and what to save beside each checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import warnings
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.enums import GradClipAlgorithmType

from gpt.checkpoint import holds_lora
from gpt.config import GPTConfig
from gpt.errors import GPTError, is_finite, is_int
from gpt.optim import TimeBudget, WeightAverage, build_optimizer, check_optimizer_settings, lr_multiplier
from gpt.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def quiet_lightning() -> None:
    """Drop Lightning's advertising and warnings that do not apply to how we use it."""

    class _NoTips(logging.Filter):
        def filter(self, record):
            return "Tip:" not in record.getMessage()

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoTips())
    for pattern in (
        ".*IterableDataset.*has `__len__` defined.*",  # one stream per rank, by design
        ".*Experiment logs directory.*exists and is not empty.*",  # the run dir holds .hydra/
        ".*isinstance\\(treespec, LeafSpec\\).*",
        ".*does not have many workers.*",  # memmap batches need no worker processes
        # Our train stream does resume: it starts at the batch of trainer.global_step (gpt.data).
        ".*resuming from a checkpoint that ended before the epoch ended.*",
        ".*when logging on epoch level in distributed setting.*",  # val/loss is all-gathered by hand
        ".*all_gather is deprecated.*",
    ):  # inside Lightning's all_gather
        warnings.filterwarnings("ignore", message=pattern)


def rng_states() -> dict:
    """Every random generator a training step may draw from (dropout: torch), as plain tensors and tuples so
    a .ckpt holding them still loads with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
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
    """Whether Lightning writes this training step's metrics to the loggers: every trainer.log_every_n_steps
    optimizer steps, counted from 1 (its rule, from public attributes). Ask it before the step, as
    training_step does; callbacks read the answer from the module afterwards (`LanguageModel.logs_now`).
    Per-step values are logged only then: each self.log is 0.3-0.6 ms of Python (Lightning's profiler), and
    three of them were ~5% of the CPU recipe's 21 ms step. The loggers get the same rows; the progress bar
    shows the latest of them."""
    every = trainer.log_every_n_steps
    return every > 0 and ((trainer.global_step + 1) % every == 0 or trainer.should_stop)


def lr_decay_steps(decay_steps, max_steps) -> int:
    """The steps the LR schedule decays over: optim.decay_steps, else trainer.max_steps (which must then end)."""
    steps = decay_steps or max_steps
    if not is_finite(steps) or steps <= 0:
        raise GPTError(
            f"trainer.max_steps must be a positive number of steps (got {max_steps!r}); the LR schedule "
            "decays over it (or over optim.decay_steps)"
        )
    return steps


class LanguageModel(L.LightningModule):
    """Next-token prediction for any module that maps (input_ids, labels) to a GPTOutput.

    Batches are dicts: input_ids (B, T), labels (B, T) with -100 where no loss is wanted, and optionally
    attention_mask (B, T) (or, packed, a (B, 1, T, T) mask with position_ids). Pretraining and fine-tuning
    (a GPT, or a PEFT-wrapped one) all use this class.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        lr: float = 6e-4,
        min_lr: float = 6e-5,
        warmup_steps: int = 100,
        decay_steps: Optional[int] = None,
        weight_decay: float = 0.1,
        betas: tuple = (0.9, 0.95),
        eps: float = 1e-8,
        fused: Optional[bool] = None,
        optimizer: str = "adamw",
        muon_lr: float = 0.02,
        muon_momentum: float = 0.95,
        muon_weight_decay: float = 0.0,
        muon_adjust_lr: str = "original",
        budget_minutes: Optional[float] = None,
        averaging: str = "none",
        ema_decay: float = 0.99,
        compile: bool = False,
        export_fn: Optional[Callable[[Path], None]] = None,
    ):
        super().__init__()
        # is_finite first: NaN passes every range check written as "refuse if x < limit"
        if not (is_finite(lr) and is_finite(min_lr) and 0 < lr and 0 <= min_lr <= lr):
            raise GPTError(
                f"need 0 <= optim.min_lr <= optim.lr and lr > 0, both finite numbers (got lr={lr}, min_lr={min_lr})"
            )
        if not is_int(warmup_steps) or warmup_steps < 0:
            raise GPTError(f"optim.warmup_steps must be a whole number >= 0 (got {warmup_steps!r})")
        if (
            isinstance(betas, (str, bytes))
            or not hasattr(betas, "__len__")
            or len(betas) != 2
            or not all(is_finite(b) and 0.0 <= b < 1.0 for b in betas)
        ):
            raise GPTError(f"optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.95] (got {betas!r})")
        if not (is_finite(eps) and eps > 0 and is_finite(weight_decay) and weight_decay >= 0):
            raise GPTError(
                f"need optim.eps > 0 and optim.weight_decay >= 0, both finite numbers (got eps={eps}, "
                f"weight_decay={weight_decay})"
            )
        if decay_steps is not None and (not is_int(decay_steps) or decay_steps <= 0):
            raise GPTError(
                f"optim.decay_steps must be a positive number of steps, or null for trainer.max_steps "
                f"(got {decay_steps!r})"
            )
        if fused is not None and not isinstance(fused, bool):
            raise GPTError(f"optim.fused is true, false or null (got {fused!r})")
        check_optimizer_settings(
            optimizer, muon_lr, muon_momentum, muon_weight_decay, muon_adjust_lr, budget_minutes, averaging, ema_decay
        )
        self.model, self.tokenizer = model, tokenizer
        self.lr, self.min_lr, self.warmup_steps, self.decay_steps = lr, min_lr, warmup_steps, decay_steps
        self.weight_decay, self.betas, self.eps, self.fused = weight_decay, tuple(betas), eps, fused
        self.optimizer_name = optimizer
        self.muon = {"lr": muon_lr, "momentum": muon_momentum, "weight_decay": muon_weight_decay}
        self.muon["adjust_lr"] = muon_adjust_lr
        self.budget_minutes, self.averaging, self.ema_decay = budget_minutes, averaging, ema_decay
        self.budget = TimeBudget(budget_minutes * 60) if budget_minutes is not None else None
        self.ema: Optional[WeightAverage] = None  # averaging=ema: made in configure_model
        self.export_averaged = False  # whether the exported model is the average (it validated better)
        self._resumed_ema: Optional[dict] = None
        self.compile_model = compile
        # How to write an exported model directory beside a checkpoint (set by pretrain / finetune).
        self.export_fn = export_fn
        self._val_sum = self._val_count = self._val_bytes = self._val_sum_ema = None
        self._token_bytes: Optional[torch.Tensor] = None  # UTF-8 bytes per token id, for bits per byte
        self._grad_norm: Optional[torch.Tensor] = None
        self._resumed_rng: Optional[dict] = None
        self.base: Optional[dict] = None  # fine-tuning: the base model's record (path, sha256), set by run.train

    @property
    def gpt_config(self):
        """The GPTConfig of the (possibly PEFT-wrapped) model."""
        return self.model.config

    def configure_callbacks(self):
        return [self.budget] if self.budget is not None else []

    def configure_model(self) -> None:
        if self.averaging == "ema" and self.ema is None:
            if isinstance(self.trainer.strategy, FSDPStrategy):
                raise GPTError(
                    "averaging=ema needs whole weights on each device; FSDP shards them: use DDP or averaging=none"
                )
            self.ema = WeightAverage(self.model, self.ema_decay)  # before compiling: the copy runs uncompiled
        if self.compile_model:
            self.model.compile()  # in place: parameter names (and checkpoints) stay the same

    def on_fit_start(self) -> None:
        if self.ema is not None:  # the weights are the checkpoint's by now, if resumed
            self.ema.to(self.device)
            self.ema.reset(self.model)
            if self._resumed_ema is not None:
                self.ema.load_state_dict(self._resumed_ema)
                self._resumed_ema = None

    def forward(self, batch: dict, model: Optional[torch.nn.Module] = None):
        extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}  # packed rows
        model = self.model if model is None else model
        return model(batch["input_ids"], batch["labels"], attention_mask=batch.get("attention_mask"), **extra)

    def on_train_batch_start(self, batch, batch_idx):
        # Resumed: continue the random streams (dropout) where the checkpointed run was. Done here, not in
        # on_load_checkpoint, because Lightning draws from them when it builds the dataloader iterator.
        if self._resumed_rng is not None:
            set_rng_states(self._resumed_rng)
            self._resumed_rng = None

    def on_train_start(self) -> None:
        self._ema_step = self.trainer.global_step  # restored by now, if resumed

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None and self.trainer.global_step != self._ema_step:
            self._ema_step = self.trainer.global_step  # once per optimizer step, not per accumulated micro-batch
            self.ema.update(self.model)

    @contextlib.contextmanager
    def exported_weights(self):
        """The weights to export in self.model inside the block: the average when it validated better."""
        if self.ema is not None and self.export_averaged:
            with self.ema.swapped_into(self.model):
                yield
        else:
            yield

    logs_now = False  # whether this step's metrics are logged (writes_logs_now), for the callbacks too

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The loss to minimise on one batch, and what else to log beside it (as train/<key>)."""
        return self(batch).loss, {}

    def training_step(self, batch, batch_idx):
        loss, extra = self.training_loss(batch)
        self.logs_now = writes_logs_now(self.trainer)
        if self.logs_now:
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)
            if extra:
                self.log_dict({f"train/{k}": v for k, v in extra.items()})
        return loss

    def on_validation_epoch_start(self):
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_bytes = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_sum_ema = torch.zeros((), device=self.device, dtype=torch.float64)
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
        if self.ema is not None and self.trainer.state.fn == "fit":
            self._val_sum_ema += self(batch, self.ema.model).loss.double() * n

    def on_validation_epoch_end(self):
        total = self.all_gather(torch.stack([self._val_sum, self._val_count, self._val_bytes, self._val_sum_ema]))
        if total.dim() > 1:
            total = total.sum(0)
        val_loss = (total[0] / total[1].clamp(min=1)).float()
        if self.ema is not None and self.trainer.state.fn == "fit":
            # Both weights validated; val/loss (what picks the best checkpoint) is the loss of the exported ones.
            ema_loss = (total[3] / total[1].clamp(min=1)).float()
            self.export_averaged = bool(ema_loss < val_loss)
            self.log_dict({"val/loss_raw": val_loss, "val/loss_ema": ema_loss}, sync_dist=False)
            self.log("val/exported_ema", float(self.export_averaged), sync_dist=False)
            if self.trainer.is_global_zero:
                which = "averaged" if self.export_averaged else "raw"
                log.info("val loss %.4f raw, %.4f averaged: the %s weights are exported", val_loss, ema_loss, which)
            if self.export_averaged:
                total[0], val_loss = total[3], ema_loss
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(val_loss), sync_dist=False)
        # Bits per byte of text: the loss per token in bits, spread over the bytes the tokens stand for. Unlike
        # the loss per token it does not depend on the tokenizer, so char and BPE models compare on it.
        if total[2] > 0:
            self.log("val/bpb", (total[0] / total[2] / math.log(2)).float(), sync_dist=False)

    def configure_optimizers(self):
        # Weight decay on matrices (Linear weights, embeddings) only; biases and LayerNorm gains are not
        # decayed. Frozen parameters (LoRA's base) are left out entirely. optim=muon: gpt/optim.py.
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise GPTError("no trainable parameters: check the LoRA target modules")
        if self.optimizer_name == "muon" and isinstance(self.trainer.strategy, FSDPStrategy):
            raise GPTError("optim=muon needs whole weight matrices; FSDP flattens them: use DDP or optim=adamw")
        device_type = params[0].device.type
        fused = self.fused if self.fused is not None else device_type in ("cuda", "cpu")
        if fused and self.trainer.gradient_clip_val and getattr(self.trainer.precision_plugin, "scaler", None):
            fused = False  # fp16's loss scaling: a fused optimizer unscales inside its step, too late to clip
        optimizer = build_optimizer(
            self.model,
            self.optimizer_name,
            self.lr,
            self.betas,
            self.eps,
            self.weight_decay,
            fused,
            **{f"muon_{k}": v for k, v in self.muon.items()},
        )
        decay_steps = lr_decay_steps(self.decay_steps, self.trainer.max_steps)
        if self.warmup_steps >= decay_steps:
            log.warning(
                "optim.warmup_steps=%d is not below the %d steps the learning rate decays over: it stays in "
                "warmup, below optim.lr, and never decays (lower optim.warmup_steps)",
                self.warmup_steps,
                decay_steps,
            )
        ratio, budget = self.min_lr / self.lr, self.budget
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(
                step, self.warmup_steps, decay_steps, ratio, budget.spent() if budget is not None else None
            ),
        )
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
        if (
            type(plugin) in (Precision, MixedPrecision)
            and getattr(plugin, "scaler", None) is None
            and gradient_clip_val
            and algorithm == GradClipAlgorithmType.NORM
        ):
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
        checkpoint["gpt"] = {
            "config": self.gpt_config.to_dict(),
            "tokenizer": self.tokenizer.to_str(),
            "settings": self.resume_settings(),
            "base": self.base,
        }
        checkpoint["rng"] = rng_states()
        if self.ema is not None:  # the weights in the checkpoint's state_dict are the raw ones, to resume
            checkpoint["averaged"] = {**self.ema.state_dict(), "exported": self.export_averaged}

    def resume_settings(self) -> dict:
        """The settings a resumed run must share with its checkpoint, by config group: the optimizer's and
        the schedule's (the optimizer state and the schedule's position are restored, so a changed value
        would be dropped or mixed in), and LoRA's (the saved adapter weights have its shapes and scale)."""
        settings = {
            "optim": {
                "lr": self.lr,
                "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps,
                "decay_steps": self.decay_steps,
                "weight_decay": self.weight_decay,
                "betas": list(self.betas),
                "eps": self.eps,
                "optimizer": self.optimizer_name,
                **({f"muon_{k}": v for k, v in self.muon.items()} if self.optimizer_name == "muon" else {}),
            },
            "": {"averaging": self.averaging, **({"ema_decay": self.ema_decay} if self.averaging == "ema" else {})},
        }
        peft_config = getattr(self.model, "peft_config", None)
        if peft_config:
            lora = peft_config["default"]
            settings["lora"] = {"rank": lora.r, "alpha": lora.lora_alpha, "targets": sorted(lora.target_modules)}
        return settings

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_resumable(checkpoint)
        self._resumed_rng = checkpoint.get("rng")
        averaged = checkpoint.get("averaged")
        if averaged is not None and self.averaging == "ema":
            self._resumed_ema, self.export_averaged = averaged, bool(averaged.get("exported"))

    def check_resumable(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of the other verb, another base, model, vocabulary or resume_settings() in one
        line, before Lightning's load_state_dict fails with a page of shape mismatches (or, for the optimizer's
        settings, silently keeps the saved ones). run.train asks before the Trainer
        exists (so before Lightning prints anything); on_load_checkpoint asks again."""
        saved, mine = checkpoint.get("gpt") or {}, self.gpt_config.to_dict()
        base = saved.get("base")
        if base and self.base:  # both fine-tuning: the same method (lora | full | dpo), weights, freezing
            for key, default in (("method", "lora"), ("weights", None), ("freeze", None)):
                if base.get(key, default) != self.base.get(key, default):
                    option = "dpo.weights" if key == "weights" else key
                    raise GPTError(
                        f"the checkpoint was fine-tuned with {option}={base.get(key, default)}, this run has "
                        f"{self.base.get(key, default)}; resume with the settings it was trained with"
                    )
        elif base and not self.base:
            raise GPTError("the checkpoint is a fine-tuning checkpoint: resume it with finetune.py ckpt_path=...")
        elif self.base and not base:
            raise GPTError(
                "the checkpoint is a pretraining checkpoint: finetune.py resumes only its own runs; to "
                "fine-tune that model, pass base=<its exported directory> (the directory beside the .ckpt)"
            )
        saved_lora = holds_lora(checkpoint.get("state_dict") or {})
        if saved_lora != holds_lora(name for name, _ in self.model.named_parameters()):
            raise GPTError(
                "the checkpoint is a LoRA fine-tuning checkpoint: resume it with finetune.py ckpt_path=..."
                if saved_lora
                else "the checkpoint is a pretraining checkpoint: finetune.py resumes only its "
                "own runs; to fine-tune that model, pass base=<its exported directory> (the directory "
                "beside the .ckpt)"
            )
        if base and self.base and base.get("sha256") != self.base.get("sha256"):
            raise GPTError(
                f"the checkpoint fine-tuned the base {base.get('path')} (weights sha256 "
                f"{str(base.get('sha256'))[:12]}…), this run's base={self.base['path']} has sha256 "
                f"{self.base['sha256'][:12]}…; resume with base={base.get('path')}"
            )
        for key, value in GPTConfig.upgrade_dict(saved.get("config") or {}).items():
            if key not in ("dropout", "attn_impl") and mine.get(key) != value:
                raise GPTError(
                    f"the checkpoint was trained with model.{key}={value}, this run has {mine.get(key)} "
                    "(a different model or data config?); resume with the settings it was trained with"
                )
        if saved.get("tokenizer") not in (None, self.tokenizer.to_str()):
            raise GPTError(
                "the checkpoint's tokenizer differs from this run's (another corpus or data.tokenizer?); "
                "resume with the data settings it was trained with"
            )
        settings = self.resume_settings()
        for group, values in (saved.get("settings") or {}).items():
            for key, value in values.items():
                if (settings.get(group) or {}).get(key, value) != value:
                    name = f"{group}.{key}" if group else key
                    raise GPTError(
                        f"the checkpoint was trained with {name}={value}, this run has "
                        f"{settings[group][key]}; a resumed run continues its saved optimizer, schedule and "
                        "weights: resume with the settings it was trained with"
                    )
