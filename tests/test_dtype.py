"""--dtype in sft.py, reward.py, ppo.py, ppo_seq2seq.py, grpo.py, dpo.py and ddpo.py: what 'auto' picks (per part
of ddpo.py's diffusion pipeline), the refusal of float16 training, and runs in bfloat16 on CPU (weights saved in
bfloat16, finite statistics; a LoRA run keeps float32 adapters over a float16 or bfloat16 base). What it saves in
memory is measured on real sizes, not here."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import ddpo
import dpo
import grpo
import ppo
import ppo_seq2seq
import reward
import sft
from test_ddpo import metrics as ddpo_metrics
from test_ddpo import tiny_aesthetic_args
from test_ddpo import tiny_args as ddpo_args
from test_dpo import run_args as dpo_args
from test_grpo import run_args as grpo_args
from test_ppo_e2e import tiny_args as ppo_args
from test_ppo_seq2seq import tiny_args as s2s_args
from test_reward import tiny_args as reward_args
from test_sft import tiny_args as sft_args
from utils import data as data_lib
from utils import tiny_sd
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


# What --dtype auto picks on a bf16 GPU, pretended on the CPU ----------------------------------------------------------
CPU = torch.device("cpu")
F32, BF16 = {torch.float32}, {torch.bfloat16}


def pretend_bf16_gpu(monkeypatch, module):
    """The script's 'auto' picks as on a CUDA GPU with bf16, for a run on the CPU (which then computes in mixed dtypes
    without autocast: stricter than the GPU, whose autocast casts every matmul's inputs)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(module, "weights_dtype", lambda name, device, trained=True:
                        weights_dtype(name, torch.device("cuda"), trained))


@pytest.mark.parametrize("script", ["ppo", "ppo_seq2seq", "grpo", "dpo"])
def test_auto_on_a_gpu_freezes_the_reference_and_reward_model_in_bfloat16(assets, tmp_path, files, monkeypatch,
                                                                          script):
    """--dtype auto on a bf16 GPU: the policy trains in float32, its frozen reference copy (and the reward model)
    load in bfloat16; and a run in those mixed dtypes trains (on the CPU, with no autocast to cast between them).
    The models are those the run builds (make_policy and RewardModel, recorded as they return)."""
    module, args = {"ppo": (ppo, ppo_args(assets, tmp_path, total_episodes=8)),
                    "ppo_seq2seq": (ppo_seq2seq, s2s_args(assets, tmp_path, total_episodes=8)),
                    "grpo": (grpo, grpo_args(assets, tmp_path, num_steps=2, beta=0.1,
                                             reward_model=str(assets / "reward"))),
                    "dpo": (dpo, dpo_args(assets, files, tmp_path, max_steps=2))}[script]
    pretend_bf16_gpu(monkeypatch, module)
    built = {}

    def record(name, make):
        def made(*a, **k):
            built[name] = make(*a, **k)
            return built[name]
        monkeypatch.setattr(module, name, made)

    record("make_policy", module.make_policy)
    if script != "dpo":  # the RL scripts' reward model
        record("RewardModel", module.RewardModel)
    metrics = [json.loads(line) for line in open(module.main(args))]
    assert metrics and finite(metrics), metrics
    policy, _, ref_lm = built["make_policy"]
    assert {p.dtype for p in policy.parameters()} == F32 and {p.dtype for p in ref_lm.parameters()} == BF16
    if script != "dpo":
        assert {p.dtype for p in built["RewardModel"].model.parameters()} == BF16
    assert saved_dtypes(tmp_path / "run") == F32


# ddpo.py: the UNet is trained (with LoRA: its base is frozen), the VAE and the text encoder are frozen ----------------


@pytest.fixture
def tiny_model():
    return str(tiny_sd.build(Path(__file__).resolve().parent.parent / "tiny" / "sd"))


def part_dtypes(pipe) -> dict:
    """{part: set of its parameters' dtypes}, the UNet's trained and frozen parameters apart."""
    unet = list(pipe.unet.parameters())
    return {"vae": {p.dtype for p in pipe.vae.parameters()},
            "text_encoder": {p.dtype for p in pipe.text_encoder.parameters()},
            "unet_trained": {p.dtype for p in unet if p.requires_grad},
            "unet_frozen": {p.dtype for p in unet if not p.requires_grad}}


def same_weights(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("lora_r", [4, 0])
def test_ddpo_auto_dtype_per_part(tiny_model, tmp_path, monkeypatch, lora_r):
    pipe, _, _ = ddpo.load_pipeline(ddpo_args(tiny_model, tmp_path / "run", lora_r=lora_r), CPU)
    assert part_dtypes(pipe) == {"vae": F32, "text_encoder": F32, "unet_trained": F32,
                                 "unet_frozen": F32 if lora_r else set()}
    pretend_bf16_gpu(monkeypatch, ddpo)
    pipe, _, _ = ddpo.load_pipeline(ddpo_args(tiny_model, tmp_path / "run", lora_r=lora_r), CPU)
    assert part_dtypes(pipe) == {"vae": BF16, "text_encoder": BF16, "unet_trained": F32,
                                 "unet_frozen": BF16 if lora_r else set()}


@pytest.mark.parametrize("lora_r", [4, 0])
def test_ddpo_bfloat16_loads_every_part_in_bfloat16_and_trains(tiny_model, tmp_path, capsys, lora_r):
    args = ddpo_args(tiny_model, tmp_path / "run", num_epochs=1, dtype="bfloat16", lora_r=lora_r)
    pipe, _, _ = ddpo.load_pipeline(args, CPU)
    assert part_dtypes(pipe) == {"vae": BF16, "text_encoder": BF16, "unet_trained": F32 if lora_r else BF16,
                                 "unet_frozen": BF16 if lora_r else set()}  # LoRA adapters stay float32
    ddpo.main(args)
    metrics = ddpo_metrics(tmp_path / "run")
    assert finite(metrics) and metrics[-1]["losses/grad_norm"] > 0
    out = tmp_path / "run"
    saved = out / "pytorch_lora_weights.safetensors" if lora_r else out / "unet" / "diffusion_pytorch_model.safetensors"
    assert {t.dtype for t in load_file(saved).values()} == (F32 if lora_r else BF16)
    if not lora_r:  # a bf16 pipeline: diffusers would load its VAE and UNet in float32 beside a bf16 text encoder
        assert "dtype=torch.bfloat16)" in capsys.readouterr().out


def test_ddpo_full_unet_under_gpu_auto_saves_one_dtype(tiny_model, tmp_path, monkeypatch):
    """A float32 UNet trained beside a bf16 VAE and text encoder: the saved pipeline is float32 throughout, its VAE and
    text encoder the model's own (not bf16-rounded), and it samples with diffusers."""
    from diffusers import DiffusionPipeline

    pretend_bf16_gpu(monkeypatch, ddpo)
    ddpo.main(ddpo_args(tiny_model, tmp_path / "run", num_epochs=1, lora_r=0, learning_rate=1e-2))
    assert finite(ddpo_metrics(tmp_path / "run"))
    saved, base = DiffusionPipeline.from_pretrained(tmp_path / "run"), DiffusionPipeline.from_pretrained(tiny_model)
    assert same_weights(saved.vae, base.vae) and same_weights(saved.text_encoder, base.text_encoder)
    assert not same_weights(saved.unet, base.unet)
    assert {p.dtype for part in (saved.vae, saved.text_encoder, saved.unet) for p in part.parameters()} == F32
    assert saved(["cat"], num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)


def test_ddpo_aesthetic_clip_follows_dtype(tmp_path):
    images = [Image.new("RGB", (40, 40), (200, 0, 0)), Image.new("RGB", (40, 40)),
              Image.effect_noise((40, 40), 60).convert("RGB")]
    scores = {dtype: ddpo.call_reward_fn(ddpo.load_reward_fn(tiny_aesthetic_args(tmp_path, dtype=dtype), "cpu"), 3,
                                         "test", images, ["a"] * 3) for dtype in ("auto", "bfloat16")}
    assert not torch.equal(scores["bfloat16"], scores["auto"])  # CLIP ran in bf16 (the MLP in float32)
    torch.testing.assert_close(scores["bfloat16"], scores["auto"], atol=2e-3, rtol=0)


def test_ddpo_refuses_float16_full_fine_tuning(tiny_model, tmp_path):
    with pytest.raises(UserError, match="^--dtype float16 would train float16 weights, .*--lora-r") as err:
        ddpo.main(ddpo_args(tiny_model, tmp_path / "run", dtype="float16", lora_r=0))
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()  # one line, before anything is written
    ddpo.check_args(ddpo_args(tiny_model, tmp_path / "run", dtype="float16", lora_r=4))  # LoRA: float32 adapters
