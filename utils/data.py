"""Small offline datasets for sft.py and reward.py, made from the labelled IMDB reviews of the tiny assets.

    python -m utils.data            # writes data/{prefs,chat}_{train,test}.jsonl (needs `python -m utils.assets`)
    python reward.py --model tiny/minilm --dataset data/prefs_train.jsonl --eval-dataset data/prefs_test.jsonl \
        --max-seq-length 128 --learning-rate 1e-4 --batch-size 8 --max-steps 20 --eval-every 10
    python sft.py --model tiny/policy --dataset data/chat_train.jsonl --chat-template zephyr

- preference pairs {"chosen", "rejected"}: a positive review chosen over a negative one (a sentiment reward
  model, the preference behind the classic gpt2-sentiment RLHF example);
- chats {"messages"}: a user asks for a positive or negative review, the assistant answers with a real one.
Reviews are drawn without replacement with a fixed seed, so the files are the same on every machine.

    python -m utils.data --stack-exchange lvwerra/stack-exchange-paired --max-examples 100000 --out data/stack

converts the Stack-Llama data (columns question, response_j = the better answer, response_k) into the three files
of its SFT -> reward -> PPO chain (see README, Recipes): sft.jsonl {"prompt", "completion"}, prefs.jsonl
{"prompt", "chosen", "rejected"} and prompts.jsonl {"text"}, with the prompt "Question: ...\n\nAnswer: ".
"""

import random
from pathlib import Path
from typing import Optional

import torch

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


def stack_exchange(dataset: str, out, split: str = "train", max_examples: Optional[int] = None) -> Path:
    """Write sft.jsonl, prefs.jsonl and prompts.jsonl (one prompt per question) from a stack-exchange-paired
    style dataset (hub id or local file) into `out`."""
    from utils.hub import UserError, load_dataset

    ds = load_dataset(dataset, split)
    missing = [c for c in ("question", "response_j", "response_k") if c not in ds.column_names]
    if missing:
        raise UserError(f"--stack-exchange {dataset!r} needs the columns question, response_j (the better answer) "
                        f"and response_k; missing {missing}, found {ds.column_names}")
    if max_examples is not None:
        ds = ds.select(range(min(max_examples, len(ds))))
    rows = [(f"Question: {r['question']}\n\nAnswer: ", r["response_j"], r["response_k"]) for r in ds.to_list()]
    out = Path(out)
    write_jsonl(out / "sft.jsonl", [{"prompt": p, "completion": j} for p, j, _ in rows])
    write_jsonl(out / "prefs.jsonl", [{"prompt": p, "chosen": j, "rejected": k} for p, j, k in rows])
    write_jsonl(out / "prompts.jsonl", [{"text": p} for p in dict.fromkeys(p for p, _, _ in rows)])
    return out


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

    from utils.hub import UserError

    parser = argparse.ArgumentParser(description="Write offline preference pairs and chats made from IMDB reviews, "
                                                 "or convert Stack-Llama data (--stack-exchange).")
    parser.add_argument("--out", default="data", help="folder to write into (default: ./data)")
    parser.add_argument("--n-train", type=int, default=1000, help="pairs / chats in each training file")
    parser.add_argument("--n-test", type=int, default=140, help="pairs / chats in each test file")
    parser.add_argument("--stack-exchange", default=None, help="convert this stack-exchange-paired dataset instead")
    parser.add_argument("--split", default="train", help="split of --stack-exchange")
    parser.add_argument("--max-examples", type=int, default=None, help="first this many rows of --stack-exchange")
    a = parser.parse_args()
    try:
        path = stack_exchange(a.stack_exchange, a.out, a.split, a.max_examples) if a.stack_exchange \
            else build(a.out, n_train=a.n_train, n_test=a.n_test)
    except UserError as err:
        raise SystemExit(f"error: {err}")
    for p in sorted(path.glob("*.jsonl")):
        print(f"  {p}")


def batch_indices(iteration: int, batch_size: int, n: int, seed: int, rank: int = 0, world_size: int = 1):
    """Example (prompt) indices of an iteration's global batch: consecutive slices of an endless stream of seeded
    permutations, so a resumed run sees exactly the examples an uninterrupted one would. Under torchrun process
    `rank` takes its share (batch_size / world_size consecutive ones), so the processes together see the batch."""
    start, out = iteration * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    share = batch_size // world_size
    return out[rank * share : (rank + 1) * share]
