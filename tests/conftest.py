"""Shared fixtures: the offline tiny assets (built once, cached in ./tiny)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "offline")
# One intra-op thread per process (tests and the scripts they launch): the models are tiny, and on a busy 2-core
# machine torch's threads spin-wait for each other (seen here: 2-10x slower than one thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def assets() -> Path:
    """Path of the tiny assets folder (see utils/assets.py for its layout)."""
    from utils.assets import build

    return build()


def run_script(*argv, check=True, timeout=600):
    """Run one of our scripts as a user would (`python ppo.py ...` from the repo root)."""
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc


def torchrun(*argv, nproc: int = 2, check=True):
    """Run one of our scripts under PyTorch's launcher on `nproc` CPU processes (gloo), as a user would."""
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc, *argv, check=check)


def learning_seed(default: int) -> int:
    """The seed of a learning test: `default`, or LEARNING_SEED from the environment (benchmarks/seed_sweep.py runs
    each learning test over many seeds before its threshold is trusted)."""
    return int(os.environ.get("LEARNING_SEED", default))


def record_learning(test: str, value: float, threshold: float):
    """Append what a learning test measured to the file named by LEARNING_LOG (the seed sweep reads it)."""
    if os.environ.get("LEARNING_LOG"):
        with open(os.environ["LEARNING_LOG"], "a") as f:
            row = {"test": test, "seed": learning_seed(-1), "value": value, "threshold": threshold}
            f.write(json.dumps(row) + "\n")


def chat_template(turn_end: str = "") -> str:
    """A minimal chat template: each message as <role>content{turn_end}, and <assistant> as the generation prompt."""
    return ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}" + turn_end + "{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def chat_policy(assets: Path, folder: Path, turn_end: str = ""):
    """The tiny policy saved in `folder` with a tokenizer that has chat_template(turn_end). Returns (folder,
    tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(assets / "policy").save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(assets / "policy")
    tokenizer.chat_template = chat_template(turn_end)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer
