"""The chat REPL (gpt/chat.py, `sample.py chat=true`): templates, the KV cache kept across turns, stdin."""

import io
import json
import string

import pytest
import torch

from gpt.chat import ChatSession, ChatTemplate
from gpt.checkpoint import save_model_dir
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.tokenizer import Tokenizer

ALPHABET = string.ascii_letters + " :\n.,!?<|>"


@pytest.fixture(scope="module")
def tiny():
    tok = Tokenizer.char_level(ALPHABET)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4)
    return model, tok


def test_templates_plain_and_jinja(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert ChatTemplate()(messages) == "System: Be brief.\nUser: Hi\nAssistant:"
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": (
                    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
                )
            }
        )
    )
    jinja = ChatTemplate.for_model(None, tmp_path)
    assert jinja(messages) == "<|system|>Be brief.<|endoftext|><|user|>Hi<|endoftext|><|assistant|>"
    assert jinja.stops == [] and ChatTemplate.for_model(tmp_path / "nothing").stops[0] == "\nUser:"


def test_a_new_turn_reuses_the_cache_and_its_logits_equal_a_full_prefill(tiny):
    model, tok = tiny
    session = ChatSession(
        model, tok, ChatTemplate(), max_new_tokens=6, temperature=0, stop_at_eos=False, notices=io.StringIO()
    )
    first = session.reply("Hi", io.StringIO())
    opening = len("User: Hi\nAssistant:")
    assert session.prefilled == opening
    with torch.inference_mode():
        prompt = tok.encode(session.template(session.messages + [{"role": "user", "content": "Go on"}]))
        logits = session.prefill(prompt)
        full = model(torch.tensor([prompt])).logits[:, -1]
    assert 0 < session.prefilled <= len(prompt) - opening  # the cached opening is not run again
    assert torch.allclose(logits, full, atol=1e-5, rtol=1e-4)
    # a reset conversation answers the first message as before
    session.reset()
    assert session.reply("Hi", io.StringIO()) == first and session.prefilled == opening


def test_the_repl_over_stdin_two_turns_reset_and_a_full_context(tiny, tmp_path, monkeypatch, capsys):
    from hydra import compose, initialize_config_dir

    from gpt.cli import CONFIG_DIR
    from gpt.sample import sample

    model, tok = tiny
    model_dir = save_model_dir(model, tok, tmp_path / "model")
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "sample",
            overrides=[
                f"ckpt={model_dir}",
                "chat=true",
                "temperature=0",
                "max_new_tokens=6",
                "stop_at_eos=false",
                "device=cpu",
                "dtype=float32",
            ],
        )
    long = "A longer message fills the context"  # fits alone, not after the first turn
    monkeypatch.setattr("sys.stdin", io.StringIO(f"Hi\nGo on\n/reset\nHi\n{long}\n/exit\nnever read\n"))
    replies = sample(cfg)
    out, err = capsys.readouterr()
    assert len(replies) == 4 and replies[2] == replies[0]  # after /reset the first message is answered again alike
    assert "(conversation reset)" in out and all(r in out for r in replies)
    assert "context full: dropped the oldest turn" in err


def test_the_repl_reads_lines_under_the_text_rule(tiny, tmp_path, monkeypatch, capsys):
    """A byte-order mark and \\r\\n line ends read as a file's are; a line that is not UTF-8 gets one error line
    and the REPL goes on (it used to die with a traceback, and took \\r and the BOM for unknown characters)."""
    from hydra import compose, initialize_config_dir

    from gpt.cli import CONFIG_DIR
    from gpt.sample import sample

    model, tok = tiny
    model_dir = save_model_dir(model, tok, tmp_path / "model")
    overrides = [f"ckpt={model_dir}", "chat=true", "temperature=0", "max_new_tokens=6", "stop_at_eos=false"]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("sample", overrides=overrides + ["device=cpu", "dtype=float32"])
    stdin = io.TextIOWrapper(io.BytesIO(b"Hi\n/reset\n\xef\xbb\xbfHi\r\n/reset\nH\xffi\r\nHi\r\n/exit\n"))
    monkeypatch.setattr("sys.stdin", stdin)
    replies = sample(cfg)
    out, _ = capsys.readouterr()
    assert len(replies) == 3 and replies[1] == replies[0]  # "\ufeffHi\r\n" is "Hi"
    assert "error: this line is not UTF-8 text (bad byte 0xff at offset 1)" in out
    assert "Traceback" not in out


def test_user_text_is_one_rule_for_every_input():
    from gpt.errors import GPTError
    from gpt.textfiles import decode_line, user_text

    assert user_text("\ufeffa\r\nb\rc\r\n", "x") == "a\nb\rc\n"  # a lone \r stays, as in files
    assert decode_line(b"\xef\xbb\xbfHi\r\n", "x") == "Hi\n"
    with pytest.raises(GPTError, match=r"prompt holds a lone surrogate \(U\+D800 at character 2\)"):
        user_text("ab\ud800", "prompt")
    with pytest.raises(GPTError, match=r"x is not UTF-8 text \(bad byte 0xe9 at offset 3\)"):
        decode_line(b"caf\xe9\n", "x")
