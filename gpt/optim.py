"""What shapes the weights besides the loss: the optimizer (AdamW, or Muon for the hidden matrices with AdamW for
the rest), the clock of a time budget that the LR schedule follows, and an exponential moving average (EMA) of
the weights. gpt/lit.py's LanguageModel builds them from the optim/ settings (docs/pretrain.md, "Muon, a time
budget, weight averaging").

Muon and AdamW are one optimizer object for Lightning (MuonAdamW), not two: Lightning takes several optimizers
only under manual optimization, which would leave gradient accumulation, clipping, the precision plugin's
closure and the NaN guard's hook (gpt/guard.py) to us. One object keeps all of them working unchanged: its
param_groups are the two inner optimizers' own group dicts (AdamW's first), so clipping, the guard's gradient
norm and the LR schedule (one LambdaLR: each group keeps its own base lr, the multiplier is shared) see every
parameter; step() steps both (AdamW stays fused); state_dict() holds both, so a .ckpt resumes bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from typing import Callable, Optional

import torch
from lightning.pytorch.callbacks import Callback
from torch.optim._muon import muon as muon_update  # torch.optim.Muon's own update, applied to row blocks below

from gpt.errors import GPTError, is_finite
from gpt.model import CausalSelfAttention, SwiGLU

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "muon")
MUON_ADJUST_LR = ("original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn choices
AVERAGING = ("none", "ema")


def check_optimizer_settings(
    optimizer, muon_lr, muon_momentum, muon_weight_decay, muon_adjust_lr, budget_minutes, averaging, ema_decay
) -> None:
    """The settings this module adds to optim/, checked once, as LanguageModel is built."""
    if optimizer not in OPTIMIZERS:
        raise GPTError(f"optim.optimizer must be one of {', '.join(OPTIMIZERS)} (got {optimizer!r}); e.g. optim=muon")
    if not (is_finite(muon_lr) and muon_lr > 0):
        raise GPTError(f"optim.muon_lr must be a finite number > 0 (got {muon_lr!r})")
    if not (is_finite(muon_momentum) and 0 <= muon_momentum < 1):
        raise GPTError(f"optim.muon_momentum must be a number in [0, 1), e.g. 0.95 (got {muon_momentum!r})")
    if not (is_finite(muon_weight_decay) and muon_weight_decay >= 0):
        raise GPTError(f"optim.muon_weight_decay must be a finite number >= 0 (got {muon_weight_decay!r})")
    if muon_adjust_lr not in MUON_ADJUST_LR:
        raise GPTError(f"optim.muon_adjust_lr must be one of {', '.join(MUON_ADJUST_LR)} (got {muon_adjust_lr!r})")
    if budget_minutes is not None and not (is_finite(budget_minutes) and budget_minutes > 0):
        raise GPTError(f"budget_minutes must be a number of minutes > 0, or null for none (got {budget_minutes!r})")
    if averaging not in AVERAGING:
        raise GPTError(f"averaging must be one of {', '.join(AVERAGING)} (got {averaging!r}); e.g. averaging=ema")
    if not (is_finite(ema_decay) and 0 < ema_decay < 1):
        raise GPTError(f"ema_decay must be a number in (0, 1), e.g. 0.99 (got {ema_decay!r})")


# ----------------------------------------------------------------------------------------------------
# Which parameter goes to which optimizer


def row_blocks(model: torch.nn.Module) -> dict[int, tuple[int, ...]]:
    """{id(weight): row counts} of the fused matrices: attention's c_attn (Q, K and V stacked; K and V narrower
    with fewer key/value heads) and SwiGLU's c_fc (gate and up). Muon orthogonalizes each block on its own."""
    blocks = {}
    for module in model.modules():
        if isinstance(module, CausalSelfAttention) and isinstance(module.c_attn, torch.nn.Linear):
            blocks[id(module.c_attn.weight)] = tuple(module.split)
        elif isinstance(module, SwiGLU) and isinstance(module.c_fc, torch.nn.Linear):  # not LoRA-wrapped
            half = module.c_fc.weight.shape[0] // 2
            blocks[id(module.c_fc.weight)] = (half, half)
    return blocks


def split_parameters(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Parameter]], list, list]:
    """The trainable parameters as (muon, adamw_decay, adamw_no_decay), each a list of (name, parameter), every
    parameter in exactly one (a tied matrix once).

    Muon: the weights of the Linear layers inside the transformer blocks (attention and MLP projections), the
    hidden matrices it is made for. AdamW: the token and position embeddings and the output head (an embedding
    in disguise, and tied to the token one by default), norm gains and biases (1-D), and LoRA's adapter
    matrices (rank-r factors of an update, not weight matrices: orthogonalizing each factor's update does not
    orthogonalize their product's, and their tuned AdamW settings carry over). Weight decay in AdamW on
    matrices only (embeddings, head, adapters), as before."""
    head = {id(p) for name, m in model.named_modules() if name.split(".")[-1] == "lm_head" for p in m.parameters()}
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    hidden = {
        id(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".h." in f".{name}." and "lora_" not in name
    }
    seen, muon, decay, no_decay = set(), [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in hidden and p.dim() == 2 and id(p) not in head | embeddings:
            muon.append((name, p))
        else:
            (decay if p.dim() >= 2 else no_decay).append((name, p))
    return muon, decay, no_decay


class Muon(torch.optim.Muon):
    """torch.optim.Muon, where a param group may say `blocks` (row counts): each block of rows is orthogonalized on
    its own, with its own shape's lr adjustment, as if the fused matrix were separate ones.

    GPT-2's attention holds Q, K and V in one (3C, C) matrix. Orthogonalizing it whole would equalize the
    singular values of the three maps' updates jointly and scale them by the stack's shape (sqrt(3) under
    adjust_lr_fn="original"); split, each map gets the update it would get as its own Linear (nanochat's
    separate c_q/c_k/c_v, modded-nanogpt's per-block qkv). The blocks are views of the parameter, its gradient
    and its momentum buffer, so the state is torch's own (one momentum buffer per parameter)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            blocks = group.get("blocks")
            if blocks:
                params, grads, bufs = ([b for t in ts for b in t.split(list(blocks))] for ts in (params, grads, bufs))
            muon_update(
                params,
                grads,
                bufs,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                nesterov=group["nesterov"],
                ns_coefficients=group["ns_coefficients"],
                eps=group["eps"],
                ns_steps=group["ns_steps"],
                adjust_lr_fn=group["adjust_lr_fn"],
                has_complex=False,
            )
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """Muon and AdamW as one optimizer (see the module's docstring for why one). param_groups: AdamW's groups,
    then Muon's, the same dicts the two hold."""

    def __init__(self, adamw: torch.optim.AdamW, muon: Muon):
        self.adamw, self.muon = adamw, muon
        super().__init__([*adamw.param_groups, *muon.param_groups], {})  # adds the same dicts, copies none

    @property
    def state(self) -> dict:  # both optimizers' per-parameter state, read-only (each loads and moves its own)
        return {**self.adamw.state, **self.muon.state}

    @state.setter
    def state(self, value) -> None:  # torch's Optimizer.__init__ sets an empty one
        pass

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # Lightning's closure: forward, backward, then clipping and the NaN guard
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.adamw.load_state_dict(state_dict["adamw"])
        self.muon.load_state_dict(state_dict["muon"])
        # torch's load_state_dict makes new group dicts: share them again, or the LR schedule would set stale ones
        self.param_groups = [*self.adamw.param_groups, *self.muon.param_groups]


def build_optimizer(
    model: torch.nn.Module,
    optimizer: str,
    lr: float,
    betas: tuple,
    eps: float,
    weight_decay: float,
    fused: bool,
    muon_lr: float,
    muon_momentum: float,
    muon_weight_decay: float,
    muon_adjust_lr: str,
) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter (optimizer=adamw), or Muon over the hidden matrices and AdamW over
    the rest (optimizer=muon; split_parameters says which is which)."""
    muon, decay, no_decay = split_parameters(model)
    if optimizer == "adamw":
        decay, muon = decay + muon, []
    if not (muon or decay or no_decay):
        raise GPTError("no trainable parameters: check the LoRA target modules")
    groups = [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=fused)
    if not muon:
        if optimizer == "muon":
            log.info("optim=muon: no hidden matrix trains here (LoRA adapters train with AdamW); AdamW only")
        return adamw
    blocks = row_blocks(model)
    by_blocks: dict[Optional[tuple], list] = {}
    for _, p in muon:
        by_blocks.setdefault(blocks.get(id(p)), []).append(p)
    muon_groups = [{"params": ps, "blocks": b} for b, ps in by_blocks.items()]
    inner = Muon(
        muon_groups,
        lr=muon_lr,
        momentum=muon_momentum,
        nesterov=True,
        weight_decay=muon_weight_decay,
        adjust_lr_fn=muon_adjust_lr,
    )
    if not adamw.param_groups:  # cannot happen with a GPT (norm gains are 1-D), but a Muon alone is still fine
        return inner
    return MuonAdamW(adamw, inner)


# ----------------------------------------------------------------------------------------------------
# A time budget


class TimeBudget(Callback):
    """Training ends `seconds` after it started (validation and checkpoint writing count: it is the wall clock
    of the run), and the LR schedule reads how much of the budget is spent (`spent`). A resumed run goes on
    with the time left: the elapsed time is saved in the checkpoint.

    `clock` is the time function (tests replace it). Lightning's Timer callback (trainer.max_time) does the
    stopping and the saving too, but reads time.monotonic in each of its hooks, with no clock to inject."""

    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self._offset = 0.0  # spent before this process resumed the run
        self._start: Optional[float] = None
        self._announced = False

    def elapsed(self) -> float:
        return self._offset + (self.clock() - self._start if self._start is not None else 0.0)

    def spent(self) -> float:
        """The fraction of the budget spent, in [0, 1]."""
        return min(1.0, self.elapsed() / self.seconds)

    def on_train_start(self, trainer, pl_module):
        if self._offset >= self.seconds:
            raise GPTError(
                f"the checkpoint has already spent the time budget ({self._offset / 60:.2f} of "
                f"{self.seconds / 60:g} minutes): nothing is left to train; raise budget_minutes to go on"
            )
        self._start = self.clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.strategy.broadcast(self.elapsed() >= self.seconds):  # rank 0's clock decides for all
            trainer.should_stop = True
            if not self._announced:
                self._announced = True
                log.info("time budget of %g min spent at step %d: stopping", self.seconds / 60, trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        self._offset, self._start = self.elapsed(), None

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._offset = float(state_dict.get("elapsed", 0.0))


def lr_multiplier(
    step: int, warmup_steps: int, decay_steps: int, min_ratio: float, spent: Optional[float] = None
) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at decay_steps, then flat (nanoGPT's schedule).

    With a time budget, `spent` is the fraction of it used: the decay then runs over whichever ends first, the
    budget or decay_steps (its progress is the larger of the two fractions), and reaches min_ratio at the
    deadline. Warmup stays a number of steps: it protects the first updates, whatever they cost in time."""
    if spent is None:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if step >= decay_steps:
            return min_ratio
        progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
        return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)
    warm = (step + 1) / (warmup_steps + 1) if step < warmup_steps else 1.0
    by_steps = 1.0 if step >= decay_steps else max(0, step - warmup_steps) / max(1, decay_steps - warmup_steps)
    progress = min(1.0, max(spent, by_steps))
    return min(warm, min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio))


# ----------------------------------------------------------------------------------------------------
# Weight averaging


class WeightAverage:
    """An exponential moving average of a model's trainable weights, held in a copy of the model (not a
    submodule of the LightningModule: its state_dict and the exported files stay the model's own).

    The decay ramps up as (1 + n) / (10 + n) over the first updates, capped at `decay`, so the random initial
    weights do not linger in the average of a short run. Lightning's WeightAveraging callback would validate
    and export only the average; here both are validated and the better one is exported (gpt/lit.py)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        mine = dict(self.model.named_parameters())
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.averaged = [mine[name] for name in self.names]

    @staticmethod
    def trainable(model: torch.nn.Module) -> list[torch.Tensor]:
        return [p.detach() for p in model.parameters() if p.requires_grad]

    def to(self, device) -> None:
        self.model.to(device)
        self.averaged = [dict(self.model.named_parameters())[name] for name in self.names]

    @torch.no_grad()
    def reset(self, model: torch.nn.Module) -> None:
        torch._foreach_copy_(self.averaged, self.trainable(model))
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.averaged, self.trainable(model), 1.0 - decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"updates": self.updates, "weights": dict(zip(self.names, (p.detach().clone() for p in self.averaged)))}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        weights = state["weights"]
        if sorted(weights) != sorted(self.names):
            raise GPTError(
                "the checkpoint's weight average holds other parameters than this run trains; resume with the "
                "settings it was trained with"
            )
        torch._foreach_copy_(self.averaged, [weights[name] for name in self.names])
        self.updates = int(state["updates"])

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module):
        """The averaged weights in `model` inside the block, its own weights back after it."""
        own = self.trainable(model)
        saved = [p.clone() for p in own]
        with torch.no_grad():
            torch._foreach_copy_(own, self.averaged)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(own, saved)
