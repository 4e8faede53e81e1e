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
import os
import runpy
import signal
import sys

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


if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    with injected(os.environ["GPT_FAULT"]):
        runpy.run_path(script, run_name="__main__")
