"""ppo.py's numeric pieces against hand-computed or independently computed values."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import ppo
import utils.rewards


def test_kl_estimators_hand_computed():
    logprobs, ref_logprobs = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    assert torch.allclose(ppo.kl_per_token(logprobs, ref_logprobs, "kl"), torch.tensor([[0.5, -1.0]]))
    assert torch.allclose(ppo.kl_per_token(logprobs, ref_logprobs, "abs"), torch.tensor([[0.5, 1.0]]))
    assert torch.allclose(ppo.kl_per_token(logprobs, ref_logprobs, "mse"), torch.tensor([[0.125, 0.5]]))
    # full: p = (0.75, 0.25), q = (0.5, 0.5): KL = 0.75 ln 1.5 + 0.25 ln 0.5
    logits, ref_logits = torch.log(torch.tensor([[[0.75, 0.25]]])), torch.zeros(1, 1, 2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert ppo.full_kl_of(logits, ref_logits).item() == pytest.approx(expected, abs=1e-6)
    full = ppo.kl_per_token(logprobs[:, :1], ref_logprobs[:, :1], "full", full_kl=torch.tensor([[expected]]))
    assert full.item() == pytest.approx(expected)
    with pytest.raises(ValueError):
        ppo.kl_per_token(logprobs, ref_logprobs, "k9")


def test_shaped_rewards_score_on_last_real_token():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = ppo.shaped_rewards(scores, kl, 0.5, mask)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 + 2.0, 0.0]])
    assert torch.allclose(rewards, expected)


def test_truncate_after_stop_and_score_position_with_pad_equal_eos():
    eos = 0  # pad == eos, as with gpt2's tokenizer: masks must come from lengths, not from ids
    generated = torch.tensor([[5, 7, eos, 9, 9], [eos, 3, 3, 3, 3], [1, 2, 3, 4, 5]])
    responses, stopped = ppo.truncate_after_stop(generated, eos)
    assert [r.tolist() for r in responses] == [[5, 7, eos], [eos], [1, 2, 3, 4, 5]]
    assert stopped.tolist() == [True, True, False]
    ids, mask = ppo.right_pad(responses, pad_id=eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    rewards = ppo.shaped_rewards(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, 5), 0.1, mask.float())
    assert rewards.nonzero().tolist() == [[0, 2], [1, 0], [2, 4]]  # the stop token itself gets the score
    none_responses, none_stopped = ppo.truncate_after_stop(generated, None)
    assert [len(r) for r in none_responses] == [5, 5, 5] and not none_stopped.any()


def reference_gae(rewards, values, lengths, gamma, lam):
    """Plain-Python GAE on each sequence's real tokens only."""
    advantages = []
    for r, v, n in zip(rewards.tolist(), values.tolist(), lengths):
        adv, last = [0.0] * len(r), 0.0
        for t in reversed(range(n)):
            next_value = v[t + 1] if t + 1 < n else 0.0
            last = r[t] + gamma * next_value - v[t] + gamma * lam * last
            adv[t] = last
        advantages.append(adv)
    return torch.tensor(advantages)


def test_gae_matches_plain_loop():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 6), torch.randn(4, 6)
    lengths = [6, 3, 1, 5]
    mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).float()
    advantages, returns = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = reference_gae(rewards, values, lengths, 0.9, 0.8)
    assert torch.allclose(advantages * mask, expected, atol=1e-6)
    assert torch.allclose(returns * mask, (expected + values) * mask, atol=1e-6)


def test_masked_whiten_matches_numpy_on_real_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    real = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    out = ppo.masked_whiten(x, mask)[mask.bool()]
    assert np.allclose(out.numpy(), (real - real.mean()) / real.std(), atol=1e-4)  # np.std: population
    assert ppo.masked_mean(x, mask).item() == pytest.approx(3.0)
    assert ppo.global_masked_mean((x - 3.0) ** 2, mask).item() == pytest.approx(real.var())  # one process
    kept = ppo.masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    assert np.allclose(kept.numpy(), (real - real.mean()) / real.std() + real.mean(), atol=1e-4)


def test_policy_loss_hand_computed():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0
    advantages = torch.tensor([[1.0, -1.0, 2.0]])
    loss, clipfrac, ratio_mean, approx_kl = ppo.policy_loss(new, old, advantages, torch.ones(1, 3), 0.2)
    # -A*r = (-1.5, 0.5, -2); -A*clip(r) = (-1.2, 0.8, -2); elementwise max = (-1.2, 0.8, -2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.0) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)
    assert ratio_mean.item() == pytest.approx(1.0)
    assert approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)
    # masked entries do not count
    loss_masked, *_ = ppo.policy_loss(new, old, advantages, torch.tensor([[1.0, 1.0, 0.0]]), 0.2)
    assert loss_masked.item() == pytest.approx((-1.2 + 0.8) / 2)


def test_value_loss_hand_computed():
    values, old_values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]])
    loss, clipfrac = ppo.value_loss(values, old_values, returns, torch.ones(1, 2), 0.2)
    # clipped values (0.7, 0.3); unclipped errors (1, 0), clipped errors (1.69, 0.09); 0.5 * mean(max)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2)
    assert clipfrac.item() == pytest.approx(1.0)


def test_adaptive_kl_controller_hand_computed():
    ctl = ppo.KLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 256)  # error clipped to +0.2: beta * (1 + 0.2 * 256 / 10000)
    assert ctl.kl_coef == pytest.approx(0.2 * 1.00512)
    ctl = ppo.KLController(0.2, target=6.0, horizon=10000)
    ctl.update(5.4, 100)  # error -0.1 (inside the clip)
    assert ctl.kl_coef == pytest.approx(0.2 * (1 - 0.1 * 100 / 10000))
    fixed = ppo.KLController(0.2, 6.0, 10000, adaptive=False)
    fixed.update(100.0, 256)
    assert fixed.kl_coef == 0.2


def test_running_moments_match_numpy():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3, 2, size=n) for n in (5, 17, 8)]
    moments = ppo.RunningMoments()
    for b in batches:
        moments.update(torch.tensor(b))
    everything = np.concatenate(batches)
    assert moments.mean == pytest.approx(everything.mean())
    assert moments.std == pytest.approx(everything.std(ddof=1))


def test_logprobs_with_temperature_and_left_padding_match_unpadded_reference():
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()
    policy = ppo.PolicyAndValue(lm, 16).eval()
    queries = [torch.tensor([3, 4, 5]), torch.tensor([7])]
    responses = [torch.tensor([8, 9]), torch.tensor([10, 11])]
    q_ids, q_mask = ppo.left_pad(queries, pad_id=0)
    r_ids, r_mask = ppo.right_pad(responses, pad_id=0)
    temperature = 0.7
    with torch.no_grad():
        logits, values = policy(torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1), 3, temperature)
        logprobs = ppo.logprobs_of(logits, r_ids)
        for i, (q, r) in enumerate(zip(queries, responses)):
            full = torch.cat([q, r])[None]
            out = lm(full, output_hidden_states=True)
            ref_logits = out.logits[0, len(q) - 1 : -1] / temperature
            expected = F.log_softmax(ref_logits, -1)[torch.arange(len(r)), r]
            assert torch.allclose(logprobs[i], expected, atol=1e-5)
            expected_values = policy.v_head(out.hidden_states[-1][0, len(q) - 1 : -1]).squeeze(-1)
            assert torch.allclose(values[i], expected_values, atol=1e-5)


def test_generation_samples_the_full_distribution_at_temperature(assets):
    """The rollout's sampling distribution is exactly softmax(logits / T): no top-k/top-p warper sneaks in
    from the model's generation config, so the log-probs we train on are the behaviour policy's."""
    from transformers import AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(assets / "policy").eval()
    lm.generation_config.top_k = 50  # as many hub models ship: must be overridden by ours
    tokenizer = AutoTokenizer.from_pretrained(assets / "policy")
    tokenizer.pad_token = tokenizer.eos_token
    args = ppo.Args(temperature=0.7, response_length=5)
    gen_config, stop_id = ppo.make_generation_config(args, tokenizer)
    assert stop_id == tokenizer.eos_token_id
    gen_config.update(output_scores=True, output_logits=True, return_dict_in_generate=True)
    queries = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    ids, mask = ppo.left_pad(queries, tokenizer.pad_token_id)
    saved, lm.generation_config = lm.generation_config, gen_config
    out = lm.generate(input_ids=ids, attention_mask=mask)
    lm.generation_config = saved
    scores, logits = torch.stack(out.scores, 1), torch.stack(out.logits, 1)
    assert torch.allclose(scores, logits / 0.7, atol=1e-5)
    # and our own forward reproduces the generation-time logits (left padding, position ids)
    responses = out.sequences[:, ids.shape[1] :]
    full_mask = torch.cat([mask, torch.ones_like(responses)], 1)
    with torch.no_grad():
        ours = ppo.lm_forward(lm, out.sequences, full_mask, ids.shape[1])
    assert torch.allclose(ours, logits, atol=1e-4)


def test_reward_label_index():
    from transformers import PretrainedConfig

    two = PretrainedConfig(num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"})
    assert utils.rewards.reward_label_index(two, "positive") == 1
    assert utils.rewards.reward_label_index(two, "0") == 0
    assert utils.rewards.reward_label_index(two, "-1") == 1
    assert utils.rewards.reward_label_index(PretrainedConfig(num_labels=1), "POSITIVE") == 0
    generic = PretrainedConfig(num_labels=2)  # LABEL_0 / LABEL_1
    with pytest.raises(ppo.UserError, match="LABEL_0"):
        utils.rewards.reward_label_index(generic, "POSITIVE")


def test_batch_indices_are_seeded_permutations_and_resumable():
    n, b = 10, 4
    stream = [i for it in range(5) for i in ppo.batch_indices(it, b, n, seed=3)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert ppo.batch_indices(3, b, n, seed=3) == stream[12:16]  # iteration 3 alone = the same prompts
    assert ppo.batch_indices(3, b, n, 3, rank=0, world_size=2) + ppo.batch_indices(3, b, n, 3, 1, 2) == stream[12:16]
    assert ppo.batch_indices(0, b, n, seed=4) != ppo.batch_indices(0, b, n, seed=3)


def test_reward_function_checks():
    from utils.rewards import call_reward_fn

    def bad_length(prompts, completions, ids):
        return [1.0]

    def nan(prompts, completions, ids):
        return [0.0, float("nan")]

    def broken(prompts, completions, ids):
        return [len(c) / 0 for c in completions]

    batch = (["a", "b"], ["c", "d"], [[1], [2]])
    with pytest.raises(ppo.UserError, match="returned 1 scores for 2 samples, iteration 3"):
        call_reward_fn(bad_length, 2, "iteration 3", *batch)
    with pytest.raises(ppo.UserError, match=r"NaN/inf for samples \[1\] of the batch of iteration 3"):
        call_reward_fn(nan, 2, "iteration 3", *batch)
    with pytest.raises(ppo.UserError) as err:
        call_reward_fn(broken, 2, "iteration 3", *batch)
    message = str(err.value)  # the user's own traceback, with their line, and where it happened
    assert "raised on the batch of iteration 3" in message and "len(c) / 0" in message
    assert "ZeroDivisionError" in message and "call_reward_fn" not in message
    assert call_reward_fn(utils.rewards.reward_length, 1, "", ["a"], ["bc"], [[1, 2]]).tolist() == [2.0]
    texts = ["great wonderful", "awful terrible"]
    vader = call_reward_fn(utils.rewards.reward_vader, 2, "", ["", ""], texts, [[1], [2]])
    assert vader[0] > 0.5 > -0.5 > vader[1]
    with pytest.raises(ppo.UserError, match="not a built-in"):
        utils.rewards.load_function("nonexistent", "--reward-fn", utils.rewards.REWARD_FUNCTIONS)
    with pytest.raises(ppo.UserError, match="--reward-weights has 1 values for 2 rewards"):
        ppo.check_args(ppo.Args(reward_fn=["vader"], reward_weights=[1.0]))


def test_first_update_is_on_policy(assets):
    """With one epoch and one mini-batch, the update's log-probs equal the rollout's: ratio exactly 1."""
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(assets / "policy")
    ref = AutoModelForCausalLM.from_pretrained(assets / "policy")
    policy = ppo.PolicyAndValue(lm, lm.config.n_embd).eval()
    args = ppo.check_args(ppo.Args(reward_fn=["length"], reward_model=None, batch_size=4, mini_batch_size=4,
                                   total_episodes=4, ppo_epochs=1, temperature=0.8))
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    queries = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10]), torch.tensor([11])]
    responses = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([5, 6]), torch.tensor([7, 8, 9, 10])]
    kl_ctl = ppo.KLController(0.2, 6.0, 10000)
    stats = ppo.ppo_step(args, policy, ref, optimizer, queries, responses, torch.tensor([1.0, 0.0, -1.0, 2.0]),
                         kl_ctl, ppo.RunningMoments(), pad_id=0, generator=torch.Generator().manual_seed(0))
    assert stats["losses/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert stats["losses/clipfrac"] == 0.0
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the update
    assert stats["charts/response_length"] == pytest.approx(2.5)
    assert kl_ctl.kl_coef < 0.2  # KL 0 below target 6: kl_coef shrinks


def test_build_prompts_truncated_whole_and_nested(assets):
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets / "tokenizer")
    texts = ["one two three four five six seven eight nine ten eleven twelve", "short", "a b c d"]
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    ds = datasets.Dataset.from_dict({"text": texts})
    cut = ppo.build_prompts(ds, tokenizer, "text", 2, 3, seed=0)
    kept = [t for t, n in zip(texts, lengths) if n >= 2]  # shorter than min_tokens: dropped
    assert len(cut) == len(kept) and all(2 <= len(p) <= 3 for p in cut)
    assert all(tokenizer.decode(p) == tokenizer.decode(tokenizer(t)["input_ids"][: len(p)]) for p, t in zip(cut, kept))
    # whole texts: those within [min, max] tokens are kept entire, longer ones dropped
    whole = ppo.build_prompts(ds, tokenizer, "text", 2, lengths[2], seed=0, truncate=False)
    expected = [t for t, n in zip(texts, lengths) if 2 <= n <= lengths[2]]
    assert [tokenizer.decode(p) for p in whole] == [tokenizer.decode(tokenizer(t)["input_ids"]) for t in expected]
    # a nested field (real-toxicity-prompts: {"prompt": {"text": ...}})
    nested = datasets.Dataset.from_list([{"prompt": {"text": t, "toxicity": 0.5}} for t in texts])
    nested_prompts = ppo.build_prompts(nested, tokenizer, "prompt.text", 2, 3, 0)
    assert [p.tolist() for p in nested_prompts] == [p.tolist() for p in cut]


def test_fused_gelu_keeps_the_models_function_and_its_saved_config(assets, tmp_path):
    from utils.models import fuse_gelu

    model = AutoModelForCausalLM.from_pretrained(assets / "policy").eval()
    assert model.config.activation_function == "gelu_new"
    ids = torch.tensor([[5, 9, 200, 31, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert fuse_gelu(model) == model.config.n_layer  # one per MLP
        assert all(type(block.mlp.act) is torch.nn.GELU for block in model.transformer.h)
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    assert fuse_gelu(model) == 0  # nothing left to swap
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers: gelu_new again
    assert reloaded.config.activation_function == "gelu_new"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


def test_compiled_blocks_compute_the_same_and_keep_parameter_names(assets):
    from utils.models import compile_blocks

    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_pretrained(assets / "policy").eval()
    compiled = AutoModelForCausalLM.from_pretrained(assets / "policy").eval()
    # aot_eager traces forward and backward as inductor does, without its C++ code generation (seconds, not minutes)
    assert compile_blocks(compiled, backend="aot_eager") == model.config.n_layer
    assert list(compiled.state_dict()) == list(model.state_dict())  # checkpoints unchanged
    ids = torch.tensor([[5, 9, 200, 31, 7], [8, 8, 3, 1, 0]])
    for m in (model, compiled):
        m(input_ids=ids).logits.square().mean().backward()
    torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()
