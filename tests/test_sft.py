"""sft.py: loss masks, packing, the loss and schedule against hand-computed values, end-to-end runs, resume,
bad input, and a learning test."""

import json
import math

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import reward
import sft
from conftest import learning_seed, record_learning, run_script, torchrun
from utils.assets import read_jsonl, write_jsonl
from utils.hub import UserError


@pytest.fixture(scope="module")
def tokenizer(assets):
    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    tok.pad_token = tok.eos_token  # as sft.py does: pad == EOS
    return tok


@pytest.fixture
def one_thread():
    """Pin torch to one thread for a learning test. On a CPU shared with other jobs, OpenMP threads spin-wait
    for each other: two threads were 2-8x slower than one on our 2-core machine under load (and ~1.5x faster
    when idle), so one thread keeps the test's time predictable. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def targets_of(example):
    """The token ids that carry loss in one tokenized example."""
    ids, labels = example
    return [t for t, label in zip(ids, labels) if label != -100]


def tiny_args(assets, tmp_path, data, **overrides):
    fields = dict(model=str(assets / "policy"), dataset=str(data), output_dir=str(tmp_path / "run"), max_steps=4,
                  batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3, max_seq_length=64, eval_every=2,
                  save_every=2, seed=3)
    fields.update(overrides)
    return sft.Args(**fields)


@pytest.fixture(scope="module")
def reviews(assets, tmp_path_factory):
    """60 IMDB reviews as a plain-text jsonl file."""
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    write_jsonl(path, read_jsonl(assets / "imdb" / "train.jsonl")[:60])
    return path


# ---------------------------------------------------------------------------------------------------------
# Loss masks
# ---------------------------------------------------------------------------------------------------------
def test_text_loss_on_every_token_and_eos_kept_when_pad_is_eos(tokenizer):
    ds = datasets.Dataset.from_list([{"text": "A fine film."}])
    (example,), n_truncated, n_dropped = sft.tokenize(ds, "text", "text", tokenizer, 64, completion_only=True)
    ids, labels = example
    assert ids[-1] == tokenizer.eos_token_id == tokenizer.pad_token_id
    assert labels[0] == -100 and labels[1:] == ids[1:]  # the first token is never predicted; EOS is a target
    # padded into a batch, the padding carries no loss but the real EOS still does
    _, batch_labels = sft.collate([example, (ids + ids, labels + labels)], tokenizer.pad_token_id, "cpu")
    assert batch_labels[0, len(ids) - 1] == tokenizer.eos_token_id
    assert (batch_labels[0, len(ids):] == -100).all()
    assert (n_truncated, n_dropped) == (0, 0)


def test_prompt_completion_mask(tokenizer):
    ds = datasets.Dataset.from_list([{"prompt": "Review: the plot", "completion": " was dull and slow."}])
    (example,), _, _ = sft.tokenize(ds, "prompt_completion", "text", tokenizer, 64, completion_only=True)
    assert tokenizer.decode(targets_of(example)) == " was dull and slow.<|endoftext|>"
    ids, labels = example
    prompt_len = len(tokenizer("Review: the plot")["input_ids"])
    assert all(label == -100 for label in labels[:prompt_len])
    # without the completion-only loss every token but the first is a target
    (example,), _, _ = sft.tokenize(ds, "prompt_completion", "text", tokenizer, 64, completion_only=False)
    assert targets_of(example) == example[0][1:]


def test_chat_mask_covers_assistant_turns_with_their_end_of_turn(tokenizer):
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = sft.ZEPHYR_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Rate Alien."},
                {"role": "assistant", "content": "Nine out of ten."}]
    ds = datasets.Dataset.from_list([{"messages": messages}])
    (example,), _, _ = sft.tokenize(ds, "messages", "text", tok, 256, completion_only=True)
    ids, labels = example
    spans, current = [], []  # contiguous runs of target tokens
    for t, label in zip(ids, labels):
        if label != -100:
            current.append(t)
        elif current:
            spans, current = spans + [current], []
    spans += [current] if current else []
    assert [tok.decode(s) for s in spans] == ["Hello there.<|endoftext|>\n", "Nine out of ten.<|endoftext|>\n"]
    assert tok.decode(ids).startswith("<|system|>\nBe brief.<|endoftext|>\n<|user|>\nHi")


def test_truncation_is_counted_and_drops_eos(tokenizer):
    long_text = "the film " * 100
    ds = datasets.Dataset.from_list([{"text": long_text}, {"text": "short"}, {"text": ""}])
    examples, n_truncated, n_dropped = sft.tokenize(ds, "text", "text", tokenizer, 16, completion_only=False)
    assert (n_truncated, n_dropped) == (1, 1)  # the empty text has nothing to learn
    assert len(examples[0][0]) == 16 and examples[0][0][-1] != tokenizer.eos_token_id  # the document did not end
    # a prompt longer than the limit leaves no completion token: dropped, not a crash
    ds = datasets.Dataset.from_list([{"prompt": long_text, "completion": " yes"}])
    examples, n_truncated, n_dropped = sft.tokenize(ds, "prompt_completion", "text", tokenizer, 16, True)
    assert (examples, n_truncated, n_dropped) == ([], 1, 1)


def test_detect_format_names_expected_and_found_columns():
    assert sft.detect_format(["text", "label"], "auto", "text") == "text"
    assert sft.detect_format(["prompt", "completion", "text"], "auto", "text") == "prompt_completion"
    assert sft.detect_format(["messages", "text"], "auto", "text") == "messages"
    with pytest.raises(UserError, match=r"expected 'review'.*found \['text', 'label'\]"):
        sft.detect_format(["text", "label"], "auto", "review")
    with pytest.raises(UserError, match=r"missing \['completion'\]"):
        sft.detect_format(["prompt", "text"], "prompt_completion", "text")


# ---------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------
def test_packing_best_fit_keeps_examples_whole_with_restarting_positions():
    examples = [([i] * n, [-100] + [i] * (n - 1)) for i, n in enumerate([5, 3, 4, 2], start=1)]
    blocks = sft.pack(examples, max_len=8)
    # best-fit decreasing: 5 opens a block, 4 opens a second, 3 fits the first exactly, 2 goes with the 4
    assert [ids for ids, _, _ in blocks] == [[1] * 5 + [2] * 3, [3] * 4 + [4] * 2]
    assert [pos for _, _, pos in blocks] == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1]]
    assert blocks[0][1] == [-100, 1, 1, 1, 1, -100, 2, 2]  # no loss across a boundary
    inputs, labels = sft.collate(blocks, pad_id=0, device="cpu")
    assert "attention_mask" not in inputs  # transformers builds the per-example mask from the positions
    assert inputs["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1, 0, 1]  # the padding tail is its own segment
    assert labels[1, 6:].tolist() == [-100, -100]


def test_packed_loss_equals_unpacked_loss_no_attention_leak(assets, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(assets / "policy").eval()
    assert sft.packing_isolates_examples(model, torch.device("cpu"))
    texts = ["A fine film.", "Dull, long and loud; I left early.", "Great cast.", "The worst sequel of the year."]
    examples, _, _ = sft.tokenize(datasets.Dataset.from_list([{"text": t} for t in texts]), "text", "text",
                                  tokenizer, 64, completion_only=False)
    with torch.no_grad():
        inputs, labels = sft.collate(examples, tokenizer.pad_token_id, "cpu")
        unpacked, n_unpacked = sft.lm_loss(model(**inputs).logits, labels)
        inputs, labels = sft.collate(sft.pack(examples, 24), tokenizer.pad_token_id, "cpu")
        assert inputs["input_ids"].shape[0] < len(examples)  # really packed
        packed, n_packed = sft.lm_loss(model(**inputs, use_cache=False).logits, labels)
    assert n_packed == n_unpacked
    assert packed.item() == pytest.approx(unpacked.item(), rel=1e-5)


def test_leak_probe_catches_a_model_that_ignores_position_ids(assets):
    class IgnoresPositions(torch.nn.Module):  # e.g. an architecture without packed-sequence support
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, position_ids=None, **kwargs):
            return self.lm(input_ids=input_ids, **kwargs)

    model = IgnoresPositions(AutoModelForCausalLM.from_pretrained(assets / "policy"))
    assert not sft.packing_isolates_examples(model, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------
# Loss and schedule against hand-computed values
# ---------------------------------------------------------------------------------------------------------
def test_lm_loss_hand_computed():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # [1, 3, vocab 2]
    labels = torch.tensor([[-100, 0, 1]])  # position 0 predicts token 0, position 1 predicts token 1
    nll, count = sft.lm_loss(logits, labels)
    expected = -math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.e / (1 + math.e))
    assert count.item() == 2 and nll.item() == pytest.approx(expected, rel=1e-6)
    nll, count = sft.lm_loss(logits, torch.tensor([[-100, -100, 1]]))  # masked targets cost nothing
    assert count.item() == 1 and nll.item() == pytest.approx(-math.log(math.e / (1 + math.e)), rel=1e-6)


def test_lm_loss_matches_transformers_loss(assets):
    model = AutoModelForCausalLM.from_pretrained(assets / "policy").eval()
    ids = torch.tensor([[5, 9, 200, 31, 7, 0]])
    labels = ids.clone()
    labels[0, :2] = -100
    out = model(input_ids=ids, labels=labels)
    nll, count = sft.lm_loss(out.logits, labels)
    assert (nll / count).item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_chunked_loss_equals_the_plain_loss_and_its_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3], labels[2, 5] = -100, -100  # prompt-like masked targets, and a lone one
    nll, count = sft.lm_loss(hidden @ weight.T, labels)
    grads = torch.autograd.grad(nll * 0.3, (hidden, weight))  # scaled, as the training loop does
    for chunk in (1, 4, 5, 100):  # a chunk boundary inside a row, rows split unevenly, one chunk
        chunked, chunked_count = sft.chunked_lm_loss(hidden, weight, labels, chunk)
        assert chunked_count == count == 15
        assert chunked.item() == pytest.approx(nll.item(), rel=1e-6)
        for g, cg in zip(grads, torch.autograd.grad(chunked * 0.3, (hidden, weight))):
            torch.testing.assert_close(cg, g, rtol=1e-5, atol=1e-6)
    hidden_only = torch.autograd.grad(sft.chunked_lm_loss(hidden, weight.detach(), labels, 4)[0], hidden)[0]
    torch.testing.assert_close(hidden_only, grads[0] / 0.3, rtol=1e-5, atol=1e-6)  # frozen head (LoRA)


def test_chunked_loss_is_used_only_where_it_reproduces_the_logits(assets, tokenizer):
    from utils.models import lm_head_weight

    model = AutoModelForCausalLM.from_pretrained(assets / "policy")
    inputs = {"input_ids": torch.tensor([[5, 9, 200, 31]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert lm_head_weight(model, inputs, fsdp=False) is model.lm_head.weight
    texts = ["A fine film.", "Dull, long and loud; I left early.", "Great cast."]
    examples, _, _ = sft.tokenize(datasets.Dataset.from_list([{"text": t} for t in texts]), "text", "text",
                                  tokenizer, 64, completion_only=False)
    cpu = torch.device("cpu")
    plain = sft.evaluate(model, examples, 2, tokenizer.pad_token_id, cpu)
    chunked = sft.evaluate(model, examples, 2, tokenizer.pad_token_id, cpu, head_weight=model.lm_head.weight, chunk=5)
    assert chunked["eval/loss"] == pytest.approx(plain["eval/loss"], rel=1e-6)
    assert lm_head_weight(model, inputs, fsdp=True) is None

    class ScaledLogits(torch.nn.Module):  # a model that scales its logits after the head (as Cohere's do)
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def get_output_embeddings(self):
            return self.lm.lm_head

        def forward(self, **kwargs):
            out = self.lm(**kwargs)
            out.logits = out.logits * 2.0
            return out

    assert lm_head_weight(ScaledLogits(model), inputs, fsdp=False) is None


def test_learning_rate_schedule_hand_computed():

    def lr(step, schedule):
        return sft.learning_rate_at(step, 10, 2, 1.0, schedule)

    assert [lr(0, "cosine"), lr(1, "cosine"), lr(2, "cosine")] == [0.5, 1.0, 1.0]  # warmup, then the peak
    assert lr(6, "cosine") == pytest.approx(0.5)  # half-way through the decay: cos(pi/2) = 0
    assert lr(9, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lr(9, "linear") == pytest.approx(1 / 8)
    assert lr(9, "constant") == 1.0


def test_shared_helpers_are_identical_in_sft_and_reward():
    for name in ("exact_div", "batch_indices", "learning_rate_at", "full_state_dicts", "save_checkpoint",
                 "load_weights", "load_training_state"):  # plumbing: one copy, in utils/
        assert getattr(sft, name) is getattr(reward, name) and getattr(sft, name).__module__.startswith("utils."), name


# ---------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------
def test_cli_run_saves_loadable_model(assets, tmp_path, reviews):
    out = tmp_path / "run"
    proc = run_script("sft.py", "--model", assets / "policy", "--dataset", reviews, "--output-dir", out,
                      "--max-steps", 3, "--batch-size", 4, "--gradient-accumulation-steps", 2, "--max-seq-length", 64,
                      "--learning-rate", 1e-3, "--eval-fraction", 0.1, "--packing", "--warmup-ratio", 0.3)
    assert "done: model in" in proc.stdout and "were truncated" in proc.stderr
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3] and "eval/perplexity" in metrics[-1]
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    initial = AutoModelForCausalLM.from_pretrained(assets / "policy")
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, initial.transformer.h[0].mlp.c_fc.weight)
    assert AutoTokenizer.from_pretrained(out).pad_token == "<|endoftext|>"
    assert (out / "checkpoint" / "training_state.pt").exists()


def test_help_reads_well():
    proc = run_script("sft.py", "--help")
    for flag in ("--dataset-text-field", "--packing", "--completion-only-loss", "--lora-r", "--merge-lora",
                 "--from-scratch", "--config-overrides", "--eval-split", "--gradient-checkpointing", "--resume",
                 "--loss-chunk-size", "--compile"):
        assert flag in proc.stdout
    assert "--num-steps" not in proc.stdout and "--micro-batch-size" not in proc.stdout  # derived, not flags


def test_from_scratch_with_config_overrides(assets, tmp_path, reviews):
    args = tiny_args(assets, tmp_path, reviews, model=str(assets / "policy"), tokenizer=str(assets / "tokenizer"),
                     from_scratch=True, config_overrides=["n_layer=1", "n_embd=32", "n_head=4"], max_steps=1)
    sft.main(args)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (1, 32, 4096)
    with pytest.raises(UserError, match="not_a_field"):
        sft.main(tiny_args(assets, tmp_path / "bad", reviews, from_scratch=True, config_overrides=["not_a_field=1"]))


def test_lora_merged_and_adapter_only(assets, tmp_path, reviews):
    sft.main(tiny_args(assets, tmp_path / "a", reviews, lora_r=4, lora_target_modules=["c_attn"], max_steps=2,
                       learning_rate=1e-2, gradient_checkpointing=True))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "run")  # no peft needed
    initial = AutoModelForCausalLM.from_pretrained(assets / "policy")
    assert not torch.equal(merged.transformer.h[0].attn.c_attn.weight, initial.transformer.h[0].attn.c_attn.weight)
    assert torch.equal(merged.transformer.h[0].mlp.c_fc.weight, initial.transformer.h[0].mlp.c_fc.weight)
    sft.main(tiny_args(assets, tmp_path / "b", reviews, lora_r=4, max_steps=1, merge_lora=False))
    assert (tmp_path / "b" / "run" / "adapter_config.json").exists()


def test_resume_after_a_crash_continues_exactly(assets, tmp_path, reviews, monkeypatch):
    """A run killed after its step-2 checkpoint and resumed == the uninterrupted run: same metrics, same weights."""
    sft.main(tiny_args(assets, tmp_path / "whole", reviews))
    real_save = sft.save_checkpoint

    def save_then_crash(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt  # as if the machine went down right after the checkpoint

    monkeypatch.setattr(sft, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        sft.main(tiny_args(assets, tmp_path / "crash", reviews))
    monkeypatch.setattr(sft, "save_checkpoint", real_save)
    sft.main(tiny_args(assets, tmp_path / "crash", reviews, resume=True))
    whole = [json.loads(row) for row in open(tmp_path / "whole" / "run" / "metrics.jsonl")]
    resumed = [json.loads(row) for row in open(tmp_path / "crash" / "run" / "metrics.jsonl")]
    keys = ("step", "losses/loss", "eval/loss", "charts/learning_rate")
    assert [[m.get(k) for k in keys] for m in resumed] == [[m.get(k) for k in keys] for m in whole]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "run").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "crash" / "run").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------
def test_bad_input_fails_with_one_clear_line(assets, tmp_path):
    write_jsonl(tmp_path / "wrong.jsonl", [{"review": "good", "stars": 5}])
    proc = run_script("sft.py", "--model", assets / "policy", "--dataset", tmp_path / "wrong.jsonl",
                      "--output-dir", tmp_path / "run", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --dataset has none of the columns")
    assert "found ['review', 'stars']" in proc.stderr and "Traceback" not in proc.stderr


def test_empty_dataset_and_chat_without_template(assets, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        sft.main(sft.Args(model=str(assets / "policy"), dataset=str(tmp_path / "empty.jsonl")))
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": "Hello"}]}] * 4)
    with pytest.raises(UserError, match="no chat template.*--chat-template zephyr"):
        sft.main(sft.Args(model=str(assets / "policy"), dataset=str(tmp_path / "chat.jsonl")))
    with pytest.raises(UserError, match="exceeds the model's context of 256"):
        sft.main(sft.Args(model=str(assets / "policy"), dataset=str(tmp_path / "chat.jsonl"), max_seq_length=512))


# ---------------------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sft_drives_held_out_loss_down_on_imdb(assets, tmp_path, one_thread):
    """The tiny random-init GPT-2 trained for 80 steps on IMDB reviews: held-out loss falls from ln 4096 = 8.3
    nats (a uniform guess) to ~6.8 (perplexity / 4.5). A loss with the wrong sign or mask would not get there."""
    write_jsonl(tmp_path / "train.jsonl", read_jsonl(assets / "imdb" / "train.jsonl")[:1000])
    args = sft.Args(model=str(assets / "policy"), dataset=str(tmp_path / "train.jsonl"),
                    eval_dataset=str(assets / "imdb" / "test.jsonl"), max_eval_examples=64,
                    output_dir=str(tmp_path / "run"),
                    max_steps=80, batch_size=16, learning_rate=3e-3, warmup_ratio=0.1, max_seq_length=128,
                    packing=True, eval_every=0, save_every=1000, seed=learning_seed(1))
    metrics = [json.loads(row) for row in open(sft.main(args))]
    start, end = metrics[0]["eval/loss"], metrics[-1]["eval/loss"]
    record_learning("sft_eval_loss_drop", start - end, 1.25)
    assert start > 8.0 and end < start - 1.25, (start, end)


# ---------------------------------------------------------------------------------------------------------
# torchrun: 2 CPU processes (gloo), DDP and FSDP, against one process with the same global batch
# ---------------------------------------------------------------------------------------------------------
NO_DROPOUT = ["--from-scratch", "--config-overrides", "n_layer=2", "n_embd=64", "n_head=4", "resid_pdrop=0",
              "embd_pdrop=0", "attn_pdrop=0"]  # dropout masks differ per process; without it the runs must agree


def distributed_flags(assets, reviews, out, steps):
    return ["--model", assets / "policy", "--dataset", reviews, "--output-dir", out, "--max-steps", steps,
            "--batch-size", 8, "--max-seq-length", 64, "--learning-rate", 1e-2, "--eval-fraction", 0.2,
            "--eval-every", 2, "--save-every", 2, "--seed", 3, *NO_DROPOUT]


def losses(out):
    """Steps logged, and the training and evaluation losses in the order logged."""
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [m["step"] for m in metrics], [m[k] for m in metrics for k in ("losses/loss", "eval/loss") if k in m]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_like_one_and_resume_in_one(assets, tmp_path, reviews, mode):
    """Same global batch of 8 on 1 process and on 2 processes x 4 (DDP with 2 micro-batches each, exercising
    no_sync; or FSDP): the same loss curve (float32 sums in another order: 1e-4) and the same final weights. Then
    the 2-process checkpoint resumes in one process."""
    run_script("sft.py", *distributed_flags(assets, reviews, tmp_path / "one", 4))
    extra = ["--gradient-accumulation-steps", 2] if mode == "ddp" else ["--fsdp"]
    proc = torchrun("sft.py", *distributed_flags(assets, reviews, tmp_path / "two", 4), *extra)
    assert proc.stdout.count("SFT: 4 steps") == 1 and proc.stdout.count("done: model in") == 1  # rank 0 only
    steps, one = losses(tmp_path / "one")
    steps2, two = losses(tmp_path / "two")
    assert steps2 == steps == [0, 1, 2, 3, 4] and len(one) == 4 + 3  # 4 training losses, 3 evaluations
    assert two == pytest.approx(one, abs=1e-4) and one[-1] < one[0] - 0.1, (one, two)  # and it learned something
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    # the checkpoint written by 2 processes resumes in one
    run_script("sft.py", *distributed_flags(assets, reviews, tmp_path / "two", 6), "--resume")
    assert losses(tmp_path / "two")[0] == [0, 1, 2, 3, 4, 5, 6]


def test_fsdp_needs_several_processes_and_no_merge(assets, tmp_path, reviews):
    with pytest.raises(UserError, match="torchrun"):
        sft.check_args(tiny_args(assets, tmp_path, reviews, fsdp=True))
    with pytest.raises(UserError, match="--no-merge-lora"):
        sft.check_args(tiny_args(assets, tmp_path, reviews, fsdp=True, lora_r=4), world_size=2)
    with pytest.raises(UserError, match="processes"):
        sft.check_args(tiny_args(assets, tmp_path, reviews, batch_size=6), world_size=4)
