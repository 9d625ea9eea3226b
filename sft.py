"""Supervised fine-tuning (SFT) of a causal language model, in one file.

The first step of the RLHF recipe (Ouyang et al. 2022, sec. 3.5; Ziegler et al. 2019 sec. 2): maximise the
log-likelihood of demonstrations, token by token. Data is plain text, prompt/completion pairs or chat
conversations (`messages`); with the last two the loss covers only the completion / assistant turns. It also
trains a small model from scratch (--from-scratch), which is how our offline quickstart gets a policy.
Read top to bottom: arguments, data (rendering, tokenization with loss masks, packing), the loss, checkpoints,
and the training loop in `main`.

    python sft.py --model facebook/opt-350m --dataset stanfordnlp/imdb --dataset-text-field text --max-seq-length 512
    python sft.py --model tiny/policy --dataset tiny/imdb/train.jsonl --eval-dataset tiny/imdb/test.jsonl   # offline
    torchrun --nproc_per_node 8 sft.py --model gpt2 ...          # DDP: each process a shard of every batch
    torchrun --nproc_per_node 8 sft.py --model gpt2 --fsdp ...   # FSDP: parameters, gradients, Adam state sharded
"""

import bisect
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
import tyro
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from utils.checkpoints import full_state_dicts, load_training_state, load_weights, save_checkpoint
from utils.data import batch_indices
from utils.distributed import distribute, distributed, finish, init_distributed
from utils.hub import UserError, check_paths, from_pretrained, load_dataset, quiet_libraries
from utils.models import (add_lora, check_dtype, check_quantize, compile_blocks, fuse_gelu, lm_head_weight,
                          quantization, weights_dtype)
from utils.runtime import (Tracker, autocast, check_positive, cli, exact_div, learning_rate_at, peak_memory_mb,
                           prepare_output_dir)


@dataclass
class Args:
    # experiment
    exp_name: str = "sft"
    """name of the run (wandb run name prefix)"""
    seed: int = 1
    """seed of the run (weights init, dropout, data order, held-out split): a CPU run is repeatable"""
    output_dir: str = "runs/sft"
    """where checkpoints, metrics.jsonl and the final model go"""
    resume: bool = False
    """continue the run in --output-dir from its checkpoint; these may differ: --max-steps, speed/logging flags"""
    overwrite: bool = False
    """replace the run in --output-dir (without it or --resume, a folder holding a run is refused)"""
    save_every: int = 500
    """save a checkpoint every this many optimizer steps (and always at the end)"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without network)"""
    wandb_project: str = "rlhf-sft"
    """wandb project name"""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... ('auto': cuda if available)"""

    # model
    model: str = "gpt2"
    """causal LM to fine-tune (hub id or local folder); with --from-scratch only its config is used"""
    tokenizer: Optional[str] = None
    """tokenizer, hub id or folder (None: the one saved with --model)"""
    from_scratch: bool = False
    """initialise the weights randomly from --model's config instead of loading them (pre-training)"""
    config_overrides: Optional[list[str]] = None
    """with --from-scratch: config fields to change, e.g. n_layer=4 n_embd=256 n_head=4"""
    trust_remote_code: bool = False
    """allow models whose code lives on the hub (runs that code!)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: fp32 weights (bf16 autocast on CUDA), a LoRA base bf16 on a bf16 GPU; or one dtype (LoRA adapters fp32)"""
    attn_implementation: Optional[str] = None
    """attention kernel: sdpa, eager, flash_attention_2, ... (None: transformers' choice)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, ~30% slower"""
    compile: bool = False
    """torch.compile the transformer blocks (a one-off compilation, then faster steps on GPU; needs a C++ compiler)"""
    loss_chunk_size: int = 1024
    """training loss: tokens whose [tokens, vocab] logits exist at a time (0: the whole micro-batch's at once)"""
    fsdp: bool = False
    """under torchrun: shard parameters, gradients and optimizer state over processes (FSDP), not copy (DDP)"""

    # data
    dataset: str = "stanfordnlp/imdb"
    """training data: hub id, a save_to_disk folder or a .jsonl/.json/.csv/.parquet file"""
    dataset_split: str = "train"
    """split of --dataset to train on"""
    dataset_format: Literal["auto", "text", "prompt_completion", "messages"] = "auto"
    """'auto' detects it from the columns: 'messages', else 'prompt'+'completion', else --dataset-text-field"""
    dataset_text_field: str = "text"
    """column of plain-text data"""
    chat_template: Optional[str] = None
    """chat template for messages data when the tokenizer has none: a Jinja file or 'zephyr'"""
    eval_dataset: Optional[str] = None
    """evaluation data in the same format (None: from --dataset)"""
    eval_split: Optional[str] = None
    """split to evaluate on (None: hold out --eval-fraction of the training split)"""
    eval_fraction: float = 0.05
    """fraction of the training split held out for evaluation when there is no eval split/dataset (0: none)"""
    max_eval_examples: Optional[int] = None
    """evaluate on the first this many evaluation examples only (faster evals)"""
    max_seq_length: Optional[int] = None
    """longer examples are truncated, counted and reported (None: the model's context, at most 1024)"""
    packing: bool = False
    """pack whole examples into blocks of --max-seq-length (best-fit decreasing) with no attention across them"""
    completion_only_loss: bool = True
    """prompt/completion and messages data: loss on completion / assistant tokens only (text: on all tokens)"""

    # optimisation
    num_epochs: float = 1.0
    """passes over the training data (ignored when --max-steps is set)"""
    max_steps: Optional[int] = None
    """number of optimizer steps (overrides --num-epochs)"""
    batch_size: int = 32
    """examples (packed blocks with --packing) per optimizer step, over all processes (each gets batch_size / world)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step on each process (micro batch = batch_size / world / accumulation steps)"""
    learning_rate: float = 2e-5
    """peak AdamW learning rate (try 1e-3 from scratch)"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """decay after warmup: cosine or linear to 0, or constant"""
    warmup_ratio: float = 0.0
    """fraction of the steps over which the learning rate rises linearly from 0"""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices only (not biases, norms)"""
    max_grad_norm: Optional[float] = 1.0
    """clip the gradient norm to this value (None: no clipping)"""
    eval_every: int = 100
    """evaluate every this many steps (also before the first step and at the end; 0: only those two)"""

    # LoRA (peft)
    lora_r: int = 0
    """LoRA rank (0: full fine-tuning)"""
    lora_alpha: int = 16
    """LoRA alpha (the adapter's output is scaled by alpha / r)"""
    lora_dropout: float = 0.05
    """dropout on the LoRA branch"""
    lora_target_modules: Optional[list[str]] = None
    """modules to adapt (None: peft's choice for the architecture)"""
    quantize: Literal["none", "4bit", "8bit"] = "none"
    """LoRA's frozen base in 4-bit NF4 (QLoRA) or 8-bit weights through bitsandbytes (needs --lora-r)"""
    merge_lora: bool = True
    """save the final model with the adapters merged in (a plain checkpoint); else (and with --quantize) the adapter"""

    # computed at runtime from the above (not flags)
    world_size: tyro.conf.Suppress[int] = 1
    """processes (torchrun's WORLD_SIZE; 1 with plain python)"""
    local_batch_size: tyro.conf.Suppress[int] = 0
    """examples per optimizer step on this process = batch_size / world_size"""
    micro_batch_size: tyro.conf.Suppress[int] = 0
    """examples per forward/backward pass = local_batch_size / gradient_accumulation_steps"""
    num_steps: tyro.conf.Suppress[int] = 0
    """optimizer steps: max_steps, or ceil(num_epochs * training examples / batch_size) once the data is loaded"""


def check_args(args: Args, world_size: int = 1) -> Args:
    """Fail loudly on inconsistent settings and fill the derived sizes known before loading anything."""
    check_dtype(args.dtype, args.lora_r)
    check_quantize(args)
    if args.from_scratch and args.quantize != "none":
        raise UserError("--quantize loads pretrained weights quantized; --from-scratch has none to load")
    check_positive(args, "batch_size", "gradient_accumulation_steps", "learning_rate", "save_every",
                   "max_seq_length", "loss_chunk_size", "max_eval_examples")
    if args.eval_every < 0 or args.weight_decay < 0:
        raise UserError("--eval-every and --weight-decay must be >= 0")
    args.world_size = world_size
    args.local_batch_size = exact_div(args.batch_size, world_size, "--batch-size / processes")
    args.micro_batch_size = exact_div(args.local_batch_size, args.gradient_accumulation_steps,
                                      "--batch-size / processes / --gradient-accumulation-steps")
    if not 0 <= args.eval_fraction < 1:
        raise UserError("--eval-fraction must be in [0, 1)")
    if args.config_overrides and not args.from_scratch:
        raise UserError("--config-overrides only applies with --from-scratch (pretrained weights fix the shapes)")
    if (args.max_steps is not None and args.max_steps < 1) or args.num_epochs <= 0:
        raise UserError("--max-steps must be >= 1 and --num-epochs > 0")
    if not 0 <= args.warmup_ratio < 1:
        raise UserError("--warmup-ratio must be in [0, 1)")
    if args.fsdp and world_size == 1:
        raise UserError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node N (N > 1)")
    if args.fsdp and args.lora_r > 0 and args.merge_lora:
        raise UserError("--fsdp with LoRA: pass --no-merge-lora (merging needs the unsharded weights; merge the saved "
                        "adapter afterwards with peft's merge_and_unload)")
    return args


# Data: render each example as text + the character spans to learn, tokenize with a loss mask, pack --------------------
# Zephyr-style turns, each closed by the tokenizer's EOS: a model trained with it learns to stop after its turn.
ZEPHYR_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def detect_format(columns: list[str], requested: str, text_field: str) -> str:
    """Which kind of data the columns hold; a clear error naming what was expected and found."""
    needs = {"messages": ["messages"], "prompt_completion": ["prompt", "completion"], "text": [text_field]}
    if requested == "auto":
        requested = next((f for f, cols in needs.items() if all(c in columns for c in cols)), None)
        if requested is None:
            raise UserError(f"--dataset has none of the columns sft.py trains on: expected {text_field!r} (plain text,"
                            f" set --dataset-text-field), 'prompt'+'completion', or 'messages'; found {columns}")
    missing = [c for c in needs[requested] if c not in columns]
    if missing:
        raise UserError(f"--dataset-format {requested} needs the columns {needs[requested]}; missing {missing}, "
                        f"found {columns}")
    return requested


def render_messages(messages, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """A conversation as chat-template text, and the character span of each assistant turn (with the template's
    end-of-turn marker, so the model learns to stop). A turn's span starts where the template's generation
    prompt ends and ends where the conversation rendered up to that turn ends."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise UserError("the chat template renders a conversation differently from its prefixes (e.g. it drops "
                            "earlier turns' reasoning), so assistant turns cannot be located; pass --chat-template "
                            "or --no-completion-only-loss")
        spans.append((len(before), len(through)))
    return text, spans


def render(example: dict, fmt: str, text_field: str, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The text to train on and the character spans whose tokens are targets of the completion-only loss."""
    if fmt == "messages":
        return render_messages(example["messages"], tokenizer)
    if fmt == "prompt_completion":
        prompt, completion = example["prompt"] or "", example["completion"] or ""
        return prompt + completion, [(len(prompt), len(prompt) + len(completion))]
    text = example[text_field] or ""
    return text, [(0, len(text))]


def tokenize(dataset, fmt: str, text_field: str, tokenizer, max_len: int, completion_only: bool):
    """Tokenize every example into (input_ids, labels), labels = -100 where no loss is taken.

    A token is a target when it overlaps a target span (all text for plain text data). EOS is appended to
    text and prompt/completion data and is a target, so the model learns to stop (a chat template closes turns
    itself). The first token of each example is never a target: nothing inside the example predicts it, which
    also keeps packed examples from learning across their boundary. Examples longer than max_len are cut
    (right side, EOS lost: the document did not end there) and counted; those left with no target are dropped.
    Returns (examples, n_truncated, n_dropped).
    """
    rendered = [render(ex, fmt, text_field, tokenizer) for ex in dataset.to_list()]  # 10x faster than iterating
    texts = [text for text, _ in rendered]
    if not texts:
        return [], 0, 0
    masked = completion_only and fmt != "text"
    if masked and not tokenizer.is_fast:
        raise UserError("the completion-only loss locates completions with token offsets, which this (slow) "
                        "tokenizer does not give; use a fast tokenizer or pass --no-completion-only-loss")
    # max_len + 1 tokens are enough to see that an example is too long, and spare tokenizing huge documents
    enc = tokenizer(texts, add_special_tokens=fmt != "messages", return_offsets_mapping=masked,
                    truncation=True, max_length=max_len + 1)
    eos = tokenizer.eos_token_id
    examples, n_truncated, n_dropped = [], 0, 0
    for k, (ids, (_, spans)) in enumerate(zip(enc["input_ids"], rendered)):
        # a token is a target if its characters overlap a target span (special tokens have empty offsets)
        is_target = [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"][k]] if masked \
            else [True] * len(ids)
        if fmt != "messages" and (not ids or ids[-1] != eos):
            ids, is_target = ids + [eos], is_target + [True]
        if len(ids) > max_len:
            n_truncated += 1
            ids, is_target = ids[:max_len], is_target[:max_len]
        labels = [i if t else -100 for i, t in zip(ids, is_target)]
        if labels:
            labels[0] = -100
        if all(label == -100 for label in labels):
            n_dropped += 1
            continue
        examples.append((ids, labels))
    return examples, n_truncated, n_dropped


def pack(examples, max_len: int):
    """Best-fit decreasing packing: each example, longest first, goes into the open block with the least room
    that still fits it; examples are never split. Position ids restart at 0 for each example, which tells the
    model where examples begin (see main: no attention across them). Returns (input_ids, labels, position_ids)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    blocks, rooms = [], []  # rooms: sorted (room left, block index) of blocks that are not full
    for i in order:
        n = len(examples[i][0])
        j = bisect.bisect_left(rooms, (n, -1))
        if j < len(rooms):
            room, b = rooms.pop(j)
        else:
            room, b = max_len, len(blocks)
            blocks.append([])
        blocks[b].append(i)
        if room > n:
            bisect.insort(rooms, (room - n, b))
    packed = []
    for members in blocks:
        ids = [t for i in members for t in examples[i][0]]
        labels = [t for i in members for t in examples[i][1]]
        position_ids = [p for i in members for p in range(len(examples[i][0]))]
        packed.append((ids, labels, position_ids))
    return packed


def collate(examples, pad_id: int, device):
    """Right-pad a list of (input_ids, labels[, position_ids]) into model inputs and labels [batch, length].

    Padding is marked by lengths, never by comparing ids with pad_id: with pad == EOS a real EOS must stay a
    target. Plain examples get an attention mask; packed blocks get position ids (restarting per example and
    for the padding tail) and no mask, from which transformers builds a block-diagonal causal mask."""
    width = max(len(ex[0]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    position_ids = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex[0])
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = torch.tensor(ex[0]), torch.tensor(ex[1]), 1
        position_ids[row, :n] = torch.tensor(ex[2]) if len(ex) == 3 else torch.arange(n)
        position_ids[row, n:] = torch.arange(width - n)
    inputs = {"input_ids": input_ids.to(device)}
    if len(examples[0]) == 3:
        inputs["position_ids"] = position_ids.to(device)
    else:
        inputs["attention_mask"] = attention_mask.to(device)
    return inputs, labels.to(device)


@torch.no_grad()
def packing_isolates_examples(model, device) -> bool:
    """Whether this model keeps packed examples apart given restarting position ids and no attention mask:
    the logits of a 3-token example must be the same after another example in the block as alone. (A leak
    moves them by ~40% of their scale even in a tiny random GPT-2; bf16 rounding by < 1%.)"""
    was_training = model.training
    model.eval()
    ids = torch.arange(1, 7, device=device).unsqueeze(0)  # shape: [1, 6]: two examples of 3 tokens
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]], device=device)
    with autocast(device):
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 3:].float()
        alone = model(input_ids=ids[:, 3:], position_ids=positions[:, 3:], use_cache=False).logits[0].float()
    model.train(was_training)
    return ((packed - alone).abs().max() <= 0.05 * alone.abs().max()).item()


# Loss and schedule (tested against hand-computed values in tests/test_sft.py) -----------------------------------------
def lm_loss(logits, labels):
    """Summed next-token negative log-likelihood over target tokens, and the number of targets.
    logits [batch, len, vocab], labels [batch, len] (-100: no loss). Summing (not averaging) per micro-batch lets
    the caller divide by the targets of the whole optimizer step, so accumulation does not reweight tokens."""
    # position t predicts token t+1: shift the labels, not the logits (slicing the logits would copy them, the
    # largest activation of a small model); the last position gets no target. shape: [batch, len]
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return nll, (targets != -100).sum()


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed NLL of `targets` under logits = hidden @ weight.T, computed `chunk` rows at a time, so only one chunk's
    [chunk, vocab] logits ever exist (the logits of a whole micro-batch are the largest activation of most LMs).
    The loss is a sum, so its gradients are known in the forward pass: d nll / d logits = softmax - onehot(target).
    Computing them there (hidden_grad = g @ W, weight_grad = g.T @ h) costs no second forward through the head;
    backward only scales them. hidden [n, d], weight [vocab, d], targets [n] (-100: no loss) -> nll []."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[:2]
        ctx.weight_dtype = weight.dtype
        hidden_grad = torch.zeros_like(hidden) if need_hidden_grad else None
        weight_grad = torch.zeros_like(weight, dtype=torch.float32) if need_weight_grad else None
        nll = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, hidden.shape[0], chunk):
            h, t = hidden[i : i + chunk], targets[i : i + chunk]
            keep = t != -100
            logits = (h @ weight.T).float()  # shape: [chunk, vocab]
            log_z = torch.logsumexp(logits, -1)
            nll += ((log_z - logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)) * keep).sum()
            if need_hidden_grad or need_weight_grad:
                g = logits.sub_(log_z[:, None]).exp_().mul_(keep[:, None])  # softmax, in place; 0 without target
                rows = keep.nonzero().squeeze(1)
                g[rows, t[rows]] -= 1
                g = g.to(h.dtype)
                if need_hidden_grad:
                    hidden_grad[i : i + chunk] = g @ weight
                if need_weight_grad:
                    weight_grad += g.T @ h
        ctx.save_for_backward(hidden_grad, weight_grad)
        return nll

    @staticmethod
    def backward(ctx, nll_grad):
        hidden_grad, weight_grad = ctx.saved_tensors
        return (hidden_grad * nll_grad if hidden_grad is not None else None,
                weight_grad.mul_(nll_grad).to(ctx.weight_dtype) if weight_grad is not None else None, None, None)


def chunked_lm_loss(hidden, weight, labels, chunk: int):
    """lm_loss(hidden @ weight.T, labels) without holding the whole logits: hidden [batch, len, d] (the states the
    LM head reads), weight [vocab, d] (the head's). Returns (summed nll, number of targets)."""
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    if not torch.is_grad_enabled():  # evaluation: detached inputs tell the function to skip the gradients
        hidden, weight = hidden.detach(), weight.detach()
    nll = ChunkedLinearCrossEntropy.apply(hidden.flatten(0, 1), weight, targets.flatten(), chunk)
    return nll, (targets != -100).sum()


@torch.no_grad()
def evaluate(model, examples, micro_batch_size: int, pad_id: int, device, rank: int = 0, world_size: int = 1,
             head_weight=None, chunk: int = 0) -> dict:
    """Mean next-token loss per target token over `examples`, and its perplexity (dropout off). Under torchrun
    each process evaluates every world_size-th micro-batch and the sums are added up: the single-process result.
    With head_weight (utils.models.lm_head_weight) the logits are computed `chunk` tokens at a time."""
    model.eval()
    batches = [examples[i : i + micro_batch_size] for i in range(0, len(examples), micro_batch_size)]
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed nll, target count
    for k in range(rank, math.ceil(len(batches) / world_size) * world_size, world_size):
        # every process runs as many forwards (FSDP gathers weights in each); one past the end counts for nothing
        inputs, labels = collate(batches[k] if k < len(batches) else batches[0], pad_id, device)
        with autocast(device):
            if head_weight is None:
                loss = lm_loss(model(**inputs, use_cache=False).logits, labels)
            else:
                out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=labels.new_zeros(0))
                loss = chunked_lm_loss(out.hidden_states[-1], head_weight, labels, chunk)
        if k < len(batches):
            totals += torch.stack(loss).double()
    if distributed():
        torch.distributed.all_reduce(totals)
    model.train()
    nll, count = totals.tolist()
    return {"eval/loss": nll / count, "eval/perplexity": math.exp(min(nll / count, 50))}


# Training -------------------------------------------------------------------------------------------------------------
def load_examples(args: Args, tokenizer, max_len: int, verbose: bool = True):
    """Training and evaluation examples, tokenized (and packed with --packing), with their counts reported."""
    train = load_dataset(args.dataset, args.dataset_split)
    if len(train) == 0:
        raise UserError(f"--dataset {args.dataset!r} split {args.dataset_split!r} is empty")
    fmt = detect_format(train.column_names, args.dataset_format, args.dataset_text_field)
    if fmt == "messages" and tokenizer.chat_template is None:
        raise UserError(f"--dataset holds chat data ('messages') but the tokenizer of {args.tokenizer or args.model!r} "
                        "has no chat template. Pass --chat-template zephyr (a generic template whose turns end with "
                        "EOS) or --chat-template path/to/template.jinja, or use a chat model's tokenizer")
    if args.eval_dataset or args.eval_split:
        evaluation = load_dataset(args.eval_dataset or args.dataset, args.eval_split or args.dataset_split,
                                  "--eval-dataset" if args.eval_dataset else "--eval-split")
        detect_format(evaluation.column_names, fmt, args.dataset_text_field)
    elif args.eval_fraction > 0 and len(train) >= 2:
        split = train.train_test_split(test_size=max(1, round(args.eval_fraction * len(train))), seed=args.seed)
        train, evaluation = split["train"], split["test"]
    else:
        evaluation = None
    if evaluation is not None and args.max_eval_examples is not None:
        evaluation = evaluation.select(range(min(args.max_eval_examples, len(evaluation))))
    completion_only = args.completion_only_loss and fmt != "text"
    out = []
    for name, ds in (("training", train), ("evaluation", evaluation)):
        if ds is None:
            out.append([])
            continue
        examples, n_truncated, n_dropped = tokenize(ds, fmt, args.dataset_text_field, tokenizer, max_len,
                                                    completion_only)
        if n_truncated and verbose:
            print(f"warning: {n_truncated} of {len(ds)} {name} examples were longer than --max-seq-length {max_len} "
                  "tokens and were truncated", file=sys.stderr)
        if n_dropped and verbose:
            print(f"warning: {n_dropped} {name} examples had no token to learn (empty, or the completion was cut off "
                  "by truncation) and were skipped", file=sys.stderr)
        if not examples and name == "training":
            raise UserError("no training example is left to learn from (see the warnings above)")
        out.append(pack(examples, max_len) if args.packing else examples)
    if verbose:
        print(f"data: {fmt} format, {len(out[0])} training and {len(out[1])} evaluation "
              f"{'packed blocks' if args.packing else 'examples'} of <= {max_len} tokens; "
              f"loss on {'completions only' if completion_only else 'all tokens'}")
    return out


def load_config(args: Args, tokenizer):
    """The model's config (cheap: no weights), with --config-overrides and the tokenizer's vocabulary and EOS
    when training --from-scratch. Checked against the tokenizer before any weights load."""
    config = from_pretrained(AutoConfig, args.model, "--model", trust_remote_code=args.trust_remote_code)
    if args.from_scratch:
        for item in args.config_overrides or []:
            key, sep, value = item.partition("=")
            if not sep or not hasattr(config, key):
                raise UserError(f"--config-overrides {item!r}: expected field=value, with a field of "
                                f"{type(config).__name__}")
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # a plain string, e.g. activation_function=gelu
            setattr(config, key, value)
        # the embedding matches the tokenizer, and EOS/BOS are the tokenizer's (as GPT-2 on the hub)
        config.vocab_size = len(tokenizer)
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    elif len(tokenizer) > (getattr(config.get_text_config(), "vocab_size", None) or len(tokenizer)):
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but --model's embedding only "
                        f"{config.get_text_config().vocab_size}: use the model's own tokenizer")
    return config


def load_model(args: Args, config, tokenizer, device):
    """The causal LM: pretrained, or freshly initialised from `config` (--from-scratch); LoRA on top if asked.
    Weights are kept in fp32 (bf16 only inside autocast), so small updates are not rounded away."""
    kwargs = {"dtype": weights_dtype(args.dtype, device, trained=args.lora_r == 0),
              "trust_remote_code": args.trust_remote_code}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if args.from_scratch:
        with torch.random.fork_rng(devices=[]):  # the init depends on --seed only, with no global side effect
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        model = from_pretrained(AutoModelForCausalLM, args.model, "--model", **kwargs,
                                **quantization(args, device))
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise UserError(f"the tokenizer has {len(tokenizer)} tokens but --model's embedding only "
                            f"{model.get_input_embeddings().num_embeddings}: use the model's own tokenizer")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    fuse_gelu(model)  # speed only: the same function as the model's own
    if args.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise UserError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
        model.activation_checkpointing_enable()  # non-reentrant: works with frozen (LoRA) base weights
    return add_lora(model, args, task_type="CAUSAL_LM").to(device)


def load_tokenizer(args: Args):
    """--tokenizer (or --model's), with an EOS (appended to every example) and a pad token, and --chat-template."""
    tokenizer_flag = "--tokenizer" if args.tokenizer else "--model"
    tokenizer = from_pretrained(AutoTokenizer, args.tokenizer or args.model, tokenizer_flag,
                                trust_remote_code=args.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token: sft.py appends EOS so the model learns to stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: padding is masked by lengths, never by id (see collate)
    if args.chat_template == "zephyr":
        tokenizer.chat_template = ZEPHYR_TEMPLATE  # saved with the tokenizer, so the model chats the way it learned
    elif args.chat_template:
        if not Path(args.chat_template).is_file():
            raise UserError(f"--chat-template {args.chat_template!r}: not 'zephyr' and not a file")
        tokenizer.chat_template = Path(args.chat_template).read_text()
    return tokenizer


def main(args: Args):
    device, rank, world_size = init_distributed(args.device)  # one process, or one per GPU/CPU under torchrun
    args = check_args(args, world_size)
    is_main = rank == 0  # only the first process prints, logs and saves
    quiet_libraries()
    # Everything the user gave is checked before any weights load: paths, the output folder (a run in it is never
    # lost: --resume or --overwrite), the tokenizer, the model's config and the data
    check_paths(("--model", args.model), ("--tokenizer", args.tokenizer), ("--dataset", args.dataset),
                ("--eval-dataset", args.eval_dataset))
    scheduled = args.lr_scheduler != "constant" or args.warmup_ratio > 0  # the schedule depends on the length
    resume_from = prepare_output_dir(args, is_main, length_flags=("max_steps", "num_epochs"), scheduled=scheduled,
                                     may_change=("eval_every",))
    out_dir, ckpt_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoint"
    torch.manual_seed(args.seed)  # LoRA init: the same on every process

    # Tokenizer and model
    tokenizer = load_tokenizer(args)
    config = load_config(args, tokenizer)
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    max_len = args.max_seq_length or min(context or 1024, 1024)
    if context and max_len > context:
        raise UserError(f"--max-seq-length {max_len} exceeds the model's context of {context} positions")
    train_examples, eval_examples = load_examples(args, tokenizer, max_len, is_main)
    model = load_model(args, config, tokenizer, device)
    if args.packing and not packing_isolates_examples(model, device) and is_main:
        print("warning: this model ignores restarting position ids, so packed examples attend to the examples "
              "before them in their block; use --attn-implementation flash_attention_2 or drop --packing",
              file=sys.stderr)
    # Dropout as the model's config sets it during training (model.train(), as the usual SFT recipe); off in eval.
    model.train()
    args.num_steps = args.max_steps or math.ceil(args.num_epochs * len(train_examples) / args.batch_size)
    warmup_steps = round(args.warmup_ratio * args.num_steps)
    if resume_from:
        load_weights(resume_from, model)
    unwrapped = model  # HF/peft model (sharded in place under FSDP) for saving; `model` may be the DDP wrapper
    model = distribute(model, device, args.fsdp, lms=(model,))  # DDP / FSDP sharded in place / itself
    if args.compile:
        compile_blocks(unwrapped)  # after FSDP's sharding, as torch recommends
    params = [p for p in model.parameters() if p.requires_grad]  # (after sharding: the optimizer holds the shards)
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=args.learning_rate, fused=True)  # one kernel for all tensors (CPU and CUDA)
    start_step = load_training_state(resume_from, unwrapped, optimizer, args.fsdp)["step"] if resume_from else 0
    if resume_from and is_main:
        print(f"resumed from {resume_from} after step {start_step}")
    # args.json, metrics.jsonl (cut back to the checkpoint's step on resume), wandb with --track
    tracker = Tracker(out_dir, args, start_step, args.track, args.wandb_project, step_key="step") if is_main else None
    n_params, n_trained = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in params)
    if is_main:
        print(f"SFT: {args.num_steps} steps x {args.batch_size} {'blocks' if args.packing else 'examples'} on "
              f"{world_size} x {device}{' (FSDP)' if args.fsdp else ''}; {n_params / 1e6:.1f}M parameters "
              f"({n_trained / 1e6:.2f}M trained); outputs in {out_dir}")

    pad_id = tokenizer.pad_token_id
    # the LM head's weight if the chunked loss reproduces the model's logits (else None: the plain loss)
    head_weight = lm_head_weight(unwrapped, collate(train_examples[:1], pad_id, device)[0], args.fsdp) \
        if args.loss_chunk_size > 0 else None
    if start_step == 0 and eval_examples:
        stats = evaluate(model, eval_examples, args.micro_batch_size, pad_id, device, rank, world_size, head_weight,
                         args.loss_chunk_size)
        if is_main:
            tracker.log({"step": 0, **stats})
    bar = tqdm(range(start_step, args.num_steps), desc="sft", initial=start_step,
               total=args.num_steps, dynamic_ncols=True, disable=not is_main)
    for step in bar:
        start = time.perf_counter()
        # Each step seeds itself (dropout) from (seed, step, rank): a resumed run is exactly an uninterrupted one.
        torch.manual_seed(args.seed + 100_000 * step + rank)
        lr = learning_rate_at(step, args.num_steps, warmup_steps, args.learning_rate, args.lr_scheduler)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Every process draws the same global batch and takes its own slice of it.
        indices = batch_indices(step, args.batch_size, len(train_examples), args.seed, rank, world_size)
        micro_batches = [collate([train_examples[i] for i in indices[j : j + args.micro_batch_size]], pad_id, device)
                         for j in range(0, args.local_batch_size, args.micro_batch_size)]
        # The loss is the mean over the target tokens of the whole step (all processes), however they fall into
        # micro-batches. DDP/FSDP average the gradients over the processes, hence the factor world_size.
        counts = torch.tensor([sum((labels[:, 1:] != -100).sum().item() for _, labels in micro_batches),
                               sum(len(train_examples[i][0]) for i in indices)], dtype=torch.float64, device=device)
        if distributed():
            torch.distributed.all_reduce(counts)
        n_targets, n_tokens = counts.tolist()
        step_nll = torch.zeros((), dtype=torch.float64, device=device)
        for k, (inputs, labels) in enumerate(micro_batches):
            last = k == len(micro_batches) - 1  # DDP: all-reduce the gradients once, after the last micro-batch
            with model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last \
                    else contextlib.nullcontext():
                with autocast(device):
                    if head_weight is None:
                        logits = model(**inputs, use_cache=False).logits  # shape: [micro_batch, len, vocab]
                        nll, _ = lm_loss(logits, labels)
                    else:  # logits_to_keep=[]: the head runs on no position here, chunk by chunk in the loss
                        out = model(**inputs, use_cache=False, output_hidden_states=True,
                                    logits_to_keep=labels.new_zeros(0))
                        nll, _ = chunked_lm_loss(out.hidden_states[-1], head_weight, labels, args.loss_chunk_size)
                (nll * world_size / n_targets).backward()
            step_nll += nll.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if distributed():
            torch.distributed.all_reduce(step_nll)

        step_time = time.perf_counter() - start
        stats = {"step": step + 1, "epoch": (step + 1) * args.batch_size / len(train_examples), "losses/loss":
                 step_nll.item() / n_targets, "losses/grad_norm": grad_norm.item(), "charts/learning_rate": lr,
                 "perf/tokens_per_s": n_tokens / step_time, "perf/peak_memory_mb": peak_memory_mb(device)}
        bar.set_postfix(loss=f"{stats['losses/loss']:.3f}")
        if eval_examples and ((args.eval_every and (step + 1) % args.eval_every == 0) or step + 1 == args.num_steps):
            stats.update(evaluate(model, eval_examples, args.micro_batch_size, pad_id, device, rank, world_size,
                                  head_weight, args.loss_chunk_size))
        if is_main and "eval/loss" in stats:  # (tqdm's write prints on every process)
            bar.write(f"step {step + 1:>5} | loss {stats['losses/loss']:.4f} | eval loss {stats['eval/loss']:.4f} "
                      f"| ppl {stats['eval/perplexity']:.2f} | lr {lr:.2e} | {stats['perf/tokens_per_s']:.0f} tok/s")
        if is_main:
            tracker.log(stats)  # (peak memory is rank 0's)
        if (step + 1) % args.save_every == 0 or step + 1 == args.num_steps:
            state = full_state_dicts(unwrapped, optimizer, args.fsdp)  # every process: FSDP gathers the shards
            if is_main:
                save_checkpoint(ckpt_dir, unwrapped, tokenizer, state, step + 1)

    # Final model at the top of the output folder: AutoModelForCausalLM.from_pretrained(output_dir) loads it
    weights = full_state_dicts(unwrapped, None, args.fsdp)[0]
    if is_main:
        merge = args.lora_r > 0 and args.merge_lora and args.quantize == "none"  # quantized weights: the adapter alone
        final = unwrapped.merge_and_unload() if merge else unwrapped
        final.save_pretrained(out_dir, state_dict=weights)
        tokenizer.save_pretrained(out_dir)
        tracker.close()
        print(f"done: model in {out_dir} (AutoModelForCausalLM.from_pretrained), metrics in {tracker.path}, "
              f"resumable checkpoint in {ckpt_dir}")
    finish()  # under torchrun: nobody leaves before rank 0 has saved
    return out_dir / "metrics.jsonl"


if __name__ == "__main__":
    cli(main, Args)
