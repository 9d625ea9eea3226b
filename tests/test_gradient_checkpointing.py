"""--gradient-checkpointing in every script that trains a transformer (dpo.py, sft.py and reward.py have their own
tests): it must really recompute (a block's inner module runs again in the backward pass; transformers checkpoints
only modules in train mode, and the RL scripts keep their policy in eval mode for generation) and change no number.
It costs memory only: the activations of the blocks are not kept."""

import math

import pytest
import torch

import ddpo
import grpo
import ppo
import ppo_seq2seq
from test_ddpo import metrics as ddpo_metrics
from test_ddpo import tiny_args as ddpo_args
from conftest import ROOT
from utils import tiny_sd
from utils.models import disable_dropout

CPU = torch.device("cpu")


def counting(module):
    """Count calls of module.forward (forward hooks are not rerun by the recomputation; the forward is)."""
    calls, forward = [], module.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = counted
    return calls


def random_batch(n, seed=0, lengths=(3, 5, 2, 4)):
    g = torch.Generator().manual_seed(seed)
    queries = [torch.randint(1, 4000, (lengths[i % 4],), generator=g) for i in range(n)]
    responses = [torch.randint(1, 4000, (lengths[(i + 1) % 4] + 1,), generator=g) for i in range(n)]
    return queries, responses, torch.randn(n, generator=g)


@pytest.mark.parametrize("module, model", [(ppo, "policy"), (ppo_seq2seq, "t5")])
def test_ppo_step_recomputes_and_changes_nothing(assets, tmp_path, module, model):
    queries, responses, scores = random_batch(8)
    results = {}
    for flag in (False, True):
        args = module.check_args(module.Args(model=str(assets / model), reward_model=None, reward_fn=["length"],
                                             batch_size=8, mini_batch_size=4, gradient_accumulation_steps=2,
                                             ppo_epochs=2, total_episodes=8, gradient_checkpointing=flag))
        policy, train_policy, ref_lm = module.make_policy(args, CPU, None)
        trunk = policy.lm.transformer.h[0] if module is ppo else policy.lm.encoder.block[0].layer[-1]
        calls = counting(trunk.mlp if module is ppo else trunk)
        optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
        kl_ctl = module.KLController(0.1, 6.0, 10000, False)
        stats = module.ppo_step(args, train_policy, ref_lm, optimizer, queries, responses, scores, kl_ctl,
                                module.RunningMoments(), 0, torch.Generator().manual_seed(0))
        assert not policy.training  # back in eval mode for the next rollout
        results[flag] = (len(calls), stats, {k: v.clone() for k, v in policy.state_dict().items()})
    (plain_calls, plain, plain_w), (ckpt_calls, ckpt, ckpt_w) = results[False], results[True]
    # 4 no-grad micro-batches of 2 (old log-probs, values), then 2 epochs x 2 mini-batches x 2 micro-batches with
    # gradients: 8 forwards, each recomputed once with checkpointing
    assert plain_calls == 4 + 8 and ckpt_calls == 4 + 8 * 2
    for key in ("losses/policy_loss", "losses/value_loss", "objective/kl"):
        assert ckpt[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key
    for name in plain_w:
        torch.testing.assert_close(ckpt_w[name], plain_w[name], rtol=1e-5, atol=1e-7, msg=name)


def test_grpo_step_recomputes_and_changes_nothing(assets):
    prompts, completions, _ = random_batch(8)
    prompts = prompts[:4]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 2.0])
    results = {}
    for flag in (False, True):
        args = grpo.check_args(grpo.Args(model=str(assets / "policy"), prompts_per_step=4, num_generations=2,
                                         num_iterations=2, gradient_accumulation_steps=2, beta=0.1,
                                         gradient_checkpointing=flag))
        policy, train_policy, ref_lm = grpo.make_policy(args, CPU, None)
        calls = counting(policy.transformer.h[0].mlp)
        stats = grpo.grpo_step(args, train_policy, ref_lm, torch.optim.SGD(policy.parameters(), lr=0.1), prompts,
                               completions, rewards, generator=torch.Generator().manual_seed(0))
        assert not policy.training
        results[flag] = (len(calls), stats, {k: v.clone() for k, v in policy.state_dict().items()})
    (plain_calls, plain, plain_w), (ckpt_calls, ckpt, ckpt_w) = results[False], results[True]
    # Old log-probs: 2 micro-batches, each a prompt forward and a completion forward (the prompt read once per group).
    # Then 2 passes x 2 micro-batches: without checkpointing the same 2 forwards each; with it [prompt, completion]
    # in one forward (checkpointing drops caches), recomputed once in the backward
    assert plain_calls == 2 * 2 + 4 * 2 and ckpt_calls == 2 * 2 + 4 * 2
    assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-5) and ckpt["kl"] == pytest.approx(plain["kl"], rel=1e-5)
    for name in plain_w:
        torch.testing.assert_close(ckpt_w[name], plain_w[name], rtol=1e-5, atol=1e-7, msg=name)


def test_ddpo_recomputes_and_changes_nothing(tmp_path):
    tiny_model = str(tiny_sd.build(ROOT / "tiny" / "sd"))
    args = ddpo_args(tiny_model, tmp_path / "probe", gradient_checkpointing=True)
    pipe, _, _ = ddpo.load_pipeline(args, CPU)
    assert pipe.unet.is_gradient_checkpointing
    runs = {}
    for flag in (False, True):
        out = tmp_path / f"run_{flag}"
        ddpo.main(ddpo_args(tiny_model, out, num_epochs=1, gradient_checkpointing=flag))
        runs[flag] = ddpo_metrics(out)[-1]
    for key, value in runs[False].items():
        if isinstance(value, float) and not key.startswith("perf/") and math.isfinite(value):
            assert runs[True][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_disable_dropout_covers_functional_dropout(assets):
    """BART passes float attributes to functional dropout (no nn.Dropout module): those are zeroed too, so train
    mode computes exactly what eval mode does."""
    from transformers import AutoModelForSeq2SeqLM

    bart = AutoModelForSeq2SeqLM.from_pretrained(assets / "bart")
    assert bart.config.dropout > 0 or bart.config.attention_dropout > 0 or bart.config.activation_dropout > 0
    ids = torch.tensor([[5, 9, 200, 31, 7]])
    expected = bart.eval()(input_ids=ids, decoder_input_ids=ids).logits
    disable_dropout(bart).train()
    torch.testing.assert_close(bart(input_ids=ids, decoder_input_ids=ids).logits, expected)
