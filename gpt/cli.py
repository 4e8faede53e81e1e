"""What the entry scripts (train.py, finetune.py, sample.py) share: Hydra, and errors a person can act on.

A `GPTError` (a user mistake) is printed as one line, `error: <what> ; <what to do>`, with exit status 2.
So is a typo'd config key or an unknown group choice: the overrides are checked against the composed
config before Hydra runs, because Hydra's own report spans several lines. Set GPT_VERBOSE=1 (or
HYDRA_FULL_ERROR=1) to get the full traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import OmegaConf

from gpt.devices import cpu_precision
from gpt.errors import GPTError
from gpt.launch import distributed_overrides, is_launch_rank_zero

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
EXIT_USER_ERROR = 2

OmegaConf.register_new_resolver("cpu_precision", cpu_precision, replace=True)


def verbose() -> bool:
    return os.environ.get("GPT_VERBOSE") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def user_errors():
    """Turn a GPTError into one line on stderr and exit status 2 (unless verbose)."""
    try:
        yield
    except GPTError as e:
        if verbose():
            raise
        fail(str(e))
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves a checkpoint and exits itself)
        if verbose():
            raise
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def _is_sweep(value: str) -> bool:
    """A value that Hydra reads as several (a,b or choice(...)); a comma inside [..], {..} or quotes is not."""
    if re.match(r"^(range|choice|glob|interval|tag|sort|shuffle)\(", value):
        return True
    depth, quote = 0, None
    for c in value:
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
        elif c == "," and depth == 0:
            return True
    return False


GROUPS = frozenset(d.name for d in CONFIG_DIR.iterdir() if d.is_dir())  # model, data, trainer, ...
# Lightning's settings that take several types (devices=2 or "auto", precision=32 or "bf16-mixed", a fraction
# or a step count): Lightning checks them itself.
LOOSE_KEYS = (
    "trainer.devices",
    "trainer.precision",
    "trainer.accelerator",
    "trainer.strategy",
    "trainer.num_nodes",
    "trainer.max_time",
    "trainer.limit_train_batches",
    "trainer.limit_val_batches",
    "trainer.val_check_interval",
    "trainer.gradient_clip_val",
)


# Hydra's flags that take the next argument as their value (--cfg job, -p model, -cn other ...); --info takes
# one only from its list.
VALUE_FLAGS = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--shell-completion",
    "-sc",
}
INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, the key=value settings), from the command line's arguments."""
    flags, settings, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("-"):
            takes = a in VALUE_FLAGS or (a in ("--info", "-i") and i + 1 < len(args) and args[i + 1] in INFO_TOPICS)
            flags += args[i : i + 1 + takes]
            i += 1 + takes
        else:
            settings.append(a)
            i += 1
    return flags, settings


def precheck_overrides(config_name: str, args: list[str]) -> list[str]:
    """Compose the config with the command-line overrides; report a bad key, choice, value type or a missing
    required value in one line. Returns the arguments for Hydra, where a bare value for a text or list setting
    (prompt=5, stop=AB, lora.targets=qkv) is rewritten to mean what it says ('5', ["AB"], ["qkv"])."""
    multirun = any(a in ("-m", "--multirun") for a in args)
    for a in args:  # bytes that are not UTF-8 reach Python as lone surrogates: no tokenizer or file name takes them
        try:
            a.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = a[e.start : e.end].encode("utf-8", "surrogateescape")
            fail(
                f"the command-line argument {a.split('=', 1)[0]}=... is not UTF-8 text (byte 0x{bad[0]:02x} at "
                f"character {e.start}); convert it, e.g. with `iconv -f latin1 -t utf-8`, or set your terminal to "
                "UTF-8"
            )
    args = [expand_home(a) for a in args]
    flags, settings = split_flags(args)  # --help, --cfg job, -m ...: Hydra's own business
    for a in settings:
        if "=" not in a and not a.startswith("~"):
            fail(f"{a!r} is not a setting: write key=value (e.g. optim.lr=1e-3); `--cfg job` lists the keys")
        if a.startswith("~") and a[1:].split("=", 1)[0] in GROUPS:
            fail(
                f"{a!r} would remove the whole {a[1:].split('=', 1)[0]} config; choose another one with "
                f"{a[1:].split('=', 1)[0]}=<name> instead"
            )
        if a.startswith("~") and not a.startswith("~hydra") and a[1:].split("=", 1)[0] not in GROUPS:
            fail(
                f"{a!r} would remove the setting {a[1:].split('=', 1)[0]}, which {config_name}.py reads; give it a "
                "value instead (null where the setting allows none)"
            )
        if "=" in a and _is_sweep(a.split("=", 1)[1]) and not multirun:
            fail(
                f"{a!r} gives several values: add -m to run one job per value (a sweep), or give one value "
                "(quote a value that contains commas: key='a,b')"
            )
    overrides = [
        a
        for a in settings
        if not a.lstrip("+~").startswith("hydra") and not ("=" in a and _is_sweep(a.split("=", 1)[1]))
    ]
    if any(f in ("--help", "-h") for f in flags):
        print_help(config_name, [a for a in overrides if a.split("=", 1)[0].lstrip("+~") in GROUPS])
    if any(
        f in ("--hydra-help", "--info", "-i", "--version", "-sc", "--shell-completion", "--experimental-rerun")
        for f in flags
    ):
        return args
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides)
    except OverrideParseException:
        if verbose():
            raise
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser, bad = OverridesParser.create(), "?"
        for arg in overrides:
            try:
                parser.parse_override(arg)
            except HydraException:
                bad = arg
                break
        key = bad.split("=", 1)[0].lstrip("+~")
        fail(
            f"cannot read the command-line setting {bad!r} (Hydra's override syntax): check it for a typo; a value "
            f"with spaces, non-ASCII letters or brackets needs quotes: '{key}=\"...\"' (single quotes for the shell)"
        )
    except (HydraException, OmegaConfBaseException) as e:
        if verbose():
            raise
        fail(describe_config_error(f"{e}\n{e.__cause__ or ''}", config_name, overrides))
    from omegaconf.errors import GrammarParseError, InterpolationResolutionError

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except (InterpolationResolutionError, GrammarParseError) as e:
        if verbose():
            raise
        key = getattr(e, "full_key", None) or "a setting"
        fail(
            f"{key}: cannot resolve ${{...}} ({str(e).splitlines()[0]}): Hydra reads ${{...}} as a reference to "
            f"another setting; for the literal text write \\${{...}} (in the shell: '{key}=\\${{...}}')"
        )
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        fail(
            f"{missing[0]} must be given for this configuration: add {missing[0]}=... "
            f"(`python {config_name}.py --cfg job` shows the settings)"
        )
    rewritten = check_value_types(config_name, overrides, cfg)
    args = [rewritten.get(a, a) for a in args]
    run_dir = ([unquote(a.split("=", 1)[1]) for a in args if a.startswith("hydra.run.dir=")] or [None])[-1]
    if run_dir and "${" not in run_dir:
        precheck_run_dir(Path(run_dir), cfg)
    return args


def unquote(value: str) -> str:
    """A value as Hydra reads it when it is one quoted string ('x y' or "x y")."""
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value


def expand_home(arg: str) -> str:
    """A path setting's leading ~ is the home directory, as the shell would have made it, also where the shell
    left it alone: in the shell's quotes ('data.path=~/corpus/*.txt', which Hydra's syntax cannot read) and in
    Hydra's (ckpt='~/runs/x'). Only path settings, and never a sweep's several values."""
    m = re.fullmatch(r"(\+?[A-Za-z_][\w.]*)=(.*)", arg, flags=re.S)
    if not m or m.group(1).lstrip("+") not in PATH_KEYS | GLOB_KEYS or _is_sweep(m.group(2)):
        return arg
    value = unquote(m.group(2))
    if not value.startswith("~") or "'" in value:
        return arg
    return f"{m.group(1)}='{os.path.expanduser(value)}'"


# Settings that name one file or directory: a leading ~ is the home directory, quoted or not (expand_home).
PATH_KEYS = {
    "ckpt",
    "adapter",
    "base",
    "input_file",
    "output_file",
    "prompt_file",
    "attention_map",
    "alignment_map",
    "ckpt_path",
    "data.tokenizer_path",
    "task.root",
    "hydra.run.dir",
    "hydra.sweep.dir",
}
GLOB_KEYS = {"data.path"}  # files or a glob (expanded by the data module): only ~ as the shell would


def check_value_types(config_name: str, overrides: list[str], cfg, base=None) -> dict[str, str]:
    """Each key=value against the type of the key's default (the config with the same group choices, before
    the values): a word where a number or true/false goes is refused here, in one line, instead of failing
    deep inside (or, for true/false, silently counting as true). Returns {override: rewritten override}."""
    from hydra import compose, initialize_config_dir

    choices = [a for a in overrides if a.lstrip("+~").split("=", 1)[0] in GROUPS]
    if base is None:  # (given by tests that check many values against one composition)
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            base = compose(config_name, overrides=choices)
    rewritten, seen = {}, set()
    for arg in reversed(overrides):  # the last one of a key wins, as in Hydra
        if arg.startswith(("+", "~")) or arg in choices or "=" not in arg:
            continue
        key, raw = arg.split("=", 1)
        if key in LOOSE_KEYS or key in seen:
            continue
        seen.add(key)
        default = OmegaConf.select(base, key, default=None, throw_on_missing=False)
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if key in PATH_KEYS | GLOB_KEYS and isinstance(value, (bool, int, float)):  # input_file=5: a file named 5
            rewritten[arg] = f"{key}='{raw}'"
            continue
        if value is None or default is None or OmegaConf.is_dict(default):
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                fail(f"{key} is true or false (got {raw!r})")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                fail(f"{key} must be a whole number (got {raw!r})")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(f"{key} must be a number (got {raw!r})")
            if not math.isfinite(value):  # NaN would pass every later `x < limit` check by failing none
                fail(f"{key} must be a finite number (got {raw})")
        elif isinstance(default, str):
            if isinstance(value, (bool, int, float)):  # prompt=5, name=2024: text, as typed
                rewritten[arg] = f"{key}='{raw}'"
        elif OmegaConf.is_list(default) and not OmegaConf.is_list(value) and not OmegaConf.is_dict(value):
            rewritten[arg] = f"{key}=[{raw}]"  # one item: stop=AB -> ["AB"], not a list of characters
    return rewritten


def precheck_run_dir(run_dir: Path, cfg) -> None:
    """An explicit hydra.run.dir, checked before Hydra creates it and writes its .hydra/ files there."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create hydra.run.dir={run_dir} ({e.strerror}); choose a directory you can write to")
    if "ckpt_path" in cfg:  # a training run: refuse a directory in use, or holding a run it does not resume
        from gpt.run import RunLock, check_run_dir_is_free, resumes_run_in

        with user_errors():  # a refused directory is checked before the lock is taken: nothing is added to it
            check_run_dir_is_free(run_dir, cfg.ckpt_path)
            others = sorted(p.name for p in run_dir.iterdir() if p.name != ".lock")
            if others and not resumes_run_in(run_dir, cfg.ckpt_path) and is_launch_rank_zero():  # .hydra/, metrics...
                raise GPTError(
                    f"hydra.run.dir={run_dir} is not empty (it holds {', '.join(others[:3])}"
                    f"{', ...' if len(others) > 3 else ''}); choose a new or empty directory"
                )
            with RunLock(run_dir):  # refuses a directory another run is writing to
                pass


@contextlib.contextmanager
def removed_if_refused(own_dir: bool):
    """A run refused with a GPTError before it wrote anything of its own takes the directory Hydra made
    for it (holding only .hydra/, its log and the lock) away with it, so runs/<name>/ lists runs, not
    attempts. A directory the user named (hydra.run.dir=...) is left alone."""
    try:
        yield
    except GPTError:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        scaffolding = {".hydra", ".lock", f"{HydraConfig.get().job.name}.log"}
        if (
            own_dir
            and is_launch_rank_zero()
            and run_dir.resolve() != Path.cwd().resolve()
            and run_dir.is_dir()
            and all(p.name in scaffolding for p in run_dir.iterdir())
        ):
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
            unpoint_latest(run_dir)
            with contextlib.suppress(OSError):
                run_dir.parent.rmdir()  # runs/<name>/ too, when this was its only attempt
        raise


def unpoint_latest(run_dir: Path) -> None:
    """runs/<name>/latest, if it named this (removed) run, goes back to the newest run with checkpoints."""
    link = run_dir.parent / "latest"
    if not link.is_symlink() or os.readlink(link) != run_dir.name:
        return
    runs = [p for p in run_dir.parent.iterdir() if not p.is_symlink() and (p / "checkpoints").is_dir()]
    if runs:
        from gpt.run import point_latest

        point_latest(max(runs, key=lambda p: p.stat().st_mtime))
    else:
        link.unlink(missing_ok=True)


def config_groups(config_name: str) -> list[str]:
    """The config groups a script composes (the groups of its config's defaults list)."""
    defaults = OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml").get("defaults") or []
    return [key for d in defaults if OmegaConf.is_dict(d) for key in d if not str(key).startswith("override")]


def print_help(config_name: str, choices: list[str]) -> None:
    """`python <script>.py --help`: its usage line, its own config groups and their options, and its settings
    (Hydra's own help would list every group under configs/, also those of the other scripts)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    lines = (CONFIG_DIR / f"{config_name}.yaml").read_text().splitlines()
    print("\n".join(line[1:].strip() for line in itertools.takewhile(lambda line: line.startswith("#"), lines)))
    groups = config_groups(config_name)
    if groups:
        print("\n== Config groups: group=option ==")
        for group in groups:
            print(f"{group}: {', '.join(sorted(p.stem for p in (CONFIG_DIR / group).glob('*.yaml')))}")
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=choices)
    except (HydraException, OmegaConfBaseException) as e:
        fail(describe_config_error(f"{e}\n{e.__cause__ or ''}", config_name, choices))
    print("\n== Settings: key=value (`--cfg job` prints them with every value filled in) ==")
    print(OmegaConf.to_yaml(cfg).rstrip())
    print("\nREADME.md is the manual; docs/errors.md has the table of errors and what to do.")
    sys.exit(0)


def describe_config_error(msg: str, config_name: str, overrides: Sequence[str] = ()) -> str:
    m = re.search(r"Could not override '([^']+)'\. No match in the defaults list", msg)
    if m:
        group, groups = m.group(1), ", ".join(config_groups(config_name)) or "none"
        given = [a for a in overrides if a.lstrip("+~").split("=", 1)[0] == group]
        chosen = [a for a in overrides if a.lstrip("+~").split("=", 1)[0] in GROUPS and a not in given]
        if not given and chosen:  # set by a chosen config, e.g. another script's experiment
            return (
                f"{' '.join(chosen)} sets {group}, which is not a config group of {config_name}.py (its groups: "
                f"{groups}): it is meant for another script; drop it (`python {config_name}.py --help`)"
            )
        return (
            f"{group} is not a config group of {config_name}.py (its groups: {groups}); drop it: "
            f"`python {config_name}.py --help` lists what it takes"
        )
    m = re.search(r"Could not override '([^']+)'", msg)
    if m and ("not in struct" in msg or "To append to your config" in msg):
        key = m.group(1)
        return (
            f"unknown config key '{key}' (a typo?); `python {config_name}.py --cfg job` lists every key, "
            f"and +{key}=... adds a new one on purpose"
        )
    m = re.search(r"Could not find '([^']+)'", msg)
    if m:
        group = m.group(1).split("/")[0]
        options = re.findall(r"^\t(\S+)$", msg, flags=re.M)
        return f"unknown choice '{m.group(1)}'" + (
            f"; available {group} options: {', '.join(options)}" if options else ""
        )
    return " ".join(line.strip() for line in msg.splitlines() if line.strip())


def run_hydra(config_name: str, task: Callable[[Any], Any]) -> None:
    """Run `task(cfg)` as a Hydra app over configs/<config_name>.yaml."""
    import hydra

    with user_errors():
        sys.argv = [sys.argv[0], *distributed_overrides(config_name, sys.argv[1:])]
        sys.argv = [sys.argv[0], *precheck_overrides(config_name, sys.argv[1:])]

    explicit_dir = any(a.startswith("hydra.run.dir=") for a in sys.argv[1:])

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
    def _main(cfg):
        with user_errors(), removed_if_refused(not explicit_dir):
            return task(cfg)

    _main()
