"""train.py init_from=<model dir | Hugging Face GPT-2 dir>: pretraining continues from trained weights, on the
loaded model's shape and tokenizer; settings that say otherwise are refused by name."""

import pytest
import torch
from conftest import TINY, assert_user_error, run_cli, train_config

from gpt.checkpoint import save_model_dir
from gpt.config import GPTConfig
from gpt.convert import export_hf
from gpt.launch import build
from gpt.model import GPT
from gpt.pretrain import pretrain
from gpt.tokenizer import Tokenizer

DATA = [a for a in TINY if a.startswith(("data.", "trainer."))]  # the shipped text; the model comes from init_from


@pytest.fixture(scope="module")
def source(shakespeare, tmp_path_factory):
    """A small model of another shape than the preset (block 48, 3 layers) with its own char tokenizer."""
    tok = Tokenizer.char_level(set(shakespeare.read_text()) | set("#"))
    torch.manual_seed(3)
    model = GPT(GPTConfig(block_size=48, vocab_size=tok.vocab_size, n_layer=3, n_head=2, n_embd=32))
    return save_model_dir(model, tok, tmp_path_factory.mktemp("src") / "model"), model


def first_val_loss(init_from, run_dir):
    cfg = train_config(
        *DATA,
        f"init_from={init_from}",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "trainer.log_every_n_steps=1",
        "optim.lr=1e-12",
        "optim.min_lr=0",
        "optim.warmup_steps=0",
        "log_samples.n=0",
        "trainer.precision=32-true",
    )
    metrics = pretrain(cfg, run_dir)
    return metrics["val_loss"], cfg


def source_loss(model, cfg) -> float:
    """The source model's token-weighted loss on the run's validation windows (the same datamodule)."""
    datamodule = build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    total = count = 0
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            n = (batch["labels"] != -100).sum()
            total += float(model.eval()(batch["input_ids"], batch["labels"]).loss.double() * n)
            count += int(n)
    return total / count


def test_init_from_our_dir_and_a_hf_dir_starts_at_the_source_models_loss(source, tmp_path):
    src, model = source
    loss, cfg = first_val_loss(src, tmp_path / "ours")
    assert cfg.model.n_layer == 3 and cfg.data.block_size == 48  # the loaded shape, not the preset's
    assert build(cfg.data).tokenizer.to_str() == Tokenizer.load(src).to_str()
    want = source_loss(model, cfg)
    assert loss == pytest.approx(want, abs=1e-5)  # one step at lr 1e-12 moves it by far less
    # the same model as a transformers GPT-2 directory, imported through gpt.convert: the same start
    hf_loss, _ = first_val_loss(export_hf(src, tmp_path / "hf"), tmp_path / "from-hf")
    assert hf_loss == pytest.approx(want, abs=1e-5)


def test_another_tokenizer_or_shape_with_init_from_is_refused(source, tmp_path):
    src, _ = source
    args = ["train.py", *DATA, f"init_from={src}", "trainer.max_steps=1"]
    assert_user_error(
        run_cli(*args, "data.tokenizer=bpe", "data.vocab_size=300", f"hydra.run.dir={tmp_path / 'a'}"),
        "brings its own tokenizer",
        "drop data.",
    )
    assert_user_error(
        run_cli(*args, "model.n_layer=4", f"hydra.run.dir={tmp_path / 'b'}"),
        "has model.n_layer=3",
        "drop model.n_layer=4",
    )
    assert_user_error(run_cli(*args, "model=mini", f"hydra.run.dir={tmp_path / 'c'}"), "drop model=mini")
