"""gpt: pretrain, fine-tune and sample decoder-only GPTs (PyTorch + Lightning + Hydra + Hugging Face)."""

import logging

# torchao (sample.py's quantize=int8), which PEFT and transformers import whenever it is installed, logs its
# CUDA-only kernels as missing on a CPU build of torch, and torch warns about torchao's enum registrations:
# four lines of noise at the start of every command that has nothing to do with it. Set here, before any
# of our modules imports those libraries.
# huggingface_hub logs two lines per retry of a hub request (ten offline, before the request fails and our
# one-line error says what to do).
for _name in ("torchao", "torch.utils._pytree", "huggingface_hub.utils._http"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from gpt.config import GPTConfig  # noqa: E402
from gpt.model import GPT  # noqa: E402

__all__ = ["GPT", "GPTConfig"]
__version__ = "0.1.0"
