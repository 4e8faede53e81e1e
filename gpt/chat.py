"""Chat with a model: `python sample.py chat=true ckpt=<model dir> [adapter=<dir>]`.

A conversation is a list of messages ({"role": "system" | "user" | "assistant", "content": ...}) rendered
into one text by a chat template. The default template is plain text, role-prefixed, one message a line:

    System: You are terse.
    User: Hello
    Assistant: Hi.
    User: Who are you?
    Assistant:

(only letters, ':' and a space, so that a character-level model can read it), and the generated reply ends
at the next "\\nUser:", "\\nSystem:" or "\\nAssistant:" line. A Jinja `chat_template` in the model's (or
adapter's) `tokenizer_config.json`, as Hugging Face models ship it, replaces it; then only the end-of-text
token ends a reply. The same templates serve `/v1/chat/completions` (gpt/serve.py).

The REPL keeps the model's KV cache across turns: each turn re-renders the whole conversation, keeps the
cached tokens it shares with the new text and runs the model over the rest only (usually just the new
turn). When the conversation no longer fits the context, the oldest turns are dropped, with a notice.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence, TextIO

import torch

from gpt.completions import StreamPrinter, unescape
from gpt.errors import GPTError
from gpt.generate import prompt_too_long, sample_next_token
from gpt.inference import load_for_sampling
from gpt.model import GPT, KVCache
from gpt.prompts import (  # noqa: F401 (the templates: gpt.prompts, shared with task=chat)
    PLAIN_STOPS,
    ROLES,
    ChatTemplate,
)
from gpt.textfiles import decode_line, user_text
from gpt.tokenizer import Tokenizer


def chat_template(cfg) -> ChatTemplate:
    """The template for a sample.py / serve config: the adapter's, else the model directory's, else plain."""
    return ChatTemplate.for_model(*[cfg.get(k) for k in ("adapter", "ckpt") if cfg.get(k) and Path(cfg[k]).is_dir()])


def truncate(cache: KVCache, n: int) -> None:
    """Forget all but the first n cached positions of a one-row cache holding real tokens only."""
    cache.length = n
    if cache.valid is not None:
        cache.valid[:, n:] = False
        cache.seen = cache.valid.sum(1)
    cache.slot = None


class ChatSession:
    """One conversation with a model, its KV cache kept between turns (see the module's docstring)."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        *,
        max_new_tokens: int,
        temperature: float,
        top_k=None,
        top_p=None,
        stops: Sequence[str] = (),
        stop_at_eos: bool = True,
        generator: Optional[torch.Generator] = None,
        strict: bool = True,
        notices: Optional[TextIO] = None,
    ):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.stops = list(stops) + [s for s in template.stops if s not in stops]
        self.eos = tokenizer.eos_id if stop_at_eos else None
        self.generator, self.strict, self.notices = generator, strict, notices or sys.stderr
        self.block = model.config.block_size
        self.device = next(model.parameters()).device
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        self.cache = self.model.new_cache()
        self.cached: list[int] = []  # the tokens whose keys/values the cache holds, in order
        self.prefilled = 0  # tokens the last turn ran through the model (the rest came from the cache)

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Next-token logits (1, vocab) after `ids`, running only what the cache does not already hold."""
        keep = 0
        while keep < min(len(ids) - 1, len(self.cached)) and ids[keep] == self.cached[keep]:
            keep += 1  # at least the last token is run: its logits are the ones wanted
        truncate(self.cache, keep)
        new = torch.tensor([ids[keep:]], dtype=torch.long, device=self.device)
        logits = self.model(new, cache=self.cache, only_last=True).logits[:, -1]
        self.cached, self.prefilled = list(ids), len(ids) - keep
        return logits

    def fit(self, messages: list[dict]) -> list[int]:
        """The prompt tokens for `messages`, dropping the oldest turns (not a leading system message) until
        the prompt leaves room for a reply (up to max_new_tokens, at most half the context)."""
        room = min(self.max_new_tokens, self.block // 2)
        while True:
            ids = self.tokenizer.encode(self.template(messages), strict=self.strict)
            first = 1 if messages and messages[0]["role"] == "system" else 0
            if len(ids) + room <= self.block or len(messages) - first <= 1:
                break
            dropped = 2 if len(messages) - first > 2 and messages[first + 1]["role"] == "assistant" else 1
            del messages[first : first + dropped]
            self.notices.write(f"(context full: dropped the oldest turn, {len(messages)} messages remain)\n")
            self.notices.flush()
        if len(ids) >= self.block:
            raise prompt_too_long(len(ids), self.block, "this message with its template")
        return ids

    @torch.inference_mode()
    def reply(self, text: str, out: TextIO) -> str:
        """Add a user message, stream the assistant's reply to `out`, and return it."""
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.fit(messages)
        self.messages = messages
        logits = self.prefill(ids)
        self.cache.start_decoding()
        printer = StreamPrinter(self.tokenizer, self.stops, out)
        full = False
        for step in range(self.max_new_tokens):
            token = sample_next_token(logits, self.temperature, self.top_k, self.top_p, self.generator)
            if self.eos is not None and int(token) == self.eos:
                break
            stopped = printer(token)
            if stopped or step == self.max_new_tokens - 1:
                break
            if self.cache.length >= self.block:
                full = True
                break
            logits = GPT.decode_step(self.model, token[:, None], self.cache)
            self.cache.length += 1
            self.cached.append(int(token))
        answer = printer.finish()
        if full:  # after the held-back end of the reply is printed
            out.flush()
            self.notices.write("\n(context full: reply cut)\n")
            self.notices.flush()
        self.messages.append({"role": "assistant", "content": self.template.reply(answer)})
        return answer


def chat(cfg, stdin: TextIO = None, stdout: TextIO = None) -> list[str]:
    """The REPL: one user message a line; /reset starts over, /exit (or end of input) quits."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    for key in ("input_file", "prompt_file", "attention_map"):
        if cfg.get(key):
            raise GPTError(f"chat=true is interactive: drop {key}=")
    if cfg.get("num_beams", 1) != 1 or cfg.get("num_samples", 1) != 1:
        raise GPTError("chat=true samples one reply a turn: drop num_beams / num_samples")
    model, tokenizer, device = load_for_sampling(cfg)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    session = ChatSession(
        model,
        tokenizer,
        chat_template(cfg),
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        stops=[unescape(str(s)) for s in cfg.stop or []],
        stop_at_eos=cfg.stop_at_eos,
        generator=generator,
        strict=cfg.get("unknown_chars", "error") == "error",
    )
    interactive = stdin.isatty()
    if interactive:
        stdout.write("chat: one message a line; /reset starts over, /exit quits\n")
    # Lines are read as bytes where stdin has them and decoded under the one text rule (gpt/textfiles.py):
    # \r\n and a byte-order mark read as a file's are, bytes that are not UTF-8 refused for that line only.
    raw = getattr(stdin, "buffer", None)
    replies = []
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = raw.readline() if raw is not None else stdin.readline()
        try:
            line = decode_line(line, "this line") if raw is not None else user_text(line, "this line")
        except GPTError as e:
            stdout.write(f"error: {e}\n")
            stdout.flush()
            continue
        if not line or line.strip() == "/exit":
            break
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            session.reset()
            stdout.write("(conversation reset)\n")
            continue
        if not line.strip():
            continue
        try:
            replies.append(session.reply(unescape(line), stdout))
        except GPTError as e:  # e.g. characters the model never saw: say so and wait for the next line
            stdout.write(f"error: {e}")
        stdout.write("\n")
        stdout.flush()
    return replies
