"""`gpt <verb> [options]` (or `python -m gpt <verb>`): one command, one table of verbs.

Each verb is the module that does the work; this file only routes to it. The Hydra verbs take `key=value`
overrides (their configs are configs/<verb>.yaml), the others their own flags (`gpt <verb> --help`).
`train.py`, `finetune.py` and `sample.py` at the repository root stay as thin entry points to the same code.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple, Optional


class Verb(NamedTuple):
    module: str  # gpt.<module> does the work
    function: str  # its entry: a Hydra task (cfg) -> None, or a main(argv)
    config: Optional[str]  # configs/<config>.yaml for a Hydra verb; None for a verb with its own flags
    extra: tuple[str, ...]  # overrides the verb adds in front of the user's
    help: str


VERBS = {
    "train": Verb("pretrain", "pretrain", "train", (), "pretrain a model on a corpus (docs/pretrain.md)"),
    "finetune": Verb("finetune", "finetune", "finetune", (), "fine-tune a model: LoRA or full (docs/finetune.md)"),
    "sample": Verb("sample", "sample", "sample", (), "complete prompts from a model or adapter (docs/sample.md)"),
    "chat": Verb("sample", "sample", "sample", ("chat=true",), "talk to a model in the terminal (docs/sample.md)"),
    "serve": Verb("serve", "serve", "serve", (), "an OpenAI-compatible HTTP server (docs/serve.md)"),
    "convert": Verb("convert", "main", None, (), "Hugging Face import/export, GGUF export (docs/convert.md)"),
    "evaluate": Verb("evaluate", "main", None, (), "bits per byte, lm-evaluation-harness tasks (docs/evaluation.md)"),
    "report": Verb("report", "main", None, (), "write a run's report.md again (docs/evaluation.md)"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = [f"  {name:<{width}}  {verb.help}" for name, verb in VERBS.items()]
    return "usage: gpt <verb> [options]   (gpt <verb> --help for a verb's options)\n\nverbs:\n" + "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in VERBS:
        print(f"error: unknown verb {name!r}; choose one of {', '.join(VERBS)} (gpt --help)", file=sys.stderr)
        raise SystemExit(2)
    verb = VERBS[name]
    entry = getattr(importlib.import_module(f"gpt.{verb.module}"), verb.function)
    if verb.config is None:
        entry(rest)
        return
    from gpt.cli import CONFIG_DIR, run_hydra

    # Hydra reads sys.argv itself, and Lightning's DDP launcher starts each further process by re-running
    # `python <sys.argv[0]> <sys.argv[1:]>` (or `python -m <__main__'s module>`, which would lose the verb).
    # So the argv becomes the root entry script's (train.py, finetune.py, sample.py: the same code), and
    # __main__ stops claiming a module: the other processes run the entry script with the same overrides.
    script = CONFIG_DIR.parent / f"{verb.config}.py"
    sys.argv = [str(script) if script.is_file() else f"gpt {name}", *verb.extra, *rest]
    if script.is_file():
        sys.modules["__main__"].__spec__ = None
    run_hydra(verb.config, entry)


if __name__ == "__main__":
    main()
