"""Scoring a fine-tuned model on its task's validation split.

Greedy generation, batched with the KV cache (`gpt.completions.generate_batch`), for three systems side by
side: the base model without the adapter, the base with the adapter, and the copy-the-input baseline (each
source line returned unchanged). Metrics: corpus BLEU and chrF from `sacrebleu` (translation-like tasks)
and exact match (short-answer tasks), plus the validation loss on the response tokens.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import torch
from peft import PeftModel

from gpt.errors import GPTError
from gpt.lit import LanguageModel, quiet_lightning
from gpt.devices import autocast
from gpt.completions import escape, generate_batch
from gpt.textfiles import write_lines_atomically
from gpt.tasks import TaskDataModule
from gpt.tokenizer import Tokenizer

log = logging.getLogger(__name__)

METRICS = ("loss", "bleu", "chrf", "exact_match")


def check_metrics(metrics: Sequence[str]) -> list[str]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise GPTError(f"unknown task metric {unknown[0]!r}; choose from {list(METRICS)}")
    return list(metrics)


def score(hypotheses: list[str], references: list[str], metrics: Sequence[str]) -> dict:
    """Corpus-level scores with sacrebleu's default settings (13a tokenization, as `sacrebleu -m bleu chrf`)."""
    import sacrebleu

    # The task's text is pre-tokenized ("word ,"); sacrebleu warns about that on every call. The scores are
    # still sacrebleu's defaults, the setting every published figure for this data uses.
    logging.getLogger("sacrebleu").setLevel(logging.ERROR)
    out = {}
    if "bleu" in metrics:
        out["bleu"] = round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2)
    if "chrf" in metrics:
        out["chrf"] = round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2)
    if "exact_match" in metrics:
        hits = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references))
        out["exact_match"] = round(100.0 * hits / max(1, len(references)), 2)
    return out


def validation_loss(model: torch.nn.Module, tokenizer: Tokenizer, datamodule: TaskDataModule,
                    accelerator: str, precision: str) -> float:
    """Token-weighted loss on the valid split's response tokens, through the same LightningModule as
    training (so it is the number training reports as val/loss)."""
    quiet_lightning()
    banner = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = banner.level
    banner.setLevel(logging.WARNING)  # "GPU available: ..." is said by the run, not again for each score
    try:
        trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    finally:
        banner.setLevel(level)
    result = trainer.validate(LanguageModel(model, tokenizer), dataloaders=datamodule.val_dataloader(), verbose=False)
    return round(float(result[0]["val/loss"]), 4)


def generate_responses(model, tokenizer: Tokenizer, prompts: list[str], *, max_new_tokens: int, stops: Sequence[str],
                       batch_size: int, dtype: str, decoding: Optional[dict] = None,
                       sources: Optional[list[str]] = None) -> list[str]:
    """Greedy (or beam search: decoding={"num_beams": 4}) responses, batched with the KV cache. A prompt that
    leaves no room for a response in the model's context gets an empty one (still scored, and counted)."""
    device = next(model.parameters()).device
    block = model.config.block_size
    fits = [i for i, ids in enumerate(tokenizer.encode_batch(prompts)) if len(ids) < block]
    if len(fits) < len(prompts):
        log.warning("%d of %d prompts fill the model's context (%d tokens): their responses are empty",
                    len(prompts) - len(fits), len(prompts), block)
    outs = [""] * len(prompts)
    with autocast(device, dtype):
        done = generate_batch(model, tokenizer, [prompts[i] for i in fits], max_new_tokens=max_new_tokens,
                              temperature=0.0, stops=stops, batch_size=batch_size, strict=False,  # as trained
                              sources=[sources[i] for i in fits] if sources is not None else None,
                              **(decoding or {})) if fits else []
    for i, text in zip(fits, done):
        outs[i] = text.strip()
    return outs


def evaluate_task(model: PeftModel, tokenizer: Tokenizer, datamodule: TaskDataModule, out_dir: Optional[Path] = None,
                  *, max_examples: Optional[int] = None, batch_size: int = 64, max_new_tokens: Optional[int] = None,
                  dtype: str = "float32", accelerator: str = "cpu", precision: str = "32-true",
                  decoding: Optional[dict] = None, systems: Sequence[str] = ("base", "adapter", "copy"),
                  base_model: Optional[torch.nn.Module] = None) -> dict:
    """Scores of each system on the valid split; greedy outputs written to out_dir/valid.<system>.txt.
    "base" is `base_model` when given (full fine-tuning), else `model` with its adapter disabled; "copy" returns
    each input; any other system name is `model` itself ("adapter", "finetuned")."""
    metrics = check_metrics(datamodule.metrics)
    rows = all_rows = datamodule.load_rows()["valid"]
    if max_examples:
        rows = rows[:max_examples]  # generation is the slow part; the loss (teacher-forced) takes them all
    prompts = [datamodule.prompt(r) for r in rows]
    references = [r["output"] for r in rows]
    max_new_tokens = max_new_tokens or datamodule.max_new_tokens
    gen_metrics = [m for m in metrics if m != "loss"]
    model.eval()
    if base_model is not None:
        base_model.eval()
    results: dict[str, dict] = {}
    for system in systems:
        t0 = time.perf_counter()
        entry: dict = {}
        if system == "copy":
            outputs = [r["input"] for r in rows]
        else:
            scored = base_model if system == "base" and base_model is not None else model
            context = model.disable_adapter() if scored is model and system == "base" else contextlib.nullcontext()
            with context:
                if "loss" in metrics:
                    entry["val_loss"] = validation_loss(scored, tokenizer, datamodule, accelerator, precision)
                outputs = generate_responses(scored, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                             stops=datamodule.stop, batch_size=batch_size, dtype=dtype,
                                             decoding=decoding, sources=[r["input"] or r["instruction"] for r in rows]
                                             ) if gen_metrics else []
        entry.update(score(outputs, references, gen_metrics) if gen_metrics else {})
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results[system] = entry
        if out_dir is not None and outputs:
            write_lines_atomically(Path(out_dir) / f"valid.{system}.txt", [escape(o) for o in outputs], True)
    results["examples"] = len(rows)
    kept = len(datamodule.data["valid"])  # the examples the loss was taken on: prompts that leave room for a response
    if "loss" in metrics:
        results["val_loss_examples"] = kept
    loss_note = ("" if "loss" not in metrics or kept == len(rows) else
                 f"; val_loss on all {kept}" if kept == len(all_rows) else f"; val_loss on {kept} of {len(all_rows)}")
    log.info("%s valid (%d examples%s):\n%s", datamodule.name, len(rows), loss_note, format_table(results, systems))
    return results


def format_table(results: dict, systems: Sequence[str]) -> str:
    keys = [k for k in ("val_loss", "bleu", "chrf", "exact_match", "seconds") if any(k in results[s] for s in systems)]
    lines = [f"{'system':<10}" + "".join(f"{k:>12}" for k in keys)]
    for s in systems:
        lines.append(f"{s:<10}" + "".join(f"{results[s][k]:>12}" if k in results[s] else f"{'-':>12}" for k in keys))
    return "\n".join(lines)
