"""Small offline datasets for sft.py and reward.py, made from the labelled IMDB reviews of the tiny assets.

    python -m utils.data            # writes data/{prefs,chat}_{train,test}.jsonl (needs `python -m utils.assets`)
    python reward.py --model tiny/minilm --dataset data/prefs_train.jsonl --eval-dataset data/prefs_test.jsonl \
        --max-seq-length 128 --learning-rate 1e-4 --batch-size 8 --max-steps 20 --eval-every 10
    python sft.py --model tiny/policy --dataset data/chat_train.jsonl --chat-template zephyr

- preference pairs {"chosen", "rejected"}: a positive review chosen over a negative one (a sentiment reward
  model, the preference behind the classic gpt2-sentiment RLHF example);
- chats {"messages"}: a user asks for a positive or negative review, the assistant answers with a real one.
Reviews are drawn without replacement with a fixed seed, so the files are the same on every machine.
"""

import random
from pathlib import Path
from typing import Optional

from utils.assets import DEFAULT_DIR, read_jsonl, write_jsonl


def imdb(split: str, assets=DEFAULT_DIR):
    """(text, label) pairs of tiny/imdb/{split}.jsonl (label 1 = positive)."""
    return [(r["text"], r["label"]) for r in read_jsonl(Path(assets) / "imdb" / f"{split}.jsonl")]


def sentiment_pairs(reviews, n: int, seed: int = 0, max_words: Optional[int] = None) -> list[dict]:
    """n pairs {"chosen": a positive review, "rejected": a negative review}, each review used at most once,
    optionally only reviews of at most `max_words` words (short enough to be read whole by a small encoder)."""
    rng = random.Random(seed)
    reviews = [(t, label) for t, label in reviews if max_words is None or len(t.split()) <= max_words]
    positive = [t for t, label in reviews if label == 1]
    negative = [t for t, label in reviews if label == 0]
    if n > min(len(positive), len(negative)):
        raise ValueError(f"asked for {n} pairs; there are {len(positive)} positive, {len(negative)} negative reviews")
    return [{"chosen": c, "rejected": r} for c, r in zip(rng.sample(positive, n), rng.sample(negative, n))]


def review_chats(reviews, n: int, seed: int = 0) -> list[dict]:
    """n conversations {"messages": [user asks for a positive/negative review, assistant answers with one]}."""
    rng = random.Random(seed)
    chats = []
    for text, label in rng.sample(reviews, n):
        ask = f"Write a {'positive' if label == 1 else 'negative'} movie review."
        chats.append({"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": text}]})
    return chats


def build(out="data", assets=DEFAULT_DIR, n_train: int = 1000, n_test: int = 140, seed: int = 0) -> Path:
    """Write the preference and chat files into `out`; the test files come from the held-out IMDB split.
    Preference pairs use reviews of at most 100 words (~90 MiniLM tokens), so --max-seq-length 128 sees them whole."""
    out = Path(out)
    train, test = imdb("train", assets), imdb("test", assets)
    write_jsonl(out / "prefs_train.jsonl", sentiment_pairs(train, n_train, seed, max_words=100))
    write_jsonl(out / "prefs_test.jsonl", sentiment_pairs(test, n_test, seed, max_words=100))
    write_jsonl(out / "chat_train.jsonl", review_chats(train, n_train, seed))
    write_jsonl(out / "chat_test.jsonl", review_chats(test, n_test, seed))
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write offline preference pairs and chats made from IMDB reviews.")
    parser.add_argument("--out", default="data", help="folder to write into (default: ./data)")
    parser.add_argument("--n-train", type=int, default=1000, help="pairs / chats in each training file")
    parser.add_argument("--n-test", type=int, default=140, help="pairs / chats in each test file")
    a = parser.parse_args()
    path = build(a.out, n_train=a.n_train, n_test=a.n_test)
    for p in sorted(path.glob("*.jsonl")):
        print(f"  {p}")
