"""What every training run shares (pretraining and fine-tuning): its directory, the lock that keeps a
second run out of it, the Lightning Trainer with our callbacks and loggers, and metrics.json.

A run directory is runs/<name>/<time>/ (Hydra's run dir); runs/<name>/latest points at the newest one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from gpt.cli import build, is_launch_rank_zero
from gpt.errors import GPTError
from gpt.lit import ExportingCheckpoint, FinalSamples, LossCurve, SpeedMonitor, StepProgressBar, quiet_lightning


def hydra_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


class RunLock:
    """One run per directory: a second run pointed at the same directory is refused, not interleaved.

    Under data parallelism only rank 0 takes the lock: the other processes of the same launch work in the
    directory rank 0 holds, and leave the writing to it."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.active = is_launch_rank_zero()

    def __enter__(self):
        if not self.active:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                return self
            except FileExistsError:
                try:
                    pid = int(self.path.read_text() or 0)
                    os.kill(pid, 0)  # raises if that process is gone: a stale lock from a killed run
                except (ValueError, ProcessLookupError, PermissionError, FileNotFoundError):
                    self.path.unlink(missing_ok=True)
                    continue
                raise GPTError(f"another run (pid {pid}) is writing to {self.path.parent}; wait for it or choose "
                               "another directory (hydra.run.dir=...)")
        raise GPTError(f"could not lock {self.path.parent}")

    def __exit__(self, *exc):
        if self.active:
            self.path.unlink(missing_ok=True)


def resolve_ckpt_path(ckpt_path: Optional[str], run_dir: Path) -> Optional[str]:
    """`last` means the newest last.ckpt among this experiment's earlier runs (siblings of run_dir)."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        candidates = sorted(run_dir.parent.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        candidates = [c for c in candidates if c.parent.parent.resolve() != run_dir.resolve()] or candidates
        if not candidates:
            raise GPTError(f"ckpt_path=last: no earlier run with checkpoints/last.ckpt under {run_dir.parent}; "
                           "pass the path of a .ckpt file")
        return str(candidates[-1])
    if not Path(ckpt_path).is_file():
        raise GPTError(f"ckpt_path={ckpt_path} does not exist; pass a .ckpt from an earlier run's checkpoints/ "
                       "(or ckpt_path=last)")
    return ckpt_path


def check_run_dir_is_free(run_dir: Path, ckpt_path: Optional[str]) -> None:
    """A directory that holds a finished or interrupted run is only reused to resume that run."""
    if (run_dir / "checkpoints").exists() and not (ckpt_path and Path(ckpt_path).resolve().is_relative_to(run_dir.resolve())):
        raise GPTError(f"{run_dir} already holds a run's checkpoints; choose a new hydra.run.dir, or resume it with "
                       f"ckpt_path={run_dir}/checkpoints/last.ckpt")


def point_latest(run_dir: Path) -> None:
    """runs/<name>/latest -> this run (replaced atomically)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(run_dir.name, tmp)
        os.replace(tmp, link)
    except OSError:  # e.g. a filesystem without symlinks: the timestamped directory is still there
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


def make_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: list = ()) -> tuple[L.Trainer, SpeedMonitor]:
    quiet_lightning()
    speed = SpeedMonitor()
    checkpoint = ExportingCheckpoint(
        dirpath=str(run_dir / "checkpoints"), filename="best", monitor="val/loss", mode="min", save_top_k=1,
        save_last=True, enable_version_counter=False, auto_insert_metric_name=False)
    samples = cfg.get("log_samples")
    if samples and samples.get("n", 0) > 0:
        extra_callbacks = [*extra_callbacks, FinalSamples(run_dir / "samples.txt", **samples)]
    trainer = build(cfg.trainer, callbacks=[checkpoint, speed, LossCurve(), *extra_callbacks]
                          + ([StepProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []),
                          logger=make_loggers(cfg.get("logger"), run_dir), default_root_dir=str(run_dir))
    check_launch(trainer)
    for logger in trainer.loggers[1:]:  # the resolved config as the run's hyperparameters (W&B config,
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # TensorBoard hparams); CSV has .hydra/
    return trainer, speed


def check_launch(trainer: L.Trainer) -> None:
    """Lightning's DDP launcher starts the other ranks by re-running this command line; under a Hydra sweep
    (-m) that would start a whole sweep per rank."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if (isinstance(launcher, _SubprocessScriptLauncher) and launcher.num_processes * launcher.num_nodes > 1
            and not launcher.cluster_environment.creates_processes_externally
            and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        raise GPTError("a Hydra sweep (-m) cannot start DDP processes itself; run each configuration as its own "
                       "command, or start the processes with torchrun / srun (see README, Multi-GPU)")


def write_metrics(run_dir: Path, metrics: dict) -> None:
    tmp = run_dir / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, run_dir / "metrics.json")
