"""README's Recipes, run as written: the hub names are swapped for the offline tiny models and data, sizes shrunk
(flags appended: the last value of a flag wins), torchrun given 2 CPU processes. Every other flag is README's."""

import json
import re
import shlex
import sys

import pytest
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from conftest import ROOT, run_script
from utils.assets import read_jsonl, write_jsonl

SHRINK = {
    "ppo.py": ["--total-episodes", "8", "--batch-size", "4", "--mini-batch-size", "4", "--response-length", "4"],
    "sft.py": ["--max-steps", "2", "--batch-size", "4", "--max-seq-length", "64", "--eval-fraction", "0"],
    "reward.py": ["--max-steps", "2", "--batch-size", "4", "--max-seq-length", "64", "--eval-fraction", "0"],
}


def readme_recipes() -> dict:
    """{title: [argv, ...]} of each bold-titled code block in README's Recipes section."""
    section = (ROOT / "README.md").read_text().split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"\*\*(.+?)\*\*.*?```\n(.*?)```", section, re.S)
    return {title: [shlex.split(line) for line in body.replace("\\\n", " ").splitlines() if line.strip()]
            for title, body in blocks}


@pytest.fixture(scope="module")
def hub(assets, tmp_path_factory):
    """Local stand-ins for the recipes' hub models and datasets."""
    tmp = tmp_path_factory.mktemp("hub")
    hate = AutoModelForSequenceClassification.from_pretrained(assets / "reward")
    hate.config.id2label, hate.config.label2id = {0: "hate", 1: "nothate"}, {"hate": 0, "nothate": 1}
    hate.save_pretrained(tmp / "hate")
    AutoTokenizer.from_pretrained(assets / "reward").save_pretrained(tmp / "hate")
    reviews = [r["text"] for r in read_jsonl(assets / "imdb" / "train.jsonl")[:40]]
    write_jsonl(tmp / "rtp.jsonl", [{"prompt": {"text": " ".join(t.split()[:12]), "toxicity": 0.5}} for t in reviews])
    write_jsonl(tmp / "stack.jsonl", [{"question": a[:200], "response_j": b[:300], "response_k": c[:300]}
                                      for a, b, c in zip(reviews[:20], reviews[20:30] * 2, reviews[30:40] * 2)])
    return {"lvwerra/gpt2-imdb": assets / "policy", "lvwerra/distilbert-imdb": assets / "reward",
            "stanfordnlp/imdb": assets / "imdb" / "train.jsonl", "EleutherAI/gpt-neo-125m": assets / "policy",
            "facebook/roberta-hate-speech-dynabench-r4-target": tmp / "hate", "allenai/real-toxicity-prompts":
            tmp / "rtp.jsonl", "meta-llama/Llama-2-7b-hf": assets / "policy",
            "lvwerra/stack-exchange-paired": tmp / "stack.jsonl"}


def localize(argv: list, hub: dict, tmp_path) -> list:
    """A README command as a local one: hub names -> tiny stand-ins, data/ and runs/ -> tmp_path, shrunk sizes."""
    out = []
    for token in argv:
        if token in hub:
            token = str(hub[token])
        elif token.startswith(("data/", "runs/")):
            token = str(tmp_path / token)
        out.append(token)
    if out[0] == "torchrun":
        assert out[1:3] == ["--nproc_per_node", "8"], out
        out = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *out[3:]]
    elif out[0] == "python":
        out[0] = sys.executable
    script = next((t for t in out if t in SHRINK), None)
    return out + SHRINK.get(script, [])


def test_readme_has_the_four_recipes():
    assert list(readme_recipes()) == ["Sentiment", "RLHF with adapters only", "Detoxification", "Stack-Llama"]


@pytest.mark.slow
@pytest.mark.parametrize("title", ["Sentiment", "RLHF with adapters only", "Detoxification", "Stack-Llama"])
def test_recipe_runs_as_written_on_tiny_models(title, hub, tmp_path):
    outputs = []
    for argv in readme_recipes()[title]:
        command = localize(argv, hub, tmp_path)
        run_script(*command[1:])  # run_script prepends this Python
        if "--output-dir" in command:
            outputs.append(command[len(command) - 1 - command[::-1].index("--output-dir") + 1])
    for out in outputs:  # each stage wrote its final model and one metrics line per step
        assert AutoConfig.from_pretrained(out) is not None
        assert len([json.loads(line) for line in open(f"{out}/metrics.jsonl")]) >= 2
    if title == "Stack-Llama":
        rows = read_jsonl(tmp_path / "data/stack/sft.jsonl")
        assert rows[0]["prompt"].startswith("Question: ") and rows[0]["prompt"].endswith("\n\nAnswer: ")
        assert len(read_jsonl(tmp_path / "data/stack/prefs.jsonl")) == 20
