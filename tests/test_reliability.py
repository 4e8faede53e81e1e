"""What a long run on a shared machine meets: SIGKILL, SIGTERM, Ctrl-C, a full disk, a NaN, a second run in
the same directory, a kill while a model directory is being replaced. Nothing may be lost, and a resumed
run must end where the uninterrupted one does.

The run under test: the tiny model on Tiny Shakespeare, 40 steps, validation every 10, dropout on (so the
random state has to survive a resume too). Faults are injected with tests/faults.py, in-process where the
process survives them, through a real `train.py` process where it does not (SIGKILL).
"""

import contextlib
import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli, train_config
from faults import assert_resumed_run_matches, injected, kill_then_resume, logged
from lightning.pytorch.callbacks import Callback

from gpt.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_model, read_lightning_ckpt, save_model_dir
from gpt.config import GPTConfig
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.pretrain import pretrain
from gpt.run import RunLock, resolve_ckpt_path
from gpt.tokenizer import Tokenizer

RUN = [
    *TINY,
    "trainer.max_steps=40",
    "trainer.val_check_interval=10",
    "trainer.log_every_n_steps=1",
    "model.dropout=0.1",
    "optim.warmup_steps=5",
    "name=rel",
]


def config(*overrides):
    return train_config(*RUN, *overrides)


def ckpt_step(path: Path) -> int:
    return read_lightning_ckpt(path)["global_step"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, shakespeare):
    """runs/rel/ with one uninterrupted run, `ref`; tests add their runs beside it (ckpt_path=last looks there)."""
    root = tmp_path_factory.mktemp("runs") / "rel"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        pretrain(config(f"data.path={shakespeare}"), root / "ref")
    return root


@pytest.fixture
def train(experiment, shakespeare):
    """train(name, *overrides): an in-process pretraining run in runs/rel/<name>/."""
    return lambda name, *overrides: pretrain(config(f"data.path={shakespeare}", *overrides), experiment / name)


def test_same_seed_same_loss_curve_bit_for_bit(experiment, train):
    train("again")
    assert logged(experiment / "again", "train/loss") == logged(experiment / "ref", "train/loss")
    assert logged(experiment / "again", "val/loss") == logged(experiment / "ref", "val/loss")
    train("seed2", "seed=2", "trainer.max_steps=10")  # the comparison can tell runs apart
    other = logged(experiment / "seed2", "train/loss")
    assert all(other[s] != v for s, v in logged(experiment / "ref", "train/loss").items() if s in other)


def test_sigkill_while_saving_then_resume_ends_where_the_uninterrupted_run_ends(tmp_path, shakespeare):
    partial = []

    def killed_halfway_through_a_save(killed: Path):
        ckpts = killed / "checkpoints"
        partial.extend(ckpts.glob(".*.ckpt.tmp-*"))
        assert partial, "the kill was meant to land in the middle of a checkpoint write"
        # The checkpoints of step 20 are whole and load; the half-written step-30 file is beside them, unused.
        assert ckpt_step(ckpts / "last.ckpt") == ckpt_step(ckpts / "best.ckpt") == 20
        for exported in ("last", "best"):
            assert json.loads((ckpts / exported / CONFIG_FILE).read_text())["gpt"]["step"] == 20
            load_model(ckpts / exported)
        with RunLock(killed):  # the dead run's lock went with it
            pass

    ref, killed, resumed = kill_then_resume(
        "train.py",
        [*RUN, f"data.path={shakespeare}"],
        tmp_path / "rel",
        kill="kill_saving@30",
        inspect_killed=killed_halfway_through_a_save,
    )
    last = killed / "checkpoints" / "last.ckpt"
    assert json.loads((resumed / "metrics.json").read_text())["resumed_from"] == str(last)  # ckpt_path=last found it
    assert_resumed_run_matches(resumed, ref, resumed_at=20, steps=40)
    assert not any(p.exists() for p in partial)  # resuming cleared the dead run's half-written file


@pytest.mark.parametrize("sig, step", [(signal.SIGTERM, 25), (signal.SIGINT, 13)])
def test_sigterm_and_ctrl_c_save_a_checkpoint_that_resumes_exactly(experiment, train, caplog, sig, step):
    name, ctrl_c = signal.Signals(sig).name, signal.getsignal(signal.SIGINT)
    with injected(f"{name.lower()}@{step}"), pytest.raises(SystemExit) as stop:
        train(f"stopped-{name}")
    assert stop.value.code == 128 + sig  # the shell's convention for "ended by this signal"
    last = experiment / f"stopped-{name}" / "checkpoints" / "last.ckpt"
    assert ckpt_step(last) == step  # saved on the way out, between validations
    assert any(f"{name}: stopped after step {step}; saved {last}" in r.getMessage() for r in caplog.records)
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # Ctrl-C is handled as before the run again

    train(f"resumed-{name}", f"ckpt_path={last}")
    assert_resumed_run_matches(experiment / f"resumed-{name}", experiment / "ref", resumed_at=step, steps=40)


class Snapshot(Callback):
    """The weights before and after optimizer step `step` (1-based)."""

    def __init__(self, step):
        self.step, self.before, self.after = step, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.after = {k: v.clone() for k, v in pl_module.state_dict().items()}


# How the guard meets a bad step: read at every step; read only at logged steps (every 4th) while the fused AdamW
# drops the step on the device (gpt/guard.py); read and dropped at every step by an unfused AdamW.
GUARDS = {"every-step": [], "deferred": ["trainer.log_every_n_steps=4"], "unfused": ["optim.fused=false"]}


@pytest.mark.parametrize("guard", GUARDS)
def test_nan_stops_with_the_step_and_a_hint_keeping_the_last_good_checkpoint(experiment, train, guard):
    with injected("nan@15"), pytest.raises(GPTError) as e:
        train(f"nan-stop-{guard}", *GUARDS[guard])
    msg = str(e.value)
    assert "at step 15" in msg and "optim.lr" in msg and "on_nan=skip" in msg
    last = experiment / f"nan-stop-{guard}" / "checkpoints" / "last.ckpt"
    assert str(last) in msg and ckpt_step(last) == 10  # nothing was saved on the way out
    model, _ = load_model(last)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("guard", GUARDS)
def test_nan_skip_drops_that_step_and_counts_it(experiment, train, guard):
    snapshot, run = Snapshot(15), experiment / f"nan-skip-{guard}"
    with injected("nan@15", snapshot):
        metrics = train(run.name, "on_nan=skip", "trainer.max_steps=20", *GUARDS[guard])
    assert metrics["step"] == 20 and metrics["skipped_steps"] == 1
    assert logged(run, "train/skipped_steps")[19] == 1
    assert all(torch.equal(snapshot.before[k], snapshot.after[k]) for k in snapshot.before)  # no update at all
    assert snapshot.before.keys() and metrics["val_loss"] < logged(run, "val/loss")[9]


def test_full_disk_while_saving_is_one_clear_error_and_the_previous_checkpoint_survives(experiment, train, monkeypatch):
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):  # the third .ckpt write (step 20's best.ckpt) hits a full disk halfway
        calls.append(f)
        if len(calls) < 3:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(GPTError) as e:
        train("disk-full", "trainer.max_steps=20")
    ckpts = experiment / "disk-full" / "checkpoints"
    assert str(e.value).startswith(f"no space left on device writing {ckpts / 'best.ckpt'}")
    assert "hydra.run.dir" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt_step(ckpts / "best.ckpt") == ckpt_step(ckpts / "last.ckpt") == 10
    assert not [p for p in ckpts.iterdir() if ".tmp-" in p.name]  # the partial file was removed
    load_model(ckpts / "best")


def test_full_disk_while_exporting_keeps_the_previous_model_dir(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    tok = Tokenizer.char_level("abc")
    model = GPT(GPTConfig(block_size=8, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8))
    save_model_dir(model, tok, tmp_path / "m")

    def full(*args, **kwargs):  # what safetensors raises on ENOSPC
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("gpt.checkpoint.save_file", full)
    with pytest.raises(GPTError, match=f"no space left on device writing {tmp_path / 'm'}"):
        save_model_dir(GPT(model.config), tok, tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    again, _ = load_model(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_a_second_run_into_a_directory_in_use_is_refused(experiment, train):
    busy = experiment / "busy"
    with RunLock(busy), pytest.raises(GPTError, match=f"another run \\(pid {os.getpid()}\\) is writing to {busy}"):
        train("busy")
    assert not (busy / "checkpoints").exists()


@pytest.mark.slow
def test_data_parallel_workers_share_the_run_directory(tmp_path, shakespeare):
    """Rank 1 re-runs train.py into rank 0's directory: the one-run-per-directory checks must let it in."""
    run = tmp_path / "ddp"
    proc = run_cli(
        "train.py",
        *TINY,
        f"data.path={shakespeare}",
        "trainer.devices=2",
        "+trainer.strategy=ddp",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        f"hydra.run.dir={run}",
        env={"OMP_NUM_THREADS": "1"},
    )  # two processes on a shared machine: one thread each
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["step"] == 4 and ckpt_step(run / "checkpoints/last.ckpt") == 4


def test_resuming_with_another_model_or_vocabulary_is_refused(experiment, train, tmp_path):
    last = experiment / "ref" / "checkpoints" / "last.ckpt"
    with pytest.raises(GPTError, match="model.n_embd=64, this run has 32"):
        train("other-shape", f"ckpt_path={last}", "model.n_embd=32", "trainer.max_steps=50")
    corpus = tmp_path / "other.txt"
    corpus.write_text("".join(chr(c) for c in range(0x400, 0x4A0)) * 40)  # another alphabet: another vocabulary
    with pytest.raises(GPTError, match="model.vocab_size=61"):
        train("other-vocab", f"ckpt_path={last}", f"data.path={corpus}", "trainer.max_steps=50")


def test_the_last_step_is_validated_and_saved_whatever_the_val_check_interval(experiment, train):
    """Validation every 10 steps: a 15-step run validates and saves step 15 (the 5 steps after step 10 are not
    lost), a 5-step run still ends with a best model, and a 40-step run validates step 40 once."""
    assert sorted(logged(experiment / "ref", "val/loss")) == [9, 19, 29, 39]
    metrics = train("odd", "trainer.max_steps=15")
    run = experiment / "odd"
    assert sorted(logged(run, "val/loss")) == [9, 14]
    assert metrics["val_loss"] == pytest.approx(logged(run, "val/loss")[14], abs=1e-6)
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 15
    assert json.loads((run / "checkpoints" / "last" / CONFIG_FILE).read_text())["gpt"]["step"] == 15
    metrics = train("short", "trainer.max_steps=5")
    run = experiment / "short"
    assert sorted(logged(run, "val/loss")) == [4]
    assert metrics["best_model"] == str(run / "checkpoints" / "best") and (run / "checkpoints" / "best").is_dir()
    assert ckpt_step(run / "checkpoints" / "best.ckpt") == 5


def test_resuming_a_finished_run_is_refused_with_the_fix(experiment, train):
    last = experiment / "ref" / "checkpoints" / "last.ckpt"
    with pytest.raises(
        GPTError, match="already at step 40 and trainer.max_steps=40: nothing is left to train; raise trainer.max_steps"
    ):
        train("finished", f"ckpt_path={last}")
    assert not (experiment / "finished" / "checkpoints").exists()


class GradNormAtStep(Callback):
    """(fused?, gradient norm) as the optimizer sees them, after clipping, at every step."""

    def __init__(self):
        self.seen = []

    def on_train_start(self, trainer, pl_module):
        def record(opt, *_):
            grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
            self.seen.append((opt.defaults["fused"], float(torch.nn.utils.get_total_norm(grads))))

        trainer.optimizers[0].register_step_post_hook(record)  # grads are computed inside step()


def test_bf16_mixed_clips_gradients_for_a_fused_adamw(train):
    """bf16-mixed scales no loss: the AdamW stays fused and still gets clipped gradients (Lightning's AMP
    plugin alone refuses to clip for any fused optimizer, a rule for fp16's scaled gradients)."""
    norms = GradNormAtStep()
    with injected(norms):
        metrics = train(
            "bf16",
            "trainer.precision=bf16-mixed",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "trainer.gradient_clip_val=0.05",
        )
    assert metrics["step"] == 4 and metrics["precision"] == "bf16-mixed" and metrics["val_loss"] < 4.5
    assert [fused for fused, _ in norms.seen] == [True] * 4
    assert all(norm <= 0.05 * 1.001 for _, norm in norms.seen), norms.seen  # unclipped norms are ~1 here


# -- a model directory replaced while a kill strikes -------------------------------------------------


def _die_at(event: int):
    """In a forked child: SIGKILL at the `event`-th filesystem step of a directory replacement."""
    import shutil

    import gpt.checkpoint as ck

    count = [0]

    def step(fn):
        def wrapped(*args, **kwargs):
            count[0] += 1
            if count[0] == event:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return wrapped

    real_save = ck.save_file

    def half_written(tensors, path, metadata=None):  # event 1: killed halfway through the weights
        real_save(tensors, path, metadata=metadata)
        if event == 1:
            os.truncate(path, os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    ck.save_file = half_written
    count[0] = 1
    os.replace, os.rename, shutil.rmtree = step(os.replace), step(os.rename), step(shutil.rmtree)


@pytest.mark.parametrize("event", range(1, 7))
def test_a_kill_at_any_point_of_an_export_leaves_a_loadable_model(tmp_path, event):
    tok = Tokenizer.char_level("abc")
    old = GPT(GPTConfig(block_size=8, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8))
    new = GPT(old.config)
    save_model_dir(old, tok, tmp_path / "m")
    pid = os.fork()
    if pid == 0:  # the child replaces m/ and is killed at step `event` (or finishes, past the last step)
        with contextlib.suppress(BaseException):
            _die_at(event)
            save_model_dir(new, tok, tmp_path / "m")
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    # 5 steps: the weights write, 3 renames, removing .old (leftovers are only removed where there are some).
    assert os.WIFSIGNALED(status) == (event <= 5)
    loaded, _ = load_model(tmp_path / "m")  # recovers an interrupted swap if it has to
    same_as = [
        m
        for m in (old, new)
        if all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), m.state_dict().values()))
    ]
    assert len(same_as) == 1  # one whole version, old or new, never a mixture
    save_model_dir(new, tok, tmp_path / "m")  # and the next export cleans up whatever was left
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json"])


def test_ckpt_path_last_is_the_newest_run_and_never_the_latest_link(tmp_path):
    """`latest` links to the newest run and moves to the new run as soon as that starts. Resuming through
    the link read the new, empty run's checkpoint (FileNotFoundError) whenever the directory listing put
    the link after the run it names: an order of the file system's (hashed names on ext4), so the case is
    set up under 40 run names."""
    import zipfile

    for n in range(40):
        name, run = tmp_path / "runs" / f"x{n}", f"2026-11-21_16-{n:02d}-05"
        ckpt = name / run / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        with zipfile.ZipFile(ckpt, "w") as z:  # what resolve_ckpt_path checks: a whole zip archive
            z.writestr("data.pkl", b"")
        os.symlink(run, name / "latest")
        (name / "2026-11-21_17-00-00").mkdir()  # the new run's directory, which Hydra has made by then
        assert resolve_ckpt_path("last", name / "2026-11-21_17-00-00") == str(ckpt)
    with pytest.raises(GPTError, match="no earlier run"):
        resolve_ckpt_path("last", tmp_path / "runs" / "y" / "new")


def test_writing_checkpoints_is_not_counted_as_training_time(train, monkeypatch):
    """train_seconds and tokens/s leave out validation and the checkpoints written after it."""
    import time as real_time

    import gpt.callbacks as callbacks

    ahead = [0.0]

    class Clock:  # the callbacks' clock, pushed 100 s on by every checkpoint save: as if each took that long
        perf_counter = staticmethod(lambda: real_time.perf_counter() + ahead[0])
        monotonic = staticmethod(real_time.monotonic)

    save = callbacks.ExportingCheckpoint._save_checkpoint

    def slow_save(self, trainer, filepath):
        save(self, trainer, filepath)
        ahead[0] += 100.0

    monkeypatch.setattr(callbacks, "time", Clock)
    monkeypatch.setattr(callbacks.ExportingCheckpoint, "_save_checkpoint", slow_save)
    metrics = train("clock", "trainer.max_steps=20")  # validated and saved (best + last) at steps 10 and 20
    assert ahead[0] >= 300 and 0 < metrics["train_seconds"] < 100
