"""ppo.py under torchrun: 2 CPU processes (gloo) against one process with the same global batch."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import ppo
from conftest import ROOT, run_script, torchrun
from ddp_worker import fixed_batch, update


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_whiten_and_update_like_one(assets, tmp_path, mode):
    torchrun(ROOT / "tests/ddp_worker.py", assets / "policy", tmp_path / "ddp.pt", mode)
    got = torch.load(tmp_path / "ddp.pt", weights_only=False)
    queries, responses, scores, x, mask = fixed_batch()
    # whitening statistics reduced over the processes == one process's on the whole batch
    assert torch.allclose(got["whitened"] * mask, ppo.masked_whiten(x, mask) * mask, atol=1e-6)
    weights, stats, kl_coef = update(assets / "policy", 1, False, queries, responses, scores)
    start = AutoModelForCausalLM.from_pretrained(assets / "policy").state_dict()
    # the update moves weights by up to ~0.1 (2 SGD steps, lr 1): a gradient not averaged over the processes would
    # move them by twice as much, far outside the tolerance
    assert max((weights["lm." + k] - w).abs().max().item() for k, w in start.items()) > 0.05
    assert all(torch.allclose(weights[k], got["weights"][k], atol=1e-5) for k in weights)
    assert kl_coef == pytest.approx(got["kl_coef"], rel=1e-6)  # KL controller fed the reduced KL
    for key in ("objective/scores", "objective/kl", "losses/policy_loss", "losses/value_loss"):
        assert stats[key] == pytest.approx(got["stats"][key], abs=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-lora"])
def test_torchrun_end_to_end_and_resume_with_another_world_size(assets, tmp_path, mode):
    """2 processes (DDP, FSDP, or FSDP with LoRA: generation through peft's wrapper, adapter-only saves), then
    the checkpoint resumes in one process."""
    out = tmp_path / "run"
    flags = ["--model", assets / "policy", "--reward-model", assets / "reward", "--dataset", assets / "prompts.jsonl",
             "--output-dir", out, "--batch-size", 8, "--mini-batch-size", 4, "--response-length", 8, "--ppo-epochs", 2,
             *(["--lora-r", 4] if mode == "fsdp-lora" else [])]
    proc = torchrun(ROOT / "ppo.py", *flags, "--total-episodes", 16, *(["--fsdp"] if "fsdp" in mode else []))
    assert proc.stdout.count("iter    1 |") == 1  # only rank 0 prints
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["iteration"] for m in metrics] == [1, 2]
    if mode == "fsdp-lora":  # the adapter alone (merging needs the unsharded weights)
        assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    else:
        AutoModelForCausalLM.from_pretrained(out)
    # resume the 2-process run in one process
    run_script(ROOT / "ppo.py", *flags, "--total-episodes", 24, "--resume")
    assert [json.loads(line)["iteration"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]
