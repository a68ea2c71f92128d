"""Tiny on-disk assets for script tests: a BPE tokenizer + random model directory, and small datasets."""
from __future__ import annotations

import csv
import random
from pathlib import Path

from tiny_models import make_model

POSITIVE = ["great", "wonderful", "lovely", "amazing", "happy", "excellent", "fun", "brilliant"]
NEGATIVE = ["terrible", "awful", "sad", "horrible", "boring", "bad", "painful", "dreadful"]
SUBJECTS = ["the movie", "this phone", "my trip", "the dinner", "our game", "that song", "the book", "his talk"]


def sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        rows.append((f"{rng.choice(SUBJECTS)} was {word} and {rng.choice(SUBJECTS)} too", label))
    return rows


def write_sentiment_csv(path: Path, n: int = 128) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(sentences(n))
    return path


def write_text_file(path: Path, n: int = 128) -> Path:
    path.write_text("\n".join(text for text, _ in sentences(n, seed=1)) + "\n")
    return path


def write_model_dir(path: Path) -> Path:
    """A byte-level BPE tokenizer trained on the tiny corpus and a matching random model, saved HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [t for t, _ in sentences(512)] + [" It was great", " It was terrible"] * 8
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    model = make_model("llama", vocab=len(fast))
    model.config.pad_token_id = fast.pad_token_id
    model.config.eos_token_id = fast.eos_token_id
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path
