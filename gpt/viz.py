"""Pictures of a model and of a run, drawn with matplotlib into PNG files (no display needed).

    attention_heatmap   what each position of a text attends to: one head, or all heads of a layer
    alignment_map       what each output token attended to in its source (the prompt's input line) when it was
                        predicted: a Bahdanau-style alignment picture, one panel per example
    loss_curve          train/val loss and the learning rate against the step, from a run's metrics.csv

Figures are built with matplotlib's object API (`Figure`, not pyplot), so nothing here touches the
interactive backend of a notebook or script that imports this module. The functions return the numbers
they drew, so tests (and users) can check the picture against the model.
"""

from __future__ import annotations

import csv
import functools
import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib import font_manager
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font

from gpt.errors import GPTError, is_int
from gpt.tokenizer import Tokenizer

# Whitespace made visible, so a label says which character the model looked at.
VISIBLE = str.maketrans({"\n": "⏎", " ": "·", "\t": "⇥", "\r": "␍"})


@functools.lru_cache(maxsize=None)
def drawable_chars(families: tuple[str, ...]) -> frozenset[int]:
    """Code points that the label fonts (these families and the fallbacks matplotlib tries after them) can
    draw. Without this a CJK character or an emoji becomes an empty box when no installed font has it."""
    # the font matplotlib falls back to when none of the families is installed (DejaVu Sans, its own)
    chars: set[int] = set(
        FT2Font(font_manager.findfont(font_manager.FontProperties(family=list(families)))).get_charmap()
    )
    for family in families:
        names = (
            matplotlib.rcParams.get(f"font.{family}", [family])
            if family in font_manager.font_family_aliases
            else [family]
        )
        for name in names:
            try:
                path = font_manager.findfont(font_manager.FontProperties(family=name), fallback_to_default=False)
            except ValueError:  # not installed
                continue
            chars.update(FT2Font(path).get_charmap())
    return frozenset(chars)


def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """One readable label per token: its own text (a BPE piece decoded alone), whitespace made visible,
    a character no installed font can draw as its code point (U+65E5). A byte-level piece that is only part
    of a UTF-8 character shows as the tokenizer spells it."""
    fonts = drawable_chars(tuple(matplotlib.rcParams["font.family"]))
    labels = []
    for i in ids:
        text = tokenizer.decode([i], skip_special_tokens=False)
        if not text or "\ufffd" in text:
            text = tokenizer.hf.id_to_token(i) or f"#{i}"
        text = text.translate(VISIBLE)
        labels.append("".join(c if ord(c) in fonts else f"U+{ord(c):04X}" for c in text))
    return labels


@torch.no_grad()
def attention_weights(model, ids: list[int]) -> list[torch.Tensor]:
    """Per layer, the (n_head, T, T) softmax weights of the model's explicit attention path for `ids`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = model(torch.tensor([ids], dtype=torch.long, device=device), need_weights=True)
    finally:
        model.train(was_training)
    return [w[0].float().cpu() for w in out.attentions]


def check_attention_choice(config, layer: Optional[int], head: Optional[int], prefix: str = "attention_") -> None:
    """prefix: whose settings these are, for the messages: attention_ (the heatmap: head=null draws every head)
    or [eval.]alignment_ (the alignment map: null averages the layers or the heads)."""
    n_layer, n_head = config.n_layer, config.n_head
    averaged = prefix.endswith("alignment_")
    if not (layer is None and averaged) and not (is_int(layer) and -n_layer <= layer < n_layer):
        raise GPTError(
            f"{prefix}layer={layer} but the model has {n_layer} layers (0..{n_layer - 1}, or -1 for the last"
            + ("; null averages them)" if averaged else ")")
        )
    if head is not None and not (is_int(head) and 0 <= head < n_head):
        raise GPTError(
            f"{prefix}head={head} but the model has {n_head} heads (0..{n_head - 1}); null "
            + ("averages them" if averaged else "draws them all")
        )


def attention_heatmap(
    model,
    tokenizer: Tokenizer,
    ids: list[int],
    path: str | Path,
    layer: int = -1,
    head: Optional[int] = None,
    title: Optional[str] = None,
) -> np.ndarray:
    """Draw what every token of `ids` attends to in `layer`: one `head`, or a grid of all heads (head=None).

    Rows are queries (the token doing the looking), columns keys (the tokens looked at); each row is a
    softmax over the tokens up to and including its own, so it sums to 1 and is zero above the diagonal.
    Returns the matrices as drawn, (heads drawn, T, T).
    """
    check_attention_choice(model.config, layer, head)
    if len(ids) > model.config.block_size:
        raise GPTError(f"{len(ids)} tokens do not fit the model's context of {model.config.block_size}")
    layer = layer % model.config.n_layer
    n_head = model.config.n_head
    weights = attention_weights(model, ids)[layer].numpy()
    heads = list(range(n_head)) if head is None else [head]
    labels = token_labels(tokenizer, ids)
    T = len(ids)

    cols = math.ceil(math.sqrt(len(heads)))
    rows = math.ceil(len(heads) / cols)
    cell = min(12.0, max(3.0, 0.16 * T)) if len(heads) == 1 else min(8.0, max(2.5, 0.11 * T))
    fig = Figure(figsize=(cols * cell + 1.2, rows * cell + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    # A square-root colour scale: weights spread over many keys (~1/T each) stay visible next to peaks.
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=float(weights[heads].max()))
    every = max(1, math.ceil(T / 80))  # past ~80 tokens, label every k-th so labels stay legible
    font = max(4.0, min(10.0, 0.8 * 72 * cell * every / max(T, 1)))  # about one label height per tick
    ticks = list(range(0, T, every))
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= len(heads):
            ax.set_axis_off()
            continue
        image = ax.imshow(weights[heads[k]], cmap="Blues", norm=norm, interpolation="nearest")
        ax.set_title(f"layer {layer}, head {heads[k]}", fontsize=9)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        bottom, left = k // cols == rows - 1 or k + cols >= len(heads), k % cols == 0
        ax.set_xticklabels([labels[t] for t in ticks] if bottom or len(heads) == 1 else [], rotation=90, fontsize=font)
        ax.set_yticklabels([labels[t] for t in ticks] if left or len(heads) == 1 else [], fontsize=font)
        if bottom:
            ax.set_xlabel("key (attended to)", fontsize=8)
        if left:
            ax.set_ylabel("query (attending)", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="attention weight (square-root scale)")
    fig.suptitle(title or f"attention of {T} tokens", fontsize=11)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    drawn = [ax.images[0].get_array() for ax in axes.flat if ax.images]
    return np.stack([np.asarray(a, dtype=np.float64) for a in drawn])


def alignment_matrix(
    attentions: list[torch.Tensor],
    prompt_len: int,
    n_rows: int,
    source: range,
    layer: Optional[int],
    head: Optional[int],
) -> np.ndarray:
    """(n_rows, len(source)): the attention of response token j when it was predicted (the query at position
    prompt_len - 1 + j, the token before it) on the source positions. attentions: per layer (n_head, T, T);
    layer / head None: the mean over layers / heads. Not renormalised: a row's mass elsewhere (the template,
    the response so far) is left out, so a row sums to the share of attention that went to the source."""
    chosen = torch.stack(attentions) if layer is None else attentions[layer][None]  # (layers, heads, T, T)
    weights = (chosen if head is None else chosen[:, head : head + 1]).float().mean(dim=(0, 1))
    queries = torch.arange(prompt_len - 1, prompt_len - 1 + n_rows)
    return weights[queries][:, source.start : source.stop].numpy()


def alignment_map(
    model,
    tokenizer: Tokenizer,
    examples: Sequence[tuple[str, str, Optional[tuple[int, int]]]],
    path: str | Path,
    *,
    layer: Optional[int],
    head: Optional[int],
    title: Optional[str] = None,
) -> list[np.ndarray]:
    """Draw one panel per (prompt, response, source span) example: rows are the response's tokens and a last
    <|endoftext|> row (when the model decided to end), columns the source's tokens, each cell the attention the
    row's token was predicted with on that source token (alignment_matrix). The source span is (start, end)
    characters of the prompt (None: the whole prompt); a token that overlaps it is a source token. The prompt and
    the response are encoded apart, as fine-tuning encodes its examples, and read in one pass through the
    model's explicit attention path. Rows past the model's context are left out. Returns the matrices drawn."""
    check_attention_choice(model.config, layer, head, "alignment_")
    panels = []
    block = model.config.block_size
    for prompt, response, span in examples:
        encoding = tokenizer.hf.encode(prompt, add_special_tokens=False)
        start, end = span if span is not None else (0, len(prompt))
        inside = [i for i, (a, b) in enumerate(encoding.offsets) if a < end and b > start]
        if not inside:
            raise GPTError(f"the source of prompt {prompt[:40]!r} has no tokens: nothing to align the output with")
        out = tokenizer.encode(response) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        P = len(encoding.ids)
        rows = min(len(out), block - P + 1)  # the last row's token is predicted, never read
        if rows < 1:
            why = f"a prompt of {P} tokens fills the model's context ({block})" if out else "the output is empty"
            raise GPTError(f"{why}: no output to align")
        weights = attention_weights(model, encoding.ids + out[: rows - 1])
        matrix = alignment_matrix(weights, P, rows, range(inside[0], inside[-1] + 1), layer, head)
        source = token_labels(tokenizer, encoding.ids[inside[0] : inside[-1] + 1])
        panels.append((matrix, source, token_labels(tokenizer, out[:rows]), rows < len(out)))

    cols = min(len(panels), 2)
    grid = math.ceil(len(panels) / cols)
    width = max(3.0, 0.22 * max(m.shape[1] for m, *_ in panels) + 1.5)
    height = max(2.5, 0.22 * max(m.shape[0] for m, *_ in panels) + 1.5)
    # (at least 6 inches wide: the title's width)
    fig = Figure(figsize=(max(6.0, cols * width + 1.2), grid * height + 0.8), layout="constrained")
    axes = fig.subplots(grid, cols, squeeze=False)
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=max(float(m.max()) for m, *_ in panels) or 1.0)
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_axis_off()
            continue
        matrix, source, out, cut = panels[k]
        image = ax.imshow(matrix, cmap="Blues", norm=norm, interpolation="nearest")
        for ticks, labels in ((ax.set_xticks, source), (ax.set_yticks, out)):
            shown = range(0, len(labels), max(1, math.ceil(len(labels) / 60)))  # past 60, every k-th: legible
            ticks(shown, [labels[t] for t in shown], fontsize=7, **({"rotation": 90} if labels is source else {}))
        ax.set_xlabel("source token", fontsize=8)
        ax.set_ylabel("output token" + (" (cut at the context)" if cut else ""), fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="attention on the source token (square-root scale)")
    where = "mean of all layers" if layer is None else f"layer {layer % model.config.n_layer}"
    heads = "mean of all heads" if head is None else f"head {head}"
    what = "attention on the source when each output token was predicted"
    fig.suptitle(title or f"alignment: {what}\n{where}, {heads}", fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return [np.asarray(ax.images[0].get_array(), dtype=np.float64) for ax in axes.flat if ax.images]


def read_metrics_csv(csv_path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning's CSV log as {column: [(step, value), ...]}, empty cells left out."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in (None, ""):
                    series.setdefault(key, []).append((int(float(step)), float(value)))
    return series


def loss_curve(csv_path: str | Path, png_path: str | Path, title: Optional[str] = None) -> dict:
    """Plot train and val loss against the step (top) and the learning rate (bottom) from a metrics.csv.
    Returns the series drawn: {"train/loss": [(step, value), ...], "val/loss": ..., "train/lr": ...}."""
    series = read_metrics_csv(csv_path)
    drawn = {k: series[k] for k in ("train/loss", "val/loss", "train/lr") if k in series}
    if "train/loss" not in drawn and "val/loss" not in drawn:
        raise GPTError(f"{csv_path} has no train/loss or val/loss values to plot (did the run log any step?)")
    fig = Figure(figsize=(8, 6), layout="constrained")
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    styles = {"train/loss": dict(lw=1, alpha=0.8), "val/loss": dict(lw=1.5, marker="o", ms=4)}
    for key, style in styles.items():
        if key in drawn:
            steps, values = zip(*drawn[key])
            loss_ax.plot(steps, values, label=key, **style)
    loss_ax.set_ylabel("loss (nats/token)")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    loss_ax.set_title(title or "/".join(Path(csv_path).resolve().parent.parts[-2:]))  # runs/<name>/<time>
    if "train/lr" in drawn:
        steps, values = zip(*drawn["train/lr"])
        lr_ax.plot(steps, values, color="tab:green", lw=1)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.grid(alpha=0.3)
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return drawn
