"""The fast decode step: `GPT.decode_step` through torch.compile, with the batch-1 CPU path that writes
every Linear as inductor's own matrix-vector loop. Used by `gpt.generate.generate(compile=True)`.
"""

from __future__ import annotations

import types
import weakref
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from gpt.model import GPT

_COMPILED_DECODE_STEPS: "weakref.WeakKeyDictionary[GPT, tuple]" = weakref.WeakKeyDictionary()


def is_plain(weight) -> bool:
    """A weight stored as an ordinary tensor (not a quantized tensor subclass)."""
    return type(weight) in (torch.Tensor, nn.Parameter)


class RowTimesWeights(TorchFunctionMode):
    """While active, F.linear of a single row with a plain weight is written as sum(W * x) along the rows.

    Decoding one token makes every Linear a matrix-vector product that reads each weight once, so its speed is
    the rate at which the weights stream through the CPU. On the benchmark CPU (README, Benchmark) the matmul
    library (oneDNN, even with pre-packed weights) reads bf16 weights at ~30 GB/s; inductor's own loop for this
    reduction (one output per weight row, vectorized along the row, rows split between the threads, fp32
    accumulation like the library's) reads ~70 GB/s. Only for compiled decoding: eager, the same expression
    would build the whole W * x. Weights of other types (torchao's int8 tensors) keep their own kernels.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[:2]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.numel() == x.size(-1) and is_plain(weight):
                y = (weight.float() * x.reshape(1, -1).float()).sum(-1)
                if bias is not None:
                    y = y + bias.float()
                return y.to(x.dtype).reshape(*x.shape[:-1], weight.size(0))
        return func(*args, **kwargs)


def compiled_decode_step(model: GPT) -> Callable:
    """GPT.decode_step through torch.compile, for this model's current weights.

    One row (batch 1) on a CPU: every Linear is a matrix-vector product, which inductor generates itself
    (RowTimesWeights). Its `deterministic` flag makes it store a product's input vector (e.g. a LayerNorm's
    output) once, instead of recomputing it for every weight row that reads it.
    Several rows, quantized weights or a GPU: inductor's freezing folds the weights into the compiled graph as
    constants, which lets it store them pre-packed in oneDNN's blocked layout (read about twice as fast as
    plain bf16 weights by oneDNN).
    Constants do not follow later in-place changes (an optimizer step, a LoRA merge), so the compiled step
    is kept per model together with a fingerprint of its tensors (identity and version counter) and is
    compiled afresh when that changes. Each compilation gets its own copy of the function's code object
    because Dynamo keeps its cache on the code object: an old model's frozen graph is never reused, and it is
    freed together with its copy.
    """
    tensors = [*model.parameters(), *model.buffers()]
    fingerprint = tuple((id(t), t._version, t.dtype, t.device) for t in tensors)
    entry = _COMPILED_DECODE_STEPS.get(model)
    if entry is None or entry[0] != fingerprint:
        fn = GPT.decode_step
        fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
        compiled = torch.compile(fresh, fullgraph=True, dynamic=False)
        plain = all(is_plain(m.weight) for m in model.modules() if isinstance(m, nn.Linear))
        # Made once: a patch builds a class when made. Shapes never change within generate(), whose later steps
        # skip Dynamo's guards as well, so the row path also drops the per-call size checks of ~100 inputs.
        # (Flags an older torch lacks are left out: they change speed, not results.)
        row_flags = torch._inductor.config.patch(
            {
                key: value
                for key, value in (("deterministic", True), ("size_asserts", False))
                if hasattr(torch._inductor.config, key)
            }
        )
        frozen_flags = torch._inductor.config.patch(freezing=True)

        def step(model, idx, cache):  # Dynamo reads the mode and flags while tracing, inductor while compiling
            if plain and idx.size(0) == 1 and idx.device.type == "cpu":  # measured on CPUs only
                with RowTimesWeights(), row_flags:
                    return compiled(model, idx, cache)
            with frozen_flags:
                return compiled(model, idx, cache)

        entry = (fingerprint, step)
        _COMPILED_DECODE_STEPS[model] = entry
    return entry[1]
