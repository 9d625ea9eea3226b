"""ppo.py run end to end as a user runs it, its checkpoints and resume, bad input, and a learning test."""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import ppo
from conftest import learning_seed, record_learning, run_script


def tiny_args(assets, tmp_path, **overrides):
    """A tiny, fast configuration of ppo.Args on the offline assets."""
    fields = dict(model=str(assets / "policy"), reward_model=str(assets / "reward"),
                  dataset=str(assets / "prompts.jsonl"), output_dir=str(tmp_path / "run"), total_episodes=16,
                  batch_size=8, mini_batch_size=4, gradient_accumulation_steps=2, response_length=8, ppo_epochs=2,
                  learning_rate=1e-3, save_every=1)
    fields.update(overrides)
    return ppo.Args(**fields)


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


def test_cli_run_saves_loadable_checkpoint(assets, tmp_path):
    out = tmp_path / "run"
    proc = run_script("ppo.py", "--model", assets / "policy", "--reward-model", assets / "reward",
                      "--dataset", assets / "prompts.jsonl", "--output-dir", out, "--total-episodes", 16,
                      "--batch-size", 8, "--mini-batch-size", 4, "--gradient-accumulation-steps", 2,
                      "--response-length", 8, "--ppo-epochs", 2, "--missing-eos-penalty", 1.0, "--track",
                      "--sample-every", 1)
    assert "iter    2 |" in proc.stdout + proc.stderr and "done: policy in" in proc.stdout
    assert len(read_metrics(out / "samples.jsonl")) == 8  # and a wandb table each iteration
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2]
    for m in metrics:
        assert all(v == v and abs(v) != float("inf") for k, v in m.items() if k != "losses/grad_norm"), m
    model = AutoModelForCausalLM.from_pretrained(out)  # the final policy, plain transformers
    assert model.config.n_layer == 2
    assert set(load_file(out / "value_head.safetensors")) == {"weight", "bias"}
    assert (out / "checkpoint" / "training_state.pt").exists()
    assert list((out / "wandb").glob("offline-run-*"))  # --track logged (WANDB_MODE=offline in tests)
    tables = sorted((out / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"))
    assert len(tables) == 2  # the sample table of each iteration, as a wandb Table
    table, samples = json.loads(tables[0].read_text()), read_metrics(out / "samples.jsonl")
    assert table["columns"] == [k for k in samples[0] if k != "iteration"]
    assert table["data"] == [[row[c] for c in table["columns"]] for row in samples if row["iteration"] == 1]
    # the trained weights differ from the initial ones: the run really updated the policy
    initial = AutoModelForCausalLM.from_pretrained(assets / "policy")
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, initial.transformer.h[0].mlp.c_fc.weight)


def test_help_documents_every_flag():
    proc = run_script("ppo.py", "--help")
    for flag in ("--reward-model", "--kl-estimator", "--response-length", "--stop-token", "--lora-r", "--resume",
                 "--missing-eos-penalty", "--score-scaling", "--target-kl", "--gradient-accumulation-steps"):
        assert flag in proc.stdout
    assert "--num-iterations" not in proc.stdout  # derived at runtime, not a flag


def test_resume_equals_uninterrupted_run(assets, tmp_path):
    """4 iterations in one go == 2 iterations + --resume for 2 more: same metrics, same weights."""
    whole = tiny_args(assets, tmp_path / "a", total_episodes=32, sample_every=1)
    ppo.main(whole)
    first = tiny_args(assets, tmp_path / "b", total_episodes=16, sample_every=1)
    ppo.main(first)
    (tmp_path / "b/run/samples.jsonl").open("a").write('{"iteration": 3, "from": "a killed run"}\n')
    ppo.main(tiny_args(assets, tmp_path / "b", total_episodes=32, resume=True, sample_every=1))
    a, b = read_metrics(tmp_path / "a/run/metrics.jsonl"), read_metrics(tmp_path / "b/run/metrics.jsonl")
    assert [m["iteration"] for m in b] == [1, 2, 3, 4]
    # samples.jsonl: 4 episodes per iteration (prompt, response, score, the reference's response), cut back on resume
    samples_a = read_metrics(tmp_path / "a/run/samples.jsonl")
    samples_b = read_metrics(tmp_path / "b/run/samples.jsonl")
    assert samples_a == samples_b and [s["iteration"] for s in samples_a] == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert set(samples_a[0]) == {"iteration", "prompt", "response", "score", "reference_response"}
    for ma, mb in zip(a, b):
        assert {k: v for k, v in ma.items() if not k.startswith("perf/")} == \
               {k: v for k, v in mb.items() if not k.startswith("perf/")}
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "a/run").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "b/run").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert torch.equal(load_file(tmp_path / "a/run/value_head.safetensors")["weight"],
                       load_file(tmp_path / "b/run/value_head.safetensors")["weight"])


def test_lora_uses_disabled_adapters_as_reference(assets, tmp_path):
    args = tiny_args(assets, tmp_path, lora_r=4, learning_rate=1e-2, sample_every=2)  # samples: the base model too
    metrics = read_metrics(ppo.main(args))
    assert metrics[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # LoRA B starts at 0: policy == ref
    assert metrics[1]["objective/kl"] != 0.0  # after one update the adapters moved away from the reference
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run")  # merged into plain weights
    assert not any("lora" in k for k in merged.state_dict())
    assert (tmp_path / "run/checkpoint/adapter_config.json").exists()
    assert [s["iteration"] for s in read_metrics(tmp_path / "run/samples.jsonl")] == [2] * 4


def test_whiten_rewards_divides_the_shaped_rewards_by_their_std(assets, tmp_path, monkeypatch):
    """--whiten-rewards (TRL's whiten_rewards): GAE gets the KL-shaped rewards divided by their std over the real
    response tokens (population std), mean kept; computed here independently of ppo.masked_whiten."""
    seen = []
    real_gae = ppo.gae
    monkeypatch.setattr(ppo, "gae", lambda rewards, *rest: seen.append(rewards.clone()) or real_gae(rewards, *rest))
    for flag in (False, True):
        ppo.main(tiny_args(assets, tmp_path / str(flag), total_episodes=8, whiten_rewards=flag, stop_token="none"))
    plain, whitened = seen
    assert plain.shape == (8, 8)  # no stop token: every response token is real (8 episodes x 8 tokens)
    values = plain.double()
    mean, std = values.mean(), values.std(unbiased=False)
    torch.testing.assert_close(whitened.double(), (values - mean) / torch.sqrt(std**2 + 1e-8) + mean, rtol=1e-5,
                               atol=1e-6)


def test_response_length_sampler(assets, tmp_path):
    """--response-length-min 2 --response-length 8 (TRL's LengthSampler): each episode's response is cut to a length
    drawn from [2, 8]; without a stop token, the lengths are exactly the draws."""
    metrics = read_metrics(ppo.main(tiny_args(assets, tmp_path, total_episodes=32, response_length_min=2,
                                              stop_token="none", sample_every=1)))
    lengths = [m["charts/response_length"] for m in metrics]
    assert all(2 <= n < 8 for n in lengths) and len(set(lengths)) > 1  # a mean of draws in [2, 8]: never all 8


@pytest.mark.parametrize("estimator", ["abs", "mse", "full"])
def test_kl_estimators_run(assets, tmp_path, estimator):
    metrics = read_metrics(ppo.main(tiny_args(assets, tmp_path, kl_estimator=estimator, total_episodes=8,
                                              score_scaling="normalize", score_clip=3.0, stop_token="none")))
    assert metrics[0]["charts/response_length"] == 8  # --stop-token none: always full length
    assert all(v == v for k, v in metrics[0].items() if k != "losses/grad_norm")


@pytest.mark.parametrize("flags, message", [
    (["--model", "gpt2"], "--model 'gpt2': the Hugging Face hub cannot be reached"),
    (["--dataset-text-field", "review"], "has no column 'review'; its columns are ['text']"),
    (["--dataset", "EMPTY"], "is empty"),
    (["--reward-label", "HAPPY"], "--reward-label 'HAPPY' is not a label of the reward model"),
    (["--total-episodes", "20", "--batch-size", "10", "--mini-batch-size", "4"],
     "--batch-size / --mini-batch-size: 10 is not divisible by 4"),
    (["--reward-model", "none", "--reward-fn", "tests/rewards.py:nan_reward"], "returned NaN/inf"),
    (["--reward-fn", "tests/rewards.py:missing"], "has no function 'missing'"),
    (["--reward-fn", "vader", "--reward-weights", "1", "2", "3"], "--reward-weights has 3 values for 2 rewards"),
    (["--reward-fn", "tests/rewards.py:crashing_reward"], "crashing_reward raised on the batch of iteration 1"),
])
def test_bad_input_fails_fast_with_one_line(assets, tmp_path, flags, message):
    (tmp_path / "empty.jsonl").write_text("")
    flags = [str(tmp_path / "empty.jsonl") if f == "EMPTY" else f for f in flags]
    base = ["--model", assets / "policy", "--reward-model", assets / "reward", "--dataset", assets / "prompts.jsonl",
            "--output-dir", tmp_path / "run", "--total-episodes", 8, "--batch-size", 8, "--mini-batch-size", 8,
            "--response-length", 4]
    start = time.perf_counter()
    proc = run_script("ppo.py", *base, *flags, check=False)
    assert time.perf_counter() - start < 30
    assert proc.returncode != 0
    if "raised on the batch" in message:  # the user's own traceback follows the error line, none of ours
        assert message in proc.stderr and "ZeroDivisionError" in proc.stderr.splitlines()[-1]
        assert "ppo.py" not in proc.stderr and "runtime.py" not in proc.stderr, proc.stderr
        return
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr


@pytest.mark.slow
def test_ppo_learns_a_dense_reward(assets, tmp_path):
    """Reward = fraction of 'e' characters in the completion, from a random-init policy (score ~0.10).
    A sign error in the advantages drives it down; a detached policy loss leaves it flat (both checked by hand).
    30 iterations: after 20 the rise was 0.0485 to 0.148 over seeds 1-10, one seed under the threshold."""
    args = tiny_args(assets, tmp_path, reward_model="none", reward_fn=["tests/rewards.py:letter_e_fraction"],
                     total_episodes=30 * 64, batch_size=64, mini_batch_size=32, gradient_accumulation_steps=1,
                     response_length=16, ppo_epochs=4, learning_rate=3e-3, kl_coef=0.05,
                     score_scaling="normalize", save_every=100, seed=learning_seed(1))
    metrics = read_metrics(ppo.main(args))
    scores = [m["objective/scores"] for m in metrics]
    first, last = sum(scores[:3]) / 3, sum(scores[-5:]) / 5
    record_learning("ppo_dense_reward_rise", last - first, 0.05)
    assert last > first + 0.05, scores
    assert all(m["objective/kl"] < 60 for m in metrics), [m["objective/kl"] for m in metrics]


def test_prompts_keep_the_bos_token_the_policy_was_trained_with(assets):
    """A Llama/Mistral-style tokenizer puts BOS before every text; sft.py trains on [BOS, text..., EOS], so ppo.py's
    prompts must start with BOS too (they were cut from texts without special tokens and lost it, silently)."""
    import datasets
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    import sft

    tokenizer = AutoTokenizer.from_pretrained(assets / "policy")
    bos = tokenizer.eos_token_id  # GPT-2 style: one token for both; the post-processor adds it before each text
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                             special_tokens=[("<|endoftext|>", bos)])
    texts = ["a great film with a great cast", "the worst movie I have seen in years"]
    data = datasets.Dataset.from_dict({"text": texts})
    examples, _, _ = sft.tokenize(data, "text", "text", tokenizer, max_len=64, completion_only=True)
    prompts = ppo.build_prompts(data, tokenizer, "text", 3, 3, seed=0)
    for (sft_ids, _), prompt, text in zip(examples, prompts, texts):
        assert sft_ids[0] == bos and prompt[0].item() == bos  # both start as the model was trained
        assert prompt.tolist() == sft_ids[:4]  # BOS + the text's first 3 tokens, exactly as SFT saw them
        assert prompt.tolist()[1:] == tokenizer(text, add_special_tokens=False)["input_ids"][:3]
    # GPT-2's own tokenizer adds nothing: prompts are the text's first tokens
    plain = AutoTokenizer.from_pretrained(assets / "policy")
    assert ppo.build_prompts(data, plain, "text", 3, 3, seed=0)[0].tolist() == plain(texts[0])["input_ids"][:3]


def test_chat_prompts_refuses_what_it_cannot_render(assets, tmp_path):
    """--chat-prompts needs a column of texts (not nested, not messages, no missing text) and a chat template."""
    from conftest import chat_policy
    from utils.assets import write_jsonl
    from utils.hub import UserError

    model_dir, _ = chat_policy(assets, tmp_path / "chat_policy")
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Review a comedy.", "messages": [{"role": "user", "content": "Hi"}],
                                          "nested": {"text": "Hi"}}, {"prompt": None, "messages": [], "nested": {}}])
    for field in ("prompt", "messages", "nested.text", "missing"):
        with pytest.raises(UserError, match=f"--chat-prompts needs --dataset-text-field '{field}' to be a column of"):
            ppo.load_inputs(tiny_args(assets, tmp_path, model=str(model_dir), dataset=str(tmp_path / "bad.jsonl"),
                                      dataset_text_field=field, chat_prompts=True))
    with pytest.raises(UserError, match="--chat-prompts: the tokenizer of --model has no chat template"):
        ppo.load_inputs(tiny_args(assets, tmp_path, dataset=str(assets / "prompts.jsonl"), chat_prompts=True))


@pytest.mark.parametrize("column, reward_template", [("messages", False), ("prompt", False), ("messages", True),
                                                     ("prompt", True)])
def test_chat_prompts_and_the_reward_model_reads_the_conversation(assets, tmp_path, monkeypatch, column,
                                                                  reward_template):
    """A dataset of chat messages, or a prompt column of texts with --chat-prompts (each text the user's one turn):
    prompts are rendered with the tokenizer's chat template and its generation prompt (whole, as sft.py trains
    chats), and the reward model reads the conversation with the response as the assistant's turn (what reward.py
    trains on chat pairs), rendered with its own template (turns ending in "#" here) or, lacking one, the policy's
    (turns ending in "|")."""
    from conftest import chat_policy, chat_template
    from utils.assets import write_jsonl
    from utils.rewards import RewardModel

    model_dir, _ = chat_policy(assets, tmp_path / "chat_policy", turn_end="|")
    reward_dir, end = assets / "reward", "|"
    if reward_template:
        reward_dir, end = Path(shutil.copytree(assets / "reward", tmp_path / "reward_chat")), "#"
        tok = AutoTokenizer.from_pretrained(reward_dir)
        tok.chat_template = chat_template(turn_end="#")
        tok.save_pretrained(reward_dir)
    topics = ["a comedy", "a thriller", "a cartoon", "a documentary"]
    rows = [{"messages": [{"role": "user", "content": f"Review {t}."}], "prompt": f"Review {t}."} for t in topics]
    write_jsonl(tmp_path / "chats.jsonl", [{column: row[column]} for row in rows])
    seen = []
    real_call = RewardModel.__call__
    monkeypatch.setattr(RewardModel, "__call__", lambda self, texts, n: seen.extend(texts) or real_call(self, texts, n))
    ppo.main(tiny_args(assets, tmp_path, model=str(model_dir), reward_model=str(reward_dir),
                       dataset=str(tmp_path / "chats.jsonl"), dataset_text_field=column,
                       chat_prompts=column == "prompt", prompt_max_tokens=64, total_episodes=8, sample_every=1))
    samples = read_metrics(tmp_path / "run/samples.jsonl")
    assert {s["prompt"] for s in samples} <= {f"<user>Review {t}.|<assistant>" for t in topics}
    assert len(seen) == 8 and all(text.startswith("<user>Review ") and text.endswith(end) for text in seen)
    sample = samples[0]
    assert sample["prompt"].replace("|<assistant>", end) + f"<assistant>{sample['response']}{end}" in seen
