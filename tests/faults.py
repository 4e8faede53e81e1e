"""Run an entry script with a fault injected, the way a real one would strike:

    GPT_FAULT=<kind>@<step> python tests/faults.py train.py [overrides...]

<step> counts optimizer steps (trainer.global_step). Kinds:
    sigkill      SIGKILL the process once step <step> is done
    sigterm      SIGTERM once step <step> is done        sigint   the same with SIGINT (Ctrl-C)
    sigterm_val  SIGTERM during the first validation batch after step <step>
    kill_saving  SIGKILL halfway through writing the first checkpoint after step <step>
    nan          make the loss of step <step> NaN (the forward pass of that one batch returns NaN logits)

The fault is a Lightning callback added to every Trainer.fit, so it reaches pretraining and fine-tuning
alike; in-process, tests use `with injected("nan@5"): ...` (see tests/test_reliability.py).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import runpy
import signal
import sys
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class Fault(Callback):
    def __init__(self, spec: str):
        self.kind, step = spec.split("@")
        self.step = int(step)
        self._hook = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.kind == "nan" and trainer.global_step + 1 == self.step and self._hook is None:
            embedding = next(m for m in pl_module.modules() if isinstance(m, torch.nn.Embedding))  # the token one
            self._hook = embedding.register_forward_hook(lambda m, args, out: out * float("nan"))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.kind == "sigterm_val" and trainer.global_step >= self.step:
            self.kind = "done"
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._hook is not None:
            self._hook.remove()
            self.kind = "done"
        if trainer.global_step == self.step and self.kind in ("sigkill", "sigterm", "sigint"):
            os.kill(os.getpid(), getattr(signal, self.kind.upper()))
        if trainer.global_step >= self.step and self.kind == "kill_saving":
            self.kind = "armed"
            real_save = torch.save

            def save_half_then_die(obj, f, *args, **kwargs):
                real_save(obj, f, *args, **kwargs)
                f.truncate(f.tell() // 2)
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)

            torch.save = save_half_then_die


@contextlib.contextmanager
def injected(*callbacks):
    """Add these callbacks (Fault specs like "nan@5", or Callback objects) to every Trainer.fit inside."""
    real_fit = L.Trainer.fit

    def fit(self, *args, **kwargs):
        self.callbacks.extend(Fault(c) if isinstance(c, str) else c for c in callbacks)
        return real_fit(self, *args, **kwargs)

    L.Trainer.fit = fit
    try:
        yield
    finally:
        L.Trainer.fit = real_fit


# -- checking that a resumed run is the uninterrupted one ---------------------------------------------


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of one metric in a run's metrics.csv."""
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def assert_resumed_run_matches(run: Path, ref: Path, resumed_at: int, steps: int) -> None:
    """`run`, resumed at step `resumed_at`, logged exactly what the uninterrupted `ref` did from there on,
    and ended with the same metrics and the same best model (bit for bit: CPU, fp32, same seed)."""
    train_ref, train_run = logged(ref, "train/loss"), logged(run, "train/loss")
    assert sorted(train_run) == list(range(resumed_at, steps))
    assert [train_run[s] for s in train_run] == [train_ref[s] for s in train_run]
    val_ref, val_run = logged(ref, "val/loss"), logged(run, "val/loss")
    assert val_run == {s: v for s, v in val_ref.items() if s >= resumed_at}  # same evaluations, same values
    metrics, ref_metrics = (json.loads((d / "metrics.json").read_text()) for d in (run, ref))
    assert metrics["step"] == steps and abs(metrics["val_loss"] - ref_metrics["val_loss"]) < 1e-3  # the bar
    assert metrics["best_val_loss"] == ref_metrics["best_val_loss"]  # the best of the whole run, not since resume

    def best(d):
        return sorted((p.name, p.read_bytes()) for p in (d / "checkpoints" / "best").iterdir())

    assert best(run) == best(ref)


def kill_then_resume(
    script: str,
    args: list,
    root: Path,
    kill: str = "kill_saving@30",
    env: Optional[dict] = None,
    inspect_killed: Callable[[Path], None] = lambda run_dir: None,
) -> tuple[Path, Path, Path]:
    """Through the real script: an uninterrupted run (root/ref), the same run killed as `kill` says
    (root/exp/killed; `inspect_killed` looks at it before anything else touches it), then that run resumed
    with ckpt_path=last (root/exp/resumed). Returns the three run dirs, for assert_resumed_run_matches.
    `args` must fix trainer.max_steps, trainer.val_check_interval and trainer.log_every_n_steps=1; e.g.

        ref, killed, resumed = kill_then_resume("finetune.py", [...tiny fine-tuning args...], tmp_path)
        assert_resumed_run_matches(resumed, ref, resumed_at=20, steps=40)
    """
    from conftest import run_cli

    ref, killed, resumed = root / "ref", root / "exp" / "killed", root / "exp" / "resumed"
    for run_dir, extra, fault in ((ref, [], None), (killed, [], kill), (resumed, ["ckpt_path=last"], None)):
        call = ("tests/faults.py", script) if fault else (script,)
        proc = run_cli(*call, *args, *extra, f"hydra.run.dir={run_dir}", env={**(env or {}), "GPT_FAULT": fault or ""})
        assert proc.returncode == (-signal.SIGKILL if fault else 0), proc.stderr[-3000:]
        if fault:
            inspect_killed(run_dir)
    return ref, killed, resumed


if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    with injected(os.environ["GPT_FAULT"]):
        runpy.run_path(script, run_name="__main__")
