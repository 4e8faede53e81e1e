"""The training callbacks every run gets (gpt.run.make_trainer): model-directory export beside Lightning's
checkpoints, a checkpoint on SIGTERM/Ctrl-C, progress (a bar in a terminal, plain lines in a
log), tokens/s and training time, the bf16-held LoRA base, the loss curve and samples from the final model.
The NaN guard is gpt/guard.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gpt.atomic import copy_atomically
from gpt.errors import GPTError, check_seed

log = logging.getLogger(__name__)


def check_not_a_link(path: Path) -> None:
    """A model directory is replaced only at its own path: a symbolic link there (to a folder of the user's,
    say) is refused by name, never written through, and what it points to is never removed."""
    if path.is_symlink():
        raise GPTError(
            f"{path} is a symbolic link (to {os.readlink(path)}); a run writes its model directories only at "
            "their own paths: remove the link, or train into a new run directory"
        )


class ExportingCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (last.ckpt + best by val loss) that also writes an exported model
    directory beside each checkpoint it saves: checkpoints/best.ckpt -> checkpoints/best/."""

    _carried_best: Optional[Path] = None

    def _save_checkpoint(self, trainer: "L.Trainer", filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        module = trainer.lightning_module
        if not trainer.is_global_zero or getattr(module, "export_fn", None) is None:
            return
        check_not_a_link(Path(filepath).with_suffix(""))
        if isinstance(trainer.strategy, FSDPStrategy):
            # No rank holds the whole model (and gathering it is a collective call that rank 0 cannot make
            # alone), but Lightning has just consolidated the full weights into the .ckpt: export those.
            from gpt.checkpoint import load_model, save_model_dir

            if not Path(filepath).is_file():
                raise GPTError(
                    "exporting needs one consolidated checkpoint file: set "
                    "trainer.strategy.state_dict_type=full (configs/trainer/fsdp.yaml does)"
                )
            model, tokenizer = load_model(filepath)
            save_model_dir(model, tokenizer, Path(filepath).with_suffix(""), extra={"step": trainer.global_step})
        else:  # averaging=ema: the averaged weights when they validated better (LanguageModel.exported_weights)
            with getattr(module, "exported_weights", contextlib.nullcontext)():
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
                check_not_a_link(Path(self.best_model_path).with_suffix(""))
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
            log.warning(
                "%s: stopped after step %d; saved %s; resume with ckpt_path=%s (or ckpt_path=last)",
                name,
                trainer.global_step,
                path,
                path,
            )


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


class LineProgress(ProgressBar):
    """The progress bar for logs nobody watches (stdout is a file, a pipe, CI, SLURM): a plain line every
    `every` steps, and at the last step, instead of a carriage-return bar that would pile thousands of
    redraws into one line. It shows what the bar shows (Lightning's progress-bar metrics)."""

    def __init__(self, every: int):
        super().__init__()
        self.every = every
        self._enabled = True
        self._start = 0.0
        self._printed = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def on_train_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, total = trainer.global_step, trainer.max_steps
        if not self.is_enabled or step == self._printed or (step % self.every and step != total):
            return
        self._printed = step
        metrics = self.get_metrics(trainer, pl_module)
        shown = [
            f"{k} {v:,.0f}" if k.endswith("per_s") else f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in metrics.items()
            if k != "v_num"
        ]
        if trainer.optimizers:
            shown.insert(1, f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        of = f"/{total}" if total and total > 0 else ""
        print(" | ".join([f"step {step}{of}", *shown, f"{time.perf_counter() - self._start:.1f} s"]), flush=True)


def progress_callback(enabled: bool, log_every_n_steps: int, max_steps: int) -> list:
    """The interactive bar when stdout is a terminal, plain lines when it is not (about 50 of them a run,
    at a multiple of the logging cadence, where fresh metrics are there to show), nothing when disabled."""
    if not enabled:
        return []
    if sys.stdout.isatty():
        return [StepProgressBar()]
    every = log_every_n_steps * max(1, math.ceil(max(max_steps, 1) / 50 / log_every_n_steps))
    return [LineProgress(every)]


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
        if getattr(pl_module, "logs_now", False):
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
        if (
            type(plugin) is not MixedPrecision
            or isinstance(trainer.strategy, FSDPStrategy)
            or all(p.requires_grad for p in pl_module.parameters())  # pretraining: nothing is frozen
            # full fine-tuning with freeze.*: its exports are whole model directories, which must hold
            # the fp32 weights at every checkpoint, not the held bf16 copies
            or not hasattr(pl_module.model, "peft_config")
        ):
            return
        from peft.helpers import disable_input_dtype_casting

        self.casts.enter_context(disable_input_dtype_casting(pl_module))
        dtype = torch.bfloat16 if plugin.precision == "bf16-mixed" else torch.float16
        shared = {
            id(p)
            for m in pl_module.modules()
            if not isinstance(m, torch.nn.Linear)
            for p in m.parameters(recurse=False)
        }
        for prefix, module in pl_module.named_modules():
            params = list(module.named_parameters(recurse=False))
            if (
                isinstance(module, torch.nn.Linear)
                and params
                and not any(p.requires_grad for _, p in params)
                and all(p.dtype == torch.float32 and id(p) not in shared for _, p in params)
            ):
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

    def __init__(
        self,
        path: Path,
        n: int = 3,
        prompt: str = "\n",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: Optional[int] = 200,
        top_p: Optional[float] = None,
        seed: int = 1337,
    ):
        from gpt.generate import check_sampling_args

        check_sampling_args(max_new_tokens, temperature, top_k, top_p, prefix="log_samples.")
        check_seed(seed, "log_samples.seed")
        self.path, self.n, self.prompt, self.seed = Path(path), n, prompt, seed
        self.args = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)

    def on_fit_start(self, trainer, pl_module):
        # A prompt the model cannot take fails now, not after hours of training.
        from gpt.completions import encode_prompt, unescape

        try:
            n = len(encode_prompt(pl_module.tokenizer, unescape(self.prompt)))
        except GPTError as e:
            raise GPTError(
                f"log_samples.prompt={self.prompt!r}: {e}; or turn samples off with log_samples.n=0"
            ) from None
        if n >= pl_module.gpt_config.block_size:
            raise GPTError(
                f"log_samples.prompt is {n} tokens, too long for the context of "
                f"{pl_module.gpt_config.block_size}; shorten it"
            )

    def on_train_end(self, trainer, pl_module):
        if isinstance(trainer.strategy, FSDPStrategy):  # sharded weights: sample from the exported model instead
            log.info("log_samples: skipped under FSDP; sample from the exported model with sample.py")
            return
        if not trainer.is_global_zero or self.n <= 0:
            return
        from gpt.completions import generate_batch, unescape

        model = pl_module.model
        model = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: adapters stay in
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        prompt = unescape(self.prompt)
        was_training = model.training
        model.eval()
        stance = getattr(torch.compiler, "set_stance", None)  # a compiled model samples eagerly: no recompiles
        try:
            with torch.no_grad(), stance("force_eager") if stance else contextlib.nullcontext():
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
                logger.experiment.add_text(
                    "samples", "\n\n".join("    " + s.replace("\n", "\n    ") for s in samples), step
                )
        log.info("%d samples from the final model: %s", self.n, self.path)
