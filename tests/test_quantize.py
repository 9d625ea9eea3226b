"""--quantize 4bit|8bit (QLoRA: a LoRA run over a bitsandbytes-quantized frozen base) on bitsandbytes' CPU backend:
what loads quantized and what trains, one-line refusals, short runs of every script that has it, and a 4-bit
QLoRA SFT run that learns. Speed and memory on a GPU are not measured here."""

import json
import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import dpo
import grpo
import ppo
import ppo_seq2seq
import reward
import sft
from test_dpo import run_args as dpo_args
from test_dtype import files  # noqa: F401 (a fixture: reviews and preference pairs)
from test_grpo import run_args as grpo_args
from test_ppo_e2e import tiny_args as ppo_args
from test_ppo_seq2seq import tiny_args as s2s_args
from test_reward import tiny_args as reward_args
from test_sft import tiny_args as sft_args
from conftest import learning_seed, record_learning
from utils.assets import read_jsonl, write_jsonl
from utils.hub import UserError
from utils.models import check_quantize

pytest.importorskip("bitsandbytes")  # in requirements.txt; a user without it gets check_quantize's one-line error
CPU = torch.device("cpu")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama(assets, tmp_path_factory):
    """A tiny random Llama with the tiny policy's tokenizer: its layers are torch.nn.Linear, which bitsandbytes
    quantizes (GPT-2's are Conv1D, which it leaves alone)."""
    tokenizer = AutoTokenizer.from_pretrained(assets / "policy")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def layer_types(model) -> set:
    return {type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_base_is_quantized_and_only_adapters_train(llama, tmp_path, files, bits):  # noqa: F811
    args = grpo.check_args(grpo_args(llama, tmp_path, model=str(llama), lora_r=4, quantize=bits, beta=0.1))
    policy, _, ref_lm = grpo.make_policy(args, CPU, None)
    quantized = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[bits]
    assert quantized in layer_types(policy) and ref_lm is None  # the reference: adapters off over the same base
    trained = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert all(p.dtype == torch.float32 for p in policy.parameters() if p.requires_grad)
    # a classifier's fresh head stays unquantized and trains in full
    model = reward.load_model(reward.check_args(reward_args(llama, tmp_path, files / "train.jsonl", model=str(llama),
                                                            lora_r=4, quantize=bits)),
                              AutoTokenizer.from_pretrained(llama), CPU, verbose=False)
    assert quantized in layer_types(model)
    head = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert head and all("score" in n for n in head)


def test_adapter_gradients_equal_those_over_the_dequantized_weights(llama, tmp_path):
    """The 4-bit layers' backward: after an eval-mode forward without gradients (generation; on CPUs with AVX512-BF16
    bitsandbytes would then repack the weights for a kernel without a backward), the LoRA gradients of a QLoRA policy
    equal those of the same adapters over a float32 copy holding the dequantized 4-bit weights."""
    import bitsandbytes.functional as bnb_f

    args = grpo.check_args(grpo_args(llama, tmp_path, model=str(llama), lora_r=4, quantize="4bit",
                                     lora_target_modules=ALL_LINEAR))
    policy, _, _ = grpo.make_policy(args, CPU, None)
    plain_args = grpo.check_args(grpo_args(llama, tmp_path, model=str(llama), lora_r=4, lora_target_modules=ALL_LINEAR))
    plain, _, _ = grpo.make_policy(plain_args, CPU, None)
    torch.manual_seed(0)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # peft starts B at 0: every A's gradient would be 0
    weights = {n + ".weight": bnb_f.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
               for n, m in policy.named_modules() if type(m).__name__ == "Linear4bit"}
    plain.load_state_dict({**{k: v for k, v in policy.state_dict().items() if "lora_" in k}, **weights}, strict=False)
    ids = torch.randint(0, 4000, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        policy(ids)  # eval mode, no gradients: what generation does before the update
    grads = []
    for model in (policy, plain):
        logp = torch.log_softmax(model(ids).logits[:, :-1], -1).gather(2, ids[:, 1:, None]).sum()
        grads.append(dict(zip([n for n, p in model.named_parameters() if p.requires_grad],
                              torch.autograd.grad(logp, [p for p in model.parameters() if p.requires_grad]))))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2 * len(ALL_LINEAR)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("script", ["sft", "reward", "ppo", "ppo_seq2seq", "grpo", "dpo"])
def test_qlora_runs_and_saves_the_adapter(assets, llama, tmp_path, files, script):  # noqa: F811
    common = dict(model=str(llama), lora_r=4, quantize="4bit")
    if script == "sft":
        out = sft.main(sft_args(llama, tmp_path, files / "reviews.jsonl", max_steps=2, **common))
    elif script == "reward":
        out = reward.main(reward_args(llama, tmp_path, files / "train.jsonl", max_steps=2, **common))
    elif script == "ppo":
        out = ppo.main(ppo_args(assets, tmp_path, total_episodes=8, **common))
    elif script == "ppo_seq2seq":  # T5's layers are torch.nn.Linear
        out = ppo_seq2seq.main(s2s_args(assets, tmp_path, total_episodes=8, **{**common, "model": str(assets / "t5")}))
    elif script == "grpo":
        out = grpo.main(grpo_args(llama, tmp_path, num_steps=2, **common))
    else:
        out = dpo.main(dpo_args(llama, files, tmp_path, max_steps=2, **common))
    metrics = [json.loads(line) for line in open(out)]
    assert metrics and all(math.isfinite(v) for m in metrics for k, v in m.items()
                           if isinstance(v, float) and "grad_norm" not in k)
    # merging into quantized weights would round them: the adapter is saved alone, and loads over the base
    assert (tmp_path / "run" / "adapter_config.json").exists()
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_bad_combinations_are_one_line(llama):
    with pytest.raises(UserError, match="needs LoRA"):
        check_quantize(grpo.Args(quantize="4bit"))
    with pytest.raises(UserError, match="--fsdp"):
        check_quantize(grpo.Args(quantize="4bit", lora_r=4, fsdp=True))
    with pytest.raises(UserError, match="from-scratch"):
        sft.check_args(sft.Args(model=str(llama), quantize="4bit", lora_r=4, from_scratch=True))


def test_qlora_sft_learns(llama, tmp_path, files):  # noqa: F811
    """4-bit base + float32 adapters on every linear layer, 40 steps on 8 reviews: the training loss of a random Llama
    falls. Over seeds 1-10 it fell by 0.48-0.53 nats (first 3 steps' mean to the last 3's; a float32 base: the same
    to 0.01 on seeds 1-2); with the adapters not training it cannot fall. The threshold is about half the lowest.
    (It does not see bitsandbytes' eval-mode repacking, as sft.py trains in train mode: the gradient test does.)"""
    write_jsonl(tmp_path / "eight.jsonl", read_jsonl(files / "reviews.jsonl")[:8])
    out = sft.main(sft_args(llama, tmp_path, tmp_path / "eight.jsonl", model=str(llama), lora_r=8, quantize="4bit",
                            lora_target_modules=ALL_LINEAR, max_steps=40, eval_every=0, eval_fraction=0,
                            learning_rate=1e-2, save_every=1000, seed=learning_seed(1)))
    losses = [m["losses/loss"] for m in map(json.loads, open(out)) if "losses/loss" in m]
    drop = sum(losses[:3]) / 3 - sum(losses[-3:]) / 3
    record_learning("test_qlora_sft_learns", drop, 0.25)
    assert drop > 0.25, losses
