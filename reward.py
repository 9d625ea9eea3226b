"""Reward modelling from pairwise preferences, in one file.

The second step of the RLHF recipe (Stiennon et al. 2020, Ouyang et al. 2022 sec. 3.5): a sequence classifier
with one output, r(x), trained so that the chosen text of each pair scores above the rejected one, with the
Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected) - margin). The saved model plugs into
`python ppo.py --reward-model <output-dir> --reward-label 0`. Read top to bottom: arguments, data, the loss and
accuracy, checkpoints, and the training loop in `main`.

    python reward.py --model gpt2 --dataset Anthropic/hh-rlhf
    python reward.py --model tiny/minilm --dataset prefs.jsonl --max-seq-length 128   # offline
    torchrun --nproc_per_node 4 reward.py --model gpt2 --dataset Anthropic/hh-rlhf     # DDP: 4 GPUs (or CPU processes)
"""

import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
import tyro
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from utils.checkpoints import full_state_dicts, load_training_state, load_weights, save_checkpoint
from utils.data import batch_indices
from utils.distributed import distribute, distributed, finish, init_distributed, mean_over_processes, unwrap
from utils.hub import (UserError, check_paths, check_tokenizer, from_pretrained, load_dataset, quiet_libraries,
                       quiet_load_report)
from utils.models import (add_lora, block_list, check_dtype, check_quantize, compile_blocks, disable_dropout,
                          fuse_gelu, quantization, weights_dtype)
from utils.prompts import left_pad, right_pad
from utils.runtime import (Tracker, autocast, check_positive, cli, exact_div, learning_rate_at, peak_memory_mb,
                           prepare_output_dir)


@dataclass
class Args:
    # experiment
    exp_name: str = "reward"
    """name of the run (wandb run name prefix)"""
    seed: int = 1
    """seed of the run (head init, dropout, data order, held-out split): a CPU run is repeatable"""
    output_dir: str = "runs/reward"
    """where checkpoints, metrics.jsonl and the final model go"""
    resume: bool = False
    """continue the run in --output-dir from its checkpoint; these may differ: --max-steps, speed/logging flags"""
    overwrite: bool = False
    """replace the run in --output-dir (without it or --resume, a folder holding a run is refused)"""
    save_every: int = 500
    """save a checkpoint every this many optimizer steps (and always at the end)"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without network)"""
    wandb_project: str = "rlhf-reward"
    """wandb project name"""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... ('auto': cuda if available)"""

    # model
    model: str = "gpt2"
    """backbone (hub id or local folder) loaded as a sequence classifier with one output (a fresh head if needed)"""
    trust_remote_code: bool = False
    """allow models whose code lives on the hub (runs that code!)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: fp32 weights (bf16 autocast on CUDA), a LoRA base bf16 on a bf16 GPU; or one dtype (LoRA adapters fp32)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, ~30% slower"""
    share_prefix: bool = True
    """decoders: read the tokens both texts of a pair start with (the prompt) once (exact; off under checkpointing)"""
    trim_last_block: bool = True
    """decoders: the last block's MLP runs only where the score is read (same scores; off: checkpointing, --compile)"""
    length_groups: int = 0
    """most forwards per micro-batch, each of texts of similar length: less padding, same scores (0: CPU 4, else 1)"""
    compile: bool = False
    """torch.compile the transformer blocks (a one-off compilation, then faster steps on GPU; needs a C++ compiler)"""

    # data
    dataset: str = "Anthropic/hh-rlhf"
    """preference pairs with columns chosen, rejected and optionally prompt, margin: hub id, folder or file"""
    dataset_split: str = "train"
    """split of --dataset to train on"""
    eval_dataset: Optional[str] = None
    """evaluation pairs in the same format (None: from --dataset)"""
    eval_split: Optional[str] = None
    """split to evaluate on (None: hold out --eval-fraction of the training split)"""
    eval_fraction: float = 0.05
    """fraction of the training split held out for evaluation when there is no eval split/dataset (0: none)"""
    max_eval_examples: Optional[int] = None
    """evaluate on the first this many evaluation pairs only (faster evals)"""
    max_seq_length: Optional[int] = None
    """longer texts are truncated, counted and reported (None: the model's context, at most 1024)"""
    truncation_side: Literal["left", "right"] = "left"
    """end of a long text to cut: 'left' keeps the end, where the judged response is (saved: ppo.py cuts alike)"""

    # loss
    center_rewards_coefficient: Optional[float] = None
    """weight of the loss mean((r_chosen + r_rejected)^2), which keeps rewards centred on 0 (Eisenstein et al. 2023)"""

    # optimisation
    num_epochs: float = 1.0
    """passes over the training pairs (ignored when --max-steps is set)"""
    max_steps: Optional[int] = None
    """number of optimizer steps (overrides --num-epochs)"""
    batch_size: int = 32
    """pairs per optimizer step, over all processes (under torchrun each rank takes batch_size / world size)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step on each process (micro batch = batch_size / world size / this)"""
    learning_rate: float = 2e-5
    """peak AdamW learning rate"""
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
    disable_dropout: bool = True
    """model dropout off (TRL's default): texts are scored in training as in evaluation and PPO (LoRA's stays)"""

    # LoRA (peft)
    lora_r: int = 0
    """LoRA rank (0: full fine-tuning); the new score head is always trained in full"""
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
    """number of processes (torchrun's WORLD_SIZE)"""
    local_batch_size: tyro.conf.Suppress[int] = 0
    """pairs per optimizer step on this process = batch_size / world_size"""
    micro_batch_size: tyro.conf.Suppress[int] = 0
    """pairs per forward/backward on this process = local_batch_size / gradient_accumulation_steps"""
    num_steps: tyro.conf.Suppress[int] = 0
    """optimizer steps: max_steps, or ceil(num_epochs * training pairs / batch_size) once the data is loaded"""


def check_args(args: Args, world_size: int = 1) -> Args:
    """Fail loudly on inconsistent settings and fill the derived sizes known before loading anything."""
    check_dtype(args.dtype, args.lora_r)
    check_quantize(args)
    if args.length_groups < 0:
        raise UserError("--length-groups must be >= 1, or 0 for the default")
    check_positive(args, "batch_size", "gradient_accumulation_steps", "learning_rate", "save_every",
                   "max_seq_length", "max_eval_examples")
    if args.eval_every < 0 or args.weight_decay < 0:
        raise UserError("--eval-every and --weight-decay must be >= 0")
    args.world_size = world_size
    args.local_batch_size = exact_div(args.batch_size, world_size,
                                      "--batch-size / processes (torchrun --nproc_per_node)")
    args.micro_batch_size = exact_div(args.local_batch_size, args.gradient_accumulation_steps,
                                      "--batch-size / processes / --gradient-accumulation-steps")
    if not 0 <= args.eval_fraction < 1:
        raise UserError("--eval-fraction must be in [0, 1)")
    if (args.max_steps is not None and args.max_steps < 1) or args.num_epochs <= 0:
        raise UserError("--max-steps must be >= 1 and --num-epochs > 0")
    if not 0 <= args.warmup_ratio < 1:
        raise UserError("--warmup-ratio must be in [0, 1)")
    return args


# Data: (prompt +) chosen and (prompt +) rejected texts, tokenized with the reward model's tokenizer -------------------
def check_columns(columns: list[str], flag: str = "--dataset"):
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    if missing:
        raise UserError(f"{flag} needs the columns 'chosen' and 'rejected' (optional: 'prompt', 'margin'); "
                        f"missing {missing}, found {columns}")


def pair_texts(example: dict, tokenizer) -> tuple[str, str]:
    """The two texts the model scores. An explicit prompt is prepended to both; without one the prompt is
    implicit (already inside chosen and rejected). Conversations (lists of messages) go through the chat template."""
    chosen, rejected, prompt = example["chosen"], example["rejected"], example.get("prompt")
    if isinstance(chosen, list):
        if tokenizer.chat_template is None:
            raise UserError("--dataset holds conversations (lists of messages) but the tokenizer of --model has no "
                            "chat template: use a model whose tokenizer has one, or give the pairs as text")
        return tuple(tokenizer.apply_chat_template((prompt or []) + c, tokenize=False) for c in (chosen, rejected))
    return (prompt or "") + chosen, (prompt or "") + rejected


def leading_special_tokens(tokenizer) -> int:
    """How many special tokens the tokenizer puts before a text (BOS, [CLS]): left truncation keeps them."""
    bare, full = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    return next((i for i in range(len(full)) if full[i : i + len(bare)] == bare), 0)


def tokenize_pairs(dataset, tokenizer, max_len: int):
    """Tokenize every pair into (chosen_ids, rejected_ids, margin). Pairs whose two texts are the same, or become
    the same once truncated to max_len tokens, say nothing about preference: they are dropped and counted.
    Texts longer than max_len are cut on tokenizer.truncation_side. On the left, where a pair's two texts start
    alike (a prompt) the same tokens are cut from both, so both responses are judged after the same context (and
    pair_rewards can read it once); a pair that parts sooner has each text cut alone.
    Returns (pairs, n_truncated_texts, n_identical, n_identical_after_truncation)."""
    texts = [pair_texts(ex, tokenizer) for ex in dataset.to_list()]  # to_list: 10x faster than iterating
    margins = [float(m) for m in dataset["margin"]] if "margin" in dataset.column_names else [0.0] * len(texts)
    n_identical = sum(c == r for c, r in texts)
    kept = [(c, r, m) for (c, r), m in zip(texts, margins) if c != r]
    flat = [t for c, r, _ in kept for t in (c, r)]
    if not flat:
        return [], 0, n_identical, 0
    ids = tokenizer(flat, verbose=False)["input_ids"]  # whole texts: chosen 0, rejected 0, chosen 1, ...
    too_long = [i for i, x in enumerate(ids) if len(x) > max_len]
    if tokenizer.truncation_side == "left":
        lead = leading_special_tokens(tokenizer)
        for k in sorted({i // 2 for i in too_long}):
            c, r = ids[2 * k], ids[2 * k + 1]
            cut = max(len(c), len(r)) - max_len  # tokens the longer text must lose, after its leading specials
            if min(len(c), len(r)) > lead + cut and c[: lead + cut] == r[: lead + cut]:
                ids[2 * k], ids[2 * k + 1] = c[:lead] + c[lead + cut :], r[:lead] + r[lead + cut :]
    # the rest are tokenized again with the tokenizer's own truncation, which keeps its special tokens (e.g. BERT's
    # [CLS] ... [SEP])
    alone = [i for i in too_long if len(ids[i]) > max_len]
    if alone:
        cut = tokenizer([flat[i] for i in alone], truncation=True, max_length=max_len)["input_ids"]
        for i, x in zip(alone, cut):
            ids[i] = x
    pairs = [(ids[2 * k], ids[2 * k + 1], m) for k, (_, _, m) in enumerate(kept)]
    same = sum(c == r for c, r, _ in pairs)
    return [p for p in pairs if p[0] != p[1]], len(too_long), n_identical, same


# Rewards, loss and accuracy (tested against hand-computed values in tests/test_reward.py) -----------------------------
def tensors(sequences) -> list[torch.Tensor]:
    """Token-id lists -> 1-D LongTensors (what left_pad and right_pad take)."""
    return [torch.tensor(s, dtype=torch.long) for s in sequences]


def causal(model) -> bool:
    """Every attention layer is causal (GPT-2, Llama, ...: a token's state depends on the tokens before it only)."""
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)


def shared_prefix_length(chosen: list[int], rejected: list[int], pad_id: int) -> int:
    """Tokens both texts start with, short of each one's scored token (its last token that is not pad_id)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    scored = [next((i for i in reversed(range(len(x))) if x[i] != pad_id), 0) for x in (chosen, rejected)]
    return min(n, *scored)


def last_block_mlp(model):
    """The MLP of a causal decoder's last transformer block (the `mlp` of GPT-2's, Llama's, Qwen's ... blocks), or
    None (encoders, and blocks without an `mlp` module)."""
    try:
        last_block = block_list(model)[1][-1]
    except UserError:  # the model has not exactly one list of blocks
        return None
    mlp = getattr(last_block, "mlp", None)
    return mlp if causal(model) and isinstance(mlp, torch.nn.Module) else None


@contextmanager
def mlp_only_at(mlp, positions: torch.Tensor):
    """Run `mlp` (one block's position-wise MLP, called as mlp(hidden [batch, time, width]) -> a tensor of that
    shape) at `positions` [batch, k] only; the other positions get zeros. In the last block of a classifier that
    reads one position per text, this changes nothing the score sees (nor its gradients, up to float rounding), and
    saves that MLP's work (~2/3 of the block) at every other position: the hidden states at those positions are
    left unfinished and must not be read. An MLP called or answering otherwise raises a TypeError (see
    shortcut_problem). mlp None: no change."""
    if mlp is None:
        yield
        return
    index = positions.unsqueeze(-1)  # [batch, k, 1], expanded to the width below
    length = None  # the full length, from the MLP's input to its output

    def take(module, args, kwargs):
        nonlocal length
        if len(args) != 1 or kwargs or not torch.is_tensor(args[0]):
            raise TypeError(f"{type(module).__name__} is not called as mlp(hidden_states)")
        length = args[0].shape[1]
        return (args[0].gather(1, index.expand(-1, -1, args[0].shape[-1])),), {}

    def put(module, args, out):
        if not torch.is_tensor(out):
            raise TypeError(f"{type(module).__name__} returns a {type(out).__name__}, not a tensor")
        full = out.new_zeros(out.shape[0], length, out.shape[-1])
        return full.scatter(1, index.expand(-1, -1, out.shape[-1]), out)  # scatter: differentiable in `out`

    handles = [mlp.register_forward_pre_hook(take, with_kwargs=True), mlp.register_forward_hook(put)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def last_tokens(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Each row's last position holding a token other than pad_id (0 if none): where a decoder classifier reads its
    score (transformers' rule). [batch, time] -> [batch, 1]."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1, keepdim=True)


def text_rewards(model, texts, pad_id: int, device, last_mlp=None) -> torch.Tensor:
    """The scores of `texts` (lists of token ids) read in one right-padded batch [texts]; last_mlp: see pair_rewards."""
    input_ids, attention_mask = (t.to(device) for t in right_pad(tensors(texts), pad_id))
    with autocast(device), mlp_only_at(last_mlp, last_tokens(input_ids, pad_id)):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()


def pair_rewards(model, pairs, pad_id: int, device, share_prefix: bool = False, last_mlp=None):
    """Score the chosen and the rejected texts of `pairs` in one batch. The classifier reads its score at the
    last token that is not config.pad_token_id (decoders) or at [CLS] (encoders), as ppo.py will.

    share_prefix (causal models only): the tokens a pair's two texts start with (its prompt) are read once, and
    both continuations attend to their cached keys/values: the same scores as reading the two whole texts (the
    gradients reach the prefix through the cache) for less compute, used when the padded shapes say it is less.
    With dropout on (--no-disable-dropout), the prefix draws one dropout mask for both texts in training.

    last_mlp (from last_block_mlp): the last block's MLP runs at the scored tokens only (mlp_only_at), and not at
    all over the shared prefixes, whose last block only gives keys and values. Returns chosen_rewards,
    rejected_rewards [pairs] and margins [pairs]."""
    chosen, rejected = [p[0] for p in pairs], [p[1] for p in pairs]
    margins = torch.tensor([p[2] for p in pairs], device=device)
    shared = [shared_prefix_length(c, r, pad_id) if share_prefix else 0 for c, r in zip(chosen, rejected)]
    width = max(map(len, chosen + rejected))
    suffix_width = max(len(x) - n for c, r, n in zip(chosen, rejected, shared) for x in (c, r))
    if min(shared) == 0 or max(shared) + 2 * suffix_width >= 2 * width:  # tokens per pair, padding included
        rewards = text_rewards(model, chosen + rejected, pad_id, device, last_mlp)
        return rewards[: len(pairs)], rewards[len(pairs) :], margins
    # the prefixes, left-padded, and after each its two continuations, right-padded: rows chosen 0, rejected 0, ...
    prefix_ids, prefix_mask = (t.to(device) for t in left_pad(tensors(c[:n] for c, n in zip(chosen, shared)), pad_id))
    suffixes = [x[n:] for c, r, n in zip(chosen, rejected, shared) for x in (c, r)]
    suffix_ids, suffix_mask = (t.to(device) for t in right_pad(tensors(suffixes), pad_id))
    pair = torch.arange(len(pairs), device=device).repeat_interleave(2)  # the prefix of each continuation
    prefix_positions = (prefix_mask.cumsum(1) - 1).clamp(min=0)  # position ids from the masks: padding shifts none
    positions = prefix_mask.sum(1)[pair].unsqueeze(1) + torch.arange(suffix_ids.shape[1], device=device)
    with autocast(device):
        # Outside DDP's wrapper: one DDP forward per backward (its contract); the gradients through the cache
        # still reach the weights, whose hooks DDP all-reduces
        with mlp_only_at(last_mlp, prefix_positions[:, :0]):  # no position: only the cache is kept
            cache = unwrap(model)(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=prefix_positions,
                                  use_cache=True).past_key_values
        cache.reorder_cache(pair)  # each continuation gets its prefix's keys/values (index_select: differentiable)
        with mlp_only_at(last_mlp, last_tokens(suffix_ids, pad_id)):
            rewards = model(input_ids=suffix_ids, attention_mask=torch.cat([prefix_mask[pair], suffix_mask], 1),
                            position_ids=positions, past_key_values=cache, use_cache=True).logits[:, 0].float()
    return rewards[0::2], rewards[1::2], margins


def length_groups(lengths: list[int], max_groups: int) -> list[list[int]]:
    """The indices of `lengths` sorted by length and cut into at most max_groups runs, each padded to its longest,
    at the cuts that compute the fewest tokens in all (real + padding), counting for each run one more item of the
    longest length (a forward's fixed cost: a cut must save more than that in padding). Dynamic programming over
    the sorted lengths: best[k, j] = (fewest tokens for the j shortest items in k runs, the index i where the last
    of those runs starts: it holds items i..j-1). One run keeps the order given."""
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1 (got {max_groups})")
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes, n = [lengths[i] for i in order], len(lengths)
    best = {(0, 0): (0, 0)}
    for k in range(1, min(max_groups, n) + 1):
        for j in range(k, n + 1):  # (k - 1, i) not in best: no way to put i items in k - 1 runs (k = 1, i > 0)
            best[k, j] = min((best[k - 1, i][0] + (j - i) * sizes[j - 1], i) for i in range(k - 1, j)
                             if (k - 1, i) in best)
    n_runs = min(range(1, min(max_groups, n) + 1), key=lambda k: best[k, n][0] + k * sizes[-1])
    if n_runs == 1:
        return [list(range(n))]  # one run keeps the order given
    runs, j = [], n
    for k in range(n_runs, 0, -1):  # back from the last run
        i = best[k, j][1]
        runs.insert(0, order[i:j])
        j = i
    return runs


def grouped_pair_rewards(model, pairs, pad_id: int, device, max_groups: int = 1, share_prefix: bool = False,
                         last_mlp=None):
    """pair_rewards of `pairs`, in their order, scored in up to max_groups forwards of texts of similar length
    (length_groups): the same scores and gradients as one forward, since padding changes no score, for fewer padded
    tokens when lengths differ. Texts are grouped one by one, or pair by pair (on the longer text) where every pair
    shares a start read once (share_prefix). All forwards but the last skip DDP's wrapper (one DDP forward per
    backward, as pair_rewards does for the prefix); the gradients through them still reach its hooks."""
    wrapper = lambda k, runs: model if k == len(runs) - 1 else unwrap(model)  # noqa: E731
    margins = torch.tensor([p[2] for p in pairs], device=device)
    if share_prefix and all(shared_prefix_length(c, r, pad_id) for c, r, _ in pairs):  # items: pairs -> [run, 2]
        runs = length_groups([max(len(c), len(r)) for c, r, _ in pairs], max_groups)
        scored = [torch.stack(pair_rewards(wrapper(k, runs), [pairs[i] for i in run], pad_id, device, True,
                                           last_mlp)[:2], 1) for k, run in enumerate(runs)]
    else:  # items: texts, all chosen then all rejected -> [run]
        texts = [c for c, _, _ in pairs] + [r for _, r, _ in pairs]
        runs = length_groups([len(t) for t in texts], max_groups)
        scored = [text_rewards(wrapper(k, runs), [texts[i] for i in run], pad_id, device, last_mlp)
                  for k, run in enumerate(runs)]
    rewards = torch.cat(scored)[torch.tensor([i for run in runs for i in run], device=device).argsort()]  # items' order
    chosen, rejected = rewards.unbind(1) if rewards.dim() == 2 else rewards.view(2, -1)
    return chosen, rejected, margins


@torch.no_grad()
def shortcut_problem(model, pairs, pad_id: int, device, **shortcut) -> Optional[str]:
    """Why pair_rewards with a shortcut (share_prefix=True, or last_mlp=...) does not give the plain scores of
    `pairs` (eval mode), or None if it does: checked on one micro-batch before training, so a model a shortcut does
    not fit runs without it. E.g. GPT-OSS's MLP also returns router scores (mlp_only_at raises a TypeError), MiniMax's
    cache cannot be reordered, CTRL's classifier returns no cache."""
    model.eval()
    try:
        plain = torch.cat(pair_rewards(model, pairs, pad_id, device)[:2])
        fast = torch.cat(pair_rewards(model, pairs, pad_id, device, **shortcut)[:2])
        if not torch.allclose(fast, plain, rtol=1e-2, atol=1e-3):  # float rounding only (bf16 under autocast)
            return f"scores differ by up to {(fast - plain).abs().max().item():.2g}"
        return None
    except (AttributeError, IndexError, RuntimeError, TypeError, ValueError) as error:  # model code we do not know
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    finally:
        model.train()


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None):
    """-log sigmoid(r_chosen - r_rejected - margin), averaged over pairs: the Bradley-Terry model's negative
    log-likelihood of the preferences (Ouyang et al. 2022, eq. 1), with the margin of Touvron et al. 2023
    (Llama 2), eq. 2. shapes: [pairs] -> scalar."""
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    return -F.logsigmoid(logits).mean()  # logsigmoid, not log(sigmoid(.)): finite for large negative logits


def center_rewards_loss(chosen_rewards, rejected_rewards):
    """mean((r_chosen + r_rejected)^2): zero when each pair's rewards sum to 0, so rewards stay centred on 0
    (the auxiliary loss of Eisenstein et al. 2023; the Bradley-Terry loss alone is blind to a shift of all
    rewards). shapes: [pairs] -> scalar."""
    return ((chosen_rewards + rejected_rewards) ** 2).mean()


def pairwise_accuracy(chosen_rewards, rejected_rewards):
    """Fraction of pairs ranked right; a tie counts one half, so a constant model scores 0.5 (chance)."""
    right = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
    return right.mean()


@torch.no_grad()
def evaluate(model, pairs, micro_batch_size: int, pad_id: int, device, rank: int = 0, world_size: int = 1,
             share_prefix: bool = False, last_mlp=None) -> dict:
    """Loss, pairwise accuracy, mean reward gap and mean reward over held-out pairs (dropout off). Each process
    scores its share pairs[rank::world_size] and the per-pair sums are added over processes, so every process
    gets the single-process result on all the pairs."""
    model.eval()
    # this process's share (may be empty when there are fewer pairs than processes), sorted by length so that each
    # micro-batch holds texts of similar length (less padding; the sums do not depend on the order)
    local_pairs = sorted(pairs[rank::world_size], key=lambda pair: max(len(pair[0]), len(pair[1])))
    # sums over pairs of: loss, accuracy, reward gap, mean reward of the pair (chosen + rejected) / 2
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for i in range(0, len(local_pairs), micro_batch_size):
        chosen, rejected, margins = pair_rewards(model, local_pairs[i : i + micro_batch_size], pad_id, device,
                                                   share_prefix, last_mlp)
        n = len(chosen)
        sums += torch.stack([bradley_terry_loss(chosen, rejected, margins) * n, pairwise_accuracy(chosen, rejected) * n,
                             (chosen - rejected).sum(), (chosen + rejected).sum() / 2]).double()
    model.train()
    if distributed():
        torch.distributed.all_reduce(sums)
    loss, accuracy, reward_gap, reward_mean = (sums / len(pairs)).tolist()
    return {"eval/loss": loss, "eval/accuracy": accuracy, "eval/reward_gap": reward_gap,
            "eval/reward_mean": reward_mean}


# Training -------------------------------------------------------------------------------------------------------------
def load_pairs(args: Args, tokenizer, max_len: int, verbose: bool = True):
    """Training and evaluation pairs, tokenized, with what was truncated or dropped reported (if verbose)."""
    train = load_dataset(args.dataset, args.dataset_split)
    check_columns(train.column_names)
    if len(train) == 0:
        raise UserError(f"--dataset {args.dataset!r} split {args.dataset_split!r} is empty")
    if args.eval_dataset or args.eval_split:
        flag = "--eval-dataset" if args.eval_dataset else "--eval-split"
        evaluation = load_dataset(args.eval_dataset or args.dataset, args.eval_split or args.dataset_split, flag)
        check_columns(evaluation.column_names, flag)
    elif args.eval_fraction > 0 and len(train) >= 2:
        split = train.train_test_split(test_size=max(1, round(args.eval_fraction * len(train))), seed=args.seed)
        train, evaluation = split["train"], split["test"]
    else:
        evaluation = None
    if evaluation is not None and args.max_eval_examples is not None:
        evaluation = evaluation.select(range(min(args.max_eval_examples, len(evaluation))))
    out = []
    for name, ds in (("training", train), ("evaluation", evaluation)):
        pairs, n_truncated, n_identical, n_same = tokenize_pairs(ds, tokenizer, max_len) if ds else ([], 0, 0, 0)
        if verbose and n_truncated:
            print(f"warning: {n_truncated} of {2 * len(ds)} {name} texts were longer than --max-seq-length {max_len} "
                  f"tokens and were truncated ({args.truncation_side} side)", file=sys.stderr)
        if verbose and n_identical:
            print(f"warning: {n_identical} {name} pairs have chosen == rejected and were dropped", file=sys.stderr)
        if verbose and n_same:
            print(f"warning: {n_same} {name} pairs became identical when truncated to {max_len} tokens and were "
                  "dropped (raise --max-seq-length)", file=sys.stderr)
        if not pairs and name == "training":
            raise UserError("no training pair is left (see the warnings above)")
        out.append(pairs)
    if verbose:
        print(f"data: {len(out[0])} training and {len(out[1])} evaluation pairs of <= {max_len} tokens per text")
    return out


def load_model(args: Args, tokenizer, device, verbose: bool = True, config=None):
    """A sequence classifier with a single output. A checkpoint with another head (a language model, a 2-label
    classifier) gets a fresh one-output head. Weights stay in fp32 (bf16 only inside autocast)."""
    remote = {"trust_remote_code": args.trust_remote_code}
    config = config or from_pretrained(AutoConfig, args.model, "--model", **remote)
    kwargs = {"num_labels": 1, "dtype": weights_dtype(args.dtype, device, trained=args.lora_r == 0), **remote}
    classifier = bool(config.architectures) and "ForSequenceClassification" in config.architectures[0]
    if classifier and config.num_labels != 1:
        kwargs["ignore_mismatched_sizes"] = True
    if verbose and not (classifier and config.num_labels == 1):  # one line of ours for transformers' load report
        print(f"note: --model has {f'a {config.num_labels}-label head' if classifier else 'no classification head'}; "
              "a fresh 1-output head is initialised and trained (on purpose)")
    with quiet_load_report():
        # (--quantize: the fresh head stays unquantized and trains in full)
        model = from_pretrained(AutoModelForSequenceClassification, args.model, "--model", **kwargs,
                                **quantization(args, device, keep=("score", "classifier")))
    # Decoder classifiers (GPT-2, Llama, ...) read the score at the last token that is not config.pad_token_id;
    # left unset or different from the tokenizer's, the score would be read at a pad token or fail for batches.
    model.config.pad_token_id = tokenizer.pad_token_id
    if args.disable_dropout:  # before LoRA: --lora-dropout stays as asked
        disable_dropout(model)
    fuse_gelu(model)  # speed only: the same function as the model's own
    if args.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise UserError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
        model.activation_checkpointing_enable()  # non-reentrant: works with frozen (LoRA) base weights
    # task SEQ_CLS: peft trains and saves the fresh head ("score"/"classifier") in full beside the adapters
    return add_lora(model, args, task_type="SEQ_CLS").to(device)


def main(args: Args):
    device, rank, world_size = init_distributed(args.device)  # one process, or one per GPU/CPU under torchrun
    args = check_args(args, world_size)
    is_main = rank == 0  # only the first process prints, logs, tracks and saves
    quiet_libraries()
    # Everything the user gave is checked before any weights load: paths, the output folder (a run in it is never
    # lost: --resume or --overwrite), the tokenizer, the model's config and the data
    check_paths(("--model", args.model), ("--dataset", args.dataset), ("--eval-dataset", args.eval_dataset))
    scheduled = args.lr_scheduler != "constant" or args.warmup_ratio > 0  # the schedule depends on the length
    resume_from = prepare_output_dir(args, is_main, length_flags=("max_steps", "num_epochs"), scheduled=scheduled,
                                     may_change=("eval_every",), before_flags={"disable_dropout": False})
    out_dir, ckpt_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoint"

    # Tokenizer, config, data, then the model
    tokenizer = from_pretrained(AutoTokenizer, args.model, "--model", trust_remote_code=args.trust_remote_code)
    config = from_pretrained(AutoConfig, args.model, "--model", trust_remote_code=args.trust_remote_code)
    check_tokenizer(tokenizer, config, "--model")  # as gpt2 reward models do: pad with EOS if there is no pad token
    tokenizer.truncation_side = args.truncation_side
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    max_len = args.max_seq_length or min(context or 1024, 1024)
    if context and max_len > context:
        raise UserError(f"--max-seq-length {max_len} exceeds the model's context of {context} positions")
    # Every process loads and tokenizes all pairs (the same on every rank) and takes its share of each batch below
    train_pairs, eval_pairs = load_pairs(args, tokenizer, max_len, verbose=is_main)
    with torch.random.fork_rng(devices=[]):  # the fresh head's init depends on --seed only: the same on every rank
        torch.manual_seed(args.seed)
        model = load_model(args, tokenizer, device, verbose=is_main, config=config)
    # Train mode: dropout (the config's, with --no-disable-dropout; LoRA's always) in training, off in evaluation.
    model.train()
    args.num_steps = args.max_steps or math.ceil(args.num_epochs * len(train_pairs) / args.batch_size)
    warmup_steps = round(args.warmup_ratio * args.num_steps)
    if resume_from:
        load_weights(resume_from, model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=args.learning_rate, fused=True)  # one kernel for all tensors (CPU and CUDA)
    start_step = load_training_state(resume_from, model, optimizer, fsdp=False)["step"] if resume_from else 0
    # Under torchrun DDP averages the gradients over the processes in the backward pass (and broadcasts rank 0's
    # weights at the start): each rank's mean loss over its equal share then gives the whole batch's mean gradient.
    ddp_model = distribute(model, device, fsdp=False)
    if args.compile:
        compile_blocks(model)
    if is_main:
        if resume_from:
            print(f"resumed from {resume_from} after step {start_step}")
        # args.json, metrics.jsonl (cut back to the checkpoint's step on resume), wandb with --track
        tracker = Tracker(out_dir, args, start_step, args.track, args.wandb_project, step_key="step")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"reward model: {args.num_steps} steps x {args.batch_size} pairs on {world_size} x {device}; "
              f"{n_params / 1e6:.1f}M parameters ({sum(p.numel() for p in params) / 1e6:.2f}M trained); "
              f"outputs in {out_dir}")

    pad_id, n_micro = tokenizer.pad_token_id, args.gradient_accumulation_steps
    # a pair's common start is read once where attention is causal (an encoder's tokens also read what follows)
    # and caches survive (activation checkpointing drops them)
    share_prefix = args.share_prefix and causal(model) and not args.gradient_checkpointing
    # the score reads one position per text: the last block's MLP runs there only. Not with activation
    # checkpointing (its recomputation in the backward pass would run without the hooks), under torch.compile (the
    # compiled blocks would recompile for hooks added and removed at each call), nor for code from the hub (an MLP
    # may add a training-only loss over the tokens it sees, e.g. an MoE's load balancing)
    trim = args.trim_last_block and not (args.gradient_checkpointing or args.compile or args.trust_remote_code)
    last_mlp = last_block_mlp(model) if trim else None
    # Each shortcut is tried once on real texts against the plain scores; a model it does not fit runs without it.
    # Each probe pair is a text and the same text with its second half reversed: they share a start.
    texts = [c for c, _, _ in train_pairs if len(c) >= 4][: args.micro_batch_size]
    probe = [(c, c[: len(c) // 2] + c[len(c) // 2 :][::-1], 0.0) for c in texts]
    problem = probe and share_prefix and shortcut_problem(model, probe, pad_id, device, share_prefix=True)
    if problem:
        share_prefix = False
        if is_main:
            print(f"note: --share-prefix is off: {type(model).__name__} fails its check ({problem})")
    problem = probe and last_mlp is not None and shortcut_problem(model, probe, pad_id, device, last_mlp=last_mlp)
    if problem:
        last_mlp = None
        if is_main:
            print(f"note: --trim-last-block is off: {type(model).__name__} fails its check ({problem})")
    # one micro-batch of texts of mixed lengths is scored in a few forwards of similar lengths (less padding); on a
    # GPU one wide forward keeps it busier (not measured yet: choose with --length-groups), and compiled blocks
    # would recompile for the extra shapes
    groups = args.length_groups or (1 if torch.device(device).type == "cuda" or args.compile else 4)
    if start_step == 0 and eval_pairs:
        stats = evaluate(model, eval_pairs, args.micro_batch_size, pad_id, device, rank, world_size,
                         share_prefix, last_mlp)
        if is_main:
            tracker.log({"step": 0, **stats})
    bar = tqdm(range(start_step, args.num_steps), desc="reward", initial=start_step,
               total=args.num_steps, dynamic_ncols=True, disable=not is_main)
    for step in bar:
        # Each step seeds its dropout (--no-disable-dropout, LoRA's) from (seed, step, rank): a resumed run draws
        # exactly what an uninterrupted one would, with no RNG state to save, and the processes draw different masks.
        torch.manual_seed(args.seed + 100_000 * step + rank)
        start = time.perf_counter()
        lr = learning_rate_at(step, args.num_steps, warmup_steps, args.learning_rate, args.lr_scheduler)
        for group in optimizer.param_groups:
            group["lr"] = lr
        local_indices = batch_indices(step, args.batch_size, len(train_pairs), args.seed, rank, world_size)
        b_chosen, b_rejected, step_loss = [], [], 0.0
        for j in range(0, args.local_batch_size, args.micro_batch_size):
            micro_pairs = [train_pairs[i] for i in local_indices[j : j + args.micro_batch_size]]
            last = j + args.micro_batch_size == args.local_batch_size
            # DDP all-reduces the gradients once per step, in the last micro-batch's backward
            with ddp_model.no_sync() if world_size > 1 and not last else nullcontext():
                chosen_rewards, rejected_rewards, margins = grouped_pair_rewards(
                    ddp_model, micro_pairs, pad_id, device, groups, share_prefix=share_prefix, last_mlp=last_mlp)
                loss = bradley_terry_loss(chosen_rewards, rejected_rewards, margins)
                if args.center_rewards_coefficient:
                    center = center_rewards_loss(chosen_rewards, rejected_rewards)
                    loss = loss + args.center_rewards_coefficient * center
                (loss / n_micro).backward()  # micro-batches hold equal numbers of pairs: this is the step's mean
            step_loss += loss.item() / n_micro
            b_chosen.append(chosen_rewards.detach())
            b_rejected.append(rejected_rewards.detach())
        # the gradients are the same on every rank now, so the clipping and the update are too
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf")).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # every process holds local_batch_size pairs: the mean over processes is the mean over the whole batch
        b_chosen, b_rejected = torch.cat(b_chosen), torch.cat(b_rejected)
        stats = mean_over_processes({
            "step": step + 1, "epoch": (step + 1) * args.batch_size / len(train_pairs), "losses/loss": step_loss,
            "losses/grad_norm": grad_norm, "objective/accuracy": pairwise_accuracy(b_chosen, b_rejected).item(),
            "objective/reward_gap": (b_chosen - b_rejected).mean().item(),
            "objective/reward_mean": torch.cat([b_chosen, b_rejected]).mean().item(), "charts/learning_rate": lr,
            "perf/pairs_per_s": args.batch_size / (time.perf_counter() - start),  # the whole batch's pairs
            "perf/peak_memory_mb": peak_memory_mb(device),  # per process
        }, device)
        if eval_pairs and ((args.eval_every and (step + 1) % args.eval_every == 0) or step + 1 == args.num_steps):
            stats.update(evaluate(model, eval_pairs, args.micro_batch_size, pad_id, device, rank, world_size,
                                  share_prefix, last_mlp))
        if not is_main:
            continue
        bar.set_postfix(loss=f"{stats['losses/loss']:.3f}", acc=f"{stats['objective/accuracy']:.2f}")
        if "eval/loss" in stats:
            bar.write(f"step {step + 1:>5} | loss {stats['losses/loss']:.4f} | eval loss {stats['eval/loss']:.4f} "
                      f"| eval accuracy {stats['eval/accuracy']:.3f} | gap {stats['eval/reward_gap']:+.3f} "
                      f"| lr {lr:.2e} | {stats['perf/pairs_per_s']:.1f} pairs/s")
        tracker.log(stats)
        if (step + 1) % args.save_every == 0 or step + 1 == args.num_steps:
            save_checkpoint(ckpt_dir, model, tokenizer, full_state_dicts(model, optimizer, fsdp=False), step + 1)

    finish()  # under torchrun: wait for rank 0's last checkpoint, then leave the process group
    if not is_main:
        return None
    # Final model at the top of the output folder: AutoModelForSequenceClassification.from_pretrained loads it
    final = model.merge_and_unload() if args.lora_r > 0 and args.merge_lora and args.quantize == "none" else model
    final.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tracker.close()
    print(f"done: reward model in {out_dir} (AutoModelForSequenceClassification.from_pretrained; "
          f"ppo.py --reward-model {out_dir} --reward-label 0), metrics in {tracker.path}, "
          f"resumable checkpoint in {ckpt_dir}")
    return tracker.path


if __name__ == "__main__":
    cli(main, Args)
