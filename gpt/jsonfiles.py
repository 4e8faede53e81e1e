"""The shapes of the JSON files we write and read back: what a model directory's config.json records about its
run (its "gpt" entry), an adapter's gpt_adapter.json, a token store's meta.json. Each is checked, key by key and
type by type, before anything uses it: a hand-edited or damaged file is one line naming the key, never a
traceback, and a misspelt key of our own format is refused with the nearest valid name (it would be ignored).
Reading the text itself (not JSON, not UTF-8, nested too deeply, the wrong top level) is gpt.errors.read_json's.
"""

from __future__ import annotations

from pathlib import Path

from gpt.errors import GPTError, is_int, json_type, read_json, unknown_keys

# What a task entry holds (gpt.tasks.TaskDataModule.describe): the prompt template(s), the stop strings, the
# chat template (task=chat). Every key is optional: sample.py asks for a template when there is none.
TASK_KEYS = ("name", "format", "template", "template_no_input", "stop", "chat_template")
ADAPTER_KEYS = ("base", "task", "decoding", "step")  # gpt_adapter.json (gpt.finetune)
BASE_KEYS = ("path", "sha256")
# config.json's "gpt" entry: what each writer of a model directory adds (pretraining, a fine-tuning run, a merge,
# gpt.convert's import-hf)
MODEL_RECORD_KEYS = ("step", "data", "task", "decoding", "merged_from", "adapter", "converted_from", "finetuned_from")


def task_problem(task: dict) -> str | None:
    """What is wrong with a task entry's fields (None: nothing)."""
    for key in ("name", "format", "template"):
        if not isinstance(task.get(key, ""), str):
            return f"{key!r} must be text (got {json_type(task[key])})"
    for key in ("template_no_input", "chat_template"):
        if not isinstance(task.get(key), (str, type(None))):
            return f"{key!r} must be text or null (got {json_type(task[key])})"
    stop = task.get("stop", [])
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        return f"'stop' must be a list of strings (got {stop!r:.60})"
    return None


def check_task(task, where: str, fix: str) -> None:
    """A task entry: an object of TASK_KEYS with text where text goes."""
    if not isinstance(task, dict):
        raise GPTError(f"{where} has a malformed task entry (it is {json_type(task)}, not an object); {fix}")
    unknown_keys(task, TASK_KEYS, f"{where}'s task entry", fix)
    problem = task_problem(task)
    if problem:
        raise GPTError(f"{where} has a malformed task entry (template, stop, format: {problem}); {fix}")


def check_common(record: dict, where: str, fix: str) -> None:
    """The entries a model record and an adapter record share: the decoding a run scored with, its step."""
    if "decoding" in record and not isinstance(record["decoding"], (dict, type(None))):
        raise GPTError(f"{where}: 'decoding' must be an object (got {json_type(record['decoding'])}); {fix}")
    if "step" in record and not (is_int(record["step"]) and record["step"] >= 0):
        raise GPTError(f"{where}: 'step' must be a whole number >= 0 (got {record['step']!r:.40}); {fix}")


def check_adapter_record(record, where: str) -> dict:
    """gpt_adapter.json: the base model (path + sha256 of its weights), the task, the decoding, the step."""
    fix = "it was edited or not written by finetune.py: re-run the fine-tuning"
    base = record.get("base") if isinstance(record, dict) else None
    if not isinstance(base, dict) or not all(isinstance(base.get(k), str) for k in BASE_KEYS):
        raise GPTError(
            f"{where} does not record the adapter's base model (base.path, base.sha256); it was edited or not "
            "written by finetune.py: re-run the fine-tuning"
        )
    unknown_keys(record, ADAPTER_KEYS, where, fix)
    unknown_keys(base, BASE_KEYS, f"{where}'s base entry", fix)
    check_task(record.get("task", {}), where, f"{fix}, or sample with template=... and stop=...")
    check_common(record, where, fix)
    return record


def check_model_record(record, where: str) -> dict:
    """config.json's "gpt" entry ({} when there is none)."""
    fix = "fix its name, or re-export the model"
    if record is None:
        return {}
    if not isinstance(record, dict):
        raise GPTError(f"{where}: its 'gpt' entry must be an object (got {json_type(record)}); {fix}")
    unknown_keys(record, MODEL_RECORD_KEYS, f"{where}'s 'gpt' entry", fix)
    if record.get("task") is not None:
        check_task(record["task"], where, "re-export the model, or sample with template=... and stop=...")
    check_common(record, where, fix)
    return record


# ----------------------------------------------------------------------------------------------------
# A token store's meta.json (gpt.data.TokenStore): a cache, rebuilt when it is deleted

STORE_DTYPES = {"uint16": 2, "uint32": 4}


def read_store_meta(root: Path) -> dict:
    """meta.json of a prepared corpus, checked against itself and against tokens.bin's size."""
    fix = f"delete {root} (a cached token store: the next run rebuilds it)"
    path = root / "meta.json"
    meta = read_json(path, fix)
    dtype, n, n_train = meta.get("dtype"), meta.get("n_tokens"), meta.get("n_train")
    problem = None
    if not isinstance(dtype, str) or dtype not in STORE_DTYPES:
        problem = f"'dtype' must be one of {list(STORE_DTYPES)} (got {dtype!r:.40})"
    elif not (is_int(n) and n > 0 and is_int(n_train) and 0 <= n_train <= n):
        problem = (
            f"'n_tokens' and 'n_train' must be whole numbers, 0 <= n_train <= n_tokens (got {n!r:.30}, {n_train!r:.30})"
        )
    elif not (is_int(meta.get("n_unknown", 0)) and meta.get("n_unknown", 0) >= 0):
        problem = f"'n_unknown' must be a whole number >= 0 (got {meta['n_unknown']!r:.30})"
    elif not isinstance(meta.get("unknown_chars", ""), str):
        problem = f"'unknown_chars' must be text (got {json_type(meta['unknown_chars'])})"
    elif not (root / "tokens.bin").is_file() or (root / "tokens.bin").stat().st_size != n * STORE_DTYPES[dtype]:
        problem = f"tokens.bin does not hold the {n} tokens of {STORE_DTYPES[dtype]} bytes it records"
    if problem:
        raise GPTError(f"{path} is damaged: {problem}; {fix}")
    return meta
