"""The NaN guard: a training step whose loss or gradients are not finite is never applied.

The verdict (loss and gradient norm finite?) is a tensor on the training device. Reading it on the host
costs a device sync, and one sync per step stops a GPU from running ahead of the Python that launches its
kernels, which is most of a small model's step. So with a fused AdamW (the default on CPUs and GPUs) the
verdict goes to the optimizer as its `found_inf` flag (the one GradScaler sets): the fused kernel drops a bad
step on the device (no update, no moment change, no step count), and the host reads the counts only when
the step's metrics are logged, before each validation (and so before each checkpoint) and at the end.
Any other optimizer (optim.fused=false, fp16's loss scaling) is checked, and a bad step dropped, at every step.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from lightning.pytorch.callbacks import Callback

from gpt.errors import GPTError

log = logging.getLogger(__name__)


def drops_on_device(trainer, optimizer) -> bool:
    """Whether `optimizer` skips a step itself when given found_inf: a fused AdamW without loss scaling (fp16's
    GradScaler sets found_inf itself)."""
    return (
        isinstance(optimizer, torch.optim.AdamW)
        and bool(optimizer.defaults.get("fused"))
        and getattr(trainer.precision_plugin, "scaler", None) is None
    )


class NonFiniteGuard(Callback):
    """A NaN/Inf training loss or gradient, found before the optimizer applies it (so the weights, and the
    last checkpoint, stay good). on_nan=stop: raise a GPTError naming the step, at the next check (see the
    module's docstring; the bad step itself is never applied). on_nan=skip: drop that optimizer step and
    count it in train/skipped_steps; stop anyway after `max_consecutive_skips` skipped steps in a row, which
    no longer looks like a passing spike."""

    HINT = "lower optim.lr, train in fp32 (trainer.precision=32-true) or clip gradients (trainer.gradient_clip_val=1.0)"

    def __init__(self, action: str = "stop", max_consecutive_skips: int = 50):
        if action not in ("stop", "skip"):
            raise GPTError(f"on_nan must be stop or skip (got {action!r})")
        self.action, self.max_consecutive_skips = action, max_consecutive_skips
        self.skipped = self._in_a_row = 0  # as of the last check
        self._bad: Optional[torch.Tensor] = None  # any non-finite micro-batch loss since the last step
        # On the device since the last check: bad steps, the current run of them, the longest run, the first one.
        self._counts: Optional[dict[str, torch.Tensor]] = None

    def on_before_backward(self, trainer, pl_module, loss):
        bad = ~torch.isfinite(loss.detach())
        self._bad = bad if self._bad is None else self._bad | bad

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        bad, self._bad = self._bad, None
        # fp16's GradScaler expects inf gradients now and then and skips those steps itself.
        norm = pl_module.grad_norm(optimizer) if getattr(trainer.precision_plugin, "scaler", None) is None else None
        if norm is not None:  # the same norm that clipping then uses
            grad_bad = ~torch.isfinite(norm)
            bad = grad_bad if bad is None else bad | grad_bad
        on_device = drops_on_device(trainer, optimizer)
        if on_device:  # read by AdamW.step once this hook returns (None: apply the step)
            optimizer.found_inf = None if bad is None else bad.float()
        if bad is None:
            return
        self._count(bad, trainer.global_step + 1)
        if not on_device and self.check(trainer):  # one device sync per optimizer step
            optimizer.zero_grad(set_to_none=True)  # no gradient: AdamW leaves the parameter and its moments alone

    def _count(self, bad: torch.Tensor, step: int) -> None:
        c = self._counts
        if c is None:
            zero = torch.zeros((), dtype=torch.long, device=bad.device)
            c = self._counts = dict(n=zero, run=zero + self._in_a_row, longest=zero, first=zero - 1)
        b = bad.long()
        c["n"] = c["n"] + b
        c["run"] = (c["run"] + 1) * b
        c["longest"] = torch.maximum(c["longest"], c["run"])
        c["first"] = torch.where((c["first"] < 0) & bad, step, c["first"])

    def check(self, trainer) -> int:
        """Read the counts since the last check (one device sync); stop, or log the skipped steps and return
        how many there were."""
        if self._counts is None:
            return 0
        n, run, longest, first = torch.stack([self._counts[k] for k in ("n", "run", "longest", "first")]).tolist()
        self._counts, self._in_a_row = None, run
        if n == 0:
            return 0
        if self.action == "stop" or longest >= self.max_consecutive_skips:
            last = getattr(trainer.checkpoint_callback, "last_model_path", "")
            saved = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
            why, alt = (
                (f" for {longest} steps in a row", "")
                if self.action == "skip"
                else ("", ", or set on_nan=skip to skip such steps")
            )
            raise GPTError(
                f"non-finite loss or gradients (NaN/Inf) at step {first}{why}; training stopped and "
                f"{saved}; {self.HINT}{alt}"
            )
        self.skipped += n
        steps = f"step {first}" if n == 1 else f"{n} steps from step {first} on"
        log.warning("non-finite loss or gradients at %s: optimizer step skipped (%d so far)", steps, self.skipped)
        return n

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if getattr(pl_module, "logs_now", False):
            self.check(trainer)
            if self.action == "skip":
                pl_module.log("train/skipped_steps", float(self.skipped))

    def on_validation_start(self, trainer, pl_module):
        self.check(trainer)

    def on_train_end(self, trainer, pl_module):
        self.check(trainer)

    def state_dict(self) -> dict:  # saved in the .ckpt: a resumed run keeps counting
        pending = self._counts or {}
        return {
            "skipped": self.skipped + int(pending.get("n", 0)),
            "in_a_row": int(pending["run"]) if "run" in pending else self._in_a_row,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self._in_a_row = state_dict.get("skipped", 0), state_dict.get("in_a_row", 0)
