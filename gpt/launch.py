"""How this process was launched, and how its config becomes objects: whether it is rank 0 before any
Trainer exists, the Hydra arguments each process of a torchrun/srun launch needs, and `build`
(hydra.utils.instantiate, with our errors coming out as themselves). Shared by the entry (gpt.cli) and the
training layer (gpt.run), below both.
"""

from __future__ import annotations

import os
import re

from gpt.errors import GPTError


def is_launch_rank_zero() -> bool:
    """Whether this process is global rank 0 of its launch, known before any Trainer exists: torchrun sets
    RANK; Lightning's DDP launcher starts its extra processes with LOCAL_RANK (and NODE_RANK on other
    nodes); srun sets SLURM_PROCID. A plain single-process run is rank 0."""
    env = os.environ
    if "RANK" in env:
        return env["RANK"] == "0"
    return all(env.get(key, "0") == "0" for key in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def distributed_overrides(config_name: str, args: list[str]) -> list[str]:
    """Processes started together by torchrun or srun each run Hydra. They must share one run directory
    (each would otherwise resolve its own ${now}), and only rank 0 writes the config snapshot (.hydra/);
    the others log to <config_name>_rank<N>.log beside rank 0's log. (Lightning's own DDP launcher does
    the same for the processes it starts.)"""
    env = os.environ
    processes = max(int(env.get("WORLD_SIZE") or 1), int(env.get("SLURM_STEP_NUM_TASKS") or 1))
    if processes <= 1 or any(a in ("-m", "--multirun") for a in args):
        return args
    if not any(a.startswith("hydra.run.dir=") for a in args):
        raise GPTError(
            f"this is one of {processes} processes of a distributed launch (torchrun / srun); give them "
            "all the same run directory: hydra.run.dir=runs/<name>/<job id>"
        )
    if is_launch_rank_zero() or "hydra.output_subdir=null" in args:
        return args
    rank = env.get("RANK", env.get("SLURM_PROCID", "n"))
    return [*args, "hydra.output_subdir=null", f"hydra.job.name={config_name}_rank{rank}"]


def build(node, **kwargs):
    """hydra.utils.instantiate, but a GPTError raised by the target comes out as itself (Hydra wraps it)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, GPTError):
            if type(cause).__name__ == "MisconfigurationException":  # Lightning's word for a bad setting
                key = re.search(r"full_key: (\S+)", str(e))
                raise GPTError(
                    f"{cause} (in the {key.group(1) if key else node.get('_target_')} config); fix "
                    "those settings (`--cfg job` prints them)"
                ) from e
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e.__cause__ or e))
        if unknown:  # +model.n_layr=3: added on purpose, but the target has no such parameter
            target = node.get("_target_", "?") if hasattr(node, "get") else "?"
            raise GPTError(
                f"{target} has no setting {unknown.group(1)!r} (a typo in a +key=... override?); "
                "`--cfg job` shows the settings it takes"
            ) from e
        raise
