"""Running a benchmark as a CPU with fewer vector instructions would (`--isa avx2`).

On an AVX-512 machine, the AVX2 rows come from the same code with torch's own kernels held to AVX2
(ATEN_CPU_CAPABILITY=avx2) and the project's bf16 probe off (GPT_CPU_BF16=0), so the defaults are an AVX2 CPU's:
fp32, and no bf16 contender. MKL and oneDNN (the matmuls) still pick their kernels from the real CPU: holding
them to AVX2 too (MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA) made a training step 1.6x slower on an AVX-512
Xeon than the same step measured on a real AVX2-only EPYC, so it would not show an AVX2 machine either. On a
CPU that has only AVX2 these settings change nothing. Code that torch.compile builds for AVX2 goes to an inductor
cache of its own: inductor's cache does not tell it from native code, and a native run that loaded it crashed.
"""

from __future__ import annotations

import os
import tempfile

ISA_CHOICES = ("native", "avx2")
AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "GPT_CPU_BF16": "0",
    "TORCHINDUCTOR_CACHE_DIR": os.path.join(tempfile.gettempdir(), f"torchinductor_avx2_{os.getuid()}"),
}


def isa_env(isa: str) -> dict:
    """The environment for a child process that runs as `isa` ("native": this machine as it is)."""
    env = dict(os.environ)
    if isa == "avx2":
        env.update(AVX2)
    return env
