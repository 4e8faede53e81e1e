"""Preference tuning (finetune.py method=dpo): a loss on pairs of answers to one prompt, one preferred ("chosen",
y_w) and one not ("rejected", y_l), and the LightningModule that trains with it.

    dpo    (Rafailov et al., 2023)  -log σ(β[(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))])
    simpo  (Meng et al., 2024)      -log σ(β/|y_w| log π(y_w) - β/|y_l| log π(y_l) - γ), reference-free

log π(y) is the sum of the log-probabilities of the answer's tokens (the labels that are not -100: the prompt
and the padding never count) under the model being trained; π_ref is the reference: the base with its LoRA
adapter disabled (PEFT's disable_adapter(), no second copy of the weights), or, for full fine-tuning, a frozen
copy of the base. The reward of an answer is β(log π(y) - log π_ref(y)) (SimPO: β/|y| log π(y)); logged per step
and per validation: the loss, both rewards, their margin and the share of pairs whose chosen reward is the
higher (reward accuracy).

The reference's log-probabilities are computed at each step, in the same batch, rather than once per example
before training: a run of less than an epoch (the showcase's) would spend more forward passes precomputing the
whole train split than it saves, and nothing has to be cached, checkpointed or invalidated: a resumed run
computes the same numbers again. The cost is one forward pass without gradients per step.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from gpt.errors import GPTError, is_finite
from gpt.lit import LanguageModel

log = logging.getLogger(__name__)

LOSSES = ("dpo", "simpo")
PAIR_METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy")


@dataclass(frozen=True)
class PreferenceLoss:
    """The preference loss and its settings (configs/finetune.yaml, dpo.*), checked when made."""

    loss: str
    beta: float
    gamma: float

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise GPTError(f"dpo.loss must be one of {list(LOSSES)} (got {self.loss!r})")
        if not is_finite(self.beta) or self.beta <= 0:
            raise GPTError(f"dpo.beta must be a finite number > 0 (got {self.beta!r}); 0.1 is usual for dpo")
        if not is_finite(self.gamma) or self.gamma < 0:
            raise GPTError(f"dpo.gamma (SimPO's target margin) must be a finite number >= 0 (got {self.gamma!r})")

    @property
    def needs_reference(self) -> bool:
        return self.loss == "dpo"

    def settings(self) -> dict:
        """What a resumed run must share with its checkpoint (gamma only counts for simpo)."""
        return {"loss": self.loss, "beta": self.beta, **({"gamma": self.gamma} if self.loss == "simpo" else {})}

    def __call__(
        self, logps: torch.Tensor, counts: torch.Tensor, ref_logps: Optional[torch.Tensor] = None
    ) -> dict[str, torch.Tensor]:
        """Per pair (B,): the loss, the rewards, their margin and whether the chosen answer's is the higher, from the
        (2B,) summed answer log-probabilities of a pad_pairs batch (chosen rows first) and their token counts."""
        if self.loss == "dpo":
            rewards = self.beta * (logps - ref_logps)
            chosen, rejected = rewards.chunk(2)
            margin = chosen - rejected
            loss = -F.logsigmoid(margin)
        else:
            rewards = self.beta * logps / counts
            chosen, rejected = rewards.chunk(2)
            margin = chosen - rejected
            loss = -F.logsigmoid(margin - self.gamma)
        return {
            "loss": loss,
            "chosen_reward": chosen.detach(),
            "rejected_reward": rejected.detach(),
            "reward_margin": margin.detach(),
            "reward_accuracy": (margin > 0).float().detach(),
        }


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of log p(label) over the positions whose label is not -100, and how many there are.
    In float32 whatever the logits' precision (bf16 log-probabilities summed over an answer would drift)."""
    flat = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return -flat.view(labels.shape).sum(-1), (labels != -100).sum(-1)


@contextlib.contextmanager
def evaluating(module: torch.nn.Module):
    """`module` in eval mode inside the block (no dropout), as it was after it."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


class PreferenceModel(LanguageModel):
    """LanguageModel (optimizer, schedule, checkpoints, resume checks, export) trained on preference pairs: only
    what one step computes and what validation logs differ. `reference`: the frozen model of full fine-tuning;
    None: the policy itself with its LoRA adapter disabled (or none needed: simpo)."""

    def __init__(self, model: torch.nn.Module, tokenizer, preference: PreferenceLoss, reference=None, **kwargs) -> None:
        super().__init__(model, tokenizer, **kwargs)
        self.preference = preference
        if reference is not None:
            reference.requires_grad_(False)
        # Held in a tuple, outside the module tree: not trained, not in the checkpoints (its weights are the
        # base's, whose sha256 they record), not moved by Lightning (reference_logps moves it once).
        self._reference = (reference,)
        if preference.needs_reference and reference is None and not hasattr(model, "disable_adapter"):
            raise GPTError("dpo needs a reference model: a LoRA adapter's base, or a frozen copy of the base")

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """log π_ref of each row's answer, without dropout. Not under torch.no_grad(): the reference's weights need
        no gradient (frozen copy; LoRA's base), so no graph is built anyway, and under bf16 autocast no_grad picks
        other kernels than the policy's pass, which would set the two apart by rounding while they are still equal
        (step 0: loss log 2, rewards 0, exactly)."""
        reference = self._reference[0]
        if reference is None:
            with self.model.disable_adapter(), evaluating(self.model):
                logits = self.model(batch["input_ids"]).logits
        else:
            if next(reference.parameters()).device != self.device:
                reference.to(self.device)
            with evaluating(reference):
                logits = reference(batch["input_ids"]).logits
        return answer_logps(logits.detach(), batch["labels"])[0]

    def pair_stats(self, batch: dict) -> dict[str, torch.Tensor]:
        logps, counts = answer_logps(self.model(batch["input_ids"]).logits, batch["labels"])
        ref = self.reference_logps(batch) if self.preference.needs_reference else None
        return self.preference(logps, counts, ref)

    def training_loss(self, batch: dict):
        stats = self.pair_stats(batch)
        return stats["loss"].mean(), {k: v.mean() for k, v in stats.items() if k != "loss"}

    def on_validation_epoch_start(self):
        # sums over the pairs of each metric, then the number of pairs (all-gathered at the end)
        self._pair_sums = torch.zeros(len(PAIR_METRICS) + 1, device=self.device, dtype=torch.float64)

    def validation_step(self, batch, batch_idx):
        stats = self.pair_stats(batch)
        n = torch.tensor([float(batch["pairs"])], device=self.device, dtype=torch.float64)
        self._pair_sums += torch.cat([torch.stack([stats[k].double().sum() for k in PAIR_METRICS]), n])

    def on_validation_epoch_end(self):
        total = self.all_gather(self._pair_sums)
        if total.dim() > 1:
            total = total.sum(0)
        means = (total[:-1] / total[-1].clamp(min=1)).float()
        self.log("val/loss", means[0], prog_bar=True, sync_dist=False)  # picks the best checkpoint, as in SFT
        self.log_dict({f"val/{k}": v for k, v in zip(PAIR_METRICS[1:], means[1:])}, sync_dist=False)

    def resume_settings(self) -> dict:
        return {**super().resume_settings(), "dpo": self.preference.settings()}


def preference_module(preference: Optional[PreferenceLoss], reference: Optional[torch.nn.Module]) -> dict:
    """gpt.run.train's LightningModule: next-token prediction ({}: its default), or, given `preference`
    (method=dpo), PreferenceModel against `reference` (None: the LoRA model with its adapter disabled)."""
    if preference is None:
        return {}
    log.info(
        "%s, beta %g: the reference is %s",
        preference.loss,
        preference.beta,
        "not needed (reference-free)"
        if not preference.needs_reference
        else "the base with the adapter disabled"
        if reference is None
        else "a frozen copy of the base",
    )
    return {"module_cls": PreferenceModel, "module_kwargs": {"preference": preference, "reference": reference}}
