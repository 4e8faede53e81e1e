"""A Python process with torch, Lightning and Hydra already imported, that runs each entry-script call
sent to it in a forked child: the child *is* `python <script> <args>` (same argv, cwd, environment, exit
status, stdout/stderr, uncaught-exception traceback) minus the ~5 s of imports. Used by conftest.run_cli.

Protocol: one JSON request per line on stdin ({"script" or "module", "args", "cwd", "env", "stdout",
"stderr"}, the last two file paths); for each, one line {"pid": N} when the child starts and {"returncode": N} when it
ends, on stdout. The preloaded modules saw the session's environment when they were imported, so run_cli
falls back to a plain subprocess for a call that changes any variable but GPT_* (which gpt reads when it
runs, never at import; gpt itself is not preloaded).
"""

import gc
import json
import logging
import os
import sys

PRELOAD = (
    "torch",
    "numpy",
    "lightning",
    "hydra",
    "omegaconf",
    "safetensors",
    "tokenizers",
    "transformers",
    "peft",
    "datasets",
)


def child(request: dict, protocol) -> None:
    """Become the script (in the forked child); leaves by exception or sys.exit like a real interpreter."""
    protocol.close()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    import runpy

    if "module" in request:  # python -m package.module: the module's file as argv[0], the cwd on the path
        sys.argv = [request["module"], *request["args"]]
        sys.path[0] = os.getcwd()
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    else:
        sys.argv = [request["script"], *request["args"]]
        sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))
        runpy.run_path(request["script"], run_name="__main__")
    sys.exit(0)


def main() -> None:
    for name in ("torchao", "torch.utils._pytree"):  # what gpt/__init__.py quiets (peft imports torchao)
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in PRELOAD:
        __import__(name)
    # Out of the garbage collector's sight: otherwise each child's exit walks (and so copies, page by page,
    # out of the shared copy-on-write memory) every preloaded object, ~1.4 s a call here.
    gc.freeze()
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request, protocol)  # returns only by raising: unwinds to the top like `python script.py`
        protocol.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        protocol.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    main()
