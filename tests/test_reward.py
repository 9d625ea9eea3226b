"""reward.py: the Bradley-Terry loss, margin, centring and accuracy against hand-computed values, data handling,
the score position, end-to-end runs (into ppo.py), resume, torchrun (2 processes against 1), bad input, and a
learning test."""

import itertools
import json
import math
import random
from functools import partial

import datasets
import pytest
import torch
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig,
                          LlamaForCausalLM)

import reward
import utils.rewards
from conftest import ROOT, learning_seed, record_learning, run_script, torchrun
from utils.assets import read_jsonl, write_jsonl
from utils.data import batch_indices, imdb, sentiment_pairs
from utils.hub import UserError

CPU = torch.device("cpu")


@pytest.fixture
def one_thread():
    """Pin torch to one thread for a learning test. On a CPU shared with other jobs, OpenMP threads spin-wait
    for each other: two threads were 2-8x slower than one on our 2-core machine under load (and ~1.5x faster
    when idle), so one thread keeps the test's time predictable. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def softplus(x):  # -log sigmoid(-x) = log(1 + e^x), by hand
    return math.log(1 + math.exp(x))


@pytest.fixture(scope="module")
def pairs_file(assets, tmp_path_factory):
    """40 sentiment pairs (positive review chosen over negative) with a shared prompt and a margin column."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    pairs = sentiment_pairs(imdb("train", assets), 40, seed=1, max_words=100)
    write_jsonl(path, [{"prompt": "Review: ", **p, "margin": 0.5} for p in pairs])
    return path


def tiny_args(assets, tmp_path, data, **overrides):
    fields = dict(model=str(assets / "reward"), dataset=str(data), output_dir=str(tmp_path / "run"), max_steps=4,
                  batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3, max_seq_length=64, eval_every=2,
                  save_every=2, eval_fraction=0.2, seed=3)
    fields.update(overrides)
    return reward.Args(**fields)


# ---------------------------------------------------------------------------------------------------------
# Loss and accuracy against hand-computed values
# ---------------------------------------------------------------------------------------------------------
def test_bradley_terry_loss_hand_computed():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # -log sigmoid(d) = log(1 + e^-d) with d = 1 and d = -2
    expected = (softplus(-1.0) + softplus(2.0)) / 2
    assert reward.bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    # with a margin the chosen reward must beat the rejected one by m: d = 1 - 0.5 and d = -2 - 1
    expected = (softplus(-0.5) + softplus(3.0)) / 2
    margin = torch.tensor([0.5, 1.0])
    assert reward.bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(expected, rel=1e-6)
    assert reward.bradley_terry_loss(chosen, rejected, torch.zeros(2)).item() == pytest.approx(
        reward.bradley_terry_loss(chosen, rejected).item())
    # a large wrong gap costs its size, finitely (log(sigmoid(.)) would give inf)
    assert reward.bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([0.0])).item() == pytest.approx(200.0)


def test_bradley_terry_gradient_pushes_chosen_up_and_rejected_down():
    chosen, rejected = torch.tensor([0.0], requires_grad=True), torch.tensor([0.0], requires_grad=True)
    reward.bradley_terry_loss(chosen, rejected).backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)  # sigmoid(0) - 1


def test_center_rewards_loss_hand_computed():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert reward.center_rewards_loss(chosen, rejected).item() == pytest.approx((1.0 + 4.0) / 2)
    assert reward.center_rewards_loss(torch.tensor([3.0]), torch.tensor([-3.0])).item() == 0.0


def test_pairwise_accuracy_hand_computed():
    chosen, rejected = torch.tensor([3.0, 1.0, 2.0, 0.5]), torch.tensor([1.0, 2.0, 2.0, 0.4])
    assert reward.pairwise_accuracy(chosen, rejected).item() == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert reward.pairwise_accuracy(torch.zeros(5), torch.zeros(5)).item() == 0.5  # a constant model is at chance


# ---------------------------------------------------------------------------------------------------------
# Data and the score position
# ---------------------------------------------------------------------------------------------------------
def test_tokenize_pairs_prompt_margin_truncation_and_identical_pairs(assets):
    tok = AutoTokenizer.from_pretrained(assets / "reward")
    tok.truncation_side = "left"
    long = "slow " * 50 + "but a great ending"
    ds = datasets.Dataset.from_list([
        {"prompt": "Q: ", "chosen": "good", "rejected": "bad", "margin": 2.0},
        {"prompt": "Q: ", "chosen": "same", "rejected": "same", "margin": 0.0},  # no preference: dropped
        {"prompt": "Q: ", "chosen": "dull " + long, "rejected": "fun " + long, "margin": 0.0},  # same once cut
        {"prompt": "Q: ", "chosen": long, "rejected": "short", "margin": 1.0},
    ])
    pairs, n_truncated, n_identical, n_same = reward.tokenize_pairs(ds, tok, max_len=16)
    assert (n_truncated, n_identical, n_same) == (3, 1, 1)
    assert [m for _, _, m in pairs] == [2.0, 1.0]
    assert tok.decode(pairs[0][0]) == "[CLS] q : good [SEP]"  # the prompt is prepended
    # left truncation keeps the end (the response being judged) and the special tokens
    assert len(pairs[1][0]) == 16 and tok.decode(pairs[1][0]).endswith("but a great ending [SEP]")
    assert tok.decode(pairs[1][0]).startswith("[CLS]")


@pytest.mark.parametrize("model, lead", [("policy", 0), ("reward", 1)])  # GPT-2's BPE; BERT's [CLS] ... [SEP]
def test_left_truncation_cuts_the_same_prompt_tokens_from_both_texts(assets, model, lead):
    """Cut on the left, a pair's two texts lose the same tokens where they start alike: both responses keep the same
    context (and a common start). Leading special tokens stay. A pair that parts before the cut: each text alone."""
    tok = AutoTokenizer.from_pretrained(assets / model)
    tok.truncation_side = "left"
    prompt = "Q: " + "a long question about films, " * 5 + "A:"
    chosen, rejected = " yes, a good one", " no, it was a very bad and boring film"
    ds = datasets.Dataset.from_list([{"prompt": prompt, "chosen": chosen, "rejected": rejected},
                                     {"chosen": "one two three " * 10, "rejected": "four " * 40}])
    pairs, n_truncated, _, _ = reward.tokenize_pairs(ds, tok, max_len=30)
    assert reward.leading_special_tokens(tok) == lead
    whole_c, whole_r = (tok(prompt + x)["input_ids"] for x in (chosen, rejected))
    cut = len(whole_r) - 30  # the longer text's excess
    shared = reward.shared_prefix_length(whole_c, whole_r, tok.pad_token_id)
    assert 30 < len(whole_c) < len(whole_r) and 0 < cut < shared - lead  # the cut stays inside the prompt
    c, r, _ = pairs[0]
    assert (len(c), len(r)) == (len(whole_c) - cut, 30)
    assert c == whole_c[:lead] + whole_c[lead + cut :] and r == whole_r[:lead] + whole_r[lead + cut :]
    # the second pair shares nothing: each text is cut alone by the tokenizer, which keeps its special tokens
    alone = tuple(tok(ds[1][k], truncation=True, max_length=30)["input_ids"] for k in ("chosen", "rejected"))
    assert pairs[1][:2] == alone
    assert n_truncated == 4  # every text is too long: the first pair's chosen loses as many tokens as its rejected


def test_conversational_pairs_use_the_chat_template(assets):
    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    example = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
               "rejected": [{"role": "assistant", "content": "Go away"}]}
    with pytest.raises(UserError, match="no chat template"):
        reward.pair_texts(example, tok)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    assert reward.pair_texts(example, tok) == ("user: Hi\nassistant: Hello\n", "user: Hi\nassistant: Go away\n")


def test_score_is_read_at_the_last_real_token_when_pad_is_eos(assets, tmp_path):
    """A GPT-2 reward model (score read at the last non-pad token) whose tokenizer pads with EOS: a text scores
    the same alone and padded in a batch, because config.pad_token_id is the tokenizer's."""
    tok = AutoTokenizer.from_pretrained(assets / "policy")
    tok.pad_token = tok.eos_token
    model = reward.load_model(reward.Args(model=str(assets / "policy")), tok, CPU).eval()
    assert model.config.pad_token_id == tok.eos_token_id
    short = tok("A fine film.")["input_ids"]
    long = tok("A long, slow and rather dull film, with a good end.")["input_ids"]
    with torch.no_grad():
        alone, _, _ = reward.pair_rewards(model, [(short, short, 0.0)], tok.pad_token_id, CPU)
        batched, _, _ = reward.pair_rewards(model, [(short, long, 0.0)], tok.pad_token_id, CPU)
    assert batched[0].item() == pytest.approx(alone[0].item(), abs=1e-5)


def test_shared_prefix_length_stops_before_either_scored_token():
    pad = 0
    assert reward.shared_prefix_length([5, 6, 7, 8], [5, 6, 9], pad) == 2  # where they part
    assert reward.shared_prefix_length([5, 6, 7], [5, 6, 7, 8, 9], pad) == 2  # a prefix of the other: its last token
    assert reward.shared_prefix_length([5, 6, 7, 0, 0], [5, 6, 7, 0, 0, 4], pad) == 2  # trailing pads are not scored
    assert reward.shared_prefix_length([1, 2], [3, 2], pad) == 0


@pytest.mark.parametrize("arch, lora_r", [("gpt2", 0), ("gpt2", 4), ("llama", 0)])
def test_shared_prefix_and_trimmed_last_block_match_whole_texts(assets, tmp_path, arch, lora_r):
    """Reading a pair's common start once (the cache shared by both continuations), running the last block's MLP
    at the scored tokens only, and both, each give the scores and the gradients of reading the two whole texts
    plainly: a GPT-2 classifier (learned positions) with and without LoRA and a random Llama (rotary positions,
    grouped-query attention), in eval mode (dropout off), padded batches with prompts of different lengths, texts
    ending in EOS (= pad), one text a prefix of the other. The fast paths must be the ones taken (a forward with a
    cache; the MLP's input narrowed), else this would compare a path with itself."""
    tok = AutoTokenizer.from_pretrained(assets / "policy")
    tok.pad_token = tok.eos_token
    path = assets / "policy"
    if arch == "llama":
        config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
        path = tmp_path / "llama"
        with torch.random.fork_rng():
            torch.manual_seed(0)
            LlamaForCausalLM(config).save_pretrained(path)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = reward.load_model(reward.Args(model=str(path), lora_r=lora_r), tok, CPU).eval()
    assert reward.causal(model)
    last_mlp = reward.last_block_mlp(model)
    base = model.get_base_model() if lora_r else model
    blocks = base.model.layers if arch == "llama" else base.transformer.h
    assert last_mlp is blocks[-1].mlp
    eos = tok.eos_token
    # EOS (= pad) ends texts and, in one, sits inside it (as an end-of-turn token does): the score is read after it
    texts = [("Review: this film was great fun, I loved it", "Review: this film was dull."),
             ("Review: ok" + eos + " fine", "Review: terrible, awful and a waste of time" + eos),
             ("Q: what is two plus two? A: four", "Q: what is two plus two? A: four, or five" + eos + eos)]
    pairs = [(tok(c)["input_ids"], tok(r)["input_ids"], 0.0) for c, r in texts]
    # the third: chosen is a prefix of rejected, so only its scored token is read after the shared 10
    assert [reward.shared_prefix_length(c, r, tok.pad_token_id) for c, r, _ in pairs] == [7, 4, 10]
    cached, mlp_widths = [], []
    model.register_forward_pre_hook(lambda m, a, kw: cached.append(kw.get("past_key_values") is not None),
                                    with_kwargs=True)
    last_mlp.register_forward_hook(lambda m, a, out: mlp_widths.append(a[0].shape[1]))  # what the MLP computed on
    results = {}
    for share, trim in ((False, False), (False, True), (True, False), (True, True)):
        model.zero_grad()
        chosen, rejected, _ = reward.pair_rewards(model, pairs, tok.pad_token_id, CPU, share_prefix=share,
                                                  last_mlp=last_mlp if trim else None)
        (0.7 * chosen.sum() - 1.3 * rejected.sum()).backward()  # any weights: chosen and rejected both checked
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[share, trim] = (chosen.detach(), rejected.detach(), grads)
    # whole texts (twice); then the prefixes, and the continuations with their cache (twice)
    assert cached == [False, False, False, True, False, True]
    # plain: every position of the padded texts, prefixes and continuations; trimmed: 1 position, none over prefixes
    width, prefix = max(len(x) for c, r, _ in pairs for x in (c, r)), 10
    continuation = max(len(x) - n for (c, r, _), n in zip(pairs, (7, 4, 10)) for x in (c, r))
    assert mlp_widths == [width, 1, prefix, continuation, 0, 1]
    for key in ((False, True), (True, False), (True, True)):
        for plain, fast in zip(results[False, False], results[key]):
            assert fast.shape == plain.shape and plain.abs().max() > 1e-3
            torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_length_groups_pad_the_fewest_tokens():
    """Against every way of cutting the sorted lengths into at most K runs (brute force), on random lengths: the
    same fewest tokens (each run padded to its longest, and one longest length more per run), every index once."""
    def fewest(lengths, k_max):  # (tokens, runs) of the best cut, by trying every cut
        s, n = sorted(lengths), len(lengths)
        return min((sum((b[t + 1] - b[t]) * s[b[t + 1] - 1] for t in range(k)) + k * s[-1], k)
                   for k in range(1, min(k_max, n) + 1)
                   for b in ([0, *cuts, n] for cuts in itertools.combinations(range(1, n), k - 1)))
    rng = random.Random(0)
    for _ in range(300):
        lengths, k_max = [rng.randint(1, 20) for _ in range(rng.randint(1, 9))], rng.randint(1, 5)
        runs = reward.length_groups(lengths, k_max)
        assert sorted(i for run in runs for i in run) == list(range(len(lengths)))
        assert all(lengths[i] <= lengths[j] for a, b in zip(runs, runs[1:]) for i in a for j in b)  # sorted runs
        tokens = sum(len(run) * max(lengths[i] for i in run) for run in runs) + len(runs) * max(lengths)
        assert (tokens, len(runs)) == fewest(lengths, k_max)
    assert reward.length_groups([7, 7, 7], 4) == [[0, 1, 2]]  # nothing to save: one forward
    assert reward.length_groups([3, 9, 4, 10], 2) == [[0, 2], [1, 3]]  # 26 + 20 tokens, not 40 + 10
    assert reward.length_groups([3, 10, 10, 10], 2) == [[0, 1, 2, 3]]  # a cut would save 7 padded tokens, < 10
    assert reward.length_groups([], 4) == [] and reward.length_groups([5], 4) == [[0]]
    with pytest.raises(ValueError):
        reward.length_groups([1, 2], 0)


@pytest.mark.parametrize("share", [False, True])
def test_pairs_scored_in_length_groups_match_one_forward(assets, share):
    """grouped_pair_rewards gives the scores (in the pairs' order) and gradients of pair_rewards on all pairs in
    one forward, with the shared prefix (pairs grouped whole) and without (texts grouped one by one), while it runs
    one forward per group of similar lengths (counted: else this compares a path with itself) and computes fewer
    tokens."""
    tok = AutoTokenizer.from_pretrained(assets / "policy")
    tok.pad_token = tok.eos_token
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = reward.load_model(reward.Args(model=str(assets / "policy")), tok, CPU).eval()
    rng = random.Random(1)
    words = "the film was great dull long short fun and awful a plot actor".split()
    text = lambda n: "Review: " + " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    pairs = [(tok(text(n))["input_ids"], tok(text(n + rng.randint(-1, 3)))["input_ids"], 0.5 * i)
             for i, n in enumerate([25, 2, 30, 3, 14, 28, 1, 9])]
    # with a shared prefix the pairs are grouped whole (on the longer text); else the texts one by one
    lengths = [max(len(c), len(r)) for c, r, _ in pairs] if share else [len(x) for p in pairs for x in p[:2]]
    n_runs = len(reward.length_groups(lengths, 3))
    assert n_runs > 1
    forwards = []
    model.register_forward_pre_hook(lambda m, a, kw: forwards.append(kw["input_ids"].shape), with_kwargs=True)
    results, tokens = [], []
    for groups in (None, 3):  # None: pair_rewards itself
        model.zero_grad()
        forwards.clear()
        score = partial(reward.grouped_pair_rewards, max_groups=groups) if groups else reward.pair_rewards
        chosen, rejected, margins = score(model, pairs, tok.pad_token_id, CPU, share_prefix=share)
        (0.7 * chosen.sum() - 1.3 * rejected.sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((chosen.detach(), rejected.detach(), margins, grads))
        # with a shared prefix each group's prefix runs outside the model's own forward (the unwrapped base here)
        assert len(forwards) == (n_runs if groups else 1) * (2 if share else 1)
        tokens.append(sum(rows * width for rows, width in forwards))  # real and padding
    assert tokens[1] < 0.8 * tokens[0]
    assert results[1][2].tolist() == [0.5 * i for i in range(len(pairs))]  # the margins, in the pairs' order
    for one, grouped in zip(*results):
        assert one.shape == grouped.shape and one.abs().max() > 1e-3
        torch.testing.assert_close(grouped, one, rtol=1e-4, atol=1e-5)


# Other decoder families, random and tiny (heads of 16 dims): how their blocks name and build the MLP varies
ARCHITECTURES = {
    "qwen2": dict(intermediate_size=128, num_key_value_heads=2),
    "qwen2_moe": dict(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      num_experts=4, num_experts_per_tok=2, num_key_value_heads=2),  # a routed MLP
    "mistral": dict(intermediate_size=128, num_key_value_heads=2),
    "gemma2": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16),  # a norm after the MLP
    "phi3": dict(intermediate_size=128, num_key_value_heads=2),
    "gpt_neox": dict(intermediate_size=128),
    "falcon": dict(),  # attention and MLP in parallel
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),  # no `mlp` module: runs whole
}


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_trimmed_last_block_and_shared_prefix_across_decoder_families(assets, model_type):
    """The two exact shortcuts on other decoder families: scores and gradients as reading whole texts plainly."""
    tok = AutoTokenizer.from_pretrained(assets / "policy")
    tok.pad_token = tok.eos_token
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_labels=1, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, **ARCHITECTURES[model_type])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config).eval()
    last_mlp = reward.last_block_mlp(model)
    assert reward.causal(model) and (last_mlp is None) == (model_type == "opt")
    prompt = "Review: this film was"
    texts = [(prompt + " great fun and I loved it", prompt + " dull."),
             (prompt + " ok", prompt + " terrible, awful and a waste of time" + tok.eos_token)]
    pairs = [(tok(c)["input_ids"], tok(r)["input_ids"], 0.0) for c, r in texts]
    cached, mlp_widths = [], []
    model.register_forward_pre_hook(lambda m, a, kw: cached.append(kw.get("past_key_values") is not None),
                                    with_kwargs=True)
    if last_mlp is not None:
        last_mlp.register_forward_hook(lambda m, a, out: mlp_widths.append(a[0].shape[1]))
    results = {}
    for share, trim in ((False, False), (False, True), (True, True)):
        model.zero_grad()
        chosen, rejected, _ = reward.pair_rewards(model, pairs, tok.pad_token_id, CPU, share_prefix=share,
                                                  last_mlp=last_mlp if trim else None)
        (0.7 * chosen.sum() - 1.3 * rejected.sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[share, trim] = (torch.cat([chosen, rejected]).detach(), grads)
    assert cached == [False, False, False, True]  # the last: the continuations after the prompts' cache
    if last_mlp is not None:  # plain: every position; trimmed: one per text, and none over the prompts
        assert mlp_widths == [max(len(x) for c, r, _ in pairs for x in (c, r)), 1, 0, 1]
    for key in ((False, True), (True, True)):
        for plain, fast in zip(results[False, False], results[key]):
            assert plain.abs().max() > 1e-3
            torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_last_block_mlp_is_none_for_encoders(assets):
    """ModernBERT's blocks have an `mlp` too, but every token also reads the tokens after it."""
    config = AutoConfig.for_model("modernbert", vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_labels=1, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    encoder = AutoModelForSequenceClassification.from_config(config)
    assert hasattr(encoder.model.layers[-1], "mlp") and reward.last_block_mlp(encoder) is None


def test_mlp_only_at_runs_the_mlp_at_the_given_positions_only():
    torch.manual_seed(0)
    mlp, x = torch.nn.Linear(4, 4), torch.randn(2, 5, 4, requires_grad=True)
    with reward.mlp_only_at(mlp, torch.tensor([[4], [2]])):
        y = mlp(x)
    expected = torch.zeros(2, 5, 4)
    expected[0, 4], expected[1, 2] = mlp(x[0, 4]), mlp(x[1, 2])
    torch.testing.assert_close(y, expected)
    y.sum().backward()  # the gradient reaches the input at those positions only
    assert x.grad[0, 4].abs().sum() > 0 and x.grad[0, :4].abs().sum() == 0 and x.grad[1, 2].abs().sum() > 0
    assert mlp(x).shape == (2, 5, 4)  # the hooks are gone


def test_shortcuts_a_model_does_not_fit_are_found_before_training(assets, tmp_path):
    """An MLP called with more than the hidden states or returning more than a tensor raises inside mlp_only_at (a
    TypeError, which shortcut_problem reports); one that mixes positions gives other scores; CTRL's classifier returns
    no cache to share. shortcut_problem (run once before training, on pairs built as main builds them) names these
    problems, and finds none with GPT-2."""

    class Tupled(torch.nn.Module):  # e.g. GPT-OSS's MLP: (hidden states, router scores)
        def forward(self, hidden):
            return hidden, None

    tupled = Tupled()
    with pytest.raises(TypeError, match="returns a tuple"), reward.mlp_only_at(tupled, torch.zeros(1, 1).long()):
        tupled(torch.zeros(1, 3, 2))
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="not called as mlp"), reward.mlp_only_at(lin, torch.zeros(1, 1).long()):
        lin(input=torch.zeros(1, 3, 2))

    tok = AutoTokenizer.from_pretrained(assets / "policy")
    tok.pad_token = tok.eos_token
    model = reward.load_model(reward.Args(model=str(assets / "policy")), tok, CPU, verbose=False)
    texts = [tok(t)["input_ids"] for t in ("A fine film.", "A long, slow and dull film with a good end.")]
    probe = [(c, c[: len(c) // 2] + c[len(c) // 2 :][::-1], 0.0) for c in texts]  # as main builds it
    cached = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: cached.append(kw.get("past_key_values") is not None),
                                           with_kwargs=True)
    assert reward.shortcut_problem(model, probe, tok.pad_token_id, CPU, share_prefix=True) is None
    assert cached == [False, False, True]  # the probe took the shared path
    hook.remove()
    assert reward.shortcut_problem(model, probe, tok.pad_token_id, CPU, last_mlp=reward.last_block_mlp(model)) is None
    assert model.training  # left as it was found

    class Mixing(torch.nn.Module):  # each position also reads the mean over all positions
        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

        def forward(self, hidden):
            return self.mlp(hidden) + hidden.mean(1, keepdim=True)

    block = model.transformer.h[-1]
    block.mlp = Mixing(block.mlp)
    problem = reward.shortcut_problem(model, probe, tok.pad_token_id, CPU, last_mlp=block.mlp)
    assert problem.startswith("scores differ")

    config = AutoConfig.for_model("ctrl", vocab_size=len(tok), n_embd=64, dff=128, n_layer=2, n_head=4, num_labels=1,
                                  pad_token_id=tok.pad_token_id)
    ctrl = AutoModelForSequenceClassification.from_config(config)
    assert reward.causal(ctrl)
    problem = reward.shortcut_problem(ctrl, probe, tok.pad_token_id, CPU, share_prefix=True)
    assert problem.startswith("AttributeError") and "past_key_values" in problem


def test_encoders_and_pairs_without_a_common_start_read_whole_texts(assets):
    """An encoder's tokens also read the tokens after them: no prefix can be read alone. Pairs that share no
    token, or whose padded shapes would not shrink, are read whole too."""
    tok = AutoTokenizer.from_pretrained(assets / "policy")
    tok.pad_token = tok.eos_token
    gpt2 = reward.load_model(reward.Args(model=str(assets / "policy")), tok, CPU).eval()
    encoder = reward.load_model(reward.Args(model=str(assets / "reward")), tok, CPU, verbose=False)
    assert reward.causal(gpt2) and not reward.causal(encoder)
    cached = []
    gpt2.register_forward_pre_hook(lambda m, a, kw: cached.append(kw.get("past_key_values") is not None),
                                   with_kwargs=True)
    unshared = [(tok("Great film.")["input_ids"], tok("Bad film.")["input_ids"], 0.0),
                (tok("Q: yes")["input_ids"], tok("Q: no")["input_ids"], 0.0)]  # one pair shares nothing
    # a long common start in one pair, one token in a longer pair: max prefix + 2 x max continuation > 2 x max text
    question = "Q: what is two plus two? A:"
    uneven = [(tok(question + " four")["input_ids"], tok(question + " five")["input_ids"], 0.0),
              (tok("A good, long and moving film with a fine cast")["input_ids"],
               tok("A bad one, slow and dull from start to end")["input_ids"], 0.0)]
    with torch.no_grad():
        for pairs in (unshared, uneven):
            reward.pair_rewards(gpt2, pairs, tok.pad_token_id, CPU, share_prefix=True)
    assert cached == [False, False]


# ---------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------
def test_cli_run_saves_a_reward_model_that_ppo_uses(assets, tmp_path, pairs_file):
    out = tmp_path / "rm"
    proc = run_script("reward.py", "--model", assets / "reward", "--dataset", pairs_file, "--output-dir", out,
                      "--max-steps", 3, "--batch-size", 4, "--gradient-accumulation-steps", 2, "--max-seq-length", 64,
                      "--learning-rate", 1e-3, "--eval-fraction", 0.2, "--center-rewards-coefficient", 0.01)
    assert "done: reward model in" in proc.stdout and "fresh 1-output head" in proc.stdout
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3] and "eval/accuracy" in metrics[-1]
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()  # plain transformers, one output
    assert model.config.num_labels == 1
    # ppo.py reads logits[:, 0] of a 1-label model: the same score as training computes
    tok = AutoTokenizer.from_pretrained(out)
    texts = ["A wonderful, moving film.", "Awful. " * 40]
    assert utils.rewards.reward_label_index(model.config, "0") == 0
    scores = utils.rewards.score_with_model(model, tok, texts, 0, 2, CPU)
    ids = [tok(t, truncation=True, max_length=64)["input_ids"] for t in texts]
    with torch.no_grad():
        ours, _, _ = reward.pair_rewards(model, [(ids[0], ids[1], 0.0)], tok.pad_token_id, CPU)
    assert scores[0].item() == pytest.approx(ours.item(), abs=1e-5)
    # and a short PPO run takes it as its reward model
    run_script("ppo.py", "--model", assets / "policy", "--reward-model", out, "--reward-label", "0",
               "--dataset", assets / "prompts.jsonl", "--output-dir", tmp_path / "ppo", "--total-episodes", 8,
               "--batch-size", 8, "--mini-batch-size", 8, "--response-length", 4, "--ppo-epochs", 1)


def test_help_reads_well():
    proc = run_script("reward.py", "--help")
    for flag in ("--center-rewards-coefficient", "--truncation-side", "--lora-r", "--merge-lora", "--eval-split",
                 "--max-seq-length", "--gradient-accumulation-steps", "--resume"):
        assert flag in proc.stdout
    assert "--num-steps" not in proc.stdout and "--micro-batch-size" not in proc.stdout
    assert "--world-size" not in proc.stdout and "--local-batch-size" not in proc.stdout
    assert "over all processes" in proc.stdout  # --batch-size is the global batch under torchrun


def test_lora_on_a_gpt2_backbone_merges_with_its_trained_head(assets, tmp_path, pairs_file):
    reward.main(tiny_args(assets, tmp_path, pairs_file, model=str(assets / "policy"), lora_r=4,
                          lora_target_modules=["c_attn"], learning_rate=1e-2, max_steps=2, gradient_checkpointing=True))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run")  # merged: no peft needed
    tok = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id == tok.eos_token_id
    assert tok.truncation_side == "left"  # saved, so ppo.py truncates long texts the same way
    fresh = reward.load_model(reward.Args(model=str(assets / "policy"), seed=3), tok, CPU)
    assert not torch.equal(model.score.weight, fresh.score.weight)  # the head was trained and saved


def test_dropout_is_off_by_default_and_lora_keeps_its_own(assets):
    """--disable-dropout (default, as TRL's RewardTrainer): the model's dropout is off, so a training-mode forward
    gives the scores of evaluation; --no-disable-dropout keeps the config's (0.1 in the tiny GPT-2), and the LoRA
    branch keeps --lora-dropout either way."""
    tok = AutoTokenizer.from_pretrained(assets / "policy")
    tok.pad_token = tok.eos_token
    pairs = [(tok("A fine film, well acted.")["input_ids"], tok("Dull.")["input_ids"], 0.0)] * 4

    def load(**kw):
        torch.manual_seed(0)
        return reward.load_model(reward.Args(model=str(assets / "policy"), **kw), tok, CPU, verbose=False)

    def dropouts(model, lora: bool):
        return {m.p for name, m in model.named_modules()
                if isinstance(m, torch.nn.Dropout) and ("lora_dropout" in name) == lora}

    def scores(model, train: bool):
        model.train(train)
        return torch.cat(reward.pair_rewards(model, pairs, tok.pad_token_id, CPU)[:2])

    off, on = load(), load(disable_dropout=False)
    assert dropouts(off, lora=False) == {0.0} and dropouts(on, lora=False) == {0.1}
    evaluation = scores(off, train=False)
    assert torch.equal(scores(on, train=False), evaluation)  # same weights (same seed): only dropout differs
    assert torch.allclose(scores(off, train=True), evaluation)
    assert not torch.allclose(scores(on, train=True), evaluation)
    assert dropouts(load(lora_r=2, lora_dropout=0.05), lora=True) == {0.05}


def test_resuming_a_run_saved_before_disable_dropout_keeps_its_dropout(assets, tmp_path, pairs_file):
    """A run saved before --disable-dropout existed (its args.json lacks it) trained with dropout on: resuming it with
    today's default would turn dropout off halfway, so it is refused, naming the flag; with the run's own setting it
    resumes."""
    reward.main(tiny_args(assets, tmp_path, pairs_file, max_steps=2, disable_dropout=False))
    args_json = tmp_path / "run" / "args.json"
    args_json.write_text(json.dumps({k: v for k, v in json.loads(args_json.read_text()).items()
                                     if k != "disable_dropout"}))  # as saved before the flag
    with pytest.raises(reward.UserError, match="--resume with flags that change the result: --disable-dropout "
                                               "False -> True"):
        reward.main(tiny_args(assets, tmp_path, pairs_file, max_steps=4, resume=True))
    reward.main(tiny_args(assets, tmp_path, pairs_file, max_steps=4, resume=True, disable_dropout=False))
    assert [json.loads(row)["step"] for row in open(tmp_path / "run" / "metrics.jsonl")][-1] == 4


def test_resume_after_a_crash_continues_exactly(assets, tmp_path, pairs_file, monkeypatch):
    reward.main(tiny_args(assets, tmp_path / "whole", pairs_file))
    real_save = reward.save_checkpoint

    def save_then_crash(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(reward, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        reward.main(tiny_args(assets, tmp_path / "crash", pairs_file))
    monkeypatch.setattr(reward, "save_checkpoint", real_save)
    reward.main(tiny_args(assets, tmp_path / "crash", pairs_file, resume=True))
    whole = [json.loads(row) for row in open(tmp_path / "whole" / "run" / "metrics.jsonl")]
    resumed = [json.loads(row) for row in open(tmp_path / "crash" / "run" / "metrics.jsonl")]
    keys = ("step", "losses/loss", "eval/accuracy", "eval/loss", "charts/learning_rate")
    assert [[m.get(k) for k in keys] for m in resumed] == [[m.get(k) for k in keys] for m in whole]
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "whole" / "run").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "crash" / "run").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------
# Under torchrun: 2 CPU processes (gloo) against one process with the same global batch
# ---------------------------------------------------------------------------------------------------------
def test_check_args_splits_the_batch_over_processes():
    args = reward.check_args(reward.Args(batch_size=8, gradient_accumulation_steps=2), world_size=2)
    assert (args.world_size, args.local_batch_size, args.micro_batch_size) == (2, 4, 2)
    with pytest.raises(UserError, match=r"--batch-size / processes \(torchrun --nproc_per_node\): 6 .* by 4"):
        reward.check_args(reward.Args(batch_size=6), world_size=4)


@pytest.fixture(scope="module")
def ddp_runs(assets, pairs_file, tmp_path_factory):
    """The tiny GPT-2 backbone (dropout off, reward.py's default: else each process draws its own masks), 6 steps
    of 8 pairs at a constant learning rate in one process ("one"); the same in 2 processes for 4 steps, then resumed
    in one process for 2 more ("two"). Micro-batches of 4 pairs in both, so each micro-batch holds the same pairs,
    padded alike: the forward passes are the same, only the order of the gradient sums differs (DDP's all-reduce vs
    accumulation). Texts are cut on the right, so a pair keeps its shared prompt, "Review: ", and is read through
    the prompt's cache: under DDP the prompt's forward runs outside the wrapper. Every fourth pair has no prompt, so
    a micro-batch holding one reads whole texts. The texts are cut to 4-40 words, so some micro-batches mix lengths
    enough to be scored in two forwards (--length-groups: whole pairs where all share a prompt, else texts one by
    one), the first also outside the wrapper. Returns (torchrun's CompletedProcess, the two output folders)."""
    tmp = tmp_path_factory.mktemp("ddp")
    rng, data = random.Random(0), tmp / "pairs.jsonl"
    cut = lambda text, n: " ".join(text.split()[:n])  # noqa: E731
    rows = [{**p, "chosen": cut(p["chosen"], n), "rejected": cut(p["rejected"], n)}  # both alike
            for p, n in ((p, rng.randint(4, 40)) for p in read_jsonl(pairs_file))]
    write_jsonl(data, [{k: v for k, v in row.items() if k != "prompt" or i % 4} for i, row in enumerate(rows)])
    model = assets / "policy"
    common = dict(model=str(model), dataset=str(data), batch_size=8, max_seq_length=64, learning_rate=3e-3,
                  lr_scheduler="constant", eval_fraction=0.2, eval_every=2, save_every=2, seed=3,
                  center_rewards_coefficient=0.01, truncation_side="right")
    tok = AutoTokenizer.from_pretrained(model)
    tok.pad_token, tok.truncation_side = tok.eos_token, "right"
    train, _ = reward.load_pairs(reward.Args(**common), tok, 64, verbose=False)
    # a pair with the prompt shares its 4 tokens (a few more where the reviews start alike), so a micro-batch of
    # such pairs, longest text W, reads <= max shared + 2 x (W - 4) < 2 x W token positions through the cache
    shared = [reward.shared_prefix_length(c, r, tok.pad_token_id) for c, r, _ in train]
    assert max(shared) < 8 and 0 < sum(n == 0 for n in shared) < len(shared) / 3
    # the 2-process steps (0-3) hold micro-batches scored in two forwards, on both paths: P (whole pairs read
    # through their prompt's cache) and T (texts one by one)
    paths = []
    for step in range(4):
        for j in (0, 4):
            mb = [train[i] for i in batch_indices(step, 8, len(train), 3, 0, 1)[j : j + 4]]
            share = all(reward.shared_prefix_length(c, r, tok.pad_token_id) for c, r, _ in mb)
            lengths = [max(len(c), len(r)) for c, r, _ in mb] if share else [len(x) for p in mb for x in p[:2]]
            paths.append(("P" if share else "T") + str(len(reward.length_groups(lengths, 4))))
    assert "P2" in paths and "T2" in paths, paths
    reward.main(reward.Args(**common, output_dir=str(tmp / "one"), max_steps=6, gradient_accumulation_steps=2))
    flags = [x for k, v in common.items() for x in (f"--{k.replace('_', '-')}", v)]
    proc = torchrun(ROOT / "reward.py", *flags, "--output-dir", tmp / "two", "--max-steps", 4,
                    "--gradient-accumulation-steps", 1)
    reward.main(reward.Args(**common, output_dir=str(tmp / "two"), max_steps=6, gradient_accumulation_steps=2,
                            resume=True))
    return proc, tmp / "one", tmp / "two"


# Both runs add the same float32 numbers in another order; Adam carries the rounding (~1e-7 relative) over the
# steps. Seen here: at most 1.7e-6 on losses and rewards, 1.4e-5 on the gradient norm (1-7, clipped to 1). A wrong
# share of the batch, unreduced statistics, or gradients not synchronised or summed rather than averaged over the
# processes moved them by 2e-3 to 2 (each tried).
TOLERANCE = dict(rel=1e-4, abs=1e-4)
COMPARED = ("step", "losses/loss", "losses/grad_norm", "objective/accuracy", "objective/reward_gap",
            "objective/reward_mean", "charts/learning_rate", "eval/loss", "eval/accuracy", "eval/reward_gap",
            "eval/reward_mean")


def assert_close(a: dict, b: dict):
    """The COMPARED metrics of two steps agree within TOLERANCE; evaluation metrics exist on evaluation steps only
    (pytest.approx(None) is an error in newer pytest, so a missing one is compared as missing)."""
    for key in COMPARED:
        assert (key in a) == (key in b), (a["step"], key)
        if key in a:
            assert b[key] == pytest.approx(a[key], **TOLERANCE), (a["step"], key)


def read_metrics(out_dir):
    return [json.loads(line) for line in open(out_dir / "metrics.jsonl")]


def test_two_processes_train_like_one_with_the_same_global_batch(ddp_runs):
    proc, one, two = ddp_runs
    # only rank 0 prints and writes: one header, one report per evaluation, one line per step
    assert proc.stdout.count("reward model: 4 steps x 8 pairs on 2 x cpu") == 1
    assert proc.stdout.count("step     2 |") == 1 and proc.stdout.count("done: reward model in") == 1
    assert proc.stderr.count("training texts were longer") == 1
    single, multi = read_metrics(one)[:5], read_metrics(two)[:5]  # steps 0-4 came from the 2-process run
    assert [m["step"] for m in multi] == [0, 1, 2, 3, 4]
    # the curve is worth comparing: the loss moves over the compared steps, and the run learns (by its step 6)
    losses = [m["losses/loss"] for m in read_metrics(one)[1:]]
    assert max(losses[:4]) - min(losses[:4]) > 0.02 and losses[-1] < losses[0] - 0.1
    for a, b in zip(single, multi):
        assert set(a) == set(b)
        assert_close(a, b)


def test_two_process_run_resumes_in_one_process(ddp_runs):
    _, one, two = ddp_runs
    single, resumed = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in resumed] == [0, 1, 2, 3, 4, 5, 6]
    for a, b in zip(single[5:], resumed[5:]):  # the steps done after the resume, in one process
        assert_close(a, b)
    # (The final eval above compares what the two models compute. Their weights are not compared: parameters with
    # no gradient in exact arithmetic, like the attention key bias, get rounding noise, which Adam scales up to
    # steps of +-learning rate.)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------
def test_missing_columns_fail_with_one_clear_line(assets, tmp_path):
    write_jsonl(tmp_path / "wrong.jsonl", [{"chosen": "good", "worse": "bad"}])
    proc = run_script("reward.py", "--model", assets / "reward", "--dataset", tmp_path / "wrong.jsonl",
                      "--output-dir", tmp_path / "run", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --dataset needs the columns 'chosen' and 'rejected' (optional: 'prompt', 'margin'); "
        "missing ['rejected'], found ['chosen', 'worse']")


def test_empty_and_all_identical_datasets(assets, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        reward.main(reward.Args(model=str(assets / "reward"), dataset=str(tmp_path / "empty.jsonl")))
    write_jsonl(tmp_path / "same.jsonl", [{"chosen": "same text", "rejected": "same text"}] * 5)
    with pytest.raises(UserError, match="no training pair is left"):
        reward.main(reward.Args(model=str(assets / "reward"), dataset=str(tmp_path / "same.jsonl"),
                                output_dir=str(tmp_path / "run")))


# ---------------------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_reward_model_learns_sentiment_preferences(assets, tmp_path, one_thread):
    """The pretrained MiniLM encoder with a fresh one-output head, trained on 128 pairs (a positive IMDB review
    chosen over a negative one; short reviews, read whole), ranks held-out pairs right >= 85% of the time (~91%
    here). A broken loss (e.g. the wrong sign) ranks them wrong instead."""
    seed = learning_seed(1)  # a seed sweep varies the training pairs too (seed 1: the pairs of seed 0)
    write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(imdb("train", assets), 128, seed=seed - 1, max_words=100))
    write_jsonl(tmp_path / "test.jsonl", sentiment_pairs(imdb("test", assets), 140, seed=0, max_words=100))
    args = reward.Args(model=str(assets / "minilm"), dataset=str(tmp_path / "train.jsonl"),
                       eval_dataset=str(tmp_path / "test.jsonl"), output_dir=str(tmp_path / "run"), max_steps=16,
                       batch_size=8, learning_rate=1e-4, lr_scheduler="constant", max_seq_length=128, eval_every=0,
                       save_every=1000, seed=seed)
    metrics = [json.loads(row) for row in open(reward.main(args))]
    start, end = metrics[0], metrics[-1]
    record_learning("reward_eval_accuracy", end["eval/accuracy"], 0.85)
    assert end["eval/accuracy"] >= 0.85, (start["eval/accuracy"], end["eval/accuracy"])
    assert end["eval/reward_gap"] > start["eval/reward_gap"]
