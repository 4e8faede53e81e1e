"""A small modern -> "Shakespeare" parallel corpus made on the spot, so the fine-tuning tests need no data
folder: NLTK-style tokenized lines (spaces around punctuation, as the real pairs have) whose target is the
source with a fixed word mapping (you -> thou, are -> art, ...). A rule that a tiny model can pick up in a
few dozen steps, with enough variety (and unchanged words) for BLEU, chrF and a copy baseline to mean
something. Deterministic: the same files on every machine.
"""

import random
from pathlib import Path

ARCHAIC = {
    "you": "thou",
    "your": "thy",
    "yours": "thine",
    "are": "art",
    "do": "dost",
    "does": "doth",
    "has": "hath",
    "before": "ere",
    "often": "oft",
    "yes": "ay",
    "no": "nay",
    "there": "yonder",
    "why": "wherefore",
    "here": "hither",
    "my": "mine",
    "perhaps": "perchance",
    "truly": "verily",
}

SUBJECTS = ["I", "you", "he", "she", "we", "they", "my lord", "the king", "your sister", "the good friar"]
VERBS = ["love", "hate", "see", "know", "fear", "serve", "trust", "follow", "remember", "forgive"]
OBJECTS = [
    "you",
    "the queen",
    "your father",
    "this letter",
    "my horse",
    "the night",
    "your name",
    "the sea",
    "his sword",
    "her heart",
]
TAILS = [
    "before dawn",
    "often",
    "over there",
    "here",
    "no more",
    "truly",
    "perhaps",
    "with all my heart",
    "in Verona",
    "tonight",
]
OPENERS = ["", "", "", "yes ,", "no ,", "why ,", "good sir ,", "madam ,"]
ENDS = [".", ".", "!", "?"]


def sentence(rng: random.Random) -> str:
    words = " ".join(
        filter(
            None,
            [
                rng.choice(OPENERS),
                rng.choice(SUBJECTS),
                rng.choice(["do", "does", "", ""]),
                rng.choice(VERBS),
                rng.choice(OBJECTS),
                rng.choice(TAILS),
                rng.choice(ENDS),
            ],
        )
    )
    return words[0].upper() + words[1:]


def shakespearize(line: str) -> str:
    out = []
    for word in line.split(" "):
        lower = word.lower()
        new = ARCHAIC.get(lower, word)
        out.append(new[0].upper() + new[1:] if word[0].isupper() and new != word else new)
    return " ".join(out)


def write_pairs(folder: Path, n_train: int = 300, n_valid: int = 24, seed: int = 0) -> Path:
    """train/valid .modern/.original files (the layout of $GPT_DATA_DIR/shakespeare_modern/) in `folder`."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid)):
        src = [sentence(rng) for _ in range(n)]
        (folder / f"{split}.modern").write_text("\n".join(src) + "\n", encoding="utf-8")
        (folder / f"{split}.original").write_text("\n".join(shakespearize(s) for s in src) + "\n", encoding="utf-8")
    return folder
