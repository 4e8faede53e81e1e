"""Shared fixtures. Hermetic: the text and the task pairs the tests train on ship with the tests (or are made
here), so `make test` needs no network and no data folder. Tests marked `data` use the real corpora from
$GPT_DATA_DIR (CI: ../shared/data; `make test-data`)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run and machine (a failure reproduces as it is, and the suite's
# outcome never depends on the day's random seed); GPT_HYPOTHESIS_RANDOM=1 explores new examples instead.
settings.register_profile("gpt", derandomize=not os.environ.get("GPT_HYPOTHESIS_RANDOM"), database=None)
settings.load_profile("gpt")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

# Inductor's cache of compiled code does not tell code built under ATEN_CPU_CAPABILITY (make test-avx2) from
# native code: a native run that loaded the compiled decode step of an AVX2 run crashed (double free). A run
# with torch's kernels held back keeps a cache of its own (bench/isa.py does the same for the benchmarks).
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{os.environ['ATEN_CPU_CAPABILITY']}_{os.getuid()}"
    )
# A tiny, fast training setup on the shipped text (add trainer.max_steps=...)
TINY = [
    "model=tiny",
    "model.block_size=32",
    "data.batch_size=16",
    "data.eval_batches=4",
    "trainer.enable_progress_bar=false",
    f"data.path={FIXTURES / 'tinyshakespeare.txt'}",
]


@pytest.fixture(autouse=True)
def _isolate(tmp_path_factory, monkeypatch):
    # Token stores built by tests go to a per-session cache, never into the user's .cache/ or data dir.
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    """The first 2,000 lines (53 KB) of Tiny Shakespeare, shipped with the tests."""
    return FIXTURES / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def shakespeare_full() -> Path:
    """The whole of Tiny Shakespeare, resolved the way the named dataset is (GPT_DATA_DIR, else download)."""
    from gpt.datafiles import resolve_files

    return resolve_files(relpath="tinyshakespeare/input.txt", name="shakespeare_char")[0]


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory) -> Path:
    """A made-up modern -> Shakespeare task (tests/pairs.py) in the layout of $GPT_DATA_DIR/shakespeare_modern/."""
    from pairs import write_pairs

    return write_pairs(tmp_path_factory.mktemp("pairs") / "shakespeare_modern")


def preset(name: str):
    """configs/model/<name>.yaml (the one list of named shapes) as the GPTConfig that `model=<name>` builds."""
    import yaml

    from gpt.config import GPTConfig

    data = yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())
    data.pop("_target_")
    return GPTConfig(**data)


PRESETS = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml"))


def train_config(*overrides: str):
    """configs/train.yaml composed with `overrides`, as train.py would see it (for in-process pretrain())."""
    from hydra import compose, initialize_config_dir

    from gpt.cli import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


class _Preloaded:
    """The tests/preloaded.py process (started on first use): runs entry scripts in forked children."""

    def __init__(self):
        self.env = {k: v for k, v in os.environ.items() if k not in ("GPT_VERBOSE", "HYDRA_FULL_ERROR")}
        self.env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "preloaded.py")],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    # What may differ between the session's environment and a call's: gpt's own variables and what tests
    # set in-process (pytest; Lightning's seed_everything), all read at run time, never at import; and what
    # libraries write into os.environ for themselves once used in the test process (Lightning Fabric's NVML
    # switch, inductor's cache dir, lm-eval's Xet download hint), read when CUDA, inductor or a hub download is
    # first used, never by the preloaded imports. Without these, every call after the first test that used one of
    # those libraries ran as a fresh process (a 13-minute suite).
    RUNTIME_ONLY = (
        "GPT_",
        "PYTEST_CURRENT_TEST",
        "PL_GLOBAL_SEED",
        "PL_SEED_WORKERS",
        "PYTORCH_NVML_BASED_CUDA_CHECK",
        "TORCHINDUCTOR_CACHE_DIR",
        "HF_XET_HIGH_PERFORMANCE",
    )

    def serves(self, env: dict) -> bool:
        """Whether a call with `env` behaves as a fresh process would (see RUNTIME_ONLY)."""
        ignore = lambda k: k.startswith(self.RUNTIME_ONLY)  # noqa: E731
        return self.proc.poll() is None and (
            {k: v for k, v in env.items() if not ignore(k)} == {k: v for k, v in self.env.items() if not ignore(k)}
        )

    def differs(self, env: dict) -> list[str]:
        return sorted(
            k
            for k in set(env) ^ set(self.env) | {k for k in env if self.env.get(k) != env[k]}
            if not k.startswith(self.RUNTIME_ONLY)
        )

    def run(self, argv: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as d:
            out, err = Path(d) / "out", Path(d) / "err"
            module = argv[1] == "-m"
            request = {
                "module" if module else "script": argv[1 + module],
                "args": argv[2 + module :],
                "cwd": str(cwd),
                "env": env,
                "stdout": str(out),
                "stderr": str(err),
            }
            self.proc.stdin.write(json.dumps(request) + "\n")
            pid = json.loads(self.proc.stdout.readline())["pid"]
            timer = threading.Timer(timeout, os.kill, (pid, signal.SIGKILL))
            timer.start()
            code = json.loads(self.proc.stdout.readline())["returncode"]
            if not timer.is_alive():
                raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text())
            timer.cancel()
            return subprocess.CompletedProcess(
                argv, code, out.read_text(errors="replace"), err.read_text(errors="replace")
            )


_preloaded: list = []


def run_cli(script: str, *args: str, env: dict | None = None, cwd: Path = ROOT, timeout: int = 300):
    """Run one of the entry scripts (or `-m package.module`) as a user would; returns the CompletedProcess.

    Runs in a fork of a process that has torch, Lightning and Hydra imported already (tests/preloaded.py):
    the same argv, cwd, environment, stdout/stderr and exit status as `python <script>`, seconds sooner.
    A call that changes environment variables other than GPT_* gets a plain subprocess instead.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("GPT_VERBOSE", None)
    full_env.pop("HYDRA_FULL_ERROR", None)
    command = ["-m", script[3:]] if script.startswith("-m ") else [str(ROOT / script)]
    argv = [sys.executable, *command, *args]
    if hasattr(os, "fork"):
        if not _preloaded:
            _preloaded.append(_Preloaded())
        # A variable a library added to this process's environment after the preloaded process started (Lightning
        # Fabric's NVML switch, inductor's cache dir, lm-eval's hub hints, ...) was not there when the preloaded
        # modules were imported, and the call did not ask for it: it does not make the call differ.
        added = set(os.environ) - set(_preloaded[0].env) - set(env or {}) - {"PYTHONUNBUFFERED"}
        compared = {k: v for k, v in full_env.items() if k not in added}
        if _preloaded[0].serves(compared):
            return _preloaded[0].run(argv, cwd, full_env, timeout)
        unasked = [k for k in _preloaded[0].differs(compared) if k not in (env or {})]
        if unasked:  # the session's environment changed under the preloaded process: worth knowing
            warnings.warn(f"run_cli: {unasked} changed since the session started; running a fresh (slower) process")
    return subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc, *needles: str):
    """Non-zero exit, one `error:` line naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]
