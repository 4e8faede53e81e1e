"""Pretrain a GPT. Examples:

python train.py experiment=shakespeare_char_cpu
python train.py model=baby data=shakespeare_bpe trainer.precision=bf16-mixed trainer.max_steps=3000
python train.py experiment=shakespeare_char_cpu ckpt_path=last      # resume the newest run
"""

from gpt.cli import run_hydra
from gpt.pretrain import pretrain

if __name__ == "__main__":
    run_hydra("train", pretrain)
