"""Pretrain a GPT on a corpus through Lightning: `python train.py experiment=shakespeare_char_cpu`.

A run directory (runs/<name>/<time>/, `runs/<name>/latest` points at the newest) receives:
    checkpoints/last.ckpt, best.ckpt   Lightning checkpoints (resume with ckpt_path=...)
    checkpoints/last/, best/           exported model directories (sample.py / finetune.py load these)
    metrics.csv                        every logged value; metrics.json: the run's summary
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from gpt.checkpoint import save_model_dir
from gpt.cli import build
from gpt.errors import GPTError
from gpt.lit import ExportingCheckpoint, LanguageModel, SpeedMonitor, StepProgressBar, quiet_lightning
from gpt.model import GPT, GPTConfig

log = logging.getLogger(__name__)


def hydra_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


class RunLock:
    """One run per directory: a second run pointed at the same directory is refused, not interleaved."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def __enter__(self):
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


def complete_model_config(config: GPTConfig, vocab_size: int) -> GPTConfig:
    if config.vocab_size is None:
        return replace(config, vocab_size=vocab_size)
    if config.vocab_size < vocab_size:
        raise GPTError(f"model.vocab_size={config.vocab_size} is smaller than the tokenizer's {vocab_size} tokens; "
                       "leave it null to take the tokenizer's")
    return config


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
    trainer = build(cfg.trainer, callbacks=[checkpoint, speed, *extra_callbacks]
                          + ([StepProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []),
                          logger=make_loggers(cfg.get("logger"), run_dir), default_root_dir=str(run_dir))
    return trainer, speed


def write_metrics(run_dir: Path, metrics: dict) -> None:
    tmp = run_dir / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, run_dir / "metrics.json")


def pretrain(cfg: DictConfig, run_dir: Optional[Path] = None) -> dict:
    run_dir = Path(run_dir) if run_dir is not None else hydra_run_dir()
    with RunLock(run_dir):
        return _pretrain(cfg, run_dir)


def _pretrain(cfg: DictConfig, run_dir: Path) -> dict:
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    if (run_dir / "checkpoints").exists() and not (ckpt_path and Path(ckpt_path).resolve().is_relative_to(run_dir.resolve())):
        raise GPTError(f"{run_dir} already holds a run's checkpoints; choose a new hydra.run.dir, or resume it with "
                       f"ckpt_path={run_dir}/checkpoints/last.ckpt")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+ (fp32 master weights stay)

    config: GPTConfig = build(cfg.model)  # shape errors before any data work
    datamodule = build(cfg.data)
    tokenizer = datamodule.tokenizer  # builds (or reuses) the token store
    config = complete_model_config(config, tokenizer.vocab_size)
    model = GPT(config)
    log.info("model: %s layers, %s heads, %s dims, context %s, vocab %s: %.2fM parameters",
             config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size,
             model.num_params() / 1e6)

    module = LanguageModel(model, tokenizer, **OmegaConf.to_container(cfg.optim, resolve=True),
                           compile=cfg.get("compile", False))
    trainer, speed = make_trainer(cfg, run_dir)
    module.export_fn = lambda path: save_model_dir(
        module.model, tokenizer, path, extra={"step": trainer.global_step, "data": datamodule.name})
    if trainer.is_global_zero:
        point_latest(run_dir)

    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    wall = time.perf_counter() - t0
    if trainer.interrupted:
        log.info("interrupted at step %d; last checkpoint in %s", trainer.global_step, run_dir / "checkpoints")

    val = trainer.callback_metrics.get("val/loss")
    best = trainer.checkpoint_callback.best_model_score
    metrics = {
        "step": trainer.global_step,
        "val_loss": float(val) if val is not None else None,
        "val_ppl": float(torch.exp(val)) if val is not None else None,
        "best_val_loss": float(best) if best is not None else None,
        "tokens_per_s": round(speed.tokens_per_s, 1),
        "train_seconds": round(speed.seconds, 2),
        "wall_seconds": round(wall, 2),
        "params": model.num_params(),
        "precision": str(trainer.precision),
        "run_dir": str(run_dir),
        "best_model": str(run_dir / "checkpoints" / "best"),
        "resumed_from": ckpt_path,
    }
    if trainer.is_global_zero:
        write_metrics(run_dir, metrics)
        log.info("step %d: val loss %s, %s tokens/s, %.1f s", metrics["step"],
                 f"{metrics['val_loss']:.4f}" if metrics["val_loss"] is not None else "n/a",
                 f"{metrics['tokens_per_s']:,.0f}", wall)
        log.info("exported model: %s", metrics["best_model"])
        log.info("sample from it: python sample.py ckpt=%s", metrics["best_model"])
    return metrics
