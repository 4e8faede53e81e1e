"""report.md, the run's report card (gpt/report.py): written by train.py and finetune.py at the end of a run (and of
one stopped by SIGTERM or a NaN), written again by `python -m gpt.evaluate harness` with lm-eval's table. Its
numbers are the run's own files' (metrics.json, metrics.csv, samples.txt), its image links resolve in the run."""

import json
import re
import shutil
import string

import pytest
import torch
import yaml
from conftest import FIXTURES, TINY, run_cli, train_config
from faults import injected
from lm_eval.utils import make_table

from gpt.checkpoint import load_model, save_model_dir
from gpt.config import GPTConfig
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.pretrain import pretrain
from gpt.report import fenced, render
from gpt.tokenizer import Tokenizer

STEPS, BATCH, BLOCK = 20, 16, 32  # TINY's batch and block


def rows(report: str, section: str) -> list[list[str]]:
    """The cells of the first table under `## <section>` (header row first, the |---| row left out)."""
    body = report.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    return [cells[0], *cells[2:]]


def summary(report: str) -> dict[str, str]:
    return {label: value for label, value in rows(report, "Summary")[1:]}


def numbers(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in re.findall(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?", text)]


def image_links(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", report)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    proc = run_cli(
        "train.py",
        *TINY,
        f"trainer.max_steps={STEPS}",
        "trainer.val_check_interval=10",
        "optim.warmup_steps=5",
        f"hydra.run.dir={run_dir}",
        env={"GPT_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run, for the tests that add to it (attention map, lm-eval results)."""
    return shutil.copytree(trained, tmp_path / "run", symlinks=True)


def test_a_training_run_reports_the_numbers_of_its_metrics(trained):
    report = (trained / "report.md").read_text()
    metrics = json.loads((trained / "metrics.json").read_text())
    row = summary(report)
    model, _ = load_model(trained / "checkpoints" / "best")
    assert numbers(row["parameters"])[0] == metrics["params"] == model.num_params() > 0
    assert numbers(row["tokens seen"]) == [metrics["tokens"]] == [STEPS * BATCH * BLOCK]
    assert numbers(row["steps"]) == [STEPS, STEPS]
    assert numbers(row["batch"]) == [BATCH, BLOCK, BATCH * BLOCK]
    final, best = numbers(row["val loss"])[:2]
    assert (final, best) == (round(metrics["val_loss"], 4), round(metrics["best_val_loss"], 4))
    assert numbers(row["val bits per byte"])[0] == round(metrics["val_bpb"], 4)
    assert numbers(row["val perplexity"]) == [round(metrics["val_ppl"], 2)]
    wall, train = numbers(row["wall time"])
    assert (wall, train) == (metrics["wall_seconds"], metrics["train_seconds"])
    assert numbers(row["tokens/s"]) == [round(metrics["tokens_per_s"])]
    assert row["precision"] == metrics["precision"] and row["device"] == metrics["device"]
    assert row["model"].startswith("2 layers, 2 heads, 64 dims; context 32, vocabulary 61")  # model=tiny, block 32
    # the validations of metrics.csv, as steps done (the CSV numbers a step by its index, from 0)
    vals = rows(report, "Loss")[1:]
    assert [numbers(v[0])[0] for v in vals] == [10, 20]
    assert numbers(vals[-1][1])[0] == round(metrics["val_loss"], 4) and numbers(vals[-1][2])[0] == round(
        metrics["val_bpb"], 4
    )
    # what was run, as the user typed it
    assert f"python train.py model=tiny model.block_size=32 data.batch_size={BATCH}" in report
    assert f"trainer.max_steps={STEPS}" in report and "Finished: 20 of 20 steps" in report
    assert "\n## Configuration\n" in report and "n_layer: 2" in report


def test_the_reports_images_and_samples_are_the_runs_files(trained):
    report = (trained / "report.md").read_text()
    links = image_links(report)
    assert links == ["loss.png"]  # no attention map yet: sample.py draws it (next test)
    assert all(not link.startswith("/") and (trained / link).is_file() for link in links)
    samples = (trained / "samples.txt").read_text()
    assert fenced(samples) in report and samples.count("---------------") == 3


def test_an_attention_map_drawn_into_the_run_is_linked_once_the_report_is_refreshed(run_copy):
    proc = run_cli(
        "sample.py",
        f"ckpt={run_copy / 'checkpoints' / 'best'}",
        "prompt=ROMEO:",
        "max_new_tokens=10",
        f"attention_map={run_copy / 'attention.png'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = (run_copy / "report.md").read_text()
    refreshed = run_cli("-m gpt.report", str(run_copy))
    assert refreshed.returncode == 0, refreshed.stderr[-2000:]
    after = (run_copy / "report.md").read_text()
    assert image_links(after) == ["loss.png", "attention.png"] and (run_copy / "attention.png").is_file()
    assert summary(after) == summary(before)  # the same files, the same numbers


def test_a_harness_run_on_the_best_model_adds_lm_evals_table_to_the_report(run_copy, tmp_path):
    tasks = tmp_path / "tasks"  # the fixture tasks with absolute data_files (as tests/test_harness.py writes them)
    tasks.mkdir()
    for src in (FIXTURES / "lm_eval").glob("*.yaml"):
        cfg = yaml.safe_load(src.read_text())
        files = cfg["dataset_kwargs"]["data_files"]
        cfg["dataset_kwargs"]["data_files"] = {s: str(FIXTURES / "lm_eval" / n) for s, n in files.items()}
        (tasks / src.name).write_text(yaml.safe_dump(cfg))
    before = (run_copy / "report.md").read_text()
    assert "lm-evaluation-harness" not in before
    best = run_copy / "checkpoints" / "best"
    proc = run_cli(
        "-m gpt.evaluate",
        *("harness", str(best), "--tasks", "tiny_mc,tiny_wiki", "--include-path", str(tasks), "--device", "cpu"),
        env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = (best / "lm_eval").glob("results_*.json")
    assert f"report: {run_copy / 'report.md'}" in proc.stdout
    report = (run_copy / "report.md").read_text()
    table = make_table(json.loads(results.read_text())).rstrip()
    assert table in report and table in proc.stdout  # lm-eval's own table, as the command printed it
    assert f"`checkpoints/best/lm_eval/{results.name}`" in report
    assert {"tiny_mc", "tiny_wiki"} <= set(re.findall(r"^\|(tiny_\w+)", report, re.M))
    assert summary(report) == summary(before)


@pytest.mark.parametrize(
    "fault, stopped, step",
    # the NaN guard reads its counts at logged steps (every 10): it stops at step 10, naming step 5
    [("sigterm@5", "SIGTERM after step 5", 5), ("nan@5", "non-finite loss or gradients (NaN/Inf) at step 5", 10)],
)
def test_a_run_stopped_by_sigterm_or_a_nan_still_leaves_its_report(tmp_path, fault, stopped, step):
    run_dir = tmp_path / "run"
    cfg = train_config(*TINY, f"trainer.max_steps={STEPS}", "trainer.val_check_interval=10", "log_samples.n=0")
    with injected(fault), pytest.raises(SystemExit if fault.startswith("sigterm") else GPTError):
        pretrain(cfg, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report = (run_dir / "report.md").read_text()
    assert stopped in metrics["stopped"] and f"**Stopped**: {metrics['stopped']}" in report
    assert metrics["step"] == step and metrics["tokens"] == step * BATCH * BLOCK
    assert numbers(summary(report)["tokens seen"]) == [step * BATCH * BLOCK]
    assert numbers(summary(report)["parameters"])[0] == metrics["params"] > 0
    if fault.startswith("sigterm"):
        assert f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}" in report


# -- fine-tuning ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(pairs_dir, tmp_path_factory):
    """finetune.py (LoRA, 10 steps) on the made-up pairs task, from a tiny random base."""
    root = tmp_path_factory.mktemp("ft")
    for split, n in (("train", 200), ("valid", 12)):
        for side, ext in (("src", "modern"), ("tgt", "original")):
            lines = (pairs_dir / f"{split}.{ext}").read_text().splitlines()[:n]
            (root / f"{split}.{side}").write_text("\n".join(lines) + "\n")
    chars = set(string.ascii_letters + string.digits + string.punctuation + " \n")
    for f in root.glob("*.s*"):
        chars.update(f.read_text())
    tok = Tokenizer.char_level(chars)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32))
    base = save_model_dir(model, tok, root / "base")
    run_dir = root / "run"
    proc = run_cli(
        "finetune.py",
        f"base={base}",
        "task=parallel",
        f"task.root={root}",
        "task.train=[train.src,train.tgt]",
        "task.valid=[valid.src,valid.tgt]",
        "task.batch_size=8",
        "task.max_new_tokens=8",
        "trainer.max_steps=10",
        "trainer.val_check_interval=10",
        "optim.warmup_steps=2",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_a_finetuning_report_has_the_score_table_of_its_metrics(finetuned):
    report = (finetuned / "report.md").read_text()
    ev = json.loads((finetuned / "metrics.json").read_text())["eval"]
    header, *table = rows(report, "Task scores")
    assert header == ["system", "val loss", "BLEU", "chrF", "seconds"]  # the task's metrics: loss, bleu, chrf
    keys = ["val_loss", "bleu", "chrf", "seconds"]
    assert [r[0] for r in table] == ["base", "adapter", "copy"]
    for system, *cells in table:
        assert cells == [str(ev[system][k]) if k in ev[system] else "–" for k in keys], system
    assert f"Validation split, {ev['examples']} examples" in report and ev["examples"] == 12
    metrics = json.loads((finetuned / "metrics.json").read_text())
    assert numbers(summary(report)["parameters"]) == [metrics["trainable_params"], metrics["total_params"]]
    assert summary(report)["fine-tuning"].startswith("LoRA rank 16, alpha 32 on qkv, attn_out, mlp")
    assert "python finetune.py base=" in report and "Finished: 10 of 10 steps" in report
    assert all((finetuned / link).is_file() for link in image_links(report))
    assert image_links(report) == ["loss.png", "alignments.png"]


def test_render_fences_text_that_holds_backticks(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"step": 1, "val_loss": 2.0}))
    (tmp_path / "samples.txt").write_text("a ``` b\n````\n")
    report = render(tmp_path)
    assert "`````text\na ``` b\n````\n`````" in report  # a fence longer than any run of backticks inside
