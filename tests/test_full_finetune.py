"""Full fine-tuning (finetune.py method=full): the model's own weights train, frozen ones stay bit-identical,
the run writes whole model directories that reload to the same logits and sample.py reads."""

import json

import pytest
import torch
from conftest import assert_user_error, run_cli
from test_finetune import base_dir, task_files  # noqa: F401 (fixtures)

from gpt.checkpoint import load_model, load_model_dir, read_lightning_ckpt
from gpt.errors import GPTError
from gpt.finetune import freeze


def test_freeze_stops_the_embeddings_and_the_first_blocks(base_dir):
    model, _ = load_model_dir(base_dir)
    frozen = freeze(model, embeddings=True, layers=1)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == set(frozen)
    assert "transformer.wte.weight" in frozen and "transformer.wpe.weight" in frozen
    assert all(n.startswith(("transformer.h.0.", "transformer.w")) for n in frozen)
    assert not model.lm_head.weight.requires_grad  # tied to wte
    with pytest.raises(GPTError, match="more than the model's 2 blocks"):
        freeze(model, layers=3)


def test_full_finetune_trains_the_unfrozen_weights_and_writes_model_dirs(task_files, base_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "finetune.py",
        f"base={base_dir}",
        "method=full",
        "freeze.layers=1",
        "task=parallel",
        f"task.root={task_files}",
        "task.train=[train.src,train.tgt]",
        "task.valid=[valid.src,valid.tgt]",
        "task.batch_size=16",
        "task.max_new_tokens=8",
        "trainer.max_steps=8",
        "trainer.val_check_interval=4",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "eval.max_examples=8",
        "trainer.enable_progress_bar=false",
        "trainer.precision=32-true",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (
        metrics["method"] == "full"
        and 0.5 * metrics["total_params"] < metrics["trainable_params"] < metrics["total_params"]
    )
    assert set(metrics["eval"]) >= {"base", "finetuned", "copy"}
    assert metrics["eval"]["finetuned"]["val_loss"] < metrics["eval"]["base"]["val_loss"]
    assert (run_dir / "alignments.png").read_bytes()[:4] == b"\x89PNG"  # the fine-tuned model's attention
    base, _ = load_model_dir(base_dir)
    state = {
        k.removeprefix("model."): v
        for k, v in read_lightning_ckpt(run_dir / "checkpoints/last.ckpt")["state_dict"].items()
    }
    for name, tensor in base.state_dict().items():
        if name.startswith("transformer.h.0."):
            assert torch.equal(state[name], tensor), name  # frozen: bit-identical
        else:
            assert not torch.equal(state[name], tensor), name  # every unfrozen tensor moved
    # checkpoints/last is a model directory holding the same weights, and reloads to the same logits
    last, tok = load_model(run_dir / "checkpoints" / "last")
    trained = type(base)(base.config)
    trained.load_state_dict(state)
    x = torch.tensor([tok.encode("I have half a mind to hit you.\n")])
    with torch.no_grad():
        assert torch.equal(last.eval()(x).logits, trained.eval()(x).logits)
    config = json.loads((run_dir / "checkpoints/best/config.json").read_text())["gpt"]
    assert config["finetuned_from"]["method"] == "full" and config["task"]["template"] == "Input: {input}\nOutput:\n"
    assert config["decoding"] == {"num_beams": 1, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "copy_bonus": 0.0}
    # sample.py reads it, prompting with the recorded task template: the scoring's greedy outputs again
    (tmp_path / "in.txt").write_text("".join((task_files / "valid.src").read_text().splitlines(True)[:8]))
    proc = run_cli(
        "sample.py",
        f"ckpt={run_dir / 'checkpoints' / 'best'}",
        f"input_file={tmp_path / 'in.txt'}",
        f"output_file={tmp_path / 'out.txt'}",
        "temperature=0",
        "max_new_tokens=8",
        "dtype=float32",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line.strip() for line in (tmp_path / "out.txt").read_text().splitlines()] == (
        run_dir / "valid.finetuned.txt"
    ).read_text().splitlines()
    # eval_only=true model_dir=<dir> scores the saved model again: the same outputs and figures as after training
    proc = run_cli(
        "finetune.py",
        "eval_only=true",
        f"model_dir={run_dir / 'checkpoints' / 'best'}",
        f"base={base_dir}",
        "task=parallel",
        f"task.root={task_files}",
        "task.train=[train.src,train.tgt]",
        "task.valid=[valid.src,valid.tgt]",
        "task.max_new_tokens=8",
        "eval.max_examples=8",
        "trainer.precision=32-true",
        f"hydra.run.dir={tmp_path / 'scored'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = json.loads((tmp_path / "scored" / "metrics.json").read_text())["eval"]
    for system in ("base", "finetuned", "copy"):
        assert (tmp_path / "scored" / f"valid.{system}.txt").read_text() == (
            run_dir / f"valid.{system}.txt"
        ).read_text()
        figures = {k: v for k, v in metrics["eval"][system].items() if k != "seconds"}
        assert {k: scored[system][k] for k in figures} == pytest.approx(figures, rel=1e-6), system
    warning = (
        "the training run scored this with num_beams=1, length_penalty=1.0, no_repeat_ngram_size=0, copy_bonus=0.0"
    )
    assert warning not in (tmp_path / "scored" / "finetune.log").read_text()
    # decoded otherwise than in training: scored as asked, with one line saying the figures will differ
    proc = run_cli(
        "finetune.py",
        "eval_only=true",
        f"model_dir={run_dir / 'checkpoints' / 'best'}",
        "task=parallel",
        f"task.root={task_files}",
        "task.valid=[valid.src,valid.tgt]",
        "task.max_new_tokens=8",
        "eval.max_examples=2",
        "eval.num_beams=2",
        f"hydra.run.dir={tmp_path / 'beams'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "beams" / "finetune.log").read_text()
    assert f"{warning}; now eval.num_beams=2, eval.length_penalty=1.0," in log
    # model_dir= without eval_only, or beside adapter=, is refused in one line
    assert_user_error(run_cli("finetune.py", f"model_dir={run_dir / 'checkpoints' / 'best'}"), "eval_only=true")
    # a resume as LoRA, or with other freezing, is refused in one line
    resume = [
        "finetune.py",
        f"base={base_dir}",
        "task=parallel",
        f"task.root={task_files}",
        "task.train=[train.src,train.tgt]",
        f"ckpt_path={run_dir / 'checkpoints/last.ckpt'}",
        "trainer.max_steps=20",
    ]
    assert_user_error(run_cli(*resume, "method=full", f"hydra.run.dir={tmp_path / 'r1'}"), "freeze=")
    assert_user_error(run_cli(*resume, f"hydra.run.dir={tmp_path / 'r2'}"), "method=full")
