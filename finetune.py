"""LoRA fine-tune an exported model on a task, then score it. Examples:

python finetune.py experiment=shakespeare_modern_lora
python finetune.py base=runs/<name>/latest/checkpoints/best task=alpaca task.train=data.json lora.rank=8
python finetune.py base=<dir> eval_only=true adapter=runs/finetune/latest/checkpoints/best
python finetune.py base=<dir> method=dpo task=preference task.train=pairs.jsonl   # preference tuning (DPO)
"""

from gpt.cli import run_hydra
from gpt.finetune import finetune

if __name__ == "__main__":
    run_hydra("finetune", finetune)
