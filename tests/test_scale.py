"""Scaling out and the ecosystem around a run: DDP on 2 CPU processes equals one process with the same global
batch, gradient accumulation equals a bigger batch, Hydra sweeps, TensorBoard and W&B (offline) logs, the
loss curve and the samples written at the end of a run."""

import glob
import json
import os
import struct
from pathlib import Path

import pytest
from conftest import assert_user_error, run_cli
from hydra import compose, initialize_config_dir

from gpt.checkpoint import load_model
from gpt.cli import CONFIG_DIR
from gpt.viz import read_metrics_csv

STEPS = 12
COMMON = [
    "model=tiny",
    "model.block_size=32",
    "data.eval_batches=4",
    "trainer.enable_progress_bar=false",
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=6",
    "trainer.log_every_n_steps=2",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
    "log_samples.n=2",
    "log_samples.max_new_tokens=20",
    "trainer.precision=32-true",
]  # the equivalences below are float32's; bf16 rounding depends on batch shapes
# Equivalent runs differ only by float32 summation order (DDP's all-reduce, accumulated micro-batches), which
# Adam's normalisation carries into the weights: max |difference| 6e-6 after these 12 steps, while the
# weights move by ~2e-2. The same 12 steps on other windows (data.seed=7) differ by 3e-2.
WEIGHT_TOL = 1e-4


def clean_env(tmp_path) -> dict:
    # W&B's own caches and settings go to the test's directory, never the user's home
    return {
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
    }


def max_weight_diff(a: Path, b: Path) -> float:
    ma, _ = load_model(a)
    mb, _ = load_model(b)
    sb = mb.state_dict()
    return max(float((v - sb[k]).abs().max()) for k, v in ma.state_dict().items())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare):
    """The same 12 steps three ways: 2 DDP processes x batch 8, and 1 process x batch 16 (with TensorBoard)."""
    root = tmp_path_factory.mktemp("scale")
    env = clean_env(root)
    data = f"data.path={shakespeare}"
    # through the one command: Lightning's DDP launcher must start the second process with the same verb
    ddp = run_cli(
        "-m gpt",
        "train",
        *COMMON,
        data,
        "trainer=ddp_cpu",
        "data.batch_size=8",
        f"hydra.run.dir={root / 'ddp' / 'run'}",
        env=env,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_cli(
        "train.py",
        *COMMON,
        data,
        "data.batch_size=16",
        "logger=tensorboard",
        f"hydra.run.dir={root / 'single' / 'run'}",
        env=env,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    return {"ddp": root / "ddp" / "run", "single": root / "single" / "run"}


@pytest.mark.slow
def test_ddp_on_two_processes_equals_one_process_with_the_same_global_batch(runs):
    # Rank r trains on its own half of every global batch of 16 windows; DDP averages the two gradients.
    # Same windows + averaged gradients = the same weights as one process on all 16 windows. Ranks that read
    # the same windows, or gradients summed instead of averaged, would not match.
    assert json.loads((runs["ddp"] / "metrics.json").read_text())["step"] == STEPS
    for name in ("last", "best"):
        assert max_weight_diff(runs["ddp"] / "checkpoints" / name, runs["single"] / "checkpoints" / name) < WEIGHT_TOL
    lrs = [read_metrics_csv(runs[run] / "metrics.csv")["train/lr"] for run in ("ddp", "single")]
    assert lrs[0] == lrs[1] and len(lrs[0]) == STEPS // 2  # the same schedule, logged every 2 steps


@pytest.mark.slow
def test_under_ddp_only_rank_zero_writes(runs):
    ddp = runs["ddp"]
    # rank 1 ran the same command (Lightning's launcher) into the same directory: its Hydra log is there ...
    rank1_log = (ddp / "train_ddp_process_1.log").read_text()
    assert "model: 2 layers" in rank1_log
    # ... but everything the run writes was written once, by rank 0
    assert sorted(p.name for p in ddp.iterdir()) == [
        ".hydra",
        ".lock",
        "checkpoints",
        "loss.png",
        "metrics.csv",
        "metrics.json",
        "report.md",
        "samples.txt",
        "train.log",
        "train_ddp_process_1.log",
    ]
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["best", "best.ckpt", "last", "last.ckpt"]
    rank0_log = (ddp / "train.log").read_text()
    for line in ("samples from the final model", "loss curve:", "exported model:"):
        assert line in rank0_log and line not in rank1_log
    assert (
        sorted(p.name for p in ddp.parent.iterdir()) == ["latest", "run"]
        and os.readlink(ddp.parent / "latest") == "run"
    )


@pytest.mark.slow
def test_loss_curve_and_samples_at_the_end_of_a_run(runs):
    for run in ("ddp", "single"):
        png = runs[run] / "loss.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"loss curve: {png}" in (runs[run] / "train.log").read_text()
        samples = (runs[run] / "samples.txt").read_text().split("\n---------------\n")
        assert len(samples) == 3 and samples[-1] == "" and all(s.startswith("\n") and len(s) > 1 for s in samples[:2])


@pytest.mark.slow
def test_tensorboard_gets_losses_config_and_samples(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["single"] / "tensorboard"))
    events.Reload()
    csv_log = read_metrics_csv(runs["single"] / "metrics.csv")
    for tag in ("train/loss", "train/lr", "train/tokens_per_s", "val/loss"):
        assert [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)] == csv_log[tag]
    assert "samples/text_summary" in events.Tags()["tensors"]
    hparams = (runs["single"] / "tensorboard" / "hparams.yaml").read_text()
    assert "lr: 0.003" in hparams and "batch_size: 16" in hparams


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path, shakespeare):
    """batch 8 x accumulate 2 and batch 16 train on the same windows (the global batch is drawn per step and
    split into micro-batches), so they must end at the same weights (within WEIGHT_TOL)."""
    from gpt.pretrain import pretrain

    def run(name, *overrides):
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[
                    *COMMON,
                    f"data.path={shakespeare}",
                    "log_samples.n=0",
                    "trainer.val_check_interval=24",
                    *overrides,
                ],
            )
        return pretrain(cfg, run_dir=tmp_path / name)

    accumulated = run("acc", "data.batch_size=8", "trainer.accumulate_grad_batches=2")
    big = run("big", "data.batch_size=16")
    assert accumulated["step"] == big["step"] == STEPS
    assert (
        max_weight_diff(tmp_path / "acc" / "checkpoints" / "last", tmp_path / "big" / "checkpoints" / "last")
        < WEIGHT_TOL
    )
    assert (tmp_path / "acc" / "loss.png").is_file()


# -- Hydra sweeps and W&B --------------------------------------------------------------------------------


def read_wandb_records(run_dir: Path) -> list:
    """The records of an offline W&B run (run-*.wandb: W&B's LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, block, pos, part, records = Path(path).read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block never starts a record header in its last 6 bytes
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


@pytest.mark.slow
def test_hydra_sweep_with_wandb_offline(tmp_path, shakespeare, monkeypatch):
    """`train.py -m optim.lr=...`: one directory per run, each with its own offline W&B run holding the
    config, the losses, lr and tokens/s (the same numbers as metrics.csv) and the samples table."""
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must be the default
    proc = run_cli(
        "train.py",
        "-m",
        "optim.lr=1e-3,3e-3",
        *[a for a in COMMON if not a.startswith("optim.lr")],
        f"data.path={shakespeare}",
        "data.batch_size=8",
        "trainer.max_steps=6",
        "logger=wandb",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        env=clean_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_ids = set()
    for num, lr in (("0", 1e-3), ("1", 3e-3)):
        run = tmp_path / "sweep" / num
        assert json.loads((run / "metrics.json").read_text())["step"] == 6
        records = read_wandb_records(run)
        config = {i.key: json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update}
        assert config["optim"]["lr"] == lr and config["trainer"]["max_steps"] == 6
        history = [
            {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in records
            if r.HasField("history")
        ]
        csv_log = read_metrics_csv(run / "metrics.csv")
        for key in ("train/loss", "train/lr", "train/tokens_per_s", "val/loss"):
            logged = [(h["trainer/global_step"], pytest.approx(h[key])) for h in history if key in h]
            assert logged == csv_log[key], key
        assert max(v for _, v in csv_log["train/lr"]) <= lr
        assert any(h.get("samples/_type") == "table-file" and h.get("samples/nrows") == 2 for h in history)
        run_ids.update(r.run.run_id for r in records if r.HasField("run"))
    assert len(run_ids) == 2  # one W&B run per sweep job, not one shared
    assert not (tmp_path / "sweep" / "latest").exists()  # jobs are numbered dirs; no link to list one twice


@pytest.mark.slow
def test_a_sweep_cannot_launch_ddp_processes(tmp_path, shakespeare):
    proc = run_cli(
        "train.py",
        "-m",
        "optim.lr=1e-3,3e-3",
        *COMMON[:5],
        f"data.path={shakespeare}",
        "trainer=ddp_cpu",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        env=clean_env(tmp_path),
    )
    assert_user_error(proc, "sweep (-m)", "torchrun")
    assert not list((tmp_path / "sweep").glob("*/checkpoints"))


@pytest.mark.parametrize("choice", ["ddp", "fsdp", "ddp_cpu"])
def test_multi_process_trainer_configs_build_their_strategy(choice):
    """The GPU configs cannot run here (no GPU): check they build the strategy they promise."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from gpt.launch import build
    from gpt.model import Block

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"trainer={choice}"])
    strategy = build(cfg.trainer.strategy)
    if choice == "fsdp":
        assert isinstance(strategy, FSDPStrategy) and cfg.trainer.precision == "bf16-mixed"
        assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}  # one FSDP unit per Block
        assert strategy._state_dict_type == "full"  # one consolidated .ckpt, which the export reads
    else:
        assert isinstance(strategy, DDPStrategy)
        assert strategy._process_group_backend == ("gloo" if choice == "ddp_cpu" else "nccl")
        assert cfg.trainer.accelerator == ("cpu" if choice == "ddp_cpu" else "gpu")


def test_log_samples_prompt_is_checked_before_training(tmp_path):
    from types import SimpleNamespace

    from gpt.callbacks import FinalSamples
    from gpt.config import GPTConfig
    from gpt.errors import GPTError
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.char_level("abc\n")
    module = SimpleNamespace(
        tokenizer=tok, gpt_config=GPTConfig(block_size=8, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8)
    )
    FinalSamples(tmp_path / "s.txt", prompt="ab\n").on_fit_start(None, module)
    with pytest.raises(GPTError, match="log_samples.prompt='xyz'.*never seen.*log_samples.n=0"):
        FinalSamples(tmp_path / "s.txt", prompt="xyz").on_fit_start(None, module)
    with pytest.raises(GPTError, match="9 tokens, too long for the context of 8"):
        FinalSamples(tmp_path / "s.txt", prompt="abcabcabc").on_fit_start(None, module)
    with pytest.raises(GPTError, match="temperature"):
        FinalSamples(tmp_path / "s.txt", temperature=-1)
