"""Pretrain a GPT on a corpus through Lightning: `python train.py experiment=shakespeare_char_cpu`.

A run directory (runs/<name>/<time>/, `runs/<name>/latest` points at the newest) receives:
    checkpoints/last.ckpt, best.ckpt   Lightning checkpoints (resume with ckpt_path=...)
    checkpoints/last/, best/           exported model directories (sample.py / finetune.py load these)
    metrics.csv                        every logged value; metrics.json: the run's summary

init_from=<model dir | local Hugging Face GPT-2 dir> continues pretraining from those weights: the model's
shape is the loaded one, and the corpus is tokenized with the loaded model's tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from omegaconf import DictConfig, open_dict

from gpt.checkpoint import CONFIG_FILE, load_model_dir, save_model_dir
from gpt.config import GPTConfig
from gpt.errors import GPTError, check_seed, read_json
from gpt.launch import build
from gpt.memory import check_fits_in_memory
from gpt.model import GPT
from gpt.run import (
    RunLock,
    check_run_dir_is_free,
    check_trainer_settings,
    hydra_run_dir,
    resolve_ckpt_path,
    train,
    write_metrics,
)
from gpt.tokenizer import TOKENIZER_FILE, Tokenizer

log = logging.getLogger(__name__)


def complete_model_config(config: GPTConfig, vocab_size: int) -> GPTConfig:
    if config.vocab_size is None:
        return replace(config, vocab_size=vocab_size)
    if config.vocab_size < vocab_size:
        raise GPTError(
            f"model.vocab_size={config.vocab_size} is smaller than the tokenizer's {vocab_size} tokens; "
            "leave it null to take the tokenizer's"
        )
    if config.vocab_size - vocab_size > 128:  # more than padding to a round size (e.g. 50304 for 50257)
        log.warning(
            "model.vocab_size=%d is larger than the tokenizer's %d tokens: %s embedding rows will never be "
            "used; model.vocab_size=null takes the tokenizer's",
            config.vocab_size,
            vocab_size,
            f"{config.vocab_size - vocab_size:,}",
        )
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

    init = load_init(cfg, run_dir) if cfg.get("init_from") else None  # sets cfg.model and cfg.data's tokenizer
    config: GPTConfig = build(cfg.model)  # shape errors before any data work
    datamodule = build(cfg.data)
    if datamodule.block_size > config.block_size:  # the model has no position embedding past its block_size
        raise GPTError(
            f"data.block_size={datamodule.block_size} is longer than the model's context "
            f"(model.block_size={config.block_size}); raise model.block_size or lower data.block_size"
        )
    tokenizer = datamodule.tokenizer  # builds (or reuses) the token store
    config = complete_model_config(config, tokenizer.vocab_size)
    check_fits_in_memory(config)
    model = GPT(config)
    if init is not None:
        model.load_state_dict(init.state_dict())
    log.info(
        "model: %s layers, %s heads, %s dims, context %s, vocab %s: %.2fM parameters",
        config.n_layer,
        config.n_head,
        config.n_embd,
        config.block_size,
        config.vocab_size,
        model.num_params() / 1e6,
    )

    trainer, metrics = train(
        cfg,
        run_dir,
        model,
        tokenizer,
        datamodule,
        ckpt_path=ckpt_path,
        batch_tokens=datamodule.batch_size * datamodule.block_size,  # metrics.json's tokens: steps x this x ranks
        export_fn=lambda t, path: save_model_dir(
            model, tokenizer, path, extra={"step": t.global_step, "data": datamodule.name}
        ),
    )
    best = run_dir / "checkpoints" / "best"
    metrics.update(params=model.num_params(), best_model=str(best) if best.is_dir() else None)
    if trainer.is_global_zero:
        write_metrics(run_dir, metrics)
        log.info(
            "step %d: val loss %s, %s tokens/s, %.1f s",
            metrics["step"],
            f"{metrics['val_loss']:.4f}" if metrics["val_loss"] is not None else "n/a",
            f"{metrics['tokens_per_s']:,.0f}",
            metrics["wall_seconds"],
        )
        exported = next((d for d in (best, best.with_name("last")) if d.is_dir()), None)
        if exported is not None:
            log.info("exported model: %s", exported)
            log.info("sample from it: python sample.py ckpt=%s", exported)
        else:
            log.info(
                "no model exported: no validation ran (trainer.limit_val_batches=0?) and the run saved no checkpoint"
            )
    return metrics


# ----------------------------------------------------------------------------------------------------
# init_from: start from trained weights

# model settings that do not change what a trained model computes: they may differ from the loaded model's
FREE_MODEL_KEYS = ("dropout", "attn_impl")


def given_overrides() -> dict[str, str]:
    """The command line's key=value overrides (Hydra's), {} when not run through Hydra (tests, a notebook)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return dict(a.lstrip("+~").split("=", 1) for a in HydraConfig.get().overrides.task if "=" in a)


def read_init(path: Path, run_dir: Path) -> tuple[GPT, Tokenizer, Path]:
    """One of our model directories, or a local Hugging Face GPT-2 directory (read by gpt.convert), and the
    tokenizer file the data reads (keyed by its hash in the token cache): the model's own tokenizer.json, or
    for a Hugging Face directory the tokenizer gpt.convert made of it, saved in the run directory."""
    if not path.is_dir():
        raise GPTError(
            f"init_from={path} is not a directory; point at an exported model (a run's checkpoints/best) "
            "or a local Hugging Face GPT-2 directory"
        )
    # a config.json that is not a JSON object (or not JSON) is refused here, in the words load_model_dir uses
    raw = read_json(path / CONFIG_FILE, "re-export the model") if (path / CONFIG_FILE).is_file() else {}
    if raw.get("model_type", "gpt") != "gpt" or "architectures" in raw:
        from gpt.convert import read_hf_dir

        model, tokenizer, _ = read_hf_dir(path)
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(run_dir / "init_tokenizer.json")
        return model, tokenizer, run_dir / "init_tokenizer.json"
    model, tokenizer = load_model_dir(path)
    return model, tokenizer, path / TOKENIZER_FILE


def load_init(cfg: DictConfig, run_dir: Path) -> GPT:
    """The model to start from. Its shape becomes cfg.model and its tokenizer the data's: settings on the command
    line that say otherwise are refused by name (model.dropout and model.attn_impl may change)."""
    path = Path(str(cfg.init_from)).expanduser()
    model, tokenizer, tokenizer_file = read_init(path, run_dir)
    given = given_overrides()
    loaded = model.config.to_dict()
    presets = [k for k in loaded if cfg.model.get(k) is not None] if "model" in given else []  # model=<preset>
    for key in dict.fromkeys([*presets, *(k[len("model.") :] for k in given if k.startswith("model."))]):
        if key in loaded and key not in FREE_MODEL_KEYS and cfg.model.get(key) != loaded[key]:
            drop = f"model.{key}={given[f'model.{key}']}" if f"model.{key}" in given else f"model={given['model']}"
            raise GPTError(
                f"init_from={path} has model.{key}={loaded[key]}, this run asks for {cfg.model.get(key)}; "
                f"the shape comes from the loaded model: drop {drop}"
            )
    for key in ("data.tokenizer", "data.vocab_size", "data.tokenizer_path"):
        if key in given and not (key == "data.tokenizer" and given[key] == "file"):
            if key == "data.tokenizer_path" and Tokenizer.load(given[key]).to_str() == tokenizer.to_str():
                continue  # the model's own tokenizer, named again
            raise GPTError(
                f"init_from={path} brings its own tokenizer and the corpus is tokenized with it; "
                f"drop {key}={given[key]}"
            )
    with open_dict(cfg):
        for key, value in loaded.items():
            if key != "model_type" and key not in FREE_MODEL_KEYS:
                cfg.model[key] = value
        cfg.data.tokenizer, cfg.data.tokenizer_path, cfg.data.vocab_size = "file", str(tokenizer_file), None
    log.info(
        "init_from %s: %s layers, %s heads, %s dims, context %s, vocab %s",
        path,
        model.config.n_layer,
        model.config.n_head,
        model.config.n_embd,
        model.config.block_size,
        model.config.vocab_size,
    )
    return model
