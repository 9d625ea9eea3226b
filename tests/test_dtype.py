"""--dtype in sft.py, reward.py, ppo.py, ppo_seq2seq.py, grpo.py and dpo.py (not yet ddpo.py): what 'auto' picks,
the refusal of float16 training, and runs in bfloat16 on CPU (weights saved in bfloat16, finite statistics; a LoRA
run keeps float32 adapters over a float16 base). What it saves in memory is measured on real sizes, not here."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import dpo
import grpo
import ppo
import ppo_seq2seq
import reward
import sft
from test_dpo import run_args as dpo_args
from test_grpo import run_args as grpo_args
from test_ppo_e2e import tiny_args as ppo_args
from test_ppo_seq2seq import tiny_args as s2s_args
from test_reward import tiny_args as reward_args
from test_sft import tiny_args as sft_args
from utils import data as data_lib
from utils.assets import read_jsonl, write_jsonl
from utils.hub import UserError
from utils.models import check_dtype, weights_dtype


def test_auto_keeps_trained_weights_in_float32():
    cpu = torch.device("cpu")
    assert weights_dtype("auto", cpu, trained=True) == weights_dtype("auto", cpu, trained=False) == torch.float32
    assert weights_dtype("bfloat16", cpu, trained=True) == torch.bfloat16
    assert weights_dtype("float16", cpu, trained=False) == torch.float16
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():  # frozen models in half precision on GPUs
        assert weights_dtype("auto", torch.device("cuda"), trained=False) == torch.bfloat16
    with pytest.raises(UserError, match="loss scaling"):
        check_dtype("float16", lora_r=0)
    check_dtype("float16", lora_r=8)  # LoRA over a float16 base: the adapters train in float32


def saved_dtypes(folder) -> set:
    return {t.dtype for t in load_file(folder / "model.safetensors").values()}


def finite(metrics) -> bool:
    return all(math.isfinite(v) for m in metrics for k, v in m.items() if isinstance(v, float) and "grad_norm" not in k)


@pytest.fixture(scope="module")
def files(assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dtype_data")
    write_jsonl(folder / "reviews.jsonl", read_jsonl(assets / "imdb" / "train.jsonl")[:40])
    pairs = data_lib.sentiment_pairs(data_lib.imdb("train", assets), 120, seed=0, max_words=100)
    write_jsonl(folder / "train.jsonl", pairs[:100])
    write_jsonl(folder / "test.jsonl", pairs[100:])
    return folder


@pytest.mark.parametrize("script", ["sft", "reward", "ppo", "ppo_seq2seq", "grpo", "dpo"])
def test_bfloat16_runs_and_saves_bfloat16(assets, tmp_path, files, script):
    if script == "sft":
        out = sft.main(sft_args(assets, tmp_path, files / "reviews.jsonl", max_steps=2, dtype="bfloat16"))
    elif script == "reward":
        out = reward.main(reward_args(assets, tmp_path, files / "train.jsonl", max_steps=2, dtype="bfloat16"))
    elif script == "ppo":
        out = ppo.main(ppo_args(assets, tmp_path, total_episodes=8, dtype="bfloat16"))
    elif script == "ppo_seq2seq":
        out = ppo_seq2seq.main(s2s_args(assets, tmp_path, total_episodes=8, dtype="bfloat16"))
    elif script == "grpo":
        out = grpo.main(grpo_args(assets, tmp_path, num_steps=2, dtype="bfloat16", beta=0.1))
    else:
        out = dpo.main(dpo_args(assets, files, tmp_path, max_steps=2, dtype="bfloat16"))
    metrics = [json.loads(line) for line in open(out)]
    assert metrics and finite(metrics), metrics
    assert saved_dtypes(tmp_path / "run") == {torch.bfloat16}


def test_lora_over_a_float16_base_trains_float32_adapters(assets, tmp_path, files):
    args = dpo.check_args(dpo_args(assets, files, tmp_path, dtype="float16", lora_r=4, merge_lora=False))
    policy, _, ref_lm = dpo.make_policy(args, torch.device("cpu"), None)
    trained = {p.dtype for p in policy.parameters() if p.requires_grad}
    frozen = {p.dtype for p in policy.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.float16} and ref_lm is None
    metrics = [json.loads(line) for line in open(dpo.main(dpo_args(assets, files, tmp_path, max_steps=2,
                                                                   dtype="float16", lora_r=4, learning_rate=1e-2)))]
    assert finite(metrics) and metrics[-1]["eval/rewards/margins"] != 0.0
