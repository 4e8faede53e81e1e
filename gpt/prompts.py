"""Prompt templates: how a task row (instruction, input) becomes the text the model continues. Shared by
fine-tuning (gpt.tasks) and sample.py, which wraps each prompt the way the adapter was trained; kept apart
from gpt.tasks so that sampling does not import Lightning."""

from __future__ import annotations

import string
from typing import Optional

from gpt.errors import GPTError


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
                parsed = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(t)
                          if name is not None]
            except ValueError as e:
                raise GPTError(f"prompt template {t!r} is malformed ({e}); write literal braces as {{{{ }}}}") from None
            for name, spec, conversion in parsed:
                if spec or conversion:  # {input:d}, {input!r}: the text goes in as it is, never formatted
                    field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
                    raise GPTError(f"prompt template {t!r} formats a field ({field}); fields are filled with the text "
                                   f"as it is: write {{{name}}} (and literal braces as {{{{ }}}})")
            names = {name for name, _, _ in parsed}
            unknown = names - {"instruction", "input"}
            if unknown:
                raise GPTError(f"prompt template {t!r} uses unknown field(s) {sorted(unknown)}; "
                               "only {instruction} and {input} are filled in")
            if not names:
                raise GPTError(f"prompt template {t!r} has no {{input}} field, so the prompt would be dropped; "
                               "put {input} where it goes, e.g. 'Q: {input}\\nA: '")
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
