"""Devices and precision: which device `auto` means, whether it multiplies bf16 natively, and the dtype and
autocast that follow. Training (`${cpu_precision:}` in configs/trainer/cpu.yaml) and sampling both ask here.

GPT_CPU_BF16=0 (or 1) overrides the CPU's bf16 probe: 0 makes a bf16 CPU behave as an AVX2-only one (fp32
by default), which is how the test suite checks the path most laptops take.
"""

from __future__ import annotations

import contextlib
import os

import torch

from gpt.errors import GPTError

CPU_BF16_ENV = "GPT_CPU_BF16"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GPTError(f"device={name} but no CUDA GPU is visible; use device=cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise GPTError(
            f"device={name} but this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0; "
            "use device=cuda"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise GPTError("device=mps but this PyTorch build or machine has no Apple GPU (MPS); use device=cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX, as torch's own kernels will use them.

    torch has no public probe for these instructions: `torch.cpu._is_avx512_bf16_supported` and
    `_is_amx_tile_supported` are what torch.compile's CPU backend itself asks (tests/test_devices.py fails if
    they go away). Kernels dispatched below AVX-512 (ATEN_CPU_CAPABILITY=avx2, or an AVX2-only CPU) emulate
    bf16, which is slower than fp32: no native bf16 then, whatever the CPU has.
    """
    override = os.environ.get(CPU_BF16_ENV, "auto")
    if override not in ("auto", "0", "1"):
        raise GPTError(f"{CPU_BF16_ENV}={override!r}: use 0 (no native bf16), 1 (native bf16) or unset it (probe)")
    if override != "auto":
        return override == "1"
    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")):
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def has_fast_bf16(device: torch.device) -> bool:
    """Whether this device multiplies bf16 matrices natively (CUDA with bf16; CPUs with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def cpu_precision() -> str:
    """`${cpu_precision:}` in configs/trainer/cpu.yaml: bf16-mixed (fp32 master weights) where the CPU
    multiplies bf16 natively, else 32-true (emulated bf16 is slower than fp32)."""
    return "bf16-mixed" if has_fast_bf16(torch.device("cpu")) else "32-true"


def check_dtype(dtype, prefix: str = "") -> None:
    if dtype != "auto" and dtype not in DTYPES:
        raise GPTError(f"{prefix}dtype must be auto, float32, bfloat16 or float16 (got {dtype!r})")


def resolve_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """ "auto" is bfloat16 where the device computes it natively (half the weight bytes to read per generated
    token), else float32."""
    check_dtype(dtype)
    return (torch.bfloat16 if has_fast_bf16(device) else torch.float32) if dtype == "auto" else DTYPES[dtype]


def autocast(device: torch.device, dtype: str):
    """The autocast context for `dtype` (see resolve_dtype): the weights stay as they are."""
    dtype = resolve_dtype(device, dtype)
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
