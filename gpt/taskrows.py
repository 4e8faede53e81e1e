"""Reading fine-tuning rows from files or the hub into one shape, {instruction, input, output}: parallel
text (a source and a target file, line-aligned), Alpaca or prompt/response JSON / JSON Lines, conversations,
preference pairs (+ "rejected"), a hub dataset. A malformed row is an error naming its place, or is skipped and
counted (task.on_bad_row=skip).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from gpt.datafiles import fetch_known, load_hub_dataset
from gpt.errors import BadJSON, GPTError, parse_json
from gpt.textfiles import check_text_files, read_text, split_lines

log = logging.getLogger(__name__)

FIELDS = ("instruction", "input", "output")  # the normalised row every format is read into
FORMATS = {
    # format -> {our field: default key in the file / column in the hub dataset}; fields not listed are ""
    "parallel": {"input": "source", "output": "target"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "prompt_response": {"input": "prompt", "output": "response"},
    # conversations: the list's key, each message's role and content keys, and our role -> the file's role name
    # (OpenAI's layout; ShareGPT's: messages=conversations role=from content=value user=human assistant=gpt)
    "chat": {
        "messages": "messages",
        "role": "role",
        "content": "content",
        "system": "system",
        "user": "user",
        "assistant": "assistant",
    },
    # preference pairs: a prompt and two answers as text, or two conversations that differ in their last
    # (assistant) message, with the chat keys above (TRL's layouts)
    "preference": {
        "input": "prompt",
        "output": "chosen",
        "rejected": "rejected",
        "role": "role",
        "content": "content",
        "system": "system",
        "user": "user",
        "assistant": "assistant",
    },
}
REQUIRED = ("output",)  # a row without a response teaches nothing; `input` may be empty (Alpaca)
ON_BAD_ROW = ("error", "skip")


# ----------------------------------------------------------------------------------------------------
# Reading rows


class BadRows:
    """What to do with a malformed row: raise at once (naming file and line), or skip it and count it."""

    def __init__(self, policy: str, task: str):
        if policy not in ON_BAD_ROW:
            raise GPTError(f"task.on_bad_row must be one of {list(ON_BAD_ROW)} (got {policy!r})")
        self.policy, self.task = policy, task
        self.skipped: list[str] = []

    def __call__(self, where: str, problem: str) -> None:
        if self.policy == "error":
            raise GPTError(f"{where}: {problem}; fix the row, or pass task.on_bad_row=skip to skip bad rows")
        self.skipped.append(f"{where}: {problem}")

    def report(self, split: str) -> int:
        if self.skipped:
            log.warning(
                "%s %s: skipped %d malformed rows (first: %s)", self.task, split, len(self.skipped), self.skipped[0]
            )
        n, self.skipped = len(self.skipped), []
        return n


def check_file(path: Path, task: str) -> Path:
    if not path.is_file():
        fetch_known(path, f"task {task}")  # a named task's file under $GPT_DATA_DIR: downloaded, checked
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise GPTError(
            f"task {task}: {path} {what}; check the path (task.root / task.train / task.valid, "
            "or $GPT_DATA_DIR for named tasks)"
        )
    check_text_files([path], allow_empty=True)  # binary or not UTF-8: one line naming the file (and the offset)
    return path


def normalise(record: dict, fields: dict, where: str, bad: BadRows) -> Optional[dict]:
    """A record with the file's keys -> {instruction, input, output} strings, or None if it is malformed."""
    row = {}
    for ours in FIELDS:
        key = fields.get(ours)
        value = record.get(key) if key is not None else ""
        if value is None:
            value = ""
        if not isinstance(value, str):
            return bad(where, f"field {key!r} must be a string (got {type(value).__name__})")
        # the response is always needed; the input too unless an instruction says what to do (Alpaca)
        required = ours in REQUIRED or (ours == "input" and not fields.get("instruction"))
        if required and (key not in record or not value.strip()):
            return bad(where, f"missing or empty field {key!r} (the record has {sorted(record)})")
        row[ours] = value
    if fields.get("instruction") and not row["instruction"].strip():  # Alpaca: the instruction is the task
        return bad(where, f"missing or empty field {fields['instruction']!r} (the record has {sorted(record)})")
    return row


def parse_messages(messages, fields: dict, key: str) -> list[dict] | str:
    """A record's list of messages -> [{"role", "content"}] with our role names, or what is wrong with it."""
    if not isinstance(messages, list) or not messages:
        return f"field {key!r} must be a non-empty list of messages"
    roles = {fields[r]: r for r in ("system", "user", "assistant")}
    out = []
    for i, m in enumerate(messages):
        role = m.get(fields["role"]) if isinstance(m, dict) else None
        content = m.get(fields["content"]) if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in roles or not isinstance(content, str):
            return (
                f"{key!r} message {i} needs {fields['role']!r} (one of {sorted(roles)}) and a text "
                f"{fields['content']!r} (got {m!r:.80})"
            )
        out.append({"role": roles[role], "content": content})
    return out


def last_user_message(messages: list[dict]) -> str:
    """What the copy baseline returns for a conversation: the user message before its last assistant message."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), "")


def normalise_chat(record: dict, fields: dict, where: str, bad: BadRows) -> Optional[dict]:
    """A conversation record -> {"messages": [{"role", "content"}, ...] with our role names, and, for scoring,
    the last assistant message as "output" and the user message before it as "input"}, or None if malformed."""
    out = parse_messages(record.get(fields["messages"]), fields, fields["messages"])
    if isinstance(out, str):
        return bad(where, f"{out} (the record has {sorted(record)})")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        return bad(where, "the conversation has no assistant message to learn from")
    last = max(i for i, m in enumerate(out) if m["role"] == "assistant")
    return {"messages": out, "instruction": "", "input": last_user_message(out), "output": out[last]["content"]}


def normalise_preference(record: dict, fields: dict, where: str, bad: BadRows) -> Optional[dict]:
    """A preference record -> a row whose "output" is the chosen answer and "rejected" the other one, or None if
    malformed. Text: {"prompt", "chosen", "rejected"}. Conversations: {"chosen": [messages], "rejected":
    [messages]} that share every message but the last, the assistant's answer (an optional "prompt" list of
    messages goes before both); the row then holds the chosen conversation as "messages", as a chat row does."""
    p, c, r = fields["input"], fields["output"], fields["rejected"]
    prompt, chosen, rejected = record.get(p), record.get(c), record.get(r)
    for key, value in ((c, chosen), (r, rejected)):
        if not isinstance(value, (str, list, type(None))):
            return bad(where, f"field {key!r} must be text or a list of messages (got {type(value).__name__})")
        if not value or (isinstance(value, str) and not value.strip()):
            return bad(where, f"missing or empty field {key!r} (the record has {sorted(record)})")
    if isinstance(chosen, list) != isinstance(rejected, list):
        return bad(
            where,
            f"{c!r} and {r!r} must both be text or both be conversations (lists of messages); got "
            f"{type(chosen).__name__} and {type(rejected).__name__}",
        )
    if isinstance(chosen, str):
        if not isinstance(prompt, str) or not prompt.strip():
            what = "missing or empty" if prompt is None or isinstance(prompt, str) else "non-text"
            return bad(where, f"{what} field {p!r}: text pairs answer a text prompt (the record has {sorted(record)})")
        if chosen == rejected:
            return bad(where, f"{c!r} and {r!r} are the same answer: the pair prefers neither")
        return {"instruction": "", "input": prompt, "output": chosen, "rejected": rejected}
    if prompt is not None and not isinstance(prompt, list):
        return bad(where, f"field {p!r} of a conversation pair must be a list of messages, or left out")
    sides = []
    for key, value in ((c, chosen), (r, rejected)):
        out = parse_messages((prompt or []) + value, fields, key)
        if isinstance(out, str):
            return bad(where, out)
        if out[-1]["role"] != "assistant" or not out[-1]["content"].strip():
            return bad(
                where,
                f"the last message of {key!r} must be the assistant's answer (it is {out[-1]['role']!r}, "
                f"{out[-1]['content']!r:.40})",
            )
        sides.append(out)
    if sides[0][:-1] != sides[1][:-1]:
        differ = next(
            (i for i, (a, b) in enumerate(zip(sides[0][:-1], sides[1][:-1])) if a != b), min(map(len, sides)) - 1
        )
        return bad(
            where,
            f"{c!r} and {r!r} must share the conversation up to the last (assistant) message; they differ at "
            f"message {differ}",
        )
    if sides[0][-1] == sides[1][-1]:
        return bad(where, f"{c!r} and {r!r} end in the same answer: the pair prefers neither")
    chosen_msgs, rejected_msgs = sides
    return {
        "messages": chosen_msgs,
        "instruction": "",
        "input": last_user_message(chosen_msgs),
        "output": chosen_msgs[-1]["content"],
        "rejected": rejected_msgs[-1]["content"],
    }


def normaliser(fields: dict):
    """The function that reads one record of a format (known by its fields)."""
    return normalise_preference if "rejected" in fields else normalise_chat if "messages" in fields else normalise


def record_keys(fields: dict) -> list[str]:
    """The keys (hub: columns) a record of a format has."""
    if "rejected" in fields:
        return [fields[k] for k in ("input", "output", "rejected")]
    return [fields["messages"]] if "messages" in fields else [k for k in fields.values() if k]


def read_parallel(source: Path, target: Path, task: str, bad: BadRows) -> list[dict]:
    """Two line-aligned text files -> rows, line N of one with line N of the other (lines as `wc -l` counts
    them, as sample.py's batch mode reads its input_file). Empty lines are bad rows."""
    sides = []
    for path in (source, target):
        check_file(path, task)
        sides.append(split_lines(read_text(path)))
    if len(sides[0]) != len(sides[1]):
        raise GPTError(
            f"parallel files are not line-aligned: {source} has {len(sides[0])} lines but {target} has "
            f"{len(sides[1])}; every source line needs exactly one target line"
        )
    rows = []
    for i, (src, tgt) in enumerate(zip(*sides), start=1):
        if not src.strip() or not tgt.strip():
            bad(f"{source if not src.strip() else target}:{i}", "empty line in a parallel file")
            continue
        rows.append({"instruction": "", "input": src, "output": tgt})
    return rows


def read_json_records(path: Path, fields: dict, task: str, bad: BadRows) -> list[dict]:
    """A JSON array of records or JSON Lines (one record per line) -> rows; errors name file and line.

    Read by hand rather than with `datasets`' json loader, which can neither say which line is broken nor
    skip it.
    """
    check_file(path, task)
    text = read_text(path)
    if text.lstrip().startswith("["):  # one JSON array
        try:
            records = parse_json(text, top=list)
        except BadJSON as e:
            raise GPTError(
                f"{path}{f':{e.line}' if e.line else ''}: {e}; fix the file (a JSON array of records, or one "
                "JSON record per line)"
            ) from None
        located = [(f"{path} record {i}", r) for i, r in enumerate(records, start=1)]
    else:  # JSON Lines
        located = []
        for i, line in enumerate(split_lines(text), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"{path}:{i}", parse_json(line, top=None)))
            except BadJSON as e:  # not JSON, or nested past MAX_JSON_DEPTH (json.loads' RecursionError)
                bad(f"{path}:{i}", str(e))
    rows = []
    for where, record in located:
        if not isinstance(record, dict):
            bad(where, f"expected a JSON object with keys {sorted(record_keys(fields))}, got {type(record).__name__}")
            continue
        row = normaliser(fields)(record, fields, where, bad)
        if row is not None:
            rows.append(row)
    return rows


def read_hub(hub: dict, split: str, fields: dict, task: str, bad: BadRows) -> list[dict]:
    ds = load_hub_dataset(hub["name"], hub.get("config"), split, instead="use local files (task.train=...)")
    columns = record_keys(fields)[1:] if "rejected" in fields else record_keys(fields)  # a pair's prompt: optional
    missing = [key for key in columns if key not in ds.column_names]
    if missing:
        raise GPTError(
            f"hub dataset {hub['name']!r} has no column {missing[0]!r} (columns: {ds.column_names}); "
            "map the columns with task.fields.<instruction|input|output>=<column>"
        )
    rows = []
    for i, record in enumerate(ds):
        row = normaliser(fields)(record, fields, f"{hub['name']}[{split}] row {i}", bad)
        if row is not None:
            rows.append(row)
    return rows
