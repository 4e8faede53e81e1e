"""finetune.py's settings checked before any work: the method (lora, full, dpo) and what each allows, scoring's
decoding, MBR and alignment options, the answers' length and stop strings. What the run trains follows from
them (`tuned_weights`), and the preference loss is built once from `dpo.*` (`preference_loss`)."""

from __future__ import annotations

from omegaconf import DictConfig

from gpt.completions import check_decoding, check_stop_strings
from gpt.errors import GPTError, is_int
from gpt.mbr import check_mbr
from gpt.preference import PreferenceLoss
from gpt.run import check_accelerator, check_trainer_settings

METHODS = ("lora", "full", "dpo")
WEIGHTS = ("lora", "full")  # what method=dpo trains (dpo.weights)


def tuned_weights(cfg: DictConfig) -> str:
    """lora (an adapter) or full (the model's own weights): what the run trains."""
    method = cfg.get("method", "lora")
    return (cfg.get("dpo") or {}).get("weights") if method == "dpo" else method


def preference_loss(cfg: DictConfig) -> PreferenceLoss:
    d = cfg.get("dpo") or {}
    return PreferenceLoss(loss=d.get("loss"), beta=d.get("beta"), gamma=d.get("gamma"))


def check_options(cfg: DictConfig) -> None:
    """Settings that would otherwise be ignored, or fail only after the training they follow."""
    method, freeze = cfg.get("method", "lora"), cfg.get("freeze") or {}
    if method not in METHODS:
        raise GPTError(f"method must be one of {list(METHODS)} (got {method!r})")
    if method == "dpo" and tuned_weights(cfg) not in WEIGHTS:
        raise GPTError(
            f"dpo.weights must be one of {list(WEIGHTS)} (got {tuned_weights(cfg)!r}): a LoRA adapter, or every weight"
        )
    if method == "dpo":
        preference_loss(cfg)
        if cfg.get("averaging", "none") != "none":
            raise GPTError("averaging=ema is for next-token training; method=dpo validates one set of weights")
    task_format = cfg.task.get("format")
    if not cfg.eval_only and (method == "dpo") != (task_format == "preference"):
        raise GPTError(
            f"method=dpo trains on preference pairs: use task=preference (rows of prompt, chosen, rejected) or "
            f"another task with format: preference (got task.format={task_format})"
            if method == "dpo"
            else "task.format=preference holds pairs of answers for preference tuning: add method=dpo (a LoRA "
            "adapter; dpo.weights=full trains every weight)"
        )
    if (
        not isinstance(freeze.get("embeddings", False), bool)
        or not is_int(freeze.get("layers", 0))
        or freeze.get("layers", 0) < 0
    ):
        raise GPTError(
            f"freeze.embeddings is true or false and freeze.layers a whole number >= 0 (got "
            f"{freeze.get('embeddings')!r}, {freeze.get('layers')!r})"
        )
    if tuned_weights(cfg) == "lora" and (freeze.get("embeddings") or freeze.get("layers")):
        raise GPTError(
            "freeze.* is for method=full (or method=dpo dpo.weights=full); LoRA already leaves every base weight frozen"
        )
    if tuned_weights(cfg) == "full" and cfg.merge:
        raise GPTError(
            "merge is for LoRA adapters; a full fine-tune writes whole model directories "
            "(sample.py ckpt=<run>/checkpoints/best)"
        )
    if cfg.get("model_dir") and not cfg.eval_only:
        raise GPTError(
            "model_dir= names a fully fine-tuned model directory to score (with eval_only=true); to fine-tune a "
            "model, give it as base=<dir>"
        )
    if cfg.get("model_dir") and cfg.get("adapter"):
        raise GPTError("eval_only scores one thing: give adapter=<adapter dir> or model_dir=<model dir>, not both")
    if cfg.get("model_dir") and cfg.merge:
        raise GPTError("merge=true folds an adapter into its base; model_dir= is already a whole model directory")
    if cfg.eval_only:
        check_accelerator(cfg.trainer)  # scoring runs on it too
        if cfg.get("ckpt_path"):
            raise GPTError(
                "ckpt_path resumes a fine-tuning run; eval_only=true scores an adapter: drop one of them "
                "(adapter=<its checkpoints/best> to score it)"
            )
    else:
        check_trainer_settings(cfg.trainer, cfg.optim.get("decay_steps"))
    if cfg.get("adapter") and not cfg.eval_only:
        raise GPTError(
            "adapter= names an adapter to score (with eval_only=true) or to sample from (sample.py "
            "adapter=...); to go on training one, resume its run with ckpt_path=<its last.ckpt>"
        )
    e = cfg.eval
    nullable = {"max_examples": "the whole valid split", "max_new_tokens": "the task's default"}
    for key in ("batch_size", *nullable):
        value = e.get(key)
        if (value is not None or key not in nullable) and (not is_int(value) or value < 1):
            raise GPTError(
                f"eval.{key} must be a positive integer (got {value!r})"
                + (f"; null = {nullable[key]}" if key in nullable else "")
            )
    check_decoding(
        e.get("num_beams", 1),
        e.get("no_repeat_ngram_size", 0),
        e.get("copy_bonus", 0.0),
        e.get("length_penalty", 1.0),
        e.get("dtype", "auto"),
        prefix="eval.",
    )
    check_mbr(e.mbr, e.mbr_samples, e.mbr_include_source, e.mbr_utility, e.mbr_temperature, prefix="eval.")
    if not is_int(e.alignments) or e.alignments < 0:
        raise GPTError(f"eval.alignments must be a whole number >= 0 (got {e.alignments!r}); 0 = no alignments.png")
    if not all(v is None or is_int(v) for v in (e.alignment_layer, e.alignment_head)):
        raise GPTError(
            f"eval.alignment_layer and eval.alignment_head are layer / head numbers, null for the mean of all (got "
            f"{e.alignment_layer!r}, {e.alignment_head!r})"
        )
    answer = cfg.task.get("max_new_tokens", 128)
    if not is_int(answer) or answer < 1:
        raise GPTError(
            f"task.max_new_tokens must be a positive integer (got {answer!r}): the longest answer scoring generates"
        )
    check_stop_strings(cfg.task.get("stop") or [], "task.stop")
