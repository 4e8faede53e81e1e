"""Sample from a trained model. Examples:

python sample.py ckpt=runs/shakespeare_char_cpu/latest/checkpoints/best prompt="ROMEO:"
python sample.py ckpt=<dir> num_samples=3 max_new_tokens=200 temperature=0.9 top_p=0.95
python sample.py ckpt=<dir> input_file=prompts.txt output_file=completions.txt temperature=0
"""

from gpt.cli import run_hydra
from gpt.sample import sample

if __name__ == "__main__":
    run_hydra("sample", sample)
