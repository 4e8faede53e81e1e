"""gpt.devices: the bf16 probe and its switch, and what `auto` resolves to."""

import pytest
import torch

from gpt.devices import cpu_has_native_bf16, cpu_precision, resolve_dtype
from gpt.errors import GPTError


def test_the_bf16_switch_decides_the_cpu_defaults(monkeypatch):
    monkeypatch.setenv("GPT_CPU_BF16", "0")
    assert not cpu_has_native_bf16() and cpu_precision() == "32-true"
    assert resolve_dtype(torch.device("cpu"), "auto") == torch.float32
    monkeypatch.setenv("GPT_CPU_BF16", "1")
    assert cpu_has_native_bf16() and cpu_precision() == "bf16-mixed"
    assert resolve_dtype(torch.device("cpu"), "auto") == torch.bfloat16
    assert resolve_dtype(torch.device("cpu"), "float32") == torch.float32  # an explicit dtype is never overridden
    monkeypatch.setenv("GPT_CPU_BF16", "yes")
    with pytest.raises(GPTError, match="GPT_CPU_BF16='yes'"):
        cpu_has_native_bf16()


def test_the_probe_uses_torchs_own_cpu_feature_checks(monkeypatch):
    # torch has no public probe for AVX512-BF16/AMX; these private ones are what inductor asks. If they move,
    # this fails here rather than every CPU silently training in fp32.
    assert callable(torch.cpu._is_avx512_bf16_supported) and callable(torch.cpu._is_amx_tile_supported)
    monkeypatch.delenv("GPT_CPU_BF16", raising=False)
    expected = torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")) and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    )
    assert cpu_has_native_bf16() == expected
