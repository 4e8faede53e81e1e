"""Fine-tuning of an exported base model on a task: `python finetune.py base=<model dir> task=<task>`.

method=lora (the default): the base is wrapped with PEFT (`LoraConfig`, `get_peft_model`) and only the adapter
trains. method=full: the model's own weights train (all of them, or all but freeze.embeddings / the first
freeze.layers blocks). method=dpo: preference tuning on a task of answer pairs (gpt/preference.py), of a LoRA
adapter (dpo.weights=lora) or of the weights (dpo.weights=full). Each way through the same LightningModule,
Trainer, checkpointing and logging as pretraining. A run directory (runs/<name>/<time>/) receives:

    checkpoints/last.ckpt, best.ckpt   Lightning checkpoints (resume with ckpt_path=...)
    checkpoints/last/, best/           lora: adapter directories (gpt/adapter.py): PEFT's files + tokenizer + base
                                       record; full: model directories, as pretraining writes them
    checkpoints/merged/                with merge=true: base + best adapter as one standalone model directory
    valid.{base,adapter,copy}.txt      the scored outputs on the valid split (greedy, beam search or MBR: eval.*)
    alignments.png                     the fine-tuned model's attention on the source of a few valid outputs
    metrics.csv, metrics.json          training log; summary with the evaluation side by side

`eval_only=true adapter=<dir>` scores an existing adapter the same way without training; `eval_only=true
model_dir=<dir>` scores a fully fine-tuned model directory (beside the copy baseline, and the base when base= is given).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from omegaconf import DictConfig

from gpt.adapter import add_lora, base_record, count_parameters, load_adapter, merge, save_adapter_dir
from gpt.checkpoint import ADAPTER_CONFIG_FILE, WEIGHTS_FILE, load_model_dir, save_model_dir
from gpt.errors import GPTError, check_seed
from gpt.evaluate import check_metrics, evaluate_task
from gpt.finetune_options import check_options, preference_loss, tuned_weights
from gpt.launch import build
from gpt.model import GPT
from gpt.preference import PreferenceLoss, preference_module
from gpt.prompts import ChatTemplate, finetuned_record, tokenizer_config
from gpt.run import RunLock, check_run_dir_is_free, hydra_run_dir, resolve_ckpt_path, train, write_metrics
from gpt.tasks import TaskDataModule

log = logging.getLogger(__name__)


def finetune(cfg: DictConfig, run_dir: Optional[Path] = None) -> dict:
    run_dir = Path(run_dir) if run_dir is not None else hydra_run_dir()
    check_options(cfg)
    with RunLock(run_dir):
        return _evaluate_only(cfg, run_dir) if cfg.eval_only else _finetune(cfg, run_dir)


def check_base_dir(base) -> Path:
    if not base:
        raise GPTError(
            "say which model to fine-tune: base=<exported model dir>, e.g. base=runs/<name>/latest/checkpoints/best"
        )
    path = Path(base)
    if (path / ADAPTER_CONFIG_FILE).is_file():
        raise GPTError(
            f"base={base} is a LoRA adapter, not a whole model; fine-tune its base (recorded in "
            f"{path / 'gpt_adapter.json'}), or merge it first (finetune.py eval_only=true merge=true "
            f"adapter={base}) and use the merged model as base"
        )
    if not (path / WEIGHTS_FILE).is_file():
        hint = f" (use the exported directory beside it: {path.with_suffix('')})" if path.suffix == ".ckpt" else ""
        raise GPTError(f"base={base} is not an exported model directory with {WEIGHTS_FILE}{hint}")
    return path


def build_task(
    cfg: DictConfig, tokenizer, block_size: int, base_dir: Optional[Path] = None, **overrides
) -> TaskDataModule:
    chats = cfg.task.get("format") in ("chat", "preference")  # preference: when its pairs are conversations
    if chats and base_dir is not None and "chat_template" not in overrides:
        overrides["chat_template"] = ChatTemplate.for_model(base_dir).jinja  # None: ours (DEFAULT_CHAT_TEMPLATE)
    datamodule = build(cfg.task, tokenizer=tokenizer, block_size=block_size, seed=cfg.seed, **overrides)
    check_metrics(datamodule.metrics)
    datamodule.prepare_data()
    return datamodule


def chat_files(datamodule: TaskDataModule) -> dict:
    """task=chat (or conversation pairs): the chat template trained with, as tokenizer_config.json beside the
    weights (Hugging Face's convention: sample.py chat=true and transformers' apply_chat_template render prompts
    with it)."""
    return {"tokenizer_config.json": tokenizer_config(datamodule.chat.jinja)} if datamodule.uses_chat else {}


def scoring_task(cfg: DictConfig, tokenizer, block_size: int, record: dict) -> TaskDataModule:
    """The task's valid split (eval_only), prompted the way the adapter or model was trained: the template and
    stop strings recorded with it, as sample.py uses them, whatever task config names the files. The train split
    is read only when the valid split is held out of it."""
    trained = {
        k: record["task"][k]
        for k in ("template", "template_no_input", "stop", "chat_template")
        if k in record.get("task", {})
    }
    differs = {k: v for k, v in trained.items() if cfg.task.get(k) != v}
    if differs:
        log.info(
            "scoring with the %s recorded with what is scored (as it was trained), not task.%s",
            ", ".join(f"{k}={v!r}" for k, v in differs.items()),
            "/".join(differs),
        )
    scored, now = record.get("decoding"), decoding(cfg)
    if isinstance(scored, dict) and cfg.eval.enabled and scored != now:
        log.warning(
            "the training run scored this with %s; now eval.%s: its figures will differ (give the training run's "
            "experiment= or those eval.* keys to compare)",
            ", ".join(f"{k}={v}" for k, v in scored.items()),
            ", eval.".join(f"{k}={v}" for k, v in now.items()),
        )
    return build_task(cfg, tokenizer, block_size, **trained, valid_only=True)


def decoding(cfg: DictConfig) -> dict:
    """How eval decodes the valid split; recorded with what a run writes, so that a later eval_only can say
    when it decodes otherwise (its figures would not be the training run's)."""
    e = cfg.eval
    settings = dict(
        num_beams=e.num_beams,
        length_penalty=e.length_penalty,
        no_repeat_ngram_size=e.no_repeat_ngram_size,
        copy_bonus=e.get("copy_bonus", 0.0),
    )
    if e.mbr:  # (recorded only when on: the records of runs without it stay as they were)
        keys = ("mbr", "mbr_samples", "mbr_temperature", "mbr_include_source", "mbr_utility")
        settings.update({k: e[k] for k in keys})
    return settings


def check_alignment_choice(cfg: DictConfig, model) -> None:
    """eval.alignment_layer / alignment_head against the model, before any training (alignments.png comes after)."""
    if cfg.eval.enabled and cfg.eval.alignments:
        from gpt.viz import check_attention_choice  # (matplotlib)

        check_attention_choice(model.config, cfg.eval.alignment_layer, cfg.eval.alignment_head, "eval.alignment_")


def _evaluate(cfg: DictConfig, model, tokenizer, run_dir: Path, datamodule: TaskDataModule, **systems) -> dict:
    e = cfg.eval
    return evaluate_task(
        model,
        tokenizer,
        datamodule,
        run_dir,
        **systems,
        max_examples=e.max_examples,
        batch_size=e.batch_size,
        max_new_tokens=e.max_new_tokens,
        dtype=e.dtype,
        accelerator=cfg.trainer.accelerator,
        precision=cfg.trainer.precision,
        decoding=decoding(cfg),
        seed=cfg.seed,
        alignments={"examples": e.alignments, "layer": e.alignment_layer, "head": e.alignment_head},
        preference=preference_loss(cfg) if datamodule.format == "preference" else None,
    )


def _evaluate_only(cfg: DictConfig, run_dir: Path) -> dict:
    if cfg.get("model_dir"):
        return _evaluate_model_dir(cfg, run_dir)
    if not cfg.get("adapter"):
        raise GPTError(
            "eval_only=true needs adapter=<adapter dir> (a LoRA run's checkpoints/best) or model_dir=<model dir> (a "
            "method=full run's checkpoints/best)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("run directory: %s", run_dir)
    base = Path(cfg.base) if cfg.get("base") else None
    metrics = {"adapter": str(Path(cfg.adapter).resolve())}
    model, tokenizer, record = load_adapter(Path(cfg.adapter), base, base_option="base")
    check_alignment_choice(cfg, model)
    # the task's files are read (and their mistakes found) before anything is written
    datamodule = scoring_task(cfg, tokenizer, model.config.block_size, record) if cfg.eval.enabled else None
    score_and_merge(cfg, model, tokenizer, record, Path(cfg.adapter), run_dir, datamodule, metrics)
    write_metrics(run_dir, metrics)
    return metrics


def _evaluate_model_dir(cfg: DictConfig, run_dir: Path) -> dict:
    """eval_only=true model_dir=<dir>: a fully fine-tuned model directory scored on the task's valid split, prompted
    with the template and stop strings its config.json records, beside the copy baseline (and the base model,
    when base= names one)."""
    model_dir = Path(cfg.model_dir)
    model, tokenizer = load_model_dir(model_dir)
    check_alignment_choice(cfg, model)
    record = finetuned_record(model_dir)
    if record.get("task") is None:
        log.info("%s records no fine-tuning task; scoring it with task.template as configured", model_dir)
    base_model = load_model_dir(check_base_dir(cfg.base))[0] if cfg.get("base") else None
    datamodule = scoring_task(cfg, tokenizer, model.config.block_size, {**record, "task": record.get("task") or {}})
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("run directory: %s", run_dir)
    metrics: dict = {"model": str(model_dir.resolve())}
    if cfg.eval.enabled:
        systems = ("base", "finetuned", "copy") if base_model is not None else ("finetuned", "copy")
        t0 = time.perf_counter()
        metrics.update(
            eval=_evaluate(cfg, model, tokenizer, run_dir, datamodule, base_model=base_model, systems=systems),
            eval_seconds=round(time.perf_counter() - t0, 1),
        )
    write_metrics(run_dir, metrics)
    return metrics


def score_and_merge(
    cfg: DictConfig,
    model,
    tokenizer,
    record: dict,
    adapter_dir: Path,
    run_dir: Path,
    datamodule: Optional[TaskDataModule],
    metrics: dict,
) -> None:
    """The adapter (loaded once) scored on the task (cfg.eval.enabled), then, with cfg.merge, folded into its
    base as checkpoints/merged/: one standalone model directory. Merging changes the model in place, so it
    comes last."""
    if cfg.eval.enabled:
        t0 = time.perf_counter()
        metrics.update(
            eval=_evaluate(cfg, model, tokenizer, run_dir, datamodule), eval_seconds=round(time.perf_counter() - t0, 1)
        )
    if cfg.merge:
        merged = save_model_dir(
            merge(model),
            tokenizer,
            run_dir / "checkpoints" / "merged",
            extra={"merged_from": record["base"], "adapter": str(adapter_dir.resolve())},
        )
        metrics["merged"] = str(merged)
        log.info("merged model: %s", merged)


def _finetune(cfg: DictConfig, run_dir: Path) -> dict:
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir, cfg.trainer.get("max_steps"))
    check_run_dir_is_free(run_dir, ckpt_path)
    check_seed(cfg.seed)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")

    base_dir = check_base_dir(cfg.base)
    preference = preference_loss(cfg) if cfg.method == "dpo" else None
    if tuned_weights(cfg) == "full":
        return _full_finetune(cfg, run_dir, base_dir, ckpt_path, preference)
    lora = build(cfg.lora)  # option errors before any loading
    model, tokenizer = load_model_dir(base_dir)
    check_alignment_choice(cfg, model)
    datamodule = build_task(cfg, tokenizer, model.config.block_size, base_dir)
    peft_model = add_lora(model, lora)
    trainable, total = count_parameters(peft_model)
    log.info(
        "LoRA r=%d alpha=%g on %s: %s trainable of %s parameters (%.2f%%)",
        lora.r,
        lora.lora_alpha,
        ", ".join(sorted(lora.target_modules)),
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )

    record = {"base": base_record(base_dir), "task": datamodule.describe(), "decoding": decoding(cfg)}
    trainer, metrics = train(
        cfg,
        run_dir,
        peft_model,
        tokenizer,
        datamodule,
        ckpt_path=ckpt_path,
        base={**record["base"], **({"method": "dpo", "weights": "lora"} if preference else {})},
        **preference_module(preference, reference=None),
        export_fn=lambda t, path: save_adapter_dir(
            peft_model, tokenizer, path, {**record, "step": t.global_step}, files=chat_files(datamodule)
        ),
    )
    adapter_dir = run_dir / "checkpoints" / "best"
    metrics.update(
        trainable_params=trainable,
        total_params=total,
        data=datamodule.stats,
        adapter=str(adapter_dir) if adapter_dir.is_dir() else None,
    )
    if not trainer.is_global_zero:
        return metrics
    if trainer.interrupted or not adapter_dir.is_dir():
        log.info("stopped at step %d before a best adapter was saved; nothing to evaluate", trainer.global_step)
        write_metrics(run_dir, metrics)
        return metrics
    if cfg.eval.enabled or cfg.merge:  # the best adapter, as saved (the model in memory is the last step's)
        best, tokenizer, saved = load_adapter(adapter_dir, base_dir, base_option="base")
        score_and_merge(cfg, best, tokenizer, saved, adapter_dir, run_dir, datamodule, metrics)
    write_metrics(run_dir, metrics)
    log.info("adapter: %s", adapter_dir)
    log.info('use it: python sample.py adapter=%s prompt="..."', adapter_dir)
    return metrics


# ----------------------------------------------------------------------------------------------------
# Full fine-tuning


def freeze(model: GPT, embeddings: bool = False, layers: int = 0) -> list[str]:
    """Stop the gradients of the embeddings (token and position; with tied embeddings that is the LM head's
    matrix too) and of the first `layers` blocks. Returns the frozen parameter names."""
    if layers > model.config.n_layer:
        raise GPTError(f"freeze.layers={layers} is more than the model's {model.config.n_layer} blocks")
    prefixes = [f"transformer.h.{i}." for i in range(layers)]
    if embeddings:
        prefixes += ["transformer.wte.", "transformer.wpe."]
    frozen = []
    for name, p in model.named_parameters():  # a tied matrix is listed once, as transformer.wte.weight
        if name.startswith(tuple(prefixes)):
            p.requires_grad_(False)
            frozen.append(name)
    if all(not p.requires_grad for p in model.parameters()):
        raise GPTError("freeze.* leaves nothing to train; lower freeze.layers or set freeze.embeddings=false")
    return frozen


def _full_finetune(
    cfg: DictConfig, run_dir: Path, base_dir: Path, ckpt_path: Optional[str], preference: Optional[PreferenceLoss]
) -> dict:
    """The model's own weights train; checkpoints/{best,last} are whole model directories, scored beside the
    base (loaded again, unchanged) and the copy baseline. With `preference` (method=dpo), on pairs against a
    frozen copy of the base."""
    model, tokenizer = load_model_dir(base_dir)
    check_alignment_choice(cfg, model)
    reference = copy.deepcopy(model) if preference is not None and preference.needs_reference else None
    datamodule = build_task(cfg, tokenizer, model.config.block_size, base_dir)
    settings = {"embeddings": bool(cfg.freeze.embeddings), "layers": int(cfg.freeze.layers)}
    frozen = freeze(model, **settings)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "full fine-tuning: %s trainable of %s parameters (%.2f%%)%s",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
        f"; frozen: {len(frozen)} tensors" if frozen else "",
    )
    method = {"method": "dpo", "weights": "full"} if preference else {"method": "full"}
    base = {**base_record(base_dir), **method, "freeze": settings}
    record = {"finetuned_from": base, "task": datamodule.describe(), "decoding": decoding(cfg)}
    trainer, metrics = train(
        cfg,
        run_dir,
        model,
        tokenizer,
        datamodule,
        ckpt_path=ckpt_path,
        base=base,
        **preference_module(preference, reference),
        export_fn=lambda t, path: save_model_dir(
            model, tokenizer, path, extra={**record, "step": t.global_step}, files=chat_files(datamodule)
        ),
    )
    best_dir = run_dir / "checkpoints" / "best"
    metrics.update(
        method=cfg.method,
        trainable_params=trainable,
        total_params=total,
        data=datamodule.stats,
        model=str(best_dir) if best_dir.is_dir() else None,
    )
    if not trainer.is_global_zero:
        return metrics
    if trainer.interrupted or not best_dir.is_dir():
        log.info("stopped at step %d before a best model was saved; nothing to evaluate", trainer.global_step)
    elif cfg.eval.enabled:  # the best model, as saved (the model in memory is the last step's)
        best, _ = load_model_dir(best_dir)
        original, _ = load_model_dir(base_dir)
        t0 = time.perf_counter()
        metrics.update(
            eval=_evaluate(
                cfg, best, tokenizer, run_dir, datamodule, base_model=original, systems=("base", "finetuned", "copy")
            ),
            eval_seconds=round(time.perf_counter() - t0, 1),
        )
    write_metrics(run_dir, metrics)
    if best_dir.is_dir():
        log.info("fine-tuned model: %s", best_dir)
        log.info('use it: python sample.py ckpt=%s prompt="..."', best_dir)
    return metrics
