"""Prompt templates: how a task row (instruction, input), or a conversation (chat templates), becomes the text
the model continues. Shared by
fine-tuning (gpt.tasks) and sample.py, which wraps each prompt the way the adapter was trained; kept apart
from gpt.tasks so that sampling does not import Lightning."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Callable, Optional, Sequence

from gpt.errors import GPTError, json_type, read_json
from gpt.jsonfiles import check_model_record
from gpt.tokenizer import EOS


class PromptTemplate:
    """`template` with {instruction} and {input} fields; `template_no_input` for rows with an empty input
    (Alpaca's two prompts). The response follows the rendered prompt directly."""

    def __init__(self, template: str, template_no_input: Optional[str] = None):
        self.fields: dict[str, set] = {}  # template -> the fields it fills
        for t in (template, template_no_input):
            if t is None:
                continue
            if not isinstance(t, str):
                raise GPTError(f"prompt template {t!r} is not text; give a template with an {{input}} field")
            try:
                parsed = [
                    (name, spec, conversion)
                    for _, name, spec, conversion in string.Formatter().parse(t)
                    if name is not None
                ]
            except ValueError as e:
                raise GPTError(f"prompt template {t!r} is malformed ({e}); write literal braces as {{{{ }}}}") from None
            for name, spec, conversion in parsed:
                if spec or conversion:  # {input:d}, {input!r}: the text goes in as it is, never formatted
                    field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
                    raise GPTError(
                        f"prompt template {t!r} formats a field ({field}); fields are filled with the text "
                        f"as it is: write {{{name}}} (and literal braces as {{{{ }}}})"
                    )
            names = {name for name, _, _ in parsed}
            unknown = names - {"instruction", "input"}
            if unknown:
                raise GPTError(
                    f"prompt template {t!r} uses unknown field(s) {sorted(unknown)}; "
                    "only {instruction} and {input} are filled in"
                )
            if not names:
                raise GPTError(
                    f"prompt template {t!r} has no {{input}} field, so the prompt would be dropped; "
                    "put {input} where it goes, e.g. 'Q: {input}\\nA: '"
                )
            self.fields[t] = names
        self.template, self.template_no_input = template, template_no_input

    def _choose(self, input: str) -> str:
        return self.template_no_input if (self.template_no_input is not None and not input.strip()) else self.template

    def __call__(self, instruction: str = "", input: str = "") -> str:
        return self._choose(input).format(instruction=instruction, input=input)

    def left_out(self, instruction: str = "", input: str = "") -> list[str]:
        """The fields of a row that hold text but have no place in its template (they would be dropped)."""
        names = self.fields[self._choose(input)]
        return [k for k, v in (("instruction", instruction), ("input", input)) if v.strip() and k not in names]

    def to_dict(self) -> dict:
        return {"template": self.template, "template_no_input": self.template_no_input}


def source_span(wrap: Callable[[str], str], text: str) -> Optional[tuple[int, int]]:
    """Where `text` lies in the prompt wrap(text) makes of it, as (start, end) characters; None where the wrapping
    has no single place for it (no template field, or a template without input for an empty text). Found by
    wrapping a character no text has (NUL) instead: searching the prompt for the text could find the template's
    own words ("are" in "Shakespeare:")."""
    marked = wrap("\0")
    before, found, after = marked.partition("\0")
    if not text or not found or "\0" in after or wrap(text) != before + text + after:
        return None
    return len(before), len(before) + len(text)


# ----------------------------------------------------------------------------------------------------
# Chat templates (sample.py chat=true, serve's /v1/chat/completions, fine-tuning on task=chat)

ROLES = ("system", "user", "assistant")
PLAIN_STOPS = ["\nUser:", "\nSystem:", "\nAssistant:"]  # a plain-template reply ends where the next turn begins


class ChatTemplate:
    """messages -> the prompt text that asks for the assistant's next message."""

    def __init__(self, jinja: Optional[str] = None, special_tokens: Optional[dict] = None):
        self.jinja, self.special = jinja, special_tokens or {}
        # A Jinja template marks the end of a reply with the end-of-text token; the plain one with the next role.
        self.stops = [] if jinja else list(PLAIN_STOPS)
        # The plain template ends the prompt with "Assistant:" and the model goes on with the space that separates
        # a role from its message (as in every message of the template): not part of the reply.
        self.separator = "" if jinja else " "

    @classmethod
    def for_model(cls, *dirs) -> "ChatTemplate":
        """The `chat_template` of the first of `dirs` whose tokenizer_config.json has one, else the plain one."""
        for d in dirs:
            path = Path(d) / "tokenizer_config.json" if d else None
            if path is None or not path.is_file():
                continue
            config = read_json(path, "fix or remove it (it holds the model's chat_template)")
            template = config.get("chat_template")
            named = isinstance(template, list) and all(isinstance(t, dict) and "name" in t for t in template)
            if named:  # [{"name": "default", "template": ...}, ...]
                template = next((t.get("template") for t in template if t["name"] == "default"), None)
            if not isinstance(template, (str, type(None))):
                raise GPTError(
                    f"{path}: chat_template must be a Jinja template (text) or a list of {{name, template}} "
                    f"objects (got {json_type(template)} {template!r:.60}); fix or remove it"
                )
            if template:
                special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
                return cls(template, {"eos_token": EOS, **special})
        return cls()

    def reply(self, text: str) -> str:
        """The generated text (or the first piece of it) as the assistant's message: without the separator."""
        return text.removeprefix(self.separator)

    def __call__(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        if self.jinja:
            from transformers.utils.chat_template_utils import render_jinja_template

            try:
                rendered, _ = render_jinja_template(
                    [list(messages)],
                    chat_template=self.jinja,
                    add_generation_prompt=add_generation_prompt,
                    **self.special,
                )
            except Exception as e:  # jinja2's errors (syntax, raise_exception in the template)
                raise GPTError(f"the model's chat_template failed on these messages ({e})") from None
            return rendered[0]
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return text + ("Assistant:" if add_generation_prompt else "")


# What task=chat fine-tuning stores (as tokenizer_config.json's chat_template) when the base model has no template
# of its own: the plain layout in Jinja, Hugging Face's convention, with the end-of-text token closing each
# assistant message, so that the model learns where its reply ends and transformers' apply_chat_template
# renders the same prompt. The newline is an expression: Hugging Face renders with trim_blocks, which drops a
# newline right after a block tag.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def tokenizer_config(jinja: str) -> dict:
    """tokenizer_config.json for a model or adapter directory: transformers' PreTrainedTokenizerFast reads it
    beside tokenizer.json (chat_template, end-of-text token); ChatTemplate.for_model reads it back."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": jinja, "eos_token": EOS, "bos_token": EOS}


def finetuned_record(ckpt) -> dict:
    """What a fully fine-tuned model directory records about its run in config.json (finetune.py method=full):
    "task", so that template=auto prompts it as it was trained, and "decoding", how the run scored it. {} for
    any other checkpoint; a task entry without a template is left out."""
    path = Path(str(ckpt)) / "config.json" if ckpt else None
    if path is None or not path.is_file():
        return {}
    raw = read_json(path, "re-export the model")
    if raw.get("model_type", "gpt") != "gpt" or "architectures" in raw:
        return {}  # a Hugging Face directory: loading the model says so
    record = check_model_record(raw.get("gpt"), str(path))  # keys and types, before any is used
    task = record.get("task")
    return record if isinstance(task, dict) and isinstance(task.get("template"), str) else {**record, "task": None}
