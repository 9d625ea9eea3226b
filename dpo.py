"""Direct preference optimisation (DPO) and its variants (IPO, hinge, robust, conservative, SimPO), in one file.

DPO (Rafailov et al. 2023) trains a policy on preference pairs with no reward model and no sampling: the policy's
log-probability ratio to a frozen reference is an implicit reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)), and the
Bradley-Terry likelihood of "chosen beats rejected" under that reward is maximised (eq. 7):
    loss = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))]).
Variants a flag away (--loss-type): IPO (Azar et al. 2023), hinge (SLiC, Zhao et al. 2023), robust DPO (Chowdhury et
al. 2024), conservative DPO (--label-smoothing), and the reference-free SimPO (Meng et al. 2024). Semantics and
metric names follow TRL's DPOTrainer so results compare. Read top to bottom: arguments, data (prompt / chosen /
rejected, tokenized as sft.py trains), log-probabilities, the losses (each tested), and the loop in `main`.

    python dpo.py --model lvwerra/gpt2-imdb --dataset trl-lib/ultrafeedback_binarized --beta 0.1
    python dpo.py --model quickstart/sft --dataset quickstart/data/prefs_train.jsonl          # offline
    torchrun --nproc_per_node 8 dpo.py --model gpt2 ... --lora-r 16   # DDP (or --fsdp): each process a share of pairs
"""

import copy
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
import tyro
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from utils.checkpoints import full_state_dicts, load_training_state, load_weights, save_checkpoint, save_final_model
from utils.data import batch_indices
from utils.distributed import all_gather, distribute, distributed, finish, init_distributed, mean_over_processes, unwrap
from utils.hub import UserError, check_paths, check_tokenizer, from_pretrained, load_dataset, quiet_libraries
from utils.models import (add_lora, check_dtype, check_quantize, disable_dropout, enable_checkpointing, fuse_gelu,
                          lm_head_weight, quantization, weights_dtype)
from utils.prompts import check_context, right_pad
from utils.runtime import (Tracker, autocast, check_positive, cli, exact_div, learning_rate_at, peak_memory_mb,
                           prepare_output_dir)


@dataclass
class Args:
    # experiment
    exp_name: str = "dpo"
    """name of the run (wandb run name prefix)"""
    seed: int = 1
    """seed of the run (the order of the pairs): a CPU run is repeatable"""
    output_dir: str = "runs/dpo"
    """where checkpoints, metrics.jsonl and the final model go"""
    resume: bool = False
    """continue the run in --output-dir from its checkpoint; these may differ: --max-steps, speed/logging flags"""
    overwrite: bool = False
    """replace the run in --output-dir (without it or --resume, a folder holding a run is refused)"""
    save_every: int = 500
    """save a checkpoint every this many optimizer steps (and always at the end)"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without network)"""
    wandb_project: str = "rlhf-dpo"
    """wandb project name"""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... ('auto': cuda if available)"""
    fsdp: bool = False
    """under torchrun: shard policy, reference and Adam state over processes (FSDP), not copy (DDP)"""

    # model
    model: str = "gpt2"
    """policy, and the reference it starts from: a causal LM (hub id or local folder), usually an SFT model"""
    trust_remote_code: bool = False
    """allow models whose code lives on the hub (runs that code!)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: policy fp32 (bf16 autocast on CUDA); reference and LoRA base bf16 on a bf16 GPU; or one dtype for all"""
    gradient_checkpointing: bool = False
    """recompute each block's activations in the backward pass: less memory, ~30% slower"""

    # data
    dataset: str = "trl-lib/ultrafeedback_binarized"
    """pairs with columns chosen, rejected and optionally prompt (text or chat messages): hub id, folder or file"""
    dataset_config: Optional[str] = None
    """configuration of a hub dataset"""
    dataset_split: str = "train"
    """split of --dataset to train on"""
    eval_dataset: Optional[str] = None
    """held-out pairs in the same format (None: --eval-split of --dataset, or no evaluation)"""
    eval_split: Optional[str] = None
    """split of --dataset (or of --eval-dataset) to evaluate on"""
    max_eval_examples: Optional[int] = None
    """evaluate on the first this many held-out pairs only (faster evals)"""
    max_prompt_length: int = 512
    """longer prompts keep their last this many tokens (the end, next to the completion); counted and reported"""
    max_length: int = 1024
    """prompt + completion tokens; longer completions are cut on the right (counted and reported)"""

    # loss
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo"] = "sigmoid"
    """DPO (sigmoid), IPO, hinge (SLiC), robust DPO, or SimPO (reference-free, length-normalised)"""
    beta: float = 0.1
    """inverse temperature of the implicit reward beta * log(pi / pi_ref): higher stays closer to the reference"""
    label_smoothing: float = 0.0
    """probability that a pair's label is flipped (conservative DPO with sigmoid; robust DPO's noise rate)"""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma (only with --loss-type simpo)"""
    precompute_ref_logprobs: bool = False
    """score every pair under the reference once before training, then keep no reference model in memory"""

    # optimisation
    num_epochs: float = 1.0
    """passes over the training pairs (ignored when --max-steps is set)"""
    max_steps: Optional[int] = None
    """number of optimizer steps (overrides --num-epochs)"""
    batch_size: int = 32
    """pairs per optimizer step, over all processes (under torchrun each rank takes batch_size / world size)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step on each process (memory only: the update is the same)"""
    learning_rate: float = 1e-6
    """peak AdamW learning rate (TRL's default)"""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """decay to 0 over the run after the warmup (linear: TRL's default), or constant"""
    warmup_ratio: float = 0.0
    """fraction of the steps over which the learning rate rises linearly from 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: Optional[float] = 1.0
    """clip the gradient norm to this value (None: no clipping)"""
    eval_every: int = 100
    """evaluate every this many steps (also before the first step and at the end)"""

    # LoRA (peft)
    lora_r: int = 0
    """LoRA rank (0: full fine-tuning). With LoRA the reference is the policy with its adapters disabled"""
    lora_alpha: int = 16
    """LoRA alpha (the adapter's output is scaled by alpha / r)"""
    lora_dropout: float = 0.0
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
    check_positive(args, "batch_size", "gradient_accumulation_steps", "learning_rate", "save_every", "beta",
                   "max_prompt_length", "max_length", "max_eval_examples", "max_steps", "num_epochs")
    if args.eval_every < 0 or args.weight_decay < 0:
        raise UserError("--eval-every and --weight-decay must be >= 0")
    if not 0 <= args.label_smoothing < 0.5:
        raise UserError("--label-smoothing must be in [0, 0.5): it is the probability that a label is wrong")
    if args.label_smoothing > 0 and args.loss_type in ("ipo", "hinge"):
        raise UserError(f"--label-smoothing has no meaning for --loss-type {args.loss_type} (use sigmoid or robust)")
    if args.loss_type == "simpo" and args.precompute_ref_logprobs:
        raise UserError("--loss-type simpo uses no reference model: drop --precompute-ref-logprobs")
    if not 0 <= args.warmup_ratio < 1:
        raise UserError("--warmup-ratio must be in [0, 1)")
    if args.fsdp and world_size == 1:
        raise UserError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node N (N > 1)")
    args.world_size = world_size
    args.local_batch_size = exact_div(args.batch_size, world_size,
                                      "--batch-size / processes (torchrun --nproc_per_node)")
    args.micro_batch_size = exact_div(args.local_batch_size, args.gradient_accumulation_steps,
                                      "--batch-size / processes / --gradient-accumulation-steps")
    return args


# Data: each pair as (prompt, chosen, rejected) token ids, tokenized the way sft.py trains --------------------------
def check_columns(columns: list[str], flag: str = "--dataset"):
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    if missing:
        raise UserError(f"{flag} needs the columns 'chosen' and 'rejected' (optional: 'prompt'); missing {missing}, "
                        f"found {columns}")


def split_pair(example: dict, tokenizer) -> tuple[str, str, str, bool]:
    """(prompt, chosen, rejected) texts of one pair, and whether they are chat-template text. Without a prompt column
    the prompt is the part the two share: the common leading messages of conversations, or the common start of two
    texts cut back to before a whitespace (no word is split). Conversations are rendered with the tokenizer's chat
    template: the prompt with the generation prompt, each completion as the rest of the whole conversation's text."""
    chosen, rejected, prompt = example["chosen"], example["rejected"], example.get("prompt")
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise UserError("--dataset: 'chosen' and 'rejected' must both be text or both be lists of messages")
    if not isinstance(chosen, list):
        if prompt is None:
            n = 0
            while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                n += 1
            while n > 0 and not chosen[n - 1].isspace():
                n -= 1
            n = max(n - 1, 0)  # the whitespace goes with the completion, as GPT-2-style tokens carry it
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        return prompt, chosen, rejected, False
    if tokenizer.chat_template is None:
        raise UserError("--dataset holds conversations (lists of messages) but the tokenizer of --model has no chat "
                        "template: train the SFT model with one (sft.py --chat-template), or give the pairs as text")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if prompt is None:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    completions = []
    for completion in (chosen, rejected):
        text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not text.startswith(prompt_text):
            raise UserError("the chat template renders a conversation differently from its prompt with the generation "
                            "prompt, so the completion cannot be located; give the pairs as text")
        completions.append(text[len(prompt_text):])
    return prompt_text, completions[0], completions[1], True


def tokenize_pairs(dataset, tokenizer, max_prompt_length: int, max_length: int):
    """Tokenize every pair into (prompt_ids, chosen_ids, rejected_ids), lists of ints. As sft.py: the prompt gets the
    tokenizer's special tokens (BOS) unless a chat template wrote them; a text completion ends with EOS (the policy
    learns to stop; a chat template closes the turn itself). Prompt and completions are tokenized apart (as TRL), so a
    completion's tokens do not depend on its prompt. Too long: the prompt keeps its end, then the completions are cut
    on the right to max_length. Pairs whose completions are (or become) identical carry no preference: dropped.
    Returns (pairs, n_truncated, n_identical)."""
    parts = [split_pair(ex, tokenizer) for ex in dataset.to_list()]  # to_list: 10x faster than iterating
    if not parts:
        return [], 0, 0
    prompts = [tokenizer(p, add_special_tokens=not chat)["input_ids"] for p, _, _, chat in parts]
    completions = tokenizer([t for _, c, r, _ in parts for t in (c, r)], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id]
    pairs, n_truncated, n_identical = [], 0, 0
    for k, (prompt_ids, (_, _, _, chat)) in enumerate(zip(prompts, parts)):
        chosen, rejected = (ids + ([] if chat else eos) for ids in completions[2 * k : 2 * k + 2])
        room = max_length - min(len(prompt_ids), max_prompt_length)
        if len(prompt_ids) > max_prompt_length or max(len(chosen), len(rejected)) > room:
            n_truncated += 1
            prompt_ids, chosen, rejected = prompt_ids[len(prompt_ids) - max_prompt_length :], chosen[:room], \
                rejected[:room]
        if chosen == rejected:
            n_identical += 1
            continue
        pairs.append((prompt_ids, chosen, rejected))
    return pairs, n_truncated, n_identical


# Log-probabilities and the losses (tested against hand-computed values in tests/test_dpo.py) -------------------------
def concatenated_logps(model, pairs, pad_id: int, device, head=None):
    """Summed log-probs of the completion tokens (prompt masked) of the chosen and the rejected sequences of `pairs`,
    from one forward over the concatenated batch [chosen..., rejected...] (right-padded: positions need no ids).
    A first token with nothing before it (no prompt, no BOS) has no prediction and is left out. head: the LM head's
    weight (utils.models.lm_head_weight) to compute logits only where a completion token is predicted (prompts and
    padding then cost no logits), or None for the model's own logits everywhere.
    Returns chosen_logps, rejected_logps [pairs] and the completion token counts [2 * pairs]."""
    sequences = [torch.tensor(p + c) for p, c, _ in pairs] + [torch.tensor(p + r) for p, _, r in pairs]
    input_ids, attention_mask = right_pad(sequences, pad_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)  # shape: [2 * pairs, len]
    starts = torch.tensor([len(p) for p, _, _ in pairs] * 2, device=device).clamp(min=1)
    positions = torch.arange(1, input_ids.shape[1], device=device)
    # position t predicts token t + 1: mask[:, t] says whether token t + 1 is a completion token
    mask = (positions >= starts[:, None]) & attention_mask[:, 1:].bool()  # shape: [2 * pairs, len - 1]
    # No attention mask: with right padding a causal LM's real tokens never attend to the padding after them, so
    # their outputs are the masked ones (and without a mask attention runs its fused causal kernel); the padded
    # positions' outputs are left out of the sums below.
    with autocast(device):
        if head is None:
            logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1][mask]
        else:
            out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True,
                        logits_to_keep=input_ids.new_zeros(0))  # no logits from the model itself
            logits = out.hidden_states[-1][:, :-1][mask] @ head.T  # shape: [completion tokens, vocab]
    token_logps = torch.gather(F.log_softmax(logits.float(), -1), 1, input_ids[:, 1:][mask].unsqueeze(1)).squeeze(1)
    sums = torch.zeros(mask.shape, device=device).masked_scatter(mask, token_logps).sum(1)  # shape: [2 * pairs]
    return sums[: len(pairs)], sums[len(pairs) :], mask.sum(1)


def preference_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type: str, beta: float,
                    label_smoothing: float = 0.0, simpo_gamma: float = 0.0):
    """Loss per pair and the implicit rewards. Log-probs [pairs]: sums over completion tokens (sigmoid, hinge, robust)
    or per-token means (ipo, simpo: the caller divides by the lengths). With h = (chosen_logps - ref_chosen_logps) -
    (rejected_logps - ref_rejected_logps), the log-ratio margin:
      sigmoid: -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)      DPO eq. 7; e > 0: conservative DPO
      robust:  (-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e)   Chowdhury et al. 2024, eq. 10:
               unbiased under labels flipped with probability e
      hinge:   max(0, 1 - beta h)                                            SLiC (Zhao et al. 2023), as TRL
      ipo:     (h - 1 / (2 beta))^2                                          Azar et al. 2023, eq. 17
      simpo:   -log sigmoid(beta (chosen_logps - rejected_logps) - gamma)    Meng et al. 2024, eq. 6: no reference
    Returns (losses [pairs], chosen_rewards [pairs], rejected_rewards [pairs]); rewards = beta * log-ratio (SimPO:
    beta * mean log-prob), detached."""
    if loss_type == "simpo":
        logits = beta * (chosen_logps - rejected_logps) - simpo_gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
        return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss type {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def pair_losses(policy, ref_lm, pairs, ref_logps, args: Args, pad_id: int, device, heads=(None, None)):
    """Losses, rewards and log-probs of a micro-batch of pairs. ref_logps [pairs, 2] (precomputed: chosen,
    rejected) or None: the reference scores them now, without gradients (ref_lm, or with ref_lm None the LoRA policy
    with its adapters disabled). heads: the LM head weights of policy and reference (concatenated_logps) or None.
    Returns (losses [pairs], stats: dict of [pairs] tensors, detached)."""
    chosen_logps, rejected_logps, lengths = concatenated_logps(policy, pairs, pad_id, device, heads[0])
    if args.loss_type == "simpo":
        ref_logps = torch.zeros(len(pairs), 2, device=device)  # unused
    elif ref_logps is None:
        ref_logps = reference_logps(ref_lm, unwrap(policy), pairs, pad_id, device, heads[1])
    ref_chosen, ref_rejected = ref_logps[:, 0], ref_logps[:, 1]
    if args.loss_type in ("ipo", "simpo"):  # per-token means: no preference for long or short completions
        n = len(pairs)
        chosen_logps, rejected_logps = chosen_logps / lengths[:n], rejected_logps / lengths[n:]
        ref_chosen, ref_rejected = ref_chosen / lengths[:n], ref_rejected / lengths[n:]
    losses, chosen_rewards, rejected_rewards = preference_loss(
        chosen_logps, rejected_logps, ref_chosen, ref_rejected, args.loss_type, args.beta, args.label_smoothing,
        args.simpo_gamma)
    stats = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
             "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
             "rewards/margins": chosen_rewards - rejected_rewards,
             "logps/chosen": chosen_logps.detach(), "logps/rejected": rejected_logps.detach()}
    return losses, stats


@torch.no_grad()
def reference_logps(ref_lm, policy, pairs, pad_id: int, device, head=None):
    """[pairs, 2] summed completion log-probs (chosen, rejected) under the reference: ref_lm, or with ref_lm None the
    LoRA policy with its adapters disabled (no second copy of the weights)."""
    if ref_lm is not None:
        chosen, rejected, _ = concatenated_logps(ref_lm, pairs, pad_id, device, head)
    else:
        with policy.disable_adapter():
            chosen, rejected, _ = concatenated_logps(policy, pairs, pad_id, device, head)
    return torch.stack([chosen, rejected], 1).float()


def precompute_reference(ref_lm, policy, pairs, micro_batch_size: int, pad_id: int, device, head=None):
    """reference_logps of every pair, once, [len(pairs), 2]. Under torchrun each process scores a contiguous block of
    ceil(n / processes) pairs (the last block padded, so every process runs as many forwards, as FSDP needs) and the
    blocks are gathered in rank order."""
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed() else (0, 1)
    per = math.ceil(len(pairs) / world)
    block = [pairs[min(i, len(pairs) - 1)] for i in range(rank * per, (rank + 1) * per)]
    out = [reference_logps(ref_lm, policy, block[i : i + micro_batch_size], pad_id, device, head)
           for i in tqdm(range(0, per, micro_batch_size), desc="reference log-probs", disable=rank != 0, leave=False)]
    return all_gather(torch.cat(out))[: len(pairs)]


@torch.no_grad()
def evaluate(policy, ref_lm, pairs, ref_logps, args: Args, pad_id: int, device, heads=(None, None)) -> dict:
    """eval/loss and eval/<TRL's metrics> over the held-out pairs. Each process scores every world_size-th
    micro-batch (all run as many forwards, as FSDP needs) and the sums are added: the one-process result."""
    rank = torch.distributed.get_rank() if distributed() else 0
    batches = range(0, len(pairs), args.micro_batch_size)
    sums = torch.zeros(7, dtype=torch.float64, device=device)  # loss, the six stats
    for k in range(rank, math.ceil(len(batches) / args.world_size) * args.world_size, args.world_size):
        s = slice(batches[min(k, len(batches) - 1)], batches[min(k, len(batches) - 1)] + args.micro_batch_size)
        ref = ref_logps[s] if ref_logps is not None else None
        losses, stats = pair_losses(policy, ref_lm, pairs[s], ref, args, pad_id, device, heads)
        if k < len(batches):  # one past the end counts for nothing
            sums += torch.stack([losses.sum(), *(v.sum() for v in stats.values())]).double()
    if distributed():
        torch.distributed.all_reduce(sums)
    names = ["eval/loss"] + [f"eval/{name}" for name in stats]
    return dict(zip(names, (sums / len(pairs)).tolist()))


# Training ---------------------------------------------------------------------------------------------------------
def load_pairs(args: Args, tokenizer, verbose: bool = True):
    """Training and held-out pairs, tokenized, with what was truncated or dropped reported (if verbose)."""
    sources = [("--dataset", args.dataset, args.dataset_split)]
    if args.eval_dataset or args.eval_split:
        sources.append(("--eval-dataset" if args.eval_dataset else "--eval-split", args.eval_dataset or args.dataset,
                        args.eval_split or "train"))
    out = [[], []]
    for k, (flag, name, split) in enumerate(sources):
        dataset = load_dataset(name, split, flag, args.dataset_config if name == args.dataset else None)
        check_columns(dataset.column_names, flag)
        if flag != "--dataset" and args.max_eval_examples is not None:
            dataset = dataset.select(range(min(args.max_eval_examples, len(dataset))))
        pairs, n_truncated, n_identical = tokenize_pairs(dataset, tokenizer, args.max_prompt_length, args.max_length)
        if verbose and n_truncated:
            print(f"warning: {n_truncated} of {len(dataset)} {flag} pairs were cut to fit --max-length "
                  f"{args.max_length} tokens (prompts to their last {args.max_prompt_length})", file=sys.stderr)
        if verbose and n_identical:
            print(f"warning: {n_identical} {flag} pairs have chosen == rejected (after truncation) and were dropped",
                  file=sys.stderr)
        if not pairs:
            raise UserError(f"{flag} {name!r}: no pair is left (see the warnings above)")
        out[k] = pairs
    if verbose:
        print(f"data: {len(out[0])} training and {len(out[1])} held-out pairs")
    return out


def load_inputs(args: Args):
    """Everything the user gave, checked before any weights load: the model's config and tokenizer, the pairs, and
    that the longest sequence fits the model's context."""
    config = from_pretrained(AutoConfig, args.model, "--model", trust_remote_code=args.trust_remote_code)
    if config.is_encoder_decoder:
        raise UserError(f"--model {args.model!r} is an encoder-decoder model; dpo.py trains causal LMs")
    tokenizer = from_pretrained(AutoTokenizer, args.model, "--model", trust_remote_code=args.trust_remote_code)
    check_tokenizer(tokenizer, config, "--model")  # no id past the embedding; pads with EOS if it has no pad token
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer of --model has no EOS token: dpo.py ends text completions with it (as sft.py)")
    train_pairs, eval_pairs = load_pairs(args, tokenizer, verbose=not distributed() or
                                         torch.distributed.get_rank() == 0)
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in train_pairs + eval_pairs)
    check_context(config, longest, f"the longest pair ({longest} tokens)", "lower --max-length")
    return tokenizer, train_pairs, eval_pairs


def make_policy(args: Args, device, resume_from: Optional[Path]):
    """The policy (LoRA adapters if asked), the module that trains it (DDP's wrapper, the policy sharded in place by
    FSDP, or the policy) and the frozen reference: a copy of the starting policy, or None when the LoRA policy
    with its adapters disabled serves (or no reference is needed: SimPO, precomputed log-probs)."""
    lm = from_pretrained(AutoModelForCausalLM, args.model, "--model", trust_remote_code=args.trust_remote_code,
                         dtype=weights_dtype(args.dtype, device, trained=args.lora_r == 0),
                         **quantization(args, device))
    fuse_gelu(lm)  # speed only: the same function as the model's own (GPT-2)
    # a copy is needed without LoRA, unless SimPO (no reference) or the log-probs are precomputed before the first step
    needs_copy = args.loss_type != "simpo" and args.lora_r == 0 and not (args.precompute_ref_logprobs and
                                                                         resume_from is None)
    frozen = weights_dtype(args.dtype, device, trained=False)  # the reference's dtype (--dtype)
    ref_lm = copy.deepcopy(lm).requires_grad_(False).to(device, frozen).eval() if needs_copy else None
    if args.gradient_checkpointing:
        enable_checkpointing(lm)
    # Dropout off (as TRL's default disable_dropout), in train mode (activation checkpointing needs it): the policy's
    # and the reference's log-probs of a pair agree exactly at the start, so every implicit reward starts at 0.
    policy = add_lora(disable_dropout(lm), args, task_type="CAUSAL_LM").to(device).train()
    if resume_from is not None:
        load_weights(resume_from, policy)
    lms = (policy, ref_lm) if ref_lm is not None else (policy,)
    return policy, distribute(policy, device, args.fsdp, lms=lms), ref_lm


def main(args: Args):
    device, rank, world_size = init_distributed(args.device)  # one process, or one per GPU/CPU under torchrun
    args = check_args(args, world_size)
    is_main = rank == 0  # only the first process prints, logs and saves
    quiet_libraries()
    # Checked before any weights load: paths, the output folder (--resume/--overwrite), then load_inputs
    check_paths(("--model", args.model), ("--dataset", args.dataset), ("--eval-dataset", args.eval_dataset))
    scheduled = args.lr_scheduler != "constant" or args.warmup_ratio > 0  # the schedule depends on the length
    resume_from = prepare_output_dir(args, is_main, length_flags=("max_steps", "num_epochs"), scheduled=scheduled,
                                     may_change=("eval_every", "max_eval_examples"))
    out_dir, ckpt_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoint"
    tokenizer, train_pairs, eval_pairs = load_inputs(args)
    pad_id = tokenizer.pad_token_id
    args.num_steps = args.max_steps or math.ceil(args.num_epochs * len(train_pairs) / args.batch_size)

    # Models: policy, reference (a frozen copy; the LoRA policy with adapters off; or log-probs computed once)
    torch.manual_seed(args.seed)
    policy, train_policy, ref_lm = make_policy(args, device, resume_from)
    # made before any forward: FSDP's root module keeps its weights gathered after one (other tensors than these)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay, fused=True)
    # Speed only: the LM heads' weights if logits = hidden @ W.T (then computed at completion tokens only), else None
    p, c, _ = train_pairs[0]
    example = {"input_ids": torch.tensor([p + c], device=device),
               "attention_mask": torch.ones(1, len(p + c), dtype=torch.long, device=device)}
    heads = tuple(lm_head_weight(m, example, args.fsdp) if m is not None else None
                  for m in (unwrap(policy), ref_lm if ref_lm is not None else unwrap(policy)))
    train_ref, eval_ref = None, None
    if args.precompute_ref_logprobs:
        # the reference: the copy, the LoRA policy with adapters off (None), or the policy itself before its first step
        reference = ref_lm if ref_lm is not None or args.lora_r > 0 else unwrap(policy)
        train_ref, eval_ref = (precompute_reference(reference, unwrap(policy), pairs, args.micro_batch_size, pad_id,
                                                    device, heads[1]) if pairs else None
                               for pairs in (train_pairs, eval_pairs))
        ref_lm = None  # the copy is freed: no reference model in memory while training
    start_step = load_training_state(resume_from, policy, optimizer, args.fsdp)["step"] if resume_from else 0
    if is_main:
        tracker = Tracker(out_dir, args, start_step, args.track, args.wandb_project, step_key="step")
        trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        print(f"DPO ({args.loss_type}, beta {args.beta}): {args.num_steps} steps x {args.batch_size} pairs on "
              f"{world_size} x {device}; {trained / 1e6:.2f}M parameters trained; outputs in {out_dir}"
              + (f"; resumed from {resume_from} after step {start_step}" if resume_from else ""))
    if eval_pairs and start_step == 0:
        stats = evaluate(train_policy, ref_lm, eval_pairs, eval_ref, args, pad_id, device, heads)
        if is_main:
            tracker.log({"step": 0, **stats})

    bar = tqdm(range(start_step, args.num_steps), desc="dpo", initial=start_step, total=args.num_steps,
               dynamic_ncols=True, disable=not is_main)
    for step in bar:
        start = time.perf_counter()
        lr = learning_rate_at(step, args.num_steps, round(args.warmup_ratio * args.num_steps), args.learning_rate,
                              args.lr_scheduler)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # This process's share of the step's pairs (a seeded order: a resumed run sees what an uninterrupted one would)
        local_indices = batch_indices(step, args.batch_size, len(train_pairs), args.seed, rank, world_size)
        step_stats, step_loss = [], 0.0
        for j in range(0, args.local_batch_size, args.micro_batch_size):
            micro_indices = local_indices[j : j + args.micro_batch_size]
            micro_ref = train_ref[micro_indices] if train_ref is not None else None
            last = j + args.micro_batch_size == args.local_batch_size
            # DDP all-reduces the gradients once per step, in the last micro-batch's backward
            with train_policy.no_sync() if world_size > 1 and not args.fsdp and not last else nullcontext():
                losses, stats = pair_losses(train_policy, ref_lm, [train_pairs[i] for i in micro_indices], micro_ref,
                                            args, pad_id, device, heads)
                loss = losses.mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError("non-finite DPO loss: lower --learning-rate or check the data")
                # micro-batches hold equal numbers of pairs, and DDP averages over processes: the step's mean
                (loss / args.gradient_accumulation_steps).backward()
            step_loss += loss.item() / args.gradient_accumulation_steps
            step_stats.append(stats)
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # Log (means over the step's pairs of every process), evaluate and save
        stats = mean_over_processes({
            "step": step + 1, "epoch": (step + 1) * args.batch_size / len(train_pairs), "loss": step_loss,
            **{k: torch.cat([s[k] for s in step_stats]).mean().item() for k in step_stats[0]},
            "grad_norm": (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item(), "learning_rate": lr,
            "perf/pairs_per_s": args.batch_size / (time.perf_counter() - start),  # the whole batch's pairs
            "perf/peak_memory_mb": peak_memory_mb(device),  # per process
        }, device)
        if eval_pairs and ((args.eval_every and (step + 1) % args.eval_every == 0) or step + 1 == args.num_steps):
            stats.update(evaluate(train_policy, ref_lm, eval_pairs, eval_ref, args, pad_id, device, heads))
        if is_main:
            tracker.log(stats)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['rewards/accuracies']:.2f}")
            if "eval/loss" in stats:
                bar.write(summary(stats))
        if (step + 1) % args.save_every == 0 or step + 1 == args.num_steps:
            state = full_state_dicts(policy, optimizer, args.fsdp)  # every process: FSDP gathers the shards
            if is_main:
                save_checkpoint(ckpt_dir, policy, tokenizer, state, step + 1)

    save_final_model(out_dir, policy, tokenizer, args.lora_r > 0 and args.merge_lora, args.fsdp, is_main)
    if is_main:
        tracker.close()
        print(f"done: policy in {out_dir} (AutoModelForCausalLM.from_pretrained), metrics in {tracker.path}, "
              f"resumable checkpoint in {ckpt_dir}")
    finish()  # under torchrun: nobody leaves before rank 0 has saved
    return out_dir / "metrics.jsonl" if is_main else None


def summary(stats: dict) -> str:
    """One line per evaluation on the terminal."""
    return (f"step {stats['step']:>5} | loss {stats['loss']:.4f} | eval loss {stats['eval/loss']:.4f} | eval accuracy "
            f"{stats['eval/rewards/accuracies']:.3f} | eval margin {stats['eval/rewards/margins']:+.3f} | "
            f"lr {stats['learning_rate']:.2e} | {stats['perf/pairs_per_s']:.1f} pairs/s")


if __name__ == "__main__":
    cli(main, Args)
