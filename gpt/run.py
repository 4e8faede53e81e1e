"""What every training run shares (pretraining and fine-tuning): its directory, the lock that keeps a
second run out of it, the Lightning Trainer with our callbacks and loggers, and metrics.json.

A run directory is runs/<name>/<time>/ (Hydra's run dir); runs/<name>/latest points at the newest one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pickle
import signal
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from gpt.atomic import atomic_file, remove_stale_temps
from gpt.callbacks import (
    ExportingCheckpoint,
    FinalSamples,
    LeanAutocastForLoRA,
    LossCurve,
    SaveOnInterrupt,
    SpeedMonitor,
    progress_callback,
)
from gpt.checkpoint import torch_load, why_unloadable
from gpt.errors import GPTError, is_finite, is_int
from gpt.guard import NonFiniteGuard
from gpt.launch import build, is_launch_rank_zero
from gpt.lit import LanguageModel, lr_decay_steps, quiet_lightning
from gpt.model import GPT
from gpt.report import describe_device, write_report

log = logging.getLogger(__name__)


def hydra_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


class RunLock:
    """One run per directory: a second run pointed at the same directory is refused, not interleaved.

    An flock on run_dir/.lock, so the kernel releases it however the holder ends (SIGKILL included) and no
    stale lock is ever left to guess about. The file holds the holder's pid, for the message. Under data
    parallelism only rank 0 takes it: the other processes of the same launch work in the directory rank 0
    holds, and leave the writing to it.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.fd: Optional[int] = None

    def __enter__(self):
        if not is_launch_rank_zero():
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise GPTError(
                f"another run (pid {holder}) is writing to {self.path.parent}; wait for it or choose "
                "another directory (hydra.run.dir=...)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the file stays (removing it would race a newcomer)
            self.fd = None


def resolve_ckpt_path(ckpt_path: Optional[str], run_dir: Path, max_steps: Optional[int] = None) -> Optional[str]:
    """`last` means the newest last.ckpt among this experiment's earlier runs (siblings of run_dir). A checkpoint
    that has already reached max_steps is refused: the resumed run would train nothing."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        # runs/<name>/latest is a link to one of these runs, not a run: it is about to move to this new one
        candidates = sorted(
            (c for c in run_dir.parent.glob("*/checkpoints/last.ckpt") if not c.parent.parent.is_symlink()),
            key=lambda p: p.stat().st_mtime,
        )
        candidates = [c for c in candidates if c.parent.parent.resolve() != run_dir.resolve()] or candidates
        if not candidates:
            raise GPTError(
                f"ckpt_path=last: no earlier run with checkpoints/last.ckpt under {run_dir.parent}; "
                "pass the path of a .ckpt file"
            )
        ckpt_path = str(candidates[-1])
    if Path(ckpt_path).is_dir():
        raise GPTError(
            f"ckpt_path={ckpt_path} is a directory; resuming needs a Lightning .ckpt file, e.g. "
            f"{Path(ckpt_path).with_suffix('.ckpt')} (or ckpt_path=last)"
        )
    if not Path(ckpt_path).is_file():
        raise GPTError(
            f"ckpt_path={ckpt_path} does not exist; pass a .ckpt from an earlier run's checkpoints/ (or ckpt_path=last)"
        )
    if not zipfile.is_zipfile(ckpt_path):  # torch.save writes zip archives; a cut-off one has no directory
        raise GPTError(
            f"ckpt_path={ckpt_path} is not a whole checkpoint (truncated, or not written by train.py); "
            "resume from another .ckpt, e.g. the run's best.ckpt"
        )
    step = saved_step(ckpt_path)
    if step is not None and max_steps is not None and 0 < max_steps <= step:
        raise GPTError(
            f"ckpt_path={ckpt_path} is already at step {step} and trainer.max_steps={max_steps}: nothing "
            f"is left to train; raise trainer.max_steps to go on (e.g. trainer.max_steps={2 * step})"
        )
    return ckpt_path


def peek_checkpoint(ckpt_path: str) -> Optional[dict]:
    """A Lightning .ckpt memory-mapped (its tensors are not read), None if unreadable here (fit then reports
    what is wrong with the file). A pickle that would run code is refused (never run)."""
    try:
        ckpt = torch_load(ckpt_path, mmap=True)
    except pickle.UnpicklingError as e:
        raise unsafe_checkpoint(ckpt_path, e) from e
    except Exception:
        return None
    return ckpt if isinstance(ckpt, dict) else None


def unsafe_checkpoint(ckpt_path, e: Exception) -> GPTError:
    return GPTError(
        f"{ckpt_path} cannot be loaded safely ({why_unloadable(e)}); it carries code or objects a "
        "checkpoint never holds; only resume from checkpoints written by this tool"
    )


def saved_step(ckpt_path: str) -> Optional[int]:
    """The global step a Lightning .ckpt was saved at, None if unknown."""
    step = (peek_checkpoint(ckpt_path) or {}).get("global_step")
    return step if isinstance(step, int) else None


def resumes_run_in(run_dir: Path, ckpt_path: Optional[str]) -> bool:
    """Whether ckpt_path is a checkpoint of the run in run_dir (resuming it in place)."""
    return bool(ckpt_path) and Path(ckpt_path).resolve().is_relative_to(run_dir.resolve())


def check_run_dir_is_free(run_dir: Path, ckpt_path: Optional[str]) -> None:
    """A directory that holds a finished or interrupted run is only reused to resume that run."""
    if is_launch_rank_zero() and (run_dir / "checkpoints").exists() and not resumes_run_in(run_dir, ckpt_path):
        raise GPTError(
            f"{run_dir} already holds a run's checkpoints; choose a new hydra.run.dir, or resume it with "
            f"ckpt_path={run_dir}/checkpoints/last.ckpt"
        )


def clear_dead_writes(ckpt_path: str) -> None:
    """Remove what a killed run left half-written beside the checkpoint it is resumed from (our exact temporary
    names of the files there, see remove_stale_temps). Called once the resume is accepted: a refused run
    changes nothing on disk."""
    directory = Path(ckpt_path).parent
    for name in sorted(os.listdir(directory)):
        if not name.startswith("."):
            remove_stale_temps(directory, name)


def is_our_link(link: Path) -> bool:
    """runs/<name>/latest as point_latest makes it: a symlink to a sibling run directory's name."""
    if not link.is_symlink():
        return False
    target = os.readlink(link)
    return "/" not in target and target not in (".", "..") and (link.parent / target).is_dir()


def point_latest(run_dir: Path) -> None:
    """runs/<name>/latest -> this run (replaced atomically). Anything else named `latest` (a file, a
    directory, a link to somewhere else) is the user's: it is left alone, and the run says so."""
    link = run_dir.parent / "latest"
    if os.path.lexists(link) and not is_our_link(link):
        log.warning(
            f"{link} is not a link to a run of this experiment (it was not made by train.py); left it as it "
            f"is: the new run is {run_dir}"
        )
        return
    tmp = run_dir.parent / f".latest.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        os.symlink(run_dir.name, tmp)  # fails if the name exists: never replaces anything
    except OSError:  # e.g. a filesystem without symlinks: the timestamped directory is still there
        return
    try:
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, but the W&B run ends with the fit: each run of a Hydra sweep (-m, one
    process) gets its own W&B run instead of appending to the first one."""

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None


def make_loggers(cfg_logger, run_dir: Path) -> list:
    loggers = [CSVLogger(save_dir=str(run_dir), name="", version="")]  # run_dir/metrics.csv, always
    if cfg_logger:
        if cfg_logger.get("_target_", "").endswith("WandbLogger"):
            os.environ.setdefault("WANDB_MODE", "offline")  # nothing leaves the machine unless asked
        loggers.append(build(cfg_logger, save_dir=str(run_dir)))
    return loggers


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's .ckpt writer, made crash-safe: torch.save streams into a temporary file beside the
    target, which is fsynced and renamed over it. A kill or a full disk mid-write leaves the previous
    checkpoint whole (Lightning's own writer buffers everything in memory and moves it via /tmp)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's (fsspec) writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path) as f:
            torch.save(checkpoint, f)


def make_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: list = ()) -> tuple[L.Trainer, SpeedMonitor]:
    """The Trainer from cfg.trainer with what every run needs: last/best checkpoints (+ exported model
    dirs) written atomically, a checkpoint on SIGTERM/Ctrl-C, the NaN guard (cfg.on_nan), tokens/s, loggers,
    the loss curve and, with cfg.log_samples, samples from the final model."""
    quiet_lightning()
    speed = SpeedMonitor()
    checkpoint = ExportingCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="best",
        monitor="val/loss",
        mode="min",
        save_top_k=1,
        save_last=True,
        enable_version_counter=False,
        auto_insert_metric_name=False,
    )
    samples = cfg.get("log_samples")
    if samples and (not is_int(samples.get("n", 0)) or samples.get("n", 0) < 0):
        raise GPTError(f"log_samples.n must be a whole number >= 0 (got {samples.get('n')!r}); 0 = no samples")
    if samples and samples.get("n", 0) > 0:
        extra_callbacks = [*extra_callbacks, FinalSamples(run_dir / "samples.txt", **samples)]
    # The progress bar first: on an exception it ends its line before the others print theirs.
    progress = progress_callback(
        cfg.trainer.get("enable_progress_bar", True),
        cfg.trainer.get("log_every_n_steps", 50),
        cfg.trainer.get("max_steps", -1),
    )
    callbacks = progress + [
        checkpoint,
        speed,
        NonFiniteGuard(cfg.get("on_nan", "stop")),
        SaveOnInterrupt(),
        LossCurve(),
        LeanAutocastForLoRA(),
        *extra_callbacks,
    ]  # before FinalSamples: it samples with the fp32 weights
    try:
        trainer = build(
            cfg.trainer,
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
            logger=make_loggers(cfg.get("logger"), run_dir),
            default_root_dir=str(run_dir),
        )
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, TypeError)):  # Lightning checking the values it was given
            raise GPTError(f"trainer config: {e.__cause__}; fix the trainer.* settings (`--cfg job` shows them)") from e
        raise
    check_launch(trainer)
    for logger in trainer.loggers[1:]:  # the resolved config as the run's hyperparameters (W&B config,
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # TensorBoard hparams); CSV has .hydra/
    return trainer, speed


def check_trainer_settings(t: DictConfig, decay_steps=None) -> None:
    """Checked by each training verb before any data work (and before the Trainer prints its banner).
    What Lightning accepts but cannot mean: a negative clip (it would flip every gradient and train uphill),
    no validation interval, no micro-batch per step, no end for the LR schedule; and a GPU this machine lacks."""
    clip, interval, accumulate = (
        t.get("gradient_clip_val"),
        t.get("val_check_interval"),
        t.get("accumulate_grad_batches"),
    )
    lr_decay_steps(decay_steps, t.get("max_steps"))
    check_accelerator(t)
    if clip is not None and (not is_finite(clip) or clip < 0):
        raise GPTError(f"trainer.gradient_clip_val must be a number >= 0 (got {clip!r}); 0 or null turns clipping off")
    if interval is not None and (not is_finite(interval) or interval <= 0):
        raise GPTError(f"trainer.val_check_interval must be a positive number of steps (got {interval!r})")
    if accumulate is not None and (not is_int(accumulate) or accumulate < 1):
        raise GPTError(f"trainer.accumulate_grad_batches must be an integer >= 1 (got {accumulate!r})")


def check_accelerator(t: DictConfig) -> None:
    """A GPU accelerator this machine lacks: Lightning's own words are "No supported gpu backend found!"."""
    accelerator = str(t.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise GPTError(
            f"trainer.accelerator={accelerator} but torch {torch.__version__} sees no CUDA GPU on this machine; "
            "use trainer=cpu, or install a CUDA build of torch (TORCH_SPEC, README Quick start)"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise GPTError(
            "trainer.accelerator=mps but this PyTorch build or machine has no Apple GPU (MPS); use trainer=cpu"
        )
    if accelerator not in ("auto", "cpu", "gpu", "cuda", "mps"):  # tpu, hpu, ...: other packages this project lacks
        raise GPTError(
            f"trainer.accelerator={accelerator} is not one this project runs on; use cpu, gpu (cuda), mps or auto"
        )


def in_sweep() -> bool:
    """Whether this is one job of a Hydra sweep (-m)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_launch(trainer: L.Trainer) -> None:
    """Lightning's DDP launcher starts the other ranks by re-running this command line; under a Hydra sweep
    (-m) that would start a whole sweep per rank."""
    # Lightning has no public name for "the launcher that re-runs the command line"; its class is private.
    # tests/test_scale.py::test_a_sweep_cannot_launch_ddp_processes fails if it moves or is renamed.
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if (
        isinstance(launcher, _SubprocessScriptLauncher)
        and launcher.num_processes * launcher.num_nodes > 1
        and not launcher.cluster_environment.creates_processes_externally
        and in_sweep()
    ):
        raise GPTError(
            "a Hydra sweep (-m) cannot start DDP processes itself; run each configuration as its own "
            "command, or start the processes with torchrun / srun (see README, Multi-GPU)"
        )


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule=None, ckpt_path: Optional[str] = None) -> None:
    """trainer.fit, reading the .ckpt with weights_only=True (a pickle that carries code is refused, never
    run). A run stopped by SIGTERM or Ctrl-C has saved last.ckpt (SaveOnInterrupt) and exits 128+signal."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise unsafe_checkpoint(ckpt_path, e) from e
    except SIGTERMException:
        stop = next((c for c in trainer.callbacks if isinstance(c, SaveOnInterrupt)), None)
        raise SystemExit(128 + (stop.signum if stop and stop.signum else 15)) from None


def train(
    cfg: DictConfig,
    run_dir: Path,
    model: torch.nn.Module,
    tokenizer,
    datamodule,
    export_fn: Callable[[L.Trainer, Path], Any],
    ckpt_path: Optional[str] = None,
    base: Optional[dict] = None,
    batch_tokens: Optional[int] = None,
    module_cls: type[LanguageModel] = LanguageModel,
    module_kwargs: Optional[dict] = None,
) -> tuple[L.Trainer, dict]:
    """What pretraining and fine-tuning share: the LightningModule around `model` (cfg.optim, cfg.compile),
    the Trainer, the exported directory beside each checkpoint (export_fn(trainer, path)), the fit, and
    the summary every run reports in metrics.json (each verb adds its own keys). base: fine-tuning's record
    of its base model, kept in the checkpoints so that a resume on another base is refused. batch_tokens: see
    summary. module_cls(model, tokenizer, **module_kwargs, ...) is what a step computes: LanguageModel, the
    next-token loss; gpt.preference.PreferenceModel, a loss on preference pairs. A run that stops on SIGTERM,
    Ctrl-C or a NaN still writes metrics.json (with `stopped`) and report.md."""
    module = module_cls(
        model,
        tokenizer,
        **(module_kwargs or {}),
        **OmegaConf.to_container(cfg.optim, resolve=True),
        compile=cfg.get("compile", False),
    )
    module.base = base
    if ckpt_path and (ckpt := peek_checkpoint(ckpt_path)) is not None:
        module.check_resumable(ckpt)  # before the Trainer prints its banner
    trainer, speed = make_trainer(cfg, run_dir)
    if ckpt_path and trainer.is_global_zero:
        clear_dead_writes(ckpt_path)  # e.g. the half-written checkpoint of the killed run
    module.export_fn = lambda path: export_fn(trainer, path)
    if trainer.is_global_zero and not in_sweep():  # a sweep's jobs are numbered dirs of one sweep, not runs of a name
        point_latest(run_dir)
    t0 = time.perf_counter()
    try:
        fit(trainer, module, datamodule=datamodule, ckpt_path=ckpt_path)
    except (SystemExit, GPTError) as e:  # SIGTERM / Ctrl-C (last.ckpt saved) or the NaN guard: an orderly stop
        if trainer.is_global_zero and trainer.global_step > 0:  # metrics.json and report.md of how far it got
            metrics = summary(trainer, speed, time.perf_counter() - t0, batch_tokens, run_dir, ckpt_path)
            params = {"params": model.num_params()} if isinstance(model, GPT) else {}
            try:
                write_metrics(run_dir, {**metrics, **params, **stop_reason(trainer, e)})
            except Exception as again:  # e.g. the full disk that stopped the run: its own error is the one to see
                log.warning("no metrics.json for the stopped run: %s", again)
        raise
    return trainer, summary(trainer, speed, time.perf_counter() - t0, batch_tokens, run_dir, ckpt_path)


def stop_reason(trainer: L.Trainer, e: BaseException) -> dict:
    stop = next((c for c in trainer.callbacks if isinstance(c, SaveOnInterrupt)), None)
    if isinstance(e, SystemExit) and stop is not None and stop.signum:
        last = trainer.checkpoint_callback.last_model_path
        return {"stopped": f"{signal.Signals(stop.signum).name} after step {trainer.global_step}", "last_ckpt": last}
    return {"stopped": str(e)}


def summary(trainer, speed, wall: float, batch_tokens, run_dir: Path, ckpt_path: Optional[str]) -> dict:
    """metrics.json's common part. batch_tokens: tokens of one micro-batch on one rank when every batch holds
    as many (pretraining: tokens seen counts the whole run, a resumed one too); else the tokens counted."""
    val, bpb, ppl = (trainer.callback_metrics.get(f"val/{k}") for k in ("loss", "bpb", "ppl"))  # ppl: next-token loss
    best = trainer.checkpoint_callback.best_model_score
    per_step = batch_tokens and batch_tokens * trainer.accumulate_grad_batches * trainer.world_size
    return {
        "step": trainer.global_step,
        "val_loss": float(val) if val is not None else None,
        "val_ppl": float(ppl) if ppl is not None else None,
        "val_bpb": float(bpb) if bpb is not None else None,
        "best_val_loss": float(best) if best is not None else None,
        "tokens": trainer.global_step * per_step if per_step else speed.tokens,
        "tokens_per_s": round(speed.tokens_per_s, 1),
        "train_seconds": round(speed.seconds, 2),
        "wall_seconds": round(wall, 2),
        "precision": str(trainer.precision),
        "device": describe_device(trainer.strategy.root_device, trainer.world_size),
        "run_dir": str(run_dir),
        "resumed_from": ckpt_path,
        "skipped_steps": skipped_steps(trainer),
    }


def skipped_steps(trainer: L.Trainer) -> int:
    """Optimizer steps the NaN guard skipped (on_nan=skip), for metrics.json."""
    return sum(c.skipped for c in trainer.callbacks if isinstance(c, NonFiniteGuard))


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """metrics.json, then the run's report.md (gpt/report.py) from it and the other files the run wrote."""
    with atomic_file(run_dir / "metrics.json") as f:
        f.write(json.dumps(metrics, indent=2).encode())
    write_report(run_dir)
