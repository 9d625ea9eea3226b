"""Critic-free RL from verifiable rewards: GRPO and its corrections (Dr. GRPO, DAPO) and RLOO, in one file.

GRPO (Shao et al. 2024, DeepSeekMath, sec. 4.1): sample G completions per prompt, score them with rewards a program
checks, and use each completion's reward relative to its group as the advantage of all its tokens: no value model.
The loss is PPO's clipped surrogate per token (Schulman et al. 2017) with an optional k3 KL penalty to a reference.
Corrections a flag away: Dr. GRPO (Liu et al. 2025: no std scaling, length-unbiased loss), DAPO (Yu et al. 2025:
clip-higher, token-level loss, overlong masking, zero-signal groups), RLOO's leave-one-out baseline (Ahmadian et
al. 2024). Semantics follow TRL's GRPOTrainer (trl 1.x) so results compare. Read top to bottom: arguments,
numeric helpers (each tested), rollout, the GRPO step (a library function: `grpo_step`) and the loop in `main`.
Plumbing (checkpoints, torchrun, reward functions, prompts) is in utils/.

    python grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k --dataset-config main \\
        --prompt-field question --reward-fn accuracy format                                        # hub + GPU
    python grpo.py --model arith/sft --dataset arith/rl_train.jsonl --reward-fn accuracy          # offline
    torchrun --nproc_per_node 8 grpo.py ...       # each process generates whole groups for its share of prompts
"""

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Literal, Optional

import torch
import torch.nn.functional as F
import tyro
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from utils.checkpoints import full_state_dicts, load_training_state, load_weights, save_checkpoint, save_final_model
from utils.data import batch_indices
from utils.distributed import all_gather, distribute, finish, init_distributed, mean_over_processes, unwrap
from utils.hub import UserError, check_paths, check_tokenizer, from_pretrained, load_dataset, quiet_libraries
from utils.models import (add_lora, check_dtype, check_quantize, disable_dropout, enable_checkpointing, fuse_gelu,
                          quantization, weights_dtype)
from utils.prompts import check_context, left_pad, render_prompts, right_pad, sample, stop_token_id
from utils.rewards import (REWARD_FUNCTIONS, VERIFIABLE_REWARDS, RewardModel, check_reward_flags, load_reward_fns,
                           total_reward)
from utils.runtime import (Tracker, autocast, check_positive, cli, exact_div, learning_rate_at, peak_memory_mb,
                           prepare_output_dir)


@dataclass
class Args:
    # experiment
    exp_name: str = "grpo"
    """name of the run (wandb run name prefix)"""
    seed: int = 1
    """seed of the run: with the same seed a CPU run is repeatable"""
    output_dir: str = "runs/grpo"
    """where checkpoints, metrics.jsonl and the final model go"""
    resume: bool = False
    """continue the run in --output-dir from its checkpoint; these may differ: --num-steps, speed/logging flags"""
    overwrite: bool = False
    """replace the run in --output-dir (without it or --resume, a folder holding a run is refused)"""
    save_every: int = 50
    """save a checkpoint every this many steps (and always at the end)"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without network)"""
    wandb_project: str = "rlhf-grpo"
    """wandb project name"""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... ('auto': cuda if available)"""
    fsdp: bool = False
    """under torchrun: shard policy, reference and Adam state over processes (FSDP), not copy (DDP)"""

    # model and data
    model: str = "Qwen/Qwen2.5-0.5B-Instruct"
    """policy: hub id or local folder of a causal LM"""
    trust_remote_code: bool = False
    """allow models whose code lives on the hub (runs that code!)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: policy fp32 (bf16 autocast on CUDA); reference, reward model, LoRA base bf16 on a bf16 GPU; or one dtype"""
    gradient_checkpointing: bool = False
    """recompute each block's activations in the backward pass: less memory, ~30% slower"""
    dataset: str = "openai/gsm8k"
    """problems: hub id, a save_to_disk folder or a .jsonl/.json/.csv/.parquet file"""
    dataset_config: Optional[str] = None
    """configuration of a hub dataset (gsm8k: main)"""
    dataset_split: str = "train"
    """split of --dataset to use"""
    prompt_field: str = "prompt"
    """column holding each prompt: text, or chat messages (rendered with the tokenizer's chat template)"""
    max_prompt_length: int = 512
    """prompts longer than this (tokens) are dropped"""
    eval_dataset: Optional[str] = None
    """held-out problems (same columns), evaluated greedily every --eval-every steps; none: no evaluation"""
    eval_every: int = 10
    """evaluate every this many steps (and at the start and the end)"""
    max_eval_examples: int = 256
    """evaluate on at most this many held-out problems"""

    # rewards
    reward_fn: list[str] = dataclasses.field(default_factory=lambda: ["accuracy"])
    """rewards fn(prompts, completions, completion_ids, **columns): accuracy, format, vader, length, file.py:fn"""
    reward_model: Optional[str] = None
    """optional sequence classifier scoring prompt + completion text (hub id or folder)"""
    reward_label: str = "POSITIVE"
    """label whose logit is the reward model's score, by name or index"""
    reward_weights: Optional[list[float]] = None
    """weights of the rewards, in order: --reward-model (if any), then each --reward-fn (default: all 1)"""

    # generation
    num_generations: int = 8
    """G: completions sampled per prompt (a group)"""
    max_completion_length: int = 512
    """longest completion (tokens); longer ones are cut (truncated)"""
    temperature: float = 1.0
    """sampling temperature (log-probs use the same temperature, so training stays on-policy)"""
    top_k: int = 0
    """top-k sampling (0: off)"""
    top_p: float = 1.0
    """nucleus sampling (1.0: off)"""
    stop_token: Optional[str] = "eos"
    """completions end after this token ('eos': the tokenizer's EOS; 'none': always full length)"""

    # GRPO
    advantage: Literal["grpo", "rloo"] = "grpo"
    """baseline: the group mean (grpo) or the mean of the group's other completions (rloo, leave-one-out)"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide advantages by the group's reward std (GRPO), the whole batch's, or not at all (Dr. GRPO)"""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """loss aggregation: sequence means averaged; token mean per process; sum / (seqs x max length); token mean"""
    epsilon: float = 0.2
    """clip range of the probability ratio: [1 - epsilon, 1 + epsilon_high]"""
    epsilon_high: Optional[float] = None
    """upper clip range (DAPO clip-higher, e.g. 0.28; default: --epsilon)"""
    beta: float = 0.0
    """coefficient of the k3 KL penalty to the reference model (0: no reference model is loaded at all)"""
    num_iterations: int = 1
    """mu: passes over each generation batch (1: on-policy, ratio 1, the loss's gradient is the policy gradient)"""
    mask_truncated_completions: bool = False
    """leave completions cut at --max-completion-length out of the loss (DAPO overlong filtering)"""
    skip_zero_std_groups: bool = False
    """leave groups whose rewards are all equal out of the loss (zero advantage: no signal, only dilution)"""

    # optimisation
    num_steps: int = 500
    """generation batches to train on"""
    prompts_per_step: int = 16
    """prompts per generation batch over all processes (x --num-generations completions)"""
    num_mini_batches: int = 1
    """optimizer steps per pass over a generation batch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step (memory only: the update is the same)"""
    learning_rate: float = 1e-6
    """AdamW learning rate (peak)"""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """learning-rate decay to 0 over --num-steps after the warmup (linear: TRL's default)"""
    warmup_ratio: float = 0.0
    """fraction of the steps over which the learning rate rises linearly from 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: Optional[float] = 1.0
    """clip the gradient norm to this value (None: no clipping)"""

    # LoRA (peft)
    lora_r: int = 0
    """LoRA rank (0: full fine-tuning). With LoRA the reference model is the policy with adapters disabled"""
    lora_alpha: int = 16
    """LoRA alpha"""
    lora_dropout: float = 0.0
    """LoRA dropout (0 keeps rollout and training log-probs identical)"""
    lora_target_modules: Optional[list[str]] = None
    """modules to adapt (default: peft's choice for the architecture)"""
    quantize: Literal["none", "4bit", "8bit"] = "none"
    """LoRA's frozen base in 4-bit NF4 (QLoRA) or 8-bit weights through bitsandbytes (needs --lora-r)"""

    # computed at runtime from the above (not flags)
    world_size: tyro.conf.Suppress[int] = 1
    """number of processes (torchrun's WORLD_SIZE)"""
    local_prompts: tyro.conf.Suppress[int] = 0
    """prompts per generation batch on this process = prompts_per_step / world_size"""
    local_mini_batch_size: tyro.conf.Suppress[int] = 0
    """completions per optimizer step on this process"""
    micro_batch_size: tyro.conf.Suppress[int] = 0
    """completions per forward/backward on this process"""


def check_args(args: Args, world_size: int = 1) -> Args:
    """Fail loudly on inconsistent settings and fill the derived sizes."""
    check_dtype(args.dtype, args.lora_r)
    check_quantize(args)
    check_positive(args, "num_steps", "prompts_per_step", "num_mini_batches", "gradient_accumulation_steps",
                   "learning_rate", "max_completion_length", "max_prompt_length", "save_every", "eval_every",
                   "num_iterations", "epsilon", "max_eval_examples")
    if args.num_generations < 2:
        raise UserError("--num-generations must be >= 2: advantages compare completions within a group")
    if args.beta < 0 or (args.epsilon_high is not None and args.epsilon_high <= 0):
        raise UserError("--beta must be >= 0 and --epsilon-high > 0")
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0 (log-probs are divided by it)")
    if not 0 <= args.warmup_ratio < 1:
        raise UserError("--warmup-ratio must be in [0, 1)")
    if args.fsdp and world_size == 1:
        raise UserError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node N (N > 1)")
    args.world_size = world_size
    args.local_prompts = exact_div(args.prompts_per_step, world_size, "--prompts-per-step / processes")
    completions = args.local_prompts * args.num_generations
    args.local_mini_batch_size = exact_div(completions, args.num_mini_batches,
                                           "--prompts-per-step x --num-generations / processes / --num-mini-batches")
    args.micro_batch_size = exact_div(args.local_mini_batch_size, args.gradient_accumulation_steps,
                                      "completions per optimizer step / --gradient-accumulation-steps")
    args.reward_model = check_reward_flags(args.reward_model, args.reward_fn, args.reward_weights)
    return args


# Numeric helpers of the algorithm (each tested against hand-computed values in tests/test_grpo.py) -----------------
def group_advantages(rewards, group_size: int, estimator: str = "grpo", scale: str = "group"):
    """Advantage of each completion from its group's rewards. rewards: [n_groups * group_size], each group's
    completions consecutive. grpo: r - mean(group) (Shao et al. 2024, eq. 3 without the std); rloo: r minus the mean
    of the group's *other* rewards = (r - mean) * G / (G - 1) (Ahmadian et al. 2024, eq. 6). scale: divide by the
    group's std (GRPO), by the std over the whole batch of every process (Dr. GRPO's fix keeps "none"; TRL's
    "batch"), with Bessel's correction and + 1e-4, as TRL. Returns (advantages, std of each completion's group)."""
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if estimator == "rloo":
        advantages = advantages * group_size / (group_size - 1)
    group_std = grouped.std(1, keepdim=True).expand_as(grouped).reshape(-1)
    advantages = advantages.reshape(-1)
    if scale == "group":
        advantages = advantages / (group_std + 1e-4)
    elif scale == "batch":
        advantages = advantages / (all_gather(rewards).std() + 1e-4)
    return advantages, group_std


def per_token_loss(logprobs, old_logprobs, advantages, epsilon_low: float, epsilon_high: float,
                   ref_logprobs=None, beta: float = 0.0):
    """Clipped surrogate per token, -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), plus beta * k3, the
    KL estimate exp(q - p) - (q - p) - 1 >= 0 with p, q the policy's and the reference's log-probs (Schulman 2020,
    "Approximating KL divergence"; GRPO eq. 4). logprobs/old/ref [batch, len], advantages [batch].
    Returns (loss [batch, len], k3 [batch, len] or None, clipped low [batch, len], clipped high [batch, len])."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)
    loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv)
    k3 = None
    if ref_logprobs is not None and beta > 0:
        k3 = torch.exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1
        loss = loss + beta * k3
    clipped_low = (ratio < 1 - epsilon_low) & (adv < 0)  # the clip holds the ratio: no gradient from these tokens
    clipped_high = (ratio > 1 + epsilon_high) & (adv > 0)
    return loss, k3, clipped_low, clipped_high


def aggregate_loss(loss, mask, loss_type: str, max_completion_length: int, n_sequences: int, n_tokens: float,
                   local_tokens: float, world_size: int = 1):
    """One micro-batch's share of the loss of its optimizer step (the shares of all micro-batches and processes add
    up to it). n_sequences, n_tokens: completions and completion tokens of the whole step over every process;
    local_tokens: this process's tokens of the step. DDP averages gradients over processes, hence * world_size.
      grpo:    mean over sequences of each sequence's token mean (short sequences weigh more per token: length bias)
      bnpo:    token mean over this process's step (TRL's bnpo; per-process normalisation)
      dr_grpo: token sum / (sequences x max_completion_length), a constant: no length bias (Liu et al. 2025)
      dapo:    token mean over the whole step of every process (Yu et al. 2025)"""
    if loss_type == "grpo":
        return ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_sequences * world_size
    if loss_type == "bnpo":
        return (loss * mask).sum() / max(local_tokens, 1.0)
    if loss_type == "dr_grpo":
        return (loss * mask).sum() / (n_sequences * max_completion_length) * world_size
    if loss_type == "dapo":
        return (loss * mask).sum() / max(n_tokens, 1.0) * world_size
    raise ValueError(f"unknown loss type {loss_type!r}")


def lm_forward(lm, prompt_ids, prompt_mask, completion_ids, completion_mask, group, share_prompt: bool = True):
    """Logits at the positions that predict each completion token: [batch, completion_len, vocab].

    prompt_ids/prompt_mask: the distinct prompts [P, prompt_len], left-padded; completion_ids/completion_mask: the
    completions [batch, completion_len], right-padded; group[i]: the row of completion i's prompt. Position ids come
    from the masks, so padding shifts no position. share_prompt: each prompt is read once and its G completions attend
    to its cached keys/values, the same numbers as reading [prompt, completion] G times (gradients reach the prompt's
    positions through the cache) at a G-th of the prompt's compute. Off, [prompt, completion] is one sequence
    (activation checkpointing drops caches)."""
    prompt_positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    positions = prompt_mask.sum(1)[group].unsqueeze(1) + torch.arange(completion_ids.shape[1],
                                                                      device=completion_ids.device)
    attention_mask = torch.cat([prompt_mask[group], completion_mask], 1)
    if not share_prompt:
        out = lm(input_ids=torch.cat([prompt_ids[group], completion_ids], 1), attention_mask=attention_mask,
                 position_ids=torch.cat([prompt_positions[group], positions], 1),
                 logits_to_keep=completion_ids.shape[1] + 1, use_cache=False)
        return out.logits[:, :-1]  # position t predicts token t+1; only these positions reach the LM head
    # the prompt's last position predicts the first token. Outside DDP's wrapper: one DDP forward per backward (its
    # contract); the gradients through the cache still reach the weights, whose hooks DDP all-reduces
    prompt_out = unwrap(lm)(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions,
                            logits_to_keep=1, use_cache=True)
    cache = prompt_out.past_key_values
    cache.reorder_cache(group)  # each completion gets its prompt's keys/values (an index_select: differentiable)
    out = lm(input_ids=completion_ids, attention_mask=attention_mask, position_ids=positions,
             past_key_values=cache, use_cache=True)
    return torch.cat([prompt_out.logits[group], out.logits[:, :-1]], 1)


def logprobs_of(logits, tokens):
    """log p(token) under softmax(logits). logits [batch, len, vocab], tokens [batch, len] -> [batch, len]."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits):
    """Entropy of softmax(logits) at each position: [batch, len, vocab] -> [batch, len]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# Rollout ---------------------------------------------------------------------------------------------------------
def truncate_after_stop(responses, stop_id: Optional[int]):
    """Cut each generated response after its first stop token (kept: emitting it was an action).
    responses [batch, len] -> (list of 1-D tensors, bool tensor [batch]: did the response stop)."""
    if stop_id is None:
        return list(responses), torch.zeros(len(responses), dtype=torch.bool)
    is_stop = responses == stop_id
    contains_stop = is_stop.any(1)
    lengths = torch.where(contains_stop, is_stop.int().argmax(1) + 1, responses.shape[1])
    return [r[:n] for r, n in zip(responses, lengths.tolist())], contains_stop


def generate(lm, prompts, num_generations: int, pad_id: int, gen_config: GenerationConfig, device,
             synced: bool = False):
    """Sample num_generations completions for each prompt, each prompt's consecutive (left-padded: every prompt is
    continued at the same position; each prompt read once, its keys/values repeated). synced: every process runs the
    same number of decoding steps (FSDP)."""
    ids, mask = left_pad(prompts, pad_id)
    out = sample(lm, ids, mask, gen_config, device, synced, num_samples=num_generations)
    return out[:, ids.shape[1] :]  # shape: [len(prompts) * num_generations, <= max length]


# The GRPO step: (prompts, G completions each, rewards) -> advantages -> updates. The loop and library users call it.
def grpo_step(args: Args, policy, ref_lm, optimizer, prompts, completions, rewards, truncated=None, pad_id: int = 0,
              generator: Optional[torch.Generator] = None) -> dict:
    """One GRPO update on a generation batch.

    prompts: list of P 1-D token-id tensors; completions: P * G 1-D tensors, each prompt's G completions consecutive
    (no padding; each >= 1 token); rewards: [P * G] floats (the weighted sum of the reward sources); truncated: [P * G]
    bools, completions cut at --max-completion-length. ref_lm: the frozen reference (None: the policy with its LoRA
    adapters disabled; unused when --beta is 0). policy may be DDP-wrapped or FSDP-sharded (torchrun): each process
    passes whole groups of its own prompts. Returns statistics averaged over processes; updates policy, optimizer.
    """
    model = unwrap(policy)
    device = next(model.parameters()).device
    G, n = args.num_generations, len(completions)
    if n != len(prompts) * G or len(rewards) != n or any(len(c) == 0 for c in completions):
        raise ValueError("grpo_step needs num_generations non-empty completions and rewards per prompt")
    if not torch.isfinite(rewards).all():
        raise ValueError("grpo_step got a NaN or infinite reward")
    truncated = (torch.zeros(n, dtype=torch.bool) if truncated is None else truncated).to(device)
    n_micro = exact_div(args.local_mini_batch_size, args.micro_batch_size, "mini-batch / micro-batch")
    exact_div(n, args.local_mini_batch_size, "completions / local_mini_batch_size")

    # 1. Group-relative advantages; which completions enter the loss
    rewards = rewards.float().to(device)
    advantages, group_std = group_advantages(rewards, G, args.advantage, args.scale_rewards)
    keep = torch.ones(n, dtype=torch.bool, device=device)
    if args.mask_truncated_completions:
        keep &= ~truncated  # no reward signal about a completion that never finished
    if args.skip_zero_std_groups:
        keep &= group_std > 0  # all rewards equal: advantage 0, only dilutes the token mean

    # 2. Inputs (each prompt once, its completions pointing at it), and the log-probs the update starts from: old (the
    # sampling policy) and reference
    q_ids, q_mask = (t.to(device) for t in left_pad(prompts, pad_id))  # shape: [P, prompt_len]
    c_ids, c_mask = (t.to(device) for t in right_pad(completions, pad_id))  # shape: [P * G, completion_len]
    inputs = (q_ids, q_mask, c_ids, c_mask)
    completion_mask = c_mask * keep.unsqueeze(1).float()  # the tokens that enter the loss
    on_policy = args.num_iterations == 1 and args.num_mini_batches == 1  # old log-probs = the current ones, detached
    old_logprobs, ref_logprobs = None, None
    with torch.no_grad():
        if not on_policy:
            old_logprobs = forward_logprobs(model, inputs, args)
        if args.beta > 0:
            ref_logprobs = forward_logprobs(ref_lm, inputs, args, adapters_off_of=None if ref_lm is not None else model)

    # 3. mu passes over shuffled mini-batches, gradient accumulation over micro-batches
    was_training = model.training  # activation checkpointing needs train mode (make_policy set dropout to 0)
    model.train(was_training or args.gradient_checkpointing)
    epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    losses, grad_norms = [], []
    token_sums = torch.zeros(5, dtype=torch.float64, device=device)  # kl, clipped low, high, entropy, tokens
    start = time.perf_counter()
    for _ in range(args.num_iterations):
        # Whole groups in a random order: a micro-batch then reads each of its prompts once (lm_forward)
        groups = torch.randperm(len(prompts), generator=generator)
        perm = (groups.unsqueeze(1) * G + torch.arange(G)).flatten()  # shape: [P * G]
        for mb_start in range(0, n, args.local_mini_batch_size):
            mb_inds = perm[mb_start : mb_start + args.local_mini_batch_size].to(device)
            local_tokens = completion_mask[mb_inds].sum()
            step_counts = torch.stack([torch.tensor(float(len(mb_inds)), device=device), local_tokens])
            n_sequences, n_tokens = all_gather(step_counts.unsqueeze(0)).sum(0).tolist()  # of the step, all processes
            for micro_start in range(0, args.local_mini_batch_size, args.micro_batch_size):
                inds = mb_inds[micro_start : micro_start + args.micro_batch_size]
                mask = completion_mask[inds]
                with autocast(device):
                    logits = micro_batch_logits(policy, inputs, inds, G, not args.gradient_checkpointing)
                logits = logits / args.temperature
                logprobs = logprobs_of(logits, c_ids[inds])
                old = logprobs.detach() if old_logprobs is None else old_logprobs[inds]
                ref = None if ref_logprobs is None else ref_logprobs[inds]
                loss, k3, low, high = per_token_loss(logprobs, old, advantages[inds], args.epsilon, epsilon_high,
                                                     ref, args.beta)
                loss = aggregate_loss(loss, mask, args.loss_type, args.max_completion_length, n_sequences,
                                      n_tokens, local_tokens.item(), args.world_size)
                if not torch.isfinite(loss):
                    raise FloatingPointError("non-finite GRPO loss: lower --learning-rate or check the rewards")
                loss.backward()
                losses.append(loss.item() * n_micro)
                kl_sum = (k3.detach() * mask).sum() if k3 is not None else torch.zeros((), device=device)
                token_sums += torch.stack([kl_sum, (low * mask).sum(), (high * mask).sum(),
                                           (entropy_of(logits.detach()) * mask).sum(), mask.sum()]).double()
            if args.max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                grad_norms.append((norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.train(was_training)
    train_time = time.perf_counter() - start
    totals = all_gather(token_sums.unsqueeze(0)).sum(0)  # sums over every process
    kl, clip_low, clip_high, entropy = (totals[:4] / totals[4].clamp(min=1)).tolist()  # token means
    lengths = torch.tensor([float(len(c)) for c in completions])
    return mean_over_processes({
        "reward": rewards.mean().item(), "reward_std": rewards.std().item(),
        "frac_reward_zero_std": (group_std == 0).float().mean().item(),
        "loss": fmean(losses), "kl": kl, "entropy": entropy, "clip_ratio/low_mean": clip_low,
        "clip_ratio/high_mean": clip_high, "grad_norm": fmean(grad_norms) if grad_norms else float("nan"),
        "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(), "completions/clipped_ratio": truncated.float().mean().item(),
        "completions/in_loss": keep.float().mean().item(),
        "perf/train_tokens_per_s": lengths.sum().item() * args.num_iterations / train_time * args.world_size,
    }, device)


def micro_batch_logits(lm, inputs, inds, num_generations: int, share_prompt: bool):
    """lm_forward on the completions `inds` of a step's inputs (prompts, their masks, completions, their masks)."""
    q_ids, q_mask, c_ids, c_mask = inputs
    rows, group = torch.unique(inds // num_generations, return_inverse=True)  # the micro-batch's prompts
    return lm_forward(lm, q_ids[rows], q_mask[rows], c_ids[inds], c_mask[inds], group, share_prompt)


def forward_logprobs(lm, inputs, args: Args, adapters_off_of=None):
    """Log-probs of the completion tokens under `lm` (or, adapters_off_of: that LoRA model with its adapters
    disabled), in micro-batches, without gradients. Returns [batch, completion_len]."""
    c_ids, out = inputs[2], []
    for i in range(0, len(c_ids), args.micro_batch_size):
        inds = torch.arange(i, min(i + args.micro_batch_size, len(c_ids)), device=c_ids.device)
        with autocast(c_ids.device):
            if adapters_off_of is not None:
                with adapters_off_of.disable_adapter():
                    logits = micro_batch_logits(adapters_off_of, inputs, inds, args.num_generations, True)
            else:
                logits = micro_batch_logits(lm, inputs, inds, args.num_generations, True)
        out.append(logprobs_of(logits / args.temperature, c_ids[inds]))
    return torch.cat(out)


# Training --------------------------------------------------------------------------------------------------------
def load_inputs(args: Args):
    """Everything the user gave, checked before any weights load: the reward functions, the model's config and
    tokenizer, the prompts (and that the longest + a completion fit the context), the held-out prompts, sampling."""
    reward_fns = load_reward_fns(args.reward_fn, {**VERIFIABLE_REWARDS, **REWARD_FUNCTIONS})
    config = from_pretrained(AutoConfig, args.model, "--model", trust_remote_code=args.trust_remote_code)
    if config.is_encoder_decoder:
        raise UserError(f"--model {args.model!r} is an encoder-decoder model; grpo.py trains causal LMs")
    tokenizer = from_pretrained(AutoTokenizer, args.model, "--model", trust_remote_code=args.trust_remote_code)
    check_tokenizer(tokenizer, config, "--model")  # no id past the embedding; pads with EOS if it has no pad token
    data = {}
    for flag, name, split in (("--dataset", args.dataset, args.dataset_split), ("--eval-dataset", args.eval_dataset,
                                                                                 "train")):
        if name is None:
            continue
        dataset = load_dataset(name, split, flag, args.dataset_config if flag == "--dataset" else None)
        if flag == "--eval-dataset":
            dataset = dataset.select(range(min(len(dataset), args.max_eval_examples)))
        prompts, kept = render_prompts(dataset, tokenizer, args.prompt_field, args.max_prompt_length)
        columns = {c: dataset[c] for c in dataset.column_names if c != args.prompt_field}  # each column read once
        columns = {c: [values[i] for i in kept] for c, values in columns.items()}
        data[flag] = (prompts, columns)
    longest = max(len(p) for p in data["--dataset"][0])
    check_context(config, longest + args.max_completion_length,
                  f"the longest prompt ({longest} tokens) + --max-completion-length {args.max_completion_length}",
                  "lower --max-prompt-length or --max-completion-length")
    stop_id = stop_token_id(tokenizer, args.stop_token)
    gen_config = GenerationConfig(  # sampling from the full distribution at --temperature unless asked otherwise
        max_new_tokens=args.max_completion_length, do_sample=True, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, eos_token_id=stop_id, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    return tokenizer, data, reward_fns, gen_config, stop_id


def make_policy(args: Args, device, resume_from: Optional[Path]):
    """The policy (LoRA adapters if asked), the module that trains it (DDP's wrapper, the policy sharded in place by
    FSDP, or the policy) and the frozen reference: none when --beta is 0 (never loaded: a whole model's memory saved)
    or under LoRA (the policy with its adapters disabled)."""
    lm = from_pretrained(AutoModelForCausalLM, args.model, "--model", trust_remote_code=args.trust_remote_code,
                         dtype=weights_dtype(args.dtype, device, trained=args.lora_r == 0),
                         **quantization(args, device))
    fuse_gelu(disable_dropout(lm))  # dropout off for good (see below); the GELU swap is for speed only
    frozen = weights_dtype(args.dtype, device, trained=False)  # the reference's dtype (--dtype)
    needs_copy = args.beta > 0 and args.lora_r == 0
    ref_lm = copy.deepcopy(lm).requires_grad_(False).to(device, frozen).eval() if needs_copy else None
    if args.gradient_checkpointing:
        enable_checkpointing(lm)
    policy = add_lora(lm, args, task_type="CAUSAL_LM").to(device)
    # Dropout off in rollout *and* training (disable_dropout): the update's log-probs then equal the sampling
    # policy's at the first pass, so the ratio starts at exactly 1. Eval mode, but the update in train mode with
    # --gradient-checkpointing (it needs it; generating in it would lose the KV cache).
    policy.eval()
    if resume_from is not None:
        load_weights(resume_from, policy)
    train_policy = distribute(policy, device, args.fsdp, lms=(policy, ref_lm) if ref_lm is not None else (policy,))
    return policy, train_policy, ref_lm


@torch.no_grad()
def evaluate(policy, tokenizer, prompts, columns, reward_fns, gen_config, stop_id, args: Args, device) -> dict:
    """Greedy completions of the held-out prompts scored by each reward function: eval/<name> means (accuracy:
    exact-match accuracy). Every process evaluates its share."""
    greedy = GenerationConfig(**{**gen_config.to_dict(), "do_sample": False, "temperature": None, "top_k": None,
                                 "top_p": None})
    rank, world = (torch.distributed.get_rank(), args.world_size) if args.world_size > 1 else (0, 1)
    share = list(range(rank, len(prompts), world))
    completions, prompt_texts = [], []
    for i in range(0, len(share), 64):
        queries = [prompts[j] for j in share[i : i + 64]]
        generated = generate(policy, queries, 1, tokenizer.pad_token_id, greedy, device, synced=args.fsdp)
        completions += truncate_after_stop(generated, stop_id)[0]
        prompt_texts += tokenizer.batch_decode(queries, skip_special_tokens=True)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    local = {c: [v[j] for j in share] for c, v in columns.items()}
    _, parts = total_reward(None, reward_fns, None, None, prompt_texts, texts, completions, 64, "evaluation", **local)
    return mean_over_processes({f"eval/{name}": part.mean().item() for name, part in parts.items()}, device)


def main(args: Args):
    device, rank, world_size = init_distributed(args.device)  # one process, or one per GPU/CPU under torchrun
    args = check_args(args, world_size)
    is_main = rank == 0  # only the first process logs, tracks and saves
    quiet_libraries()
    # Checked before any weights load: paths, the output folder (--resume/--overwrite), then load_inputs
    check_paths(("--model", args.model), ("--reward-model", args.reward_model), ("--dataset", args.dataset),
                ("--eval-dataset", args.eval_dataset))
    scheduled = args.lr_scheduler != "constant" or args.warmup_ratio > 0  # the schedule depends on the length
    resume_from = prepare_output_dir(args, is_main, length_flags=("num_steps",), scheduled=scheduled)
    out_dir, ckpt_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoint"
    tokenizer, data, reward_fns, gen_config, stop_id = load_inputs(args)
    prompts, columns = data["--dataset"]

    # Models: policy, reference (only if --beta > 0), reward model; the optimizer; a resumed run's state
    torch.manual_seed(args.seed)
    policy, train_policy, ref_lm = make_policy(args, device, resume_from)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay, fused=True)
    reward_model = RewardModel(args.reward_model, args.reward_label, device, args.trust_remote_code,
                               weights_dtype(args.dtype, device, trained=False)) if args.reward_model else None
    start_step = load_training_state(resume_from, policy, optimizer, args.fsdp)["step"] if resume_from else 0
    if is_main:
        tracker = Tracker(out_dir, args, start_step, args.track, args.wandb_project, step_key="step")
        print(f"GRPO: {args.num_steps} steps x {args.prompts_per_step} prompts x {args.num_generations} completions "
              f"on {world_size} x {device}; {len(prompts)} prompts; outputs in {out_dir}"
              + (f"; resumed from {resume_from} after step {start_step}" if resume_from else ""))
    if "--eval-dataset" in data and start_step == 0:
        eval_stats = evaluate(policy, tokenizer, *data["--eval-dataset"], reward_fns, gen_config, stop_id, args, device)
        if is_main:
            tracker.log({"step": 0, **eval_stats})

    bar = tqdm(range(start_step, args.num_steps), desc="grpo", initial=start_step, total=args.num_steps,
               dynamic_ncols=True, disable=not is_main)
    for step in bar:
        # Each step seeds itself from (seed, step, rank): a resumed run samples what an uninterrupted one would
        torch.manual_seed(args.seed + 100_000 * step + rank)
        generator = torch.Generator().manual_seed(args.seed + 100_000 * step + rank)  # mini-batch shuffling
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, args.num_steps, round(args.warmup_ratio * args.num_steps),
                                           args.learning_rate, args.lr_scheduler)

        # Rollout: this process's share of the step's prompts, G completions each, cut after the stop token
        start = time.perf_counter()
        indices = batch_indices(step, args.prompts_per_step, len(prompts), args.seed, rank, world_size)
        generated = generate(policy, [prompts[i] for i in indices], args.num_generations, tokenizer.pad_token_id,
                             gen_config, device, synced=args.fsdp)
        completions, stopped = truncate_after_stop(generated, stop_id)
        truncated = ~stopped if stop_id is not None else torch.zeros(len(completions), dtype=torch.bool)
        generate_time = time.perf_counter() - start

        # Score: each reward source on the decoded completions (the dataset's other columns as keywords)
        prompt_texts = [t for t in tokenizer.batch_decode([prompts[i] for i in indices], skip_special_tokens=True)
                        for _ in range(args.num_generations)]  # each prompt decoded once, repeated for its group
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        extra = {c: [v[i] for i in indices for _ in range(args.num_generations)] for c, v in columns.items()}
        rewards, parts = total_reward(reward_model, reward_fns, args.reward_weights,
                                      [p + c for p, c in zip(prompt_texts, texts)], prompt_texts, texts,
                                      completions, args.micro_batch_size, f"step {step + 1}", **extra)

        # Update: group-relative advantages, clipped surrogate, mu passes (grpo_step)
        stats = grpo_step(args, train_policy, ref_lm, optimizer, [prompts[i] for i in indices], completions,
                          rewards, truncated, tokenizer.pad_token_id, generator)

        # Log, evaluate and save
        step_time = time.perf_counter() - start
        stats.update(mean_over_processes({
            "step": step + 1, "completions": (step + 1) * args.prompts_per_step * args.num_generations,
            "learning_rate": optimizer.param_groups[0]["lr"],
            **{f"rewards/{name}/mean": part.mean().item() for name, part in parts.items()},
            "perf/completions_per_s": args.prompts_per_step * args.num_generations / step_time,
            "perf/generate_tokens_per_s": sum(len(c) for c in completions) / generate_time * world_size,
            "perf/step_s": step_time, "perf/peak_memory_mb": peak_memory_mb(device),
        }, device))
        if "--eval-dataset" in data and ((step + 1) % args.eval_every == 0 or step + 1 == args.num_steps):
            stats.update(evaluate(policy, tokenizer, *data["--eval-dataset"], reward_fns, gen_config, stop_id, args,
                                  device))
        if is_main:
            tracker.log(stats)
            bar.write(summary(stats))
        if (step + 1) % args.save_every == 0 or step + 1 == args.num_steps:
            state = full_state_dicts(policy, optimizer, args.fsdp)  # every process: FSDP gathers the shards
            if is_main:
                save_checkpoint(ckpt_dir, policy, tokenizer, state, step + 1)

    save_final_model(out_dir, policy, tokenizer, args.lora_r > 0, args.fsdp, is_main)
    if is_main:
        tracker.close()
        print(f"done: policy in {out_dir} (AutoModelForCausalLM.from_pretrained), metrics in {tracker.path}, "
              f"resumable checkpoint in {ckpt_dir}")
    finish()  # under torchrun: nobody leaves before rank 0 has saved
    return out_dir / "metrics.jsonl" if is_main else None


def summary(stats: dict) -> str:
    """One line per step on the terminal."""
    line = (f"step {stats['step']:>4} | reward {stats['reward']:+.3f} | zero-std {stats['frac_reward_zero_std']:.2f} "
            f"| kl {stats['kl']:.4f} | entropy {stats['entropy']:.2f} | len {stats['completions/mean_length']:.1f} "
            f"| {stats['perf/completions_per_s']:.1f} completions/s")
    return line + "".join(f" | {k} {v:.3f}" for k, v in stats.items() if k.startswith("eval/"))


if __name__ == "__main__":
    cli(main, Args)
