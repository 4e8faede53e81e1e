"""Scoring models: a fine-tuned model on its task's validation split, and any model on any text in bits per byte.

Task scoring (finetune.py): greedy generation or beam search, batched with the KV cache
(`gpt.completions.generate_batch`; minimum Bayes-risk choices: gpt/mbr.py), for three systems side by side: the
base model without the adapter, the base with the adapter, and the copy-the-input baseline (each source line
returned unchanged). Metrics: corpus BLEU and chrF from `sacrebleu` (translation-like tasks) and exact match
(short-answer tasks), plus the validation loss on the response tokens.

Bits per byte (the command line):

    python -m gpt.evaluate bpb <model> <text file> [--stride N] [--batch-size 8] [--device auto] [--dtype auto]

<model>: one of our model directories or .ckpt files, or a Hugging Face GPT-2 / Llama directory (converted in
memory). Bits per byte is the model's cross-entropy on the text in bits, divided by the text's UTF-8 bytes: a
char model and a BPE model (or an imported one) score on one scale, whatever their vocabularies.

lm-evaluation-harness tasks (gpt/harness.py; docs/evaluation.md):

    python -m gpt.evaluate harness <model> --tasks hellaswag,arc_easy [--limit N] [--include-path DIR] [--output PATH]

<model> may also be a LoRA adapter directory (on its recorded base, or --base). lm-eval's table is printed and
its results are written as JSON (default: <model dir>/lm_eval/results_<time>.json); for a model of a run
(<run dir>/checkpoints/best) the run's report.md is written again with lm-eval's table (gpt/report.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import torch
from peft import PeftModel

from gpt.completions import escape, generate_batch
from gpt.devices import autocast, check_dtype, resolve_device
from gpt.errors import GPTError
from gpt.inference import load_any_model
from gpt.lit import LanguageModel, quiet_lightning
from gpt.mbr import mbr_decode
from gpt.preference import PreferenceLoss, PreferenceModel
from gpt.scoring import bits_per_byte
from gpt.tasks import TaskDataModule
from gpt.textfiles import read_text_file, write_lines_atomically
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


def validation_loss(
    model: torch.nn.Module, tokenizer: Tokenizer, datamodule: TaskDataModule, accelerator: str, precision: str
) -> float:
    """Token-weighted loss on the valid split's response tokens, through the same LightningModule as
    training (so it is the number training reports as val/loss)."""
    return round(validate(LanguageModel(model, tokenizer), datamodule, accelerator, precision)["val/loss"], 4)


def preference_scores(
    model,
    tokenizer: Tokenizer,
    datamodule: TaskDataModule,
    preference: PreferenceLoss,
    reference,
    accelerator: str,
    precision: str,
) -> dict:
    """A preference task's valid pairs through the LightningModule that trained on them: the loss (val/loss in
    training) and the reward accuracy and margin against the reference (`reference`, or the model with its
    adapter disabled)."""
    if preference.needs_reference and reference is None and not hasattr(model, "disable_adapter"):
        log.info("no reward accuracy: dpo's rewards need the reference model (give base=<the model it was tuned from>)")
        return {}
    module = PreferenceModel(model, tokenizer, preference, reference)
    result = validate(module, datamodule, accelerator, precision)
    return {k: round(result[f"val/{m}"], 4) for k, m in PREFERENCE_SCORES.items()}


PREFERENCE_SCORES = {"val_loss": "loss", "reward_accuracy": "reward_accuracy", "reward_margin": "reward_margin"}


def validate(module: LanguageModel, datamodule: TaskDataModule, accelerator: str, precision: str) -> dict:
    """What `module` logs on the valid split (val/...), as floats."""
    quiet_lightning()
    banner = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = banner.level
    banner.setLevel(logging.WARNING)  # "GPU available: ..." is said by the run, not again for each score
    try:
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            precision=precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    finally:
        banner.setLevel(level)
    result = trainer.validate(module, dataloaders=datamodule.val_dataloader(), verbose=False)
    return {k: float(v) for k, v in result[0].items()}


def generate_responses(
    model,
    tokenizer: Tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    stops: Sequence[str],
    batch_size: int,
    dtype: str,
    decoding: Optional[dict] = None,
    sources: Optional[list[str]] = None,
    seed: int = 0,
) -> list[str]:
    """Greedy (or beam search: decoding={"num_beams": 4}) responses, batched with the KV cache; with
    decoding["mbr"], minimum Bayes-risk choices (gpt/mbr.py; its sampled candidates drawn from `seed`). A prompt
    that leaves no room for a response in the model's context gets an empty one (still scored, and counted)."""
    device = next(model.parameters()).device
    block = model.config.block_size
    fits = [i for i, ids in enumerate(tokenizer.encode_batch(prompts)) if len(ids) < block]
    if len(fits) < len(prompts):
        log.warning(
            "%d of %d prompts fill the model's context (%d tokens): their responses are empty",
            len(prompts) - len(fits),
            len(prompts),
            block,
        )
    outs = [""] * len(prompts)
    decoding = dict(decoding or {})
    mbr = {k.removeprefix("mbr_"): decoding.pop(k) for k in list(decoding) if k.startswith("mbr")}
    common = dict(max_new_tokens=max_new_tokens, stops=stops, batch_size=batch_size, strict=False)  # as trained
    kept = [sources[i] for i in fits] if sources is not None else None
    with autocast(device, dtype):
        if not fits:
            done = []
        elif mbr.pop("mbr", False):
            done = mbr_decode(
                model,
                tokenizer,
                [prompts[i] for i in fits],
                sources=kept,
                generator=torch.Generator(device=device).manual_seed(seed),
                **mbr,  # utility, temperature, samples, include_source
                **common,
                **decoding,
            )
        else:
            done = generate_batch(
                model, tokenizer, [prompts[i] for i in fits], temperature=0.0, sources=kept, **common, **decoding
            )
    for i, text in zip(fits, done):
        outs[i] = text.strip()
    return outs


def evaluate_task(
    model: PeftModel,
    tokenizer: Tokenizer,
    datamodule: TaskDataModule,
    out_dir: Optional[Path] = None,
    *,
    max_examples: Optional[int] = None,
    batch_size: int = 64,
    max_new_tokens: Optional[int] = None,
    dtype: str = "float32",
    accelerator: str = "cpu",
    precision: str = "32-true",
    decoding: Optional[dict] = None,
    systems: Sequence[str] = ("base", "adapter", "copy"),
    base_model: Optional[torch.nn.Module] = None,
    seed: int = 0,
    alignments: Optional[dict] = None,
    preference: Optional[PreferenceLoss] = None,
) -> dict:
    """Scores of each system on the valid split; greedy outputs written to out_dir/valid.<system>.txt.
    "base" is `base_model` when given (full fine-tuning), else `model` with its adapter disabled; "copy" returns
    each input; any other system name is `model` itself ("adapter", "finetuned"). alignments ({"examples": n,
    "layer": l, "head": h}, n > 0): out_dir/alignments.png, `model`'s attention on the source of its first n
    outputs (gpt.viz.alignment_map). A preference task (`preference`: its loss) scores its "loss" metric as the
    pairs' loss, reward accuracy and margin of `model` against the base (the base against itself has loss log 2
    and no margin by definition: not scored); generation answers each prompt and is scored against its chosen
    answer."""
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
                if "loss" in metrics and preference is not None:
                    if system != "base":
                        entry.update(
                            preference_scores(
                                scored, tokenizer, datamodule, preference, base_model, accelerator, precision
                            )
                        )
                elif "loss" in metrics:
                    entry["val_loss"] = validation_loss(scored, tokenizer, datamodule, accelerator, precision)
                outputs = (
                    generate_responses(
                        scored,
                        tokenizer,
                        prompts,
                        max_new_tokens=max_new_tokens,
                        stops=datamodule.stop,
                        batch_size=batch_size,
                        dtype=dtype,
                        decoding=decoding,
                        sources=[r["input"] or r["instruction"] for r in rows],
                        seed=seed,
                    )
                    if gen_metrics
                    else []
                )
        entry.update(score(outputs, references, gen_metrics) if gen_metrics else {})
        if system not in ("base", "copy") and (decoding or {}).get("mbr_include_source") and outputs:
            entry["mbr_chose_source"] = sum(
                o == (r["input"] or r["instruction"]).strip() for o, r in zip(outputs, rows)
            )
        if system not in ("base", "copy") and out_dir is not None and outputs and (alignments or {}).get("examples"):
            draw_alignments(model, tokenizer, datamodule, rows, outputs, Path(out_dir) / "alignments.png", alignments)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results[system] = entry
        if out_dir is not None and outputs:
            write_lines_atomically(Path(out_dir) / f"valid.{system}.txt", [escape(o) for o in outputs], True)
    results["examples"] = len(rows)
    kept = len(datamodule.data["valid"])  # the examples the loss was taken on: prompts that leave room for a response
    if "loss" in metrics:
        results["val_loss_examples"] = kept
    loss_note = (
        ""
        if "loss" not in metrics or kept == len(rows)
        else f"; val_loss on all {kept}"
        if kept == len(all_rows)
        else f"; val_loss on {kept} of {len(all_rows)}"
    )
    log.info("%s valid (%d examples%s):\n%s", datamodule.name, len(rows), loss_note, format_table(results, systems))
    return results


def draw_alignments(model, tokenizer, datamodule, rows, outputs, path: Path, alignments: dict) -> None:
    """alignments.png: the first alignments["examples"] valid rows whose prompt leaves room for an output, each
    output's attention on the source line inside its prompt (the whole prompt for a chat task)."""
    from gpt.viz import alignment_map

    block = model.config.block_size
    picked = []
    for row, output in zip(rows, outputs):
        prompt = datamodule.prompt(row)
        if len(picked) < alignments["examples"] and (row["input"] or row["instruction"]).strip():
            if len(tokenizer.encode(prompt)) < block:  # (a prompt that fills the context has no output)
                picked.append((prompt, output, datamodule.source_span(row)))
    if picked:
        alignment_map(model, tokenizer, picked, path, layer=alignments["layer"], head=alignments["head"])
        log.info("alignments of %d valid outputs on their source: %s", len(picked), path)


def format_table(results: dict, systems: Sequence[str]) -> str:
    columns = ("val_loss", *list(PREFERENCE_SCORES)[1:], "bleu", "chrf", "exact_match", "seconds")
    keys = [k for k in columns if any(k in results[s] for s in systems)]
    width = {k: max(12, len(k) + 2) for k in keys}
    lines = [f"{'system':<10}" + "".join(f"{k:>{width[k]}}" for k in keys)]
    for s in systems:
        lines.append(f"{s:<10}" + "".join(f"{results[s].get(k, '-'):>{width[k]}}" for k in keys))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Bits per byte of any text


@torch.no_grad()
def check_options(args) -> None:
    """Values that would silently mean something else (0 read as "the default", "" as the working directory)
    are refused, each by name."""
    for option, value, unit in (
        ("--stride", args.stride, "tokens (the window step; leave it out for a whole context)"),
        ("--batch-size", args.batch_size, "windows per forward pass"),
        ("--limit", args.limit, "characters (leave it out to score the whole text)"),
    ):
        if value is not None and value <= 0:
            raise GPTError(f"{option} must be a positive number of {unit} (got {value})")
    for name in ("model", "text"):
        if not getattr(args, name):
            raise GPTError(f"the {name} argument is empty (it would name the working directory); give a path")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", args.device):
        raise GPTError(f"--device must be auto, cpu, cuda, cuda:N or mps (got {args.device!r})")


def main(argv: Optional[list[str]] = None) -> None:
    from gpt.cli import fail, user_errors

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # argparse's usage + error block -> our one `error:` line, exit status 2
            fail(f"{message}; see `{self.prog} --help`")

    parser = Parser(
        prog="python -m gpt.evaluate",
        description=__doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{bpb,harness}")
    bpb = verbs.add_parser("bpb", help="bits per byte of a model on a text file")
    bpb.add_argument("model", help="a model directory or .ckpt of ours, or a Hugging Face GPT-2 / Llama directory")
    bpb.add_argument("text", help="a UTF-8 text file, scored as one document")
    bpb.add_argument(
        "--stride",
        type=int,
        default=None,
        help="window step in tokens (default: the model's context; smaller: more context per token)",
    )
    bpb.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    bpb.add_argument("--limit", type=int, default=None, help="score only the first N characters of the text")
    bpb.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    bpb.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    bpb.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_harness_parser(verbs)
    args = parser.parse_args(argv)
    if args.verb == "harness":
        with user_errors():
            return harness_main(args)
    with user_errors():
        check_options(args)
        check_dtype(args.dtype, "--")
        device = resolve_device(args.device)
        text = read_text_file(args.text)[: args.limit]
        model, tokenizer = load_any_model(args.model, device)
        result = bits_per_byte(model, tokenizer, text, stride=args.stride, batch_size=args.batch_size, dtype=args.dtype)
    if args.json:
        print(json.dumps({"model": str(args.model), "text": str(args.text), **result}))
    else:
        print(
            f"{args.model} on {args.text}: {result['bpb']:.4f} bits per byte ({result['loss']:.4f} nats per token, "
            f"{result['tokens']:,} tokens, {result['bytes']:,} bytes, {result['bytes_per_token']:.2f} bytes/token; "
            f"context {result['context']}, stride {result['stride']}; {result['seconds']} s)"
        )


def add_harness_parser(verbs) -> None:
    h = verbs.add_parser("harness", help="lm-evaluation-harness tasks (accuracy, perplexity, ...) on a model")
    h.add_argument("model", help="a model directory or .ckpt of ours, an adapter directory, or a HF GPT-2 / Llama dir")
    h.add_argument("--tasks", required=True, help="comma-separated lm-eval task / group names or task YAML paths")
    h.add_argument("--limit", default=None, help="documents per task: a whole number, or a fraction in (0, 1)")
    h.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    h.add_argument("--include-path", action="append", default=[], help="a folder of task YAMLs (repeatable)")
    h.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    h.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    h.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    h.add_argument("--base", default=None, help="an adapter's base model directory, when not at its recorded path")
    h.add_argument("--no-merge", action="store_true", help="keep an adapter PEFT-wrapped (same numbers, slower)")
    h.add_argument("--max-gen-toks", type=int, default=256, help="new tokens when a task does not say (max_gen_toks)")
    h.add_argument("--output", default=None, help="results JSON (default: <model dir>/lm_eval/results_<time>.json)")


def harness_main(args) -> None:
    """The `harness` verb: inputs checked (one `error:` line each) before lm-eval or the model is loaded."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise GPTError("--tasks names no task; give e.g. --tasks hellaswag,arc_easy (comma-separated)")
    for option, value in (("--batch-size", args.batch_size), ("--max-gen-toks", args.max_gen_toks)):
        if value <= 0:
            raise GPTError(f"{option} must be a positive number (got {value})")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise GPTError(f"--num-fewshot must be 0 or more (got {args.num_fewshot})")
    if not args.model:
        raise GPTError("the model argument is empty (it would name the working directory); give a path")
    if not Path(args.model).exists():
        raise GPTError(f"{args.model} does not exist; point at a model directory, a .ckpt or an adapter directory")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", args.device):
        raise GPTError(f"--device must be auto, cpu, cuda, cuda:N or mps (got {args.device!r})")
    check_dtype(args.dtype, "--")
    from lm_eval.utils import make_table

    from gpt.harness import GPTLM, default_output, parse_limit, run_tasks, write_results

    limit = parse_limit(args.limit)
    lm = GPTLM(
        args.model,
        base=args.base,
        merge=not args.no_merge,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        max_gen_toks=args.max_gen_toks,
    )
    results = run_tasks(lm, tasks, include_path=args.include_path, limit=limit, num_fewshot=args.num_fewshot)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    path = write_results(results, args.output or default_output(args.model))
    print(f"results: {path}")
    from gpt.report import run_dir_of, write_report

    run_dir = run_dir_of(args.model)  # a model of a run (<run>/checkpoints/best): its report.md gets lm-eval's table
    if run_dir is not None and write_report(run_dir) is not None:
        print(f"report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    main()
