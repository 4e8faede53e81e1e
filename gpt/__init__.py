"""gpt: pretrain, fine-tune and sample decoder-only GPTs (PyTorch + Lightning + Hydra + Hugging Face)."""

from gpt.model import GPT, GPTConfig, PRESETS

__all__ = ["GPT", "GPTConfig", "PRESETS"]
__version__ = "0.1.0"
