"""End to end, through the entry scripts as a user runs them: train -> export -> sample."""

import csv
import json

import pytest
import torch
from conftest import TINY, assert_user_error, run_cli

from gpt.checkpoint import load_model
from gpt.errors import GPTError
from gpt.generate import generate


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 300 steps on Tiny Shakespeare through train.py."""
    run_dir = tmp_path_factory.mktemp("run") / "r"
    proc = run_cli(
        "train.py",
        *TINY,
        "trainer.max_steps=300",
        "trainer.val_check_interval=100",
        "optim.lr=3e-3",
        "optim.warmup_steps=20",
        f"hydra.run.dir={run_dir}",
        "trainer.enable_progress_bar=true",  # stdout is a file here: plain progress lines
        env={"GPT_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir / "stdout.txt").write_text(proc.stdout + proc.stderr)
    return run_dir


def test_a_log_file_gets_plain_progress_lines_not_a_redrawn_bar(trained):
    log = (trained / "stdout.txt").read_text()
    assert "\r" not in log and max(map(len, log.splitlines())) < 300
    # every 10 steps (log_every_n_steps) x ceil(300 / 50 / 10): a line every 10 steps, and the last one
    steps = [
        int(line.split()[1].split("/")[0]) for line in log.splitlines() if line.startswith("step ") and "/300 |" in line
    ]
    assert steps == list(range(10, 301, 10)), steps
    last = next(line for line in log.splitlines() if line.startswith("step 300/300 |"))
    assert "train/loss" in last and "| lr " in last and "train/tokens_per_s" in last and last.endswith(" s")


def test_training_lowers_the_loss_and_writes_the_run(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["step"] == 300
    assert metrics["tokens_per_s"] > 0 and metrics["wall_seconds"] > 0
    rows = list(csv.DictReader(open(trained / "metrics.csv")))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 3
    # Uniform guessing scores ln(67) = 4.20 and the best context-free guess (character frequencies) 3.31
    # nats; a model that uses its context must go well below both, and keep improving.
    assert val[-1] < 2.7 and val[-1] < val[0] - 0.05, val
    assert abs(metrics["val_loss"] - val[-1]) < 1e-6
    # train metrics every trainer.log_every_n_steps (10 in trainer/cpu.yaml): logged only on the steps that
    # Lightning writes (gpt.lit.writes_logs_now), so none may be missing
    for key in ("train/loss", "train/lr", "train/tokens_per_s", "train/seconds"):
        assert [int(r["step"]) for r in rows if r.get(key)] == list(range(9, 300, 10)), key
    # the training clock grows with each step and ends at metrics.json's train_seconds (within the last 10 steps)
    seconds = [float(r["train/seconds"]) for r in rows if r.get("train/seconds")]
    assert all(b > a for a, b in zip(seconds, seconds[1:])) and 0 < seconds[-1] <= metrics["train_seconds"] + 0.01
    assert seconds[-1] >= metrics["train_seconds"] * 0.9 - 0.01
    # and each row holds its own step's values: step 9 of a 20-step linear warmup to 3e-3 ran at 3e-3 * 10/21
    lr_at_9 = next(float(r["train/lr"]) for r in rows if r["step"] == "9" and r.get("train/lr"))
    assert lr_at_9 == pytest.approx(3e-3 * 10 / 21)
    for name in ("best", "last"):
        assert (trained / "checkpoints" / f"{name}.ckpt").is_file()
        assert {p.name for p in (trained / "checkpoints" / name).iterdir()} == {
            "config.json",
            "model.safetensors",
            "tokenizer.json",
        }


def test_exported_model_equals_the_lightning_checkpoint(trained):
    exported, tok = load_model(trained / "checkpoints" / "last")
    from_ckpt, tok2 = load_model(trained / "checkpoints" / "last.ckpt")
    x = torch.tensor([tok.encode("ROMEO:\nWhat light")])
    assert torch.equal(exported.eval()(x).logits, from_ckpt.eval()(x).logits)
    assert tok.encode("to be") == tok2.encode("to be")


def test_sampling_is_reproducible_and_seeded(trained):
    model = str(trained / "checkpoints" / "best")
    args = [f"ckpt={model}", "prompt=ROMEO:", "max_new_tokens=60", "temperature=1.0"]
    a = run_cli("sample.py", *args, "seed=5")
    b = run_cli("sample.py", *args, "seed=5")
    c = run_cli("sample.py", *args, "seed=6")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout != c.stdout
    assert a.stdout.startswith("ROMEO:") and len(a.stdout) > 60
    # a path setting may start with ~ even quoted (the shell expands only an unquoted one): in Hydra's quotes,
    # and in the shell's ('ckpt=~/...' reaches us as is, and Hydra's syntax has no bare ~ in a value)
    for arg in (f"ckpt='~/{trained.name}/checkpoints/best'", f"ckpt=~/{trained.name}/checkpoints/best"):
        home = run_cli("sample.py", arg, *args[1:], "seed=5", env={"HOME": str(trained.parent)})
        assert home.returncode == 0, home.stderr
        assert home.stdout == a.stdout


def test_the_gpt_command_runs_each_verb_as_its_own_entry_does(trained, tmp_path):
    """`gpt <verb>` (here `python -m gpt <verb>`, the same main) is a router: the same output and the same
    one-line errors as the entry script or module it stands for."""
    model = str(trained / "checkpoints" / "best")
    args = [f"ckpt={model}", "prompt=ROMEO:", "max_new_tokens=40", "temperature=1.0", "seed=7"]
    direct = run_cli("sample.py", *args)
    routed = run_cli("-m gpt", "sample", *args)
    assert direct.returncode == 0 and routed.returncode == 0, routed.stderr
    assert routed.stdout == direct.stdout and len(routed.stdout) > 40
    listing = run_cli("-m gpt", "--help")
    assert listing.returncode == 0
    for verb in ("train", "finetune", "sample", "chat", "serve", "convert", "evaluate", "report"):
        assert f"\n  {verb} " in listing.stdout, verb
    assert_user_error(run_cli("-m gpt", "nope"), "unknown verb 'nope'", "gpt --help")
    assert_user_error(run_cli("-m gpt", "sample", "model=tiny"), "model is not a config group of sample.py")
    assert_user_error(run_cli("-m gpt", "report", str(tmp_path)), "not a run directory")
    exported = tmp_path / "hf"
    assert run_cli("-m gpt", "convert", "export-hf", model, str(exported)).returncode == 0
    assert (exported / "config.json").is_file()


def test_batch_mode_one_completion_per_line(trained, tmp_path):
    """Lines are what `wc -l` and sacrebleu count: a byte-order mark and \r\n endings are not text, and
    U+2028 or a form feed inside a line do not split it (str.splitlines would: 4 completions for 3 lines)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffROMEO:\r\nJULIET:\\nO\nKING\u2028QUEEN\x0c\n".encode())
    out = tmp_path / "out.txt"
    args = [
        f"ckpt={trained / 'checkpoints' / 'best'}",
        f"input_file={prompts}",
        f"output_file={out}",
        "max_new_tokens=20",
        "temperature=0",
    ]
    refused = run_cli("sample.py", *args)  # U+2028 and the form feed are not in Tiny Shakespeare
    assert_user_error(refused, "prompt 3 (line 3 of a batch input)", "never seen", "unknown_chars=unk")
    proc = run_cli("sample.py", *args, "unknown_chars=unk")  # read as <|unk|>, as fine-tuning reads them
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines[:-1]) == 3 and all(lines[:-1])
    lines = lines[:-1]
    # greedy batch output equals greedy one-by-one output (left padding changes nothing)
    model, tok = load_model(trained / "checkpoints" / "best")
    first = generate(model.eval(), torch.tensor([tok.encode("ROMEO:")]), 20, temperature=0)
    assert lines[0] == tok.decode(first[0].tolist()).replace("\n", "\\n")
    # and it refuses to overwrite what is there
    again = run_cli("sample.py", *args)
    assert_user_error(again, "exists", "overwrite=true")
    assert out.read_text(encoding="utf-8").split("\n")[:-1] == lines


def test_stop_strings_typed_with_backslash_escapes_stop_the_sample(trained):
    """stop='["\\n"]' (a shell passes backslash + n) stops at a newline, as the README writes it; a single
    string is one stop string, not a list of characters."""
    args = [f"ckpt={trained / 'checkpoints' / 'best'}", "prompt=ROMEO:\\n", "max_new_tokens=120", "seed=1"]
    full = run_cli("sample.py", *args, "stop_at_eos=false")  # seeded: the stop changes nothing before it
    assert full.returncode == 0, full.stderr
    first_line = full.stdout[: full.stdout.index("\n", len("ROMEO:\n"))]  # the prompt + the first completed line
    assert len(first_line) > len("ROMEO:\n")
    for stop in ('stop=["\\n"]', "stop=\\n"):
        stopped = run_cli("sample.py", *args, "stop_at_eos=false", stop)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.rstrip("\n").rstrip("-").rstrip("\n") == first_line, stop  # less the sample separator


# Bad input through the entry scripts (every row of the README's error table): tests/test_errors.py


# -- distributed launches (torchrun / srun / Lightning's launcher) ------------------------------------


@pytest.mark.parametrize(
    "env, zero",
    [
        ({}, True),
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),
        ({"RANK": "3"}, False),
        ({"LOCAL_RANK": "1"}, False),
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),
        ({"SLURM_PROCID": "2"}, False),
        ({"RANK": "0", "SLURM_PROCID": "1"}, True),
    ],
)
def test_launch_rank_zero(monkeypatch, env, zero):
    from gpt.launch import is_launch_rank_zero

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert is_launch_rank_zero() is zero


def test_torchrun_processes_share_one_run_dir_and_only_rank_zero_writes_the_config(monkeypatch, capsys):
    from gpt.launch import distributed_overrides

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    args = ["model=tiny", "hydra.run.dir=runs/x/42"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert distributed_overrides("train", args) == args
    monkeypatch.setenv("RANK", "2")
    assert distributed_overrides("train", args) == [*args, "hydra.output_subdir=null", "hydra.job.name=train_rank2"]
    with pytest.raises(GPTError, match="hydra.run.dir="):
        distributed_overrides("train", ["model=tiny"])  # each process would pick its own ${now} directory
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed_overrides("train", ["model=tiny"]) == ["model=tiny"]


def test_hydra_flags_with_a_value_are_not_taken_for_settings():
    """`--cfg job` (how the README and every error message say to list the keys) was refused as a bare word."""
    from gpt.cli import split_flags

    assert split_flags(["--cfg", "job", "-p", "model", "a=1", "-m", "--info", "config", "b=2", "--info"]) == (
        ["--cfg", "job", "-p", "model", "-m", "--info", "config", "--info"],
        ["a=1", "b=2"],
    )
    for script in ("train.py", "finetune.py", "sample.py"):
        proc = run_cli(script, "--cfg", "job", "seed=7")
        assert proc.returncode == 0 and "\nseed: 7\n" in "\n" + proc.stdout, (script, proc.stderr[-2000:])
    assert_user_error(run_cli("train.py", "--cfg", "job", "model.n_layr=2"), "unknown config key 'model.n_layr'")


def test_help_lists_each_scripts_own_config_groups_and_a_foreign_group_is_named():
    """Hydra's --help lists every group under configs/, the other scripts' too (sample.py showed model/,
    data/, ...); ours lists the script's own and its settings."""
    for script, shown, foreign in (
        ("train.py", "model: baby, gpt2", "task: alpaca"),
        ("finetune.py", "task: alpaca, chat, parallel", "data: hub"),
        ("sample.py", "ckpt: null", "model: baby"),
    ):
        proc = run_cli(script, "--help")
        assert proc.returncode == 0, proc.stderr
        assert (
            shown in proc.stdout
            and foreign not in proc.stdout
            and proc.stdout.startswith(("Pretraining", "Fine-tuning", "Sampling"))
        )
    assert_user_error(run_cli("sample.py", "model=tiny"), "model is not a config group of sample.py", "--help")
    assert_user_error(
        run_cli("finetune.py", "experiment=shakespeare_char_cpu"),
        "experiment=shakespeare_char_cpu sets model, which is not a config group of finetune.py",
    )
    assert_user_error(run_cli("train.py", "--help", "model=bogus"), "unknown choice 'model/bogus'")


def test_sampling_code_does_not_import_lightning():
    """sample.py (with or without an adapter's prompt template) starts without Lightning (~1 s of imports)."""
    import subprocess
    import sys

    code = (
        "import sys, gpt.sample, gpt.prompts; print(sorted(m for m in ('lightning', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
