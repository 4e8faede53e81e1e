"""Pretrain a GPT on a corpus through Lightning: `python train.py experiment=shakespeare_char_cpu`.

A run directory (runs/<name>/<time>/, `runs/<name>/latest` points at the newest) receives:
    checkpoints/last.ckpt, best.ckpt   Lightning checkpoints (resume with ckpt_path=...)
    checkpoints/last/, best/           exported model directories (sample.py / finetune.py load these)
    metrics.csv                        every logged value; metrics.json: the run's summary
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from omegaconf import DictConfig

from gpt.checkpoint import save_model_dir
from gpt.launch import build
from gpt.errors import GPTError, check_seed
from gpt.model import GPT, GPTConfig
from gpt.run import (RunLock, check_run_dir_is_free, check_trainer_settings, hydra_run_dir, resolve_ckpt_path, train,
                     write_metrics)

log = logging.getLogger(__name__)


def complete_model_config(config: GPTConfig, vocab_size: int) -> GPTConfig:
    if config.vocab_size is None:
        return replace(config, vocab_size=vocab_size)
    if config.vocab_size < vocab_size:
        raise GPTError(f"model.vocab_size={config.vocab_size} is smaller than the tokenizer's {vocab_size} tokens; "
                       "leave it null to take the tokenizer's")
    if config.vocab_size - vocab_size > 128:  # more than padding to a round size (e.g. 50304 for 50257)
        log.warning("model.vocab_size=%d is larger than the tokenizer's %d tokens: %s embedding rows will never be "
                    "used; model.vocab_size=null takes the tokenizer's", config.vocab_size, vocab_size,
                    f"{config.vocab_size - vocab_size:,}")
    return config


def pretrain(cfg: DictConfig, run_dir: Optional[Path] = None) -> dict:
    run_dir = Path(run_dir) if run_dir is not None else hydra_run_dir()
    with RunLock(run_dir):
        return _pretrain(cfg, run_dir)


def _pretrain(cfg: DictConfig, run_dir: Path) -> dict:
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir, cfg.trainer.get("max_steps"))
    check_run_dir_is_free(run_dir, ckpt_path)
    check_seed(cfg.seed)
    check_trainer_settings(cfg.trainer, cfg.optim.get("decay_steps"))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+ (fp32 master weights stay)

    config: GPTConfig = build(cfg.model)  # shape errors before any data work
    datamodule = build(cfg.data)
    if datamodule.block_size > config.block_size:  # the model has no position embedding past its block_size
        raise GPTError(f"data.block_size={datamodule.block_size} is longer than the model's context "
                       f"(model.block_size={config.block_size}); raise model.block_size or lower data.block_size")
    tokenizer = datamodule.tokenizer  # builds (or reuses) the token store
    config = complete_model_config(config, tokenizer.vocab_size)
    model = GPT(config)
    log.info("model: %s layers, %s heads, %s dims, context %s, vocab %s: %.2fM parameters",
             config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size,
             model.num_params() / 1e6)

    trainer, metrics = train(cfg, run_dir, model, tokenizer, datamodule, ckpt_path=ckpt_path, export_fn=lambda t, path:
                             save_model_dir(model, tokenizer, path, extra={"step": t.global_step, "data": datamodule.name}))
    best = run_dir / "checkpoints" / "best"
    metrics.update(params=model.num_params(), best_model=str(best) if best.is_dir() else None)
    if trainer.is_global_zero:
        write_metrics(run_dir, metrics)
        log.info("step %d: val loss %s, %s tokens/s, %.1f s", metrics["step"],
                 f"{metrics['val_loss']:.4f}" if metrics["val_loss"] is not None else "n/a",
                 f"{metrics['tokens_per_s']:,.0f}", metrics["wall_seconds"])
        exported = next((d for d in (best, best.with_name("last")) if d.is_dir()), None)
        if exported is not None:
            log.info("exported model: %s", exported)
            log.info("sample from it: python sample.py ckpt=%s", exported)
        else:
            log.info("no model exported: no validation ran (trainer.limit_val_batches=0?) and the run saved no "
                     "checkpoint")
    return metrics
