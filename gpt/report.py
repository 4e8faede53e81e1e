"""A run's report card, `report.md` in its directory: what was trained, how long it took, where the loss ended,
samples, task scores and lm-eval tables, in one markdown page that GitHub shows as it is.

It is a plain writer over the files the run already wrote, so it can be written again at any time with the same
result from the same files:

    metrics.json        the summary (gpt.run.train and each verb): step, losses, bits per byte, tokens, times,
                        device, parameters; fine-tuning's task scores (`eval`: base / adapter or finetuned / copy)
    metrics.csv         every validation (val/loss, val/bpb) and the training clock (train/seconds)
    .hydra/             the command line's overrides and the composed config
    checkpoints/        the exported model's config.json (its shape); lm-eval results under */lm_eval/
    loss.png, samples.txt, attention.png (sample.py attention_map=<run dir>/attention.png), valid.*.txt,
    alignments.png (fine-tuning's scoring)

train.py and finetune.py write it whenever they write metrics.json (gpt.run.write_metrics: at the end of a run,
and of one stopped by SIGTERM, Ctrl-C or a NaN); `python -m gpt.evaluate harness <run>/checkpoints/best` writes
it again with lm-eval's table; `python -m gpt.report <run dir>` refreshes it by hand (e.g. after sample.py drew
the attention map into the run directory). Images are linked by relative paths, so the page reads the same in
the run directory and in a copy of it.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
SCRIPTS = {"train": "train.py", "finetune": "finetune.py"}
SCORE_COLUMNS = {
    "val_loss": "val loss",
    "reward_accuracy": "reward accuracy",  # preference tasks (method=dpo)
    "reward_margin": "reward margin",
    "bleu": "BLEU",
    "chrf": "chrF",
    "exact_match": "exact match (%)",
}
MAX_SAMPLE_CHARS = 4000
MAX_VAL_ROWS = 25


def describe_device(device, world_size: int = 1) -> str:
    """What trained, in words: `NVIDIA H100 80GB HBM3`, `CPU (AMD EPYC 7B13, 2 threads)`; `4 × ...` for 4 ranks."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        name = f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)"
    else:
        name = device.type
    return f"{world_size} × {name}" if world_size > 1 else name


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


# ----------------------------------------------------------------------------------------------------
# Reading the run's files


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


class Config:
    """The run's .hydra/config.yaml, read key by key: an interpolation that cannot be resolved here (a resolver of
    the training process, ${cpu_precision:}) reads as None rather than failing the report."""

    def __init__(self, run_dir: Path):
        from omegaconf import OmegaConf

        path = run_dir / ".hydra" / "config.yaml"
        self.text = path.read_text(encoding="utf-8") if path.is_file() else None
        self.cfg = OmegaConf.create(self.text) if self.text else None

    def __call__(self, key: str, default=None):
        from omegaconf import OmegaConf

        if self.cfg is None:
            return default
        try:
            value = OmegaConf.select(self.cfg, key, default=default, throw_on_resolution_failure=False)
        except Exception:
            return default
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=False)
        return default if value is None else value


def read_validations(run_dir: Path) -> list[dict]:
    """metrics.csv's validations: [{"step", "val/loss", "val/bpb", "train/seconds"}], the training clock taken
    from the train row of the same step (Lightning writes train and val values of one step on separate rows)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    seconds, vals = {}, []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            if row.get("train/seconds"):
                seconds[step + 1] = float(row["train/seconds"])
            if row.get("val/loss"):  # metrics.csv numbers a step by its index (from 0): the report counts steps done
                vals.append({"step": step + 1, **{k: float(row[k]) for k in ("val/loss", "val/bpb") if row.get(k)}})
    for v in vals:
        if v["step"] in seconds:
            v["train/seconds"] = seconds[v["step"]]
    return vals


def model_config(run_dir: Path, cfg: Config) -> dict:
    """The trained model's shape: an exported model directory's config.json (a LoRA run: its base's)."""
    places = [run_dir / "checkpoints" / n / "config.json" for n in ("best", "last", "merged")]
    if cfg("base"):
        places.append(Path(str(cfg("base"))).expanduser() / "config.json")
    return next((c for c in map(read_json, places) if c.get("n_layer")), {})


# ----------------------------------------------------------------------------------------------------
# Markdown


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]], align: Optional[list[str]] = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fenced(text: str, lang: str = "text") -> str:
    """A code block that no run of backticks inside the text can close."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip(chr(10))}\n{fence}"


def num(value: Any, fmt: str = "{:,}") -> str:
    return "n/a" if value is None else fmt.format(value)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.2f} s"
    m, s = divmod(seconds, 60)
    h, m = divmod(int(m), 60)
    return f"{seconds:.2f} s ({f'{h} h ' if h else ''}{m} min {s:.0f} s)"


def command(run_dir: Path) -> Optional[str]:
    hydra = read_yaml(run_dir / ".hydra" / "hydra.yaml") or {}
    job = ((hydra.get("hydra") or {}).get("job") or {}).get("name")
    overrides = read_yaml(run_dir / ".hydra" / "overrides.yaml")
    if not job or not isinstance(overrides, list):
        return None
    return " ".join(["python", SCRIPTS.get(job, f"{job}.py"), *(shlex.quote(str(o)) for o in overrides)])


def status(m: dict, cfg: Config) -> str:
    step, max_steps, budget = m.get("step"), cfg("trainer.max_steps"), cfg("budget_minutes")
    if m.get("stopped"):
        last = m.get("last_ckpt")
        resume = f"; resume with `ckpt_path={last}`" if last else ""
        return f"**Stopped**: {m['stopped']}{resume}."
    if step is None:
        scored = m.get("adapter") or m.get("model")
        return f"Scored `{scored}` (`eval_only=true`)." if scored else "No training steps recorded."
    if isinstance(max_steps, int) and 0 < max_steps <= step:
        return f"Finished: {step:,} of {max_steps:,} steps (`trainer.max_steps`)."
    if budget:
        return f"Finished: the time budget of {budget:g} min ran out at step {step:,}."
    return f"Ended at step {step:,}."


def model_rows(m: dict, cfg: Config, shape: dict) -> list[list]:
    rows = []
    if shape:
        kv = f" ({shape['n_kv_head']} key/value)" if shape.get("n_kv_head") else ""
        parts = [
            f"{plural(shape['n_layer'], 'layer')}, {plural(shape['n_head'], 'head')}{kv}, {shape['n_embd']} dims",
            f"context {shape.get('block_size')}, vocabulary {num(shape.get('vocab_size'))}",
            f"{shape.get('pos_emb', 'learned')} positions, {shape.get('norm', 'layernorm')}, {shape.get('mlp', 'gelu')}"
            " MLP" + (", tied embeddings" if shape.get("tie_embeddings", True) else ""),
        ]
        rows.append(["model", "; ".join(parts)])
    if cfg("base"):
        method = cfg("method", "lora")
        weights = cfg("dpo.weights", "lora") if method == "dpo" else method
        if weights == "lora":
            how = f"LoRA rank {cfg('lora.rank')}, alpha {cfg('lora.alpha')} on {', '.join(cfg('lora.targets') or [])}"
        else:
            frozen = ["the embeddings"] if cfg("freeze.embeddings") else []
            frozen += [f"the first {cfg('freeze.layers')} blocks"] if cfg("freeze.layers") else []
            how = "full fine-tuning" + (f" (frozen: {', '.join(frozen)})" if frozen else "")
        if method == "dpo":  # preference tuning (gpt/preference.py)
            how = f"preference tuning, loss {cfg('dpo.loss')} (β {cfg('dpo.beta')}), {how}"
        rows.append(["fine-tuning", f"{how}; base `{cfg('base')}`"])
    if m.get("params") is not None:
        rows.append(
            [
                "parameters",
                f"{m['params']:,}"
                + (" (without the position embedding)" if shape.get("pos_emb", "learned") == "learned" else ""),
            ]
        )
    if m.get("trainable_params") is not None:
        rows.append(["parameters", f"{m['trainable_params']:,} trainable of {m['total_params']:,}"])
    return rows


def data_rows(m: dict, cfg: Config) -> list[list]:
    rows = []
    if cfg("data.name"):
        source = cfg("data.path") or cfg("data.relpath") or cfg("data.hub")
        rows.append(["data", f"{cfg('data.name')} (`{source}`), tokenizer {cfg('data.tokenizer')}"])
    elif cfg("task.name"):
        stats = m.get("data") or {}
        counts = ", ".join(f"{s} {v.get('examples', v.get('rows'))}" for s, v in stats.items() if isinstance(v, dict))
        unit = "pairs" if cfg("task.format") == "preference" else "examples"
        rows.append(["task", f"{cfg('task.name')} ({cfg('task.format')})" + (f": {counts} {unit}" if counts else "")])
    optimizer = cfg("optim.optimizer", "adamw")
    if cfg("optim.lr") is not None:
        text = f"{optimizer}: lr {cfg('optim.lr'):g} → {cfg('optim.min_lr'):g}"
        text += f" (warmup {cfg('optim.warmup_steps')} steps, cosine)"
        if optimizer == "muon":
            text += f", Muon lr {cfg('optim.muon_lr'):g} for the hidden matrices"
        text += f", weight decay {cfg('optim.weight_decay')}, betas {tuple(cfg('optim.betas') or ())}"
        if cfg("trainer.gradient_clip_val"):
            text += f", gradient clip {cfg('trainer.gradient_clip_val')}"
        if cfg("averaging", "none") != "none":
            text += f"; weight averaging {cfg('averaging')} (decay {cfg('ema_decay')})"
        rows.append(["optimizer", text])
    if m.get("step") is not None:
        of = cfg("trainer.max_steps")
        budget = f"; time budget {cfg('budget_minutes'):g} min" if cfg("budget_minutes") else ""
        rows.append(["steps", f"{m['step']:,}" + (f" of {of:,}" if isinstance(of, int) and of > 0 else "") + budget])
    accumulate, devices = cfg("trainer.accumulate_grad_batches", 1), cfg("trainer.devices", 1)
    scale = f" × {accumulate} accumulated" if accumulate != 1 else ""
    scale += f" × {devices} devices" if devices != 1 else ""
    if cfg("data.batch_size"):
        block = cfg("data.block_size") or cfg("model.block_size")
        step, tokens = m.get("step"), m.get("tokens")
        per_step = f" = {tokens // step:,} tokens per step" if step and tokens else ""
        rows.append(["batch", f"{cfg('data.batch_size')} sequences × {block} tokens{scale}{per_step}"])
    elif cfg("task.batch_size"):
        unit = "pairs" if cfg("task.format") == "preference" else "examples"
        rows.append(["batch", f"{cfg('task.batch_size')} {unit}{scale}"])
    for key, label in (("precision", "precision"), ("device", "device")):
        if m.get(key):
            rows.append([label, m[key]])
    return rows


def result_rows(m: dict, cfg: Config, vals: list[dict]) -> list[list]:
    rows = []
    if m.get("step") is None:
        return rows
    if m.get("tokens") is not None:
        counted = " (counted: prompts and responses, no padding)" if cfg("task.name") else ""
        rows.append(["tokens seen", f"{m['tokens']:,}{counted}"])
    rows.append(["wall time", duration(m.get("wall_seconds")) + f"; training {duration(m.get('train_seconds'))}"])
    rows.append(["tokens/s", num(m.get("tokens_per_s"), "{:,.0f}")])
    best_row = min(vals, key=lambda v: v["val/loss"]) if vals else {}
    if m.get("val_loss") is not None:
        best = m.get("best_val_loss")
        at = f" (step {best_row['step']:,})" if best_row and abs(best_row["val/loss"] - (best or 0)) < 1e-6 else ""
        rows.append(["val loss", f"final {m['val_loss']:.4f}; best {num(best, '{:.4f}')}{at}"])
    if m.get("val_bpb") is not None:
        at_best = f"; at the best val loss {best_row['val/bpb']:.4f}" if "val/bpb" in best_row else ""
        rows.append(["val bits per byte", f"final {m['val_bpb']:.4f}{at_best}"])
    if m.get("val_ppl") is not None:
        rows.append(["val perplexity", f"{m['val_ppl']:.2f}"])
    if m.get("skipped_steps"):
        rows.append(["skipped steps (NaN/Inf)", m["skipped_steps"]])
    if m.get("resumed_from"):
        rows.append(["resumed from", f"`{m['resumed_from']}`"])
    return rows


def loss_section(run_dir: Path, vals: list[dict]) -> list[str]:
    out = []
    if (run_dir / "loss.png").is_file():
        out += ["![loss curve: train and val loss, learning rate](loss.png)", ""]
    if vals:
        shown = vals
        if len(vals) > MAX_VAL_ROWS:  # evenly spread, the last one always
            every = -(-len(vals) // MAX_VAL_ROWS)
            shown = vals[::every] + ([vals[-1]] if (len(vals) - 1) % every else [])
        rows = [
            [
                f"{v['step']:,}",
                f"{v['val/loss']:.4f}",
                num(v.get("val/bpb"), "{:.4f}"),
                num(v.get("train/seconds"), "{:.1f}"),
            ]
            for v in shown
        ]
        out += [table(["step", "val loss", "val bpb", "training time (s)"], rows, ["--:", "--:", "--:", "--:"]), ""]
    return out


def scores_section(run_dir: Path, ev: dict) -> list[str]:
    systems = [s for s, v in ev.items() if isinstance(v, dict)]
    keys = [k for k in (*SCORE_COLUMNS, "seconds") if any(k in ev[s] for s in systems)]
    rows = [[s, *(ev[s].get(k, "–") for k in keys)] for s in systems]
    header = ["system", *(SCORE_COLUMNS.get(k, k) for k in keys)]
    note = f"Validation split, {ev.get('examples')} examples"
    if ev.get("val_loss_examples") not in (None, ev.get("examples")):
        note += f" (val loss on {ev['val_loss_examples']})"
    outputs = [f"`valid.{s}.txt`" for s in systems if (run_dir / f"valid.{s}.txt").is_file()]
    note += "; greedy outputs in " + ", ".join(outputs) if outputs else ""
    return [note + ". `copy` returns each input unchanged.", "", table(header, rows, ["---"] + ["--:"] * len(keys)), ""]


def samples_section(run_dir: Path, cfg: Config) -> list[str]:
    text = (run_dir / "samples.txt").read_text(encoding="utf-8", errors="replace")
    settings = [f"{k} {cfg(f'log_samples.{k}')}" for k in ("temperature", "top_k", "top_p") if cfg(f"log_samples.{k}")]
    prompt = cfg("log_samples.prompt")
    head = "From the final model (`samples.txt`" + (f"; prompt {json.dumps(prompt)}" if prompt is not None else "")
    head += (", " + ", ".join(settings) if settings else "") + "):"
    cut = len(text) > MAX_SAMPLE_CHARS
    return [head, "", fenced(text[:MAX_SAMPLE_CHARS] + ("\n[...]" if cut else "")), ""]


def lm_eval_section(run_dir: Path) -> list[str]:
    files = sorted(run_dir.glob("checkpoints/*/lm_eval/results_*.json")) + sorted(
        run_dir.glob("checkpoints/lm_eval/results_*.json")
    )
    if not files:
        return []
    from lm_eval.utils import make_table

    out = ["## lm-evaluation-harness", ""]
    for path in files:
        results = read_json(path)
        where = path.relative_to(run_dir).as_posix()
        if not isinstance(results.get("results"), dict):
            out += [f"`{where}`: not lm-eval results (unreadable)", ""]
            continue
        config = results.get("config") or {}
        limit = f", limit {config['limit']:g} per task" if config.get("limit") else ""
        out += [f"`{where}` (`python -m gpt.evaluate harness`{limit}):", "", make_table(results).rstrip(), ""]
        if results.get("groups"):
            out += [make_table(results, "groups").rstrip(), ""]
    return out


def safe(section, *args) -> list:
    """One part of the report; a part that cannot be made of these files (an odd value, a file cut short) is left
    out with a warning, and the rest of the report is still written."""
    try:
        return section(*args)
    except Exception as e:
        log.warning("report: %s left out (%s: %s)", section.__name__, type(e).__name__, e)
        return []


def render(run_dir: str | Path) -> str:
    """report.md's text for a run directory."""
    run_dir = Path(run_dir)
    m, cfg = read_json(run_dir / "metrics.json"), Config(run_dir)
    vals, shape = read_validations(run_dir), model_config(run_dir, cfg)
    name = cfg("name") or run_dir.parent.name
    out = [f"# {name}: run {run_dir.name}", ""]
    cmd = command(run_dir)
    if cmd:
        out += [fenced(cmd, "sh"), ""]
    out += [status(m, cfg) + f" Report written {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    rows = safe(model_rows, m, cfg, shape) + safe(data_rows, m, cfg) + safe(result_rows, m, cfg, vals)
    if rows:
        out += ["## Summary", "", table(["", ""], rows), ""]
    loss = safe(loss_section, run_dir, vals)
    if loss:
        out += ["## Loss", "", *loss]
    if isinstance(m.get("eval"), dict):
        out += ["## Task scores", "", *safe(scores_section, run_dir, m["eval"])]
    if (run_dir / "alignments.png").is_file():  # finetune.py's eval.alignments
        out += ["## Alignments", "", "![each output token's attention on its source line](alignments.png)", ""]
    if (run_dir / "samples.txt").is_file():
        out += ["## Samples", "", *safe(samples_section, run_dir, cfg)]
    if (run_dir / "attention.png").is_file():
        out += ["## Attention", "", "![attention heatmap of a sample (sample.py attention_map=...)](attention.png)", ""]
    out += safe(lm_eval_section, run_dir)
    if cfg.text:
        out += ["## Configuration", "", "<details><summary><code>.hydra/config.yaml</code></summary>", ""]
        out += [fenced(cfg.text, "yaml"), "", "</details>", ""]
    present = [f"`{p}`" for p in FILES if (run_dir / p).exists()]
    if present:
        out += ["Files in the run directory: " + ", ".join(present) + ".", ""]
    return "\n".join(out)


FILES = (
    "checkpoints/best/",
    "checkpoints/last/",
    "checkpoints/merged/",
    "checkpoints/best.ckpt",
    "checkpoints/last.ckpt",
    "metrics.json",
    "metrics.csv",
    "samples.txt",
    "train.log",
    "finetune.log",
    ".hydra/",
)


def write_report(run_dir: str | Path) -> Optional[Path]:
    """Write run_dir/report.md atomically. A report that cannot be written is a warning, never the run's end."""
    from gpt.atomic import atomic_file

    path = Path(run_dir) / REPORT_FILE
    try:
        text = render(run_dir)
        with atomic_file(path) as f:
            f.write(text.encode("utf-8"))
    except Exception as e:  # the run's own files are written; the report is a summary of them
        log.warning("no report: %s: %s", type(e).__name__, e)
        return None
    log.info("report: %s", path)
    return path


def run_dir_of(model_path: str | Path) -> Optional[Path]:
    """The run directory a model lies in: <run>/checkpoints/<best|last|merged> or <run>/checkpoints/<x>.ckpt."""
    path = Path(model_path).resolve()
    checkpoints = path.parent if path.parent.name == "checkpoints" else None
    if checkpoints is None or not (checkpoints.parent / "metrics.json").is_file():
        return None
    return checkpoints.parent


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m gpt.report <run dir>   (writes <run dir>/report.md again)", file=sys.stderr)
        raise SystemExit(2)
    run_dir = Path(argv[0])
    if not (run_dir / "metrics.json").is_file():
        print(f"error: {run_dir} is not a run directory (no metrics.json)", file=sys.stderr)
        raise SystemExit(2)
    path = write_report(run_dir)
    if path is None:
        raise SystemExit(1)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
