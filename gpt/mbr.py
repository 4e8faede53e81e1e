"""Minimum Bayes-risk (MBR) decoding: of several candidate texts for one prompt, the one that agrees most with
the others. Candidates: the num_beams best texts of beam search (num_beams=1: the greedy text), `samples` texts
drawn at a temperature, and (include_source) the source line itself, copied. Each candidate's utility is its mean
sacrebleu sentence score (chrF or BLEU) with every other candidate as the reference; the highest wins (of equal
ones, the first: beam search's before the samples, the copied source last). Used by sample.py (mbr=true) and
fine-tuning's scoring (eval.mbr=true).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional, Sequence

import torch

from gpt.completions import generate_batch
from gpt.errors import GPTError, is_int, is_number
from gpt.model import GPT
from gpt.tokenizer import Tokenizer

UTILITIES = ("chrf", "bleu")


def check_mbr(mbr, samples, include_source, utility, temperature, prefix: str = "") -> None:
    """The MBR settings sample.py (prefix "") and fine-tuning's scoring (prefix "eval.") share; temperature: the
    one the samples are drawn at."""
    for key, value in (("mbr", mbr), ("mbr_include_source", include_source)):
        if not isinstance(value, bool):
            raise GPTError(f"{prefix}{key} is true or false (got {value!r})")
    if not is_int(samples) or samples < 0:
        raise GPTError(f"{prefix}mbr_samples must be an integer >= 0 (got {samples!r}); 0 = beam search's texts only")
    if utility not in UTILITIES:
        raise GPTError(f"{prefix}mbr_utility must be one of {list(UTILITIES)} (got {utility!r})")
    if samples and not mbr:
        raise GPTError(f"{prefix}mbr_samples draws candidates for {prefix}mbr=true; set it, or drop mbr_samples")
    if mbr and samples and (not is_number(temperature) or temperature <= 0):
        key = "eval.mbr_temperature" if prefix else "temperature"
        raise GPTError(f"{prefix}mbr_samples={samples} samples its candidates: {key} must be > 0 (got {temperature!r})")


@functools.lru_cache(maxsize=None)
def _metric(utility: str):
    import sacrebleu

    # sacrebleu's sentence-level defaults (sacrebleu.sentence_chrf / sentence_bleu: BLEU with effective order)
    logging.getLogger("sacrebleu").setLevel(logging.ERROR)  # its warning about pre-tokenized text, on every call
    return sacrebleu.metrics.CHRF() if utility == "chrf" else sacrebleu.metrics.BLEU(effective_order=True)


def mbr_select(candidates: Sequence[str], utility: str) -> int:
    """The index of the candidate with the highest mean utility against the other candidates (the first of
    equals); a single candidate is chosen as it is. Duplicates count as often as they occur: a text the model
    produced several times is that much more likely, which MBR rewards."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    if len(candidates) == 1:
        return 0
    metric = _metric(utility)
    means = [
        sum(metric.sentence_score(c, [o]).score for j, o in enumerate(candidates) if j != i) / (len(candidates) - 1)
        for i, c in enumerate(candidates)
    ]
    return max(range(len(candidates)), key=means.__getitem__)


def mbr_candidates(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: list[str],
    *,
    sources: Optional[Sequence[str]],
    num_beams: int,
    samples: int,
    include_source: bool,
    generator: Optional[torch.Generator] = None,
    temperature: float = 1.0,
    top_k=None,
    top_p=None,
    **decoding,
) -> list[list[str]]:
    """The candidates of each prompt, in the order mbr_select breaks ties by: the num_beams best of beam search
    (the greedy text with num_beams=1), `samples` sampled texts, the source (its line of `sources`, else the
    prompt) when include_source. `decoding`: generate_batch's other settings (max_new_tokens, stops, batch_size,
    length_penalty, no_repeat_ngram_size, copy_bonus, strict), shared by beam search and sampling."""
    n = len(prompts)
    beams = generate_batch(
        model,
        tokenizer,
        prompts,
        sources=sources,
        temperature=0.0,
        num_beams=num_beams,
        num_return_sequences=num_beams,
        **decoding,
    )
    candidates = [beams[i * num_beams : (i + 1) * num_beams] for i in range(n)]
    if samples:
        if generator is None:
            raise ValueError("sampled candidates need a seeded generator (the same seed, the same candidates)")
        # Prompt i's s-th sample is row i * samples + s: each its own random stream (see generate_batch).
        drawn = generate_batch(
            model,
            tokenizer,
            [p for p in prompts for _ in range(samples)],
            sources=None if sources is None else [t for t in sources for _ in range(samples)],
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            **decoding,
        )
        for i in range(n):
            candidates[i] += drawn[i * samples : (i + 1) * samples]
    if include_source:
        for i in range(n):
            candidates[i].append((sources or prompts)[i])
    return candidates


def mbr_decode(model: GPT, tokenizer: Tokenizer, prompts: list[str], *, utility: str, **options) -> list[str]:
    """The MBR choice for each prompt among mbr_candidates(model, tokenizer, prompts, **options)."""
    return [c[mbr_select(c, utility)] for c in mbr_candidates(model, tokenizer, prompts, **options)]
