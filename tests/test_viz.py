"""Pictures: attention heatmaps (what was drawn is the model's attention) and loss curves (what was drawn is
the CSV log)."""

import csv
import math

import matplotlib
import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_cli
from matplotlib.image import imread

from gpt.checkpoint import save_model_dir
from gpt.config import GPTConfig
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.tokenizer import Tokenizer
from gpt.viz import attention_heatmap, loss_curve, token_labels

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def model_and_tok():
    torch.manual_seed(0)
    tok = Tokenizer.char_level(TEXT)
    config = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=32)
    return GPT(config).eval(), tok


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    h, w, _ = imread(path).shape
    assert h > 100 and w > 100


def test_attention_heatmap_draws_causal_softmax_rows(model_and_tok, tmp_path):
    model, tok = model_and_tok
    ids = tok.encode(TEXT)
    T = len(ids)
    grid = attention_heatmap(model, tok, ids, tmp_path / "grid.png", layer=1)
    assert_png(tmp_path / "grid.png")
    assert grid.shape == (4, T, T)  # all heads of the layer
    np.testing.assert_allclose(grid.sum(-1), 1.0, atol=1e-5)  # each query's weights are a distribution
    assert (grid[:, np.triu_indices(T, k=1)[0], np.triu_indices(T, k=1)[1]] == 0).all()  # nothing from the future
    assert (grid[:, np.tril_indices(T)[0], np.tril_indices(T)[1]] > 0).all()
    # one head drawn alone is the same matrix as in the grid, and it is the model's attention for these tokens
    one = attention_heatmap(model, tok, ids, tmp_path / "one.png", layer=-1, head=2)
    assert_png(tmp_path / "one.png")
    assert one.shape == (1, T, T) and np.array_equal(one[0], grid[2])
    with torch.no_grad():
        weights = model(torch.tensor([ids]), need_weights=True).attentions[1][0, 2]
    np.testing.assert_allclose(one[0], weights.numpy(), atol=1e-7)


def test_attention_heatmap_refuses_a_layer_or_head_that_is_not_there(model_and_tok, tmp_path):
    model, tok = model_and_tok
    with pytest.raises(GPTError, match="2 layers"):
        attention_heatmap(model, tok, tok.encode("ROMEO"), tmp_path / "x.png", layer=2)
    with pytest.raises(GPTError, match="4 heads"):
        attention_heatmap(model, tok, tok.encode("ROMEO"), tmp_path / "x.png", head=4)
    assert not (tmp_path / "x.png").exists()


def test_token_labels_are_readable(shakespeare):
    char = Tokenizer.char_level(TEXT)
    assert token_labels(char, char.encode("O:\nBut s")) == ["O", ":", "⏎", "B", "u", "t", "·", "s"]
    lines = shakespeare.read_text().splitlines(keepends=True)[:2000]
    bpe = Tokenizer.train_bpe(iter([lines]), vocab_size=400, show_progress=False)
    text = "ROMEO:\nWhat light through yonder window breaks?"
    labels = token_labels(bpe, bpe.encode(text))
    assert len(labels) < len(text)  # whole BPE pieces, not bytes
    assert "".join(labels) == text.replace("\n", "⏎").replace(" ", "·")  # each piece decoded to its own text
    assert "Ġ" not in "".join(labels)  # no byte-level artefacts


def test_token_labels_spell_out_characters_no_font_can_draw():
    # U+10FFFD is a private-use code point: no installed font has a glyph for it, so matplotlib would draw an
    # empty box; the label names the code point instead. Characters the fonts have stay as they are.
    tok = Tokenizer.char_level("ab\U0010fffdé\n")
    assert token_labels(tok, tok.encode("a\U0010fffdé\n")) == ["a", "U+10FFFD", "é", "⏎"]
    # a font.family that is not installed: matplotlib draws with its fallback font, and so do the labels
    with matplotlib.rc_context({"font.family": ["No Such Font Family"]}):
        assert token_labels(tok, tok.encode("a\U0010fffdé\n")) == ["a", "U+10FFFD", "é", "⏎"]


def write_lightning_csv(path, rows):
    keys = ["epoch", "step", "train/loss", "train/lr", "train/tokens_per_s", "val/loss", "val/ppl"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in keys})


def test_loss_curve_plots_what_the_csv_says(tmp_path):
    rows = []
    for step in range(9, 100, 10):
        rows.append(
            {
                "epoch": 0,
                "step": step,
                "train/loss": 4 * math.exp(-step / 50),
                "train/lr": 1e-3 * (step + 1) / 100,
                "train/tokens_per_s": 1000,
            }
        )
        if step % 50 == 49:
            rows.append({"epoch": 0, "step": step, "val/loss": 4.1 * math.exp(-step / 60), "val/ppl": 1.0})
    write_lightning_csv(tmp_path / "metrics.csv", rows)
    drawn = loss_curve(tmp_path / "metrics.csv", tmp_path / "loss.png")
    assert_png(tmp_path / "loss.png")
    assert drawn["train/loss"] == [(r["step"], pytest.approx(r["train/loss"])) for r in rows if "train/loss" in r]
    assert drawn["val/loss"] == [
        (49, pytest.approx(4.1 * math.exp(-49 / 60))),
        (99, pytest.approx(4.1 * math.exp(-99 / 60))),
    ]
    assert [s for s, _ in drawn["train/lr"]] == list(range(9, 100, 10))


def test_loss_curve_of_a_log_without_losses(tmp_path):
    write_lightning_csv(tmp_path / "metrics.csv", [{"epoch": 0, "step": 0, "train/tokens_per_s": 5}])
    with pytest.raises(GPTError, match="no train/loss or val/loss"):
        loss_curve(tmp_path / "metrics.csv", tmp_path / "loss.png")


def test_sample_py_draws_the_attention_of_prompt_and_completion(model_and_tok, tmp_path):
    model, tok = model_and_tok
    save_model_dir(model, tok, tmp_path / "m")
    png = tmp_path / "attn.png"
    proc = run_cli(
        "sample.py",
        f"ckpt={tmp_path / 'm'}",
        "prompt=ROMEO:",
        "max_new_tokens=10",
        "temperature=0",
        f"attention_map={png}",
        "attention_layer=0",
    )
    assert proc.returncode == 0, proc.stderr
    assert_png(png)
    assert f"16 tokens, layer 0, all heads): {png}" in proc.stderr  # 6 prompt + 10 new tokens
    proc = run_cli("sample.py", f"ckpt={tmp_path / 'm'}", f"attention_map={tmp_path / 'b.png'}", "attention_head=7")
    assert_user_error(proc, "attention_head=7", "4 heads")
    assert not (tmp_path / "b.png").exists()
