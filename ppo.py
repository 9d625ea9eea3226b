"""RLHF with PPO for causal language models, in one file.

Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (KL-shaped reward, adaptive KL),
with PPO (Schulman et al. 2017) and GAE (Schulman et al. 2016). Semantics follow TRL's PPOTrainer with its
value-head model (trl <= 0.11, AutoModelForCausalLMWithValueHead) so results compare. Read top to bottom:
arguments, model wrapper, numeric helpers (each tested), rollout, the PPO step (a library function: `ppo_step`)
and the loop in `main`. Plumbing (checkpoints, torchrun, reward sources, prompts) is in utils/.

    python ppo.py --model gpt2 --reward-model lvwerra/distilbert-imdb
    python ppo.py --model tiny/policy --reward-model tiny/reward --dataset tiny/prompts.jsonl   # offline
    torchrun --nproc_per_node 8 ppo.py --model gpt2 ...          # DDP: each process a share of every batch
    torchrun --nproc_per_node 8 ppo.py --model gpt2 --fsdp ...   # FSDP: policy, reference and Adam state sharded
"""

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from utils.checkpoints import full_state_dicts, load_training_state, load_weights, save_checkpoint, save_final_model
from utils.data import batch_indices
from utils.distributed import (all_gather, distribute, distributed, finish, init_distributed, mean_over_processes,
                               unwrap)
from utils.hub import UserError, check_paths, check_tokenizer, from_pretrained, load_dataset, quiet_libraries
from utils.prompts import (build_prompts, check_context, left_pad, render_prompts, right_pad, sample,
                           stop_token_id)
from utils.models import (add_lora, check_dtype, check_quantize, disable_dropout, enable_checkpointing, fuse_gelu,
                          on_device, quantization, reference_model, sample_table, weights_dtype)
from utils.rewards import RewardModel, check_reward_flags, load_reward_fns, total_reward
from utils.runtime import Tracker, autocast, check_positive, cli, exact_div, peak_memory_mb, prepare_output_dir


@dataclass
class Args:
    # experiment
    exp_name: str = "ppo"
    """name of the run (wandb run name prefix)"""
    seed: int = 1
    """seed of the run: with the same seed a CPU run is repeatable"""
    output_dir: str = "runs/ppo"
    """where checkpoints, metrics.jsonl and the final model go"""
    resume: bool = False
    """continue the run in --output-dir from its checkpoint; these may differ: --total-episodes, speed/logging flags"""
    overwrite: bool = False
    """replace the run in --output-dir (without it or --resume, a folder holding a run is refused)"""
    save_every: int = 10
    """save a checkpoint every this many iterations (and always at the end)"""
    sample_every: int = 10
    """log 4 episodes (prompt, response, score, reference's response) to samples.jsonl and wandb so often (0: never)"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without network)"""
    wandb_project: str = "rlhf-ppo"
    """wandb project name"""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... ('auto': cuda if available)"""
    fsdp: bool = False
    """under torchrun: shard policy, value head, reference and Adam state over processes (FSDP), not copy (DDP)"""

    # models and data
    model: str = "gpt2"
    """policy: hub id or local folder of a causal LM"""
    reward_model: Optional[str] = "lvwerra/distilbert-imdb"
    """sequence classifier scoring prompt+response text (hub id or folder); 'none' to use --reward-fn only"""
    reward_label: str = "POSITIVE"
    """label whose logit is the score, by name or index (ignored for 1-output reward models)"""
    reward_fn: list[str] = dataclasses.field(default_factory=list)
    """reward functions fn(prompts, completions, completion_ids) -> floats: vader, length, file.py:fn, module:fn"""
    reward_weights: Optional[list[float]] = None
    """weights of the rewards, in order: --reward-model (if any), then each --reward-fn (default: all 1)"""
    trust_remote_code: bool = False
    """allow models whose code lives on the hub (runs that code!)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: policy fp32 (bf16 autocast on CUDA); reference, reward model, LoRA base bf16 on a bf16 GPU; or one dtype"""
    gradient_checkpointing: bool = False
    """recompute each block's activations in the backward pass: less memory, ~30% slower"""
    ref_shared_layers: int = 0
    """reference shares the policy's embeddings + first N blocks: those (and a tied head) then cannot train; 0: off"""
    ref_offload: bool = False
    """keep the reference model on the CPU, on the device only for its log-prob forward (and sample table)"""
    dataset: str = "stanfordnlp/imdb"
    """prompts: hub id, a save_to_disk folder or a .jsonl/.json/.csv/.parquet file"""
    dataset_split: str = "train"
    """split of --dataset to use"""
    dataset_text_field: str = "text"
    """column of texts whose first tokens become prompts (nested: prompt.text) or of chat messages (whole prompts)"""
    chat_prompts: bool = False
    """each text of that column is a whole prompt, the user's one message, rendered as chat messages are"""
    prompt_min_tokens: int = 2
    """shortest prompt (tokens); each prompt's length is drawn uniformly in [min, max]"""
    prompt_max_tokens: int = 8
    """longest prompt (tokens)"""
    prompt_truncation: bool = True
    """prompts are each text's first [min, max] tokens; --no-prompt-truncation: whole texts within [min, max]"""

    # rollout
    response_length: int = 24
    """maximum number of generated tokens per response"""
    response_length_min: Optional[int] = None
    """each response cut to a length drawn uniformly from [this, --response-length] (TRL's LengthSampler; None: off)"""
    temperature: float = 1.0
    """sampling temperature (log-probs use the same temperature, so training stays on-policy)"""
    top_k: int = 0
    """top-k sampling (0: off). Anything but the full distribution biases the KL estimate"""
    top_p: float = 1.0
    """nucleus sampling (1.0: off). Anything but the full distribution biases the KL estimate"""
    stop_token: Optional[str] = "eos"
    """responses end after this token ('eos': the tokenizer's EOS; 'none': always full length)"""
    missing_eos_penalty: Optional[float] = None
    """subtracted from the score of responses that never emit the stop token"""

    # reward shaping
    kl_estimator: Literal["kl", "abs", "mse", "full"] = "kl"
    """per-token KL estimate: kl=log p-log q, abs=|.|, mse=0.5(.)^2, full=exact KL over the vocabulary"""
    kl_coef: float = 0.2
    """initial KL coefficient (the papers' beta; kl_coef in code and metrics)"""
    adaptive_kl: bool = True
    """adapt the KL coefficient towards --kl-target (Ziegler et al. 2019, sec. 2.2)"""
    kl_target: float = 6.0
    """target KL (nats per sequence) of the adaptive controller"""
    kl_horizon: int = 10000
    """horizon (episodes) of the adaptive controller"""
    score_scaling: Literal["none", "scale", "normalize"] = "none"
    """divide scores by their running std ('scale') or also subtract the running mean ('normalize')"""
    score_clip: Optional[float] = None
    """clip scores to [-score_clip, score_clip] after scaling"""
    whiten_rewards: bool = False
    """whiten the KL-shaped per-token rewards (scaled, mean kept) before GAE, as TRL's whiten_rewards"""

    # PPO
    total_episodes: int = 25600
    """total number of prompts to train on"""
    batch_size: int = 128
    """episodes (prompts) per iteration, over all processes (under torchrun each rank gets batch_size / world)"""
    mini_batch_size: int = 128
    """episodes per optimizer step, over all processes"""
    gradient_accumulation_steps: int = 1
    """micro-batches per mini-batch (micro batch = mini_batch_size / gradient_accumulation_steps)"""
    ppo_epochs: int = 4
    """passes over each batch"""
    learning_rate: float = 1.41e-5
    """Adam learning rate"""
    anneal_lr: bool = False
    """decay the learning rate linearly to 0 over the run"""
    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """PPO policy clip range"""
    cliprange_value: float = 0.2
    """value clip range"""
    vf_coef: float = 0.1
    """value loss coefficient"""
    max_grad_norm: Optional[float] = 1.0
    """clip the gradient norm to this value (None: no clipping)"""
    target_kl: Optional[float] = None
    """stop the PPO epochs of an iteration early when approx-KL exceeds this"""
    ratio_threshold: float = 10.0
    """skip a micro-batch whose mean probability ratio exceeds this (guards against exploding ratios)"""

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
    num_iterations: tyro.conf.Suppress[int] = 0
    """number of PPO iterations = total_episodes / batch_size"""
    local_batch_size: tyro.conf.Suppress[int] = 0
    """episodes per iteration on this process = batch_size / world_size"""
    local_mini_batch_size: tyro.conf.Suppress[int] = 0
    """episodes per optimizer step on this process = mini_batch_size / world_size"""
    micro_batch_size: tyro.conf.Suppress[int] = 0
    """episodes per forward/backward on this process = local_mini_batch_size / gradient_accumulation_steps"""


def check_args(args: Args, world_size: int = 1) -> Args:
    """Fail loudly on inconsistent settings and fill the derived sizes."""
    check_dtype(args.dtype, args.lora_r)
    check_quantize(args)
    check_positive(args, "total_episodes", "batch_size", "mini_batch_size", "gradient_accumulation_steps",
                   "ppo_epochs", "learning_rate", "response_length", "save_every", "kl_horizon", "cliprange",
                   "cliprange_value")
    if args.kl_coef < 0 or args.vf_coef < 0:
        raise UserError("--kl-coef and --vf-coef must be >= 0")
    args.world_size = world_size
    args.num_iterations = exact_div(args.total_episodes, args.batch_size, "--total-episodes / --batch-size")
    exact_div(args.batch_size, args.mini_batch_size, "--batch-size / --mini-batch-size")
    args.local_batch_size = exact_div(args.batch_size, world_size, "--batch-size / processes")
    args.local_mini_batch_size = exact_div(args.mini_batch_size, world_size, "--mini-batch-size / processes")
    args.micro_batch_size = exact_div(args.local_mini_batch_size, args.gradient_accumulation_steps,
                                      "--mini-batch-size / processes / --gradient-accumulation-steps")
    args.reward_model = check_reward_flags(args.reward_model, args.reward_fn, args.reward_weights)
    if not 1 <= args.prompt_min_tokens <= args.prompt_max_tokens:
        raise UserError("need 1 <= --prompt-min-tokens <= --prompt-max-tokens")
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0 (log-probs are divided by it)")
    if args.response_length_min is not None and not 1 <= args.response_length_min <= args.response_length:
        raise UserError("need 1 <= --response-length-min <= --response-length")
    if args.sample_every < 0:
        raise UserError("--sample-every must be >= 0 (0: no samples)")
    if args.fsdp and world_size == 1:
        raise UserError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node N (N > 1)")
    if args.ref_shared_layers < 0:
        raise UserError("--ref-shared-layers must be >= 0 (0: the reference is a full frozen copy)")
    if (args.ref_shared_layers or args.ref_offload) and args.lora_r > 0:
        raise UserError("--ref-shared-layers/--ref-offload: with --lora-r there is no reference copy to share or "
                        "offload (the reference is the policy with its adapters disabled)")
    if (args.ref_shared_layers or args.ref_offload) and args.fsdp:
        raise UserError("--ref-shared-layers/--ref-offload do not work with --fsdp, which shards the reference over "
                        "the processes instead")
    if args.top_k != 0 or args.top_p < 1.0:
        print("warning: top-k/top-p sampling makes the policy sample from a truncated distribution; the KL "
              "estimate is then biased (it can go negative). Use --top-k 0 --top-p 1.0 unless you mean it.",
              file=sys.stderr)
    return args


# Model: the policy LM with a scalar value head on its last hidden state (one forward gives both) ----------------------
class PolicyAndValue(nn.Module):
    def __init__(self, lm: nn.Module, hidden_size: int):
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(hidden_size, 1)
        # init as lm-human-preferences' value head ("scalar head"): std 1/sqrt(hidden+1), zero bias
        nn.init.normal_(self.v_head.weight, std=1 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.v_head.bias)

    def forward(self, query_responses, attention_mask, context_length: int, temperature: float):
        """Logits (divided by temperature) and values at the positions that predict each response token.
        query_responses: [batch, context_length + response_len], queries left-padded, responses right-padded.
        Returns logits [batch, response_len, vocab] and values [batch, response_len]."""
        logits, hidden = lm_forward(self.lm, query_responses, attention_mask, context_length, hidden=True)
        values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)  # fp32 head, any trunk; [batch, len]
        return logits / temperature, values


def lm_forward(lm, query_responses, attention_mask, context_length: int, hidden: bool = False):
    """One forward of a causal LM. Position ids come from the attention mask, so left padding does not shift
    positions. Only the positions that predict response tokens go through the LM head (`logits_to_keep`)."""
    response_len = query_responses.shape[1] - context_length
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    out = lm(input_ids=query_responses, attention_mask=attention_mask, position_ids=position_ids,
             logits_to_keep=response_len + 1, output_hidden_states=hidden, use_cache=False)
    logits = out.logits[:, :-1]  # position t predicts token t+1; shape: [batch, response_len, vocab]
    if not hidden:
        return logits
    return logits, out.hidden_states[-1][:, context_length - 1 : -1]  # shape: [batch, response_len, hidden]


def logprobs_of(logits, tokens):
    """log p(token) under softmax(logits). logits [batch, len, vocab], tokens [batch, len] -> [batch, len]."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits):
    """Entropy of softmax(logits) at each position: [batch, len, vocab] -> [batch, len]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# Numeric helpers of the algorithm (each tested against hand-computed values in tests/test_ppo_math.py) ----------------
def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def global_masked_mean(x, mask):
    """masked_mean over the entries of every process (all-reduced under torchrun), so statistics that steer
    training are the same on every rank and equal to a single process's on the whole batch."""
    sums = torch.stack([(x * mask).sum(), mask.sum()])
    if distributed():
        torch.distributed.all_reduce(sums)
    return sums[0] / sums[1]


def masked_whiten(x, mask, shift_mean: bool = True):
    """(x - mean) / std over the real (mask=1) entries of the whole batch; padded entries are left as they come
    out. Population variance (no Bessel correction), as lm-human-preferences' whiten: the batch is the whole
    population of advantages we normalise, not a sample of one."""
    mean = global_masked_mean(x, mask)
    var = global_masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_per_token(logprobs, ref_logprobs, estimator: str, full_kl=None):
    """Per-token estimate of KL(policy || reference) for sampled tokens. shapes: [batch, len]."""
    logratio = logprobs - ref_logprobs
    if estimator == "kl":
        return logratio  # k1: unbiased, can be negative per token
    if estimator == "abs":
        return logratio.abs()
    if estimator == "mse":
        return 0.5 * logratio**2
    if estimator == "full":
        return full_kl  # exact sum_v p(v) (log p(v) - log q(v)), computed from the full distributions
    raise ValueError(f"unknown KL estimator {estimator!r}")


def full_kl_of(logits, ref_logits):
    """Exact KL(softmax(logits) || softmax(ref_logits)) at each position: [batch, len, vocab] -> [batch, len]."""
    logp, ref_logp = F.log_softmax(logits.float(), -1), F.log_softmax(ref_logits.float(), -1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def shaped_rewards(scores, kl, kl_coef: float, response_mask):
    """Per-token reward r_t = -kl_coef * KL_t, plus the sequence score at the last real response token
    (Ziegler et al. 2019, eq. 2). scores [batch], kl/response_mask [batch, len] -> rewards [batch, len]."""
    rewards = -kl_coef * kl * response_mask
    last = response_mask.sum(1).long() - 1  # index of the last real token; every response has >= 1 token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards, values, response_mask, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 11-16) over response tokens.
    Padded steps carry zero reward and zero value, so the bootstrap after the last real token is 0.
    rewards/values/response_mask [batch, len] -> advantages, returns [batch, len]."""
    values = values * response_mask
    rewards = rewards * response_mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # TD error, eq. 11
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    returns = advantages + values
    return advantages, returns


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float):
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.
    Returns (loss, clipfrac, ratio mean, approx KL = 0.5 E[(log ratio)^2])."""
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    losses = -advantages * ratio
    clipped_losses = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(losses, clipped_losses), mask)
    clipfrac = masked_mean((clipped_losses > losses).float(), mask)
    approx_kl = 0.5 * masked_mean(logratio**2, mask)
    return loss, clipfrac, masked_mean(ratio, mask), approx_kl


def value_loss(values, old_values, returns, mask, cliprange_value: float):
    """Clipped value loss 0.5 * max((v - R)^2, (clip(v, v_old +- eps) - R)^2). Returns (loss, clipfrac)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses, clipped_losses = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(losses, clipped_losses), mask)
    return loss, masked_mean((clipped_losses > losses).float(), mask)


class KLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2, their beta): kl_coef <- kl_coef * (1 + K * e * n /
    horizon), e = clip(KL / KL_target - 1, -0.2, 0.2), K = 1. With adaptive=False kl_coef stays fixed."""

    def __init__(self, kl_coef: float, target: float, horizon: int, adaptive: bool = True):
        self.kl_coef, self.target, self.horizon, self.adaptive = kl_coef, target, horizon, adaptive

    def update(self, current_kl: float, n_steps: int):
        if self.adaptive:
            proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
            self.kl_coef *= 1 + proportional_error * n_steps / self.horizon


class RunningMoments:
    """Running mean and std of scores over all batches so far (Chan et al. parallel update)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, x: torch.Tensor):
        batch_mean, batch_var, n = x.mean().item(), x.var(unbiased=False).item(), x.numel()
        delta, total = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self):
        return math.sqrt(self.var * self.count / max(self.count - 1, 1))  # unbiased


# Rollout --------------------------------------------------------------------------------------------------------------
def truncate_after_stop(responses, stop_id: Optional[int]):
    """Cut each generated response after its first stop token (kept: emitting it was an action).
    responses [batch, len] -> (list of 1-D tensors, bool tensor [batch]: did the response stop)."""
    if stop_id is None:
        return list(responses), torch.zeros(len(responses), dtype=torch.bool)
    is_stop = responses == stop_id
    contains_stop = is_stop.any(1)
    lengths = torch.where(contains_stop, is_stop.int().argmax(1) + 1, responses.shape[1])
    return [r[:n] for r, n in zip(responses, lengths.tolist())], contains_stop


def make_generation_config(args: Args, tokenizer):
    """Sampling from the full distribution at --temperature (no top-k/top-p unless asked), stopping after
    --stop-token. Returns the config and the stop token id (None: responses always run to full length)."""
    stop_id = stop_token_id(tokenizer, args.stop_token)
    gen_config = GenerationConfig(
        max_new_tokens=args.response_length, do_sample=True, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, eos_token_id=stop_id, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    return gen_config, stop_id


def cut_to_drawn_lengths(responses, contains_stop, min_length: int, max_length: int):
    """Each response cut to a maximum length drawn uniformly from [min_length, max_length] (TRL's LengthSampler);
    a response still contains its stop token if it ended before its cut. Returns (responses, contains_stop)."""
    limits = torch.randint(min_length, max_length + 1, (len(responses),))
    contains_stop = contains_stop & (torch.tensor([len(r) for r in responses]) <= limits)
    return [r[:n] for r, n in zip(responses, limits.tolist())], contains_stop


def generate(lm, queries, pad_id: int, gen_config: GenerationConfig, device, synced: bool = False):
    """Sample a response for each query (left-padded: every prompt is continued at the same position). synced: every
    process runs the same number of decoding steps (FSDP)."""
    ids, mask = left_pad(queries, pad_id)
    return sample(lm, ids, mask, gen_config, device, synced)[:, ids.shape[1] :]  # shape: [batch, <= response_length]


# The PPO step: (queries, responses, scores) -> one PPO update. The script's loop and library users call it. -----------
def ppo_step(args: Args, policy: PolicyAndValue, ref_lm, optimizer, queries, responses, scores,
             kl_ctl: KLController, score_moments: Optional[RunningMoments] = None, pad_id: int = 0,
             generator: Optional[torch.Generator] = None) -> dict:
    """One PPO iteration on a batch of episodes.

    queries, responses: lists of 1-D token-id tensors (any lengths, no padding; each response >= 1 token).
    scores: [batch] float tensor, one scalar reward per episode (before scaling/clipping).
    ref_lm: the frozen reference LM, or None to use `policy.lm` with its LoRA adapters disabled. Its weights may live
    on the CPU (--ref-offload): they come to the policy's device for this step's reference forward only.
    policy may be wrapped in DistributedDataParallel or sharded with FSDP (torchrun): each process passes its own
    share of the batch.
    Returns a dict of statistics (averaged over processes). Updates policy, optimizer and kl_ctl in place.
    """
    model = unwrap(policy)
    device = next(model.parameters()).device
    batch_size = len(queries)
    if not (len(responses) == len(scores) == batch_size) or any(len(r) == 0 for r in responses):
        raise ValueError("ppo_step needs one non-empty response and one score per query")
    if not torch.isfinite(scores).all():
        raise ValueError("ppo_step got a NaN or infinite score")
    exact_div(batch_size, args.local_mini_batch_size, "batch / local_mini_batch_size")
    n_micro = exact_div(args.local_mini_batch_size, args.micro_batch_size, "local_mini_batch_size / micro_batch_size")

    # 1. Score scaling and clipping (running statistics over the whole run)
    scores = scores.float()
    raw_scores = scores.clone()
    if args.score_scaling != "none":
        if score_moments is None:
            raise ValueError("score scaling needs score_moments=RunningMoments(), kept across calls")
        score_moments.update(all_gather(scores.to(device)).cpu())  # the same statistics on every process
        shift = score_moments.mean if args.score_scaling == "normalize" else 0.0
        scores = (scores - shift) / (score_moments.std + 1e-8)
    if args.score_clip is not None:
        scores = scores.clamp(-args.score_clip, args.score_clip)

    # 2. One forward over query+response of the policy and the reference: old log-probs, values, KL
    q_ids, q_mask = left_pad(queries, pad_id)
    r_ids, response_mask = right_pad(responses, pad_id)
    context_length = q_ids.shape[1]
    query_responses = torch.cat([q_ids, r_ids], 1).to(device)  # shape: [batch, context + response_len]
    attention_mask = torch.cat([q_mask, response_mask], 1).to(device)
    r_ids, response_mask = r_ids.to(device), response_mask.to(device).float()
    logprobs, ref_logprobs, values, entropy, full_kl = [], [], [], [], []
    with torch.no_grad(), on_device(ref_lm, device, keep=model.lm):  # an offloaded reference: on the device meanwhile
        for i in range(0, batch_size, args.micro_batch_size):
            s = slice(i, i + args.micro_batch_size)
            with autocast(device):
                logits, v = model(query_responses[s], attention_mask[s], context_length, args.temperature)
                if ref_lm is None:
                    with model.lm.disable_adapter():
                        ref_logits = lm_forward(model.lm, query_responses[s], attention_mask[s], context_length)
                else:
                    ref_logits = lm_forward(ref_lm, query_responses[s], attention_mask[s], context_length)
            ref_logits = ref_logits / args.temperature
            logprobs.append(logprobs_of(logits, r_ids[s]))
            ref_logprobs.append(logprobs_of(ref_logits, r_ids[s]))
            values.append(v.float())
            entropy.append(entropy_of(logits))
            if args.kl_estimator == "full":
                full_kl.append(full_kl_of(logits, ref_logits))
    logprobs, ref_logprobs = torch.cat(logprobs), torch.cat(ref_logprobs)  # shape: [batch, response_len]
    values, entropy = torch.cat(values), torch.cat(entropy)
    full_kl = torch.cat(full_kl) if full_kl else None

    # 3. KL-shaped rewards, GAE, whitened advantages (all over real response tokens only)
    kl_coef = kl_ctl.kl_coef  # this iteration's; the controller updates it at the end
    kl = kl_per_token(logprobs, ref_logprobs, args.kl_estimator, full_kl) * response_mask
    rewards = shaped_rewards(scores.to(device), kl, kl_coef, response_mask)
    if args.whiten_rewards:  # TRL's whiten_rewards: divided by their std over real tokens, the mean kept
        rewards = masked_whiten(rewards, response_mask, shift_mean=False) * response_mask
    advantages, returns = gae(rewards, values, response_mask, args.gamma, args.lam)
    advantages = masked_whiten(advantages, response_mask) * response_mask
    sequence_kl = ((logprobs - ref_logprobs) * response_mask).sum(1)  # k1 estimate per sequence, for stats

    # 4. PPO epochs over shuffled mini-batches, with gradient accumulation over micro-batches
    was_training = model.training  # activation checkpointing needs train mode (make_policy set dropout to 0)
    model.train(was_training or args.gradient_checkpointing)
    policy_losses, value_losses, clipfracs, value_clipfracs, approx_kls, ratios = [], [], [], [], [], []
    skipped, grad_norms = 0, []
    start = time.perf_counter()
    for epoch in range(args.ppo_epochs):
        perm = torch.randperm(batch_size, generator=generator)
        epoch_kls = []
        for mb_start in range(0, batch_size, args.local_mini_batch_size):
            mb_inds = perm[mb_start : mb_start + args.local_mini_batch_size]
            for micro_start in range(0, args.local_mini_batch_size, args.micro_batch_size):
                micro_inds = mb_inds[micro_start : micro_start + args.micro_batch_size].to(device)
                micro_mask = response_mask[micro_inds]
                with autocast(device):
                    logits, vpred = policy(query_responses[micro_inds], attention_mask[micro_inds],
                                           context_length, args.temperature)
                new_logprobs = logprobs_of(logits, r_ids[micro_inds])
                pg_loss, clipfrac, ratio_mean, approx_kl = policy_loss(
                    new_logprobs, logprobs[micro_inds], advantages[micro_inds], micro_mask, args.cliprange)
                vf_loss, vf_clipfrac = value_loss(
                    vpred.float(), values[micro_inds], returns[micro_inds], micro_mask, args.cliprange_value)
                loss = pg_loss + args.vf_coef * vf_loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite PPO loss (policy {pg_loss.item()}, value {vf_loss.item()}) "
                                             "- lower --learning-rate or check the scores")
                if ratio_mean.item() > args.ratio_threshold:  # an exploding ratio: never step on it. A zero loss
                    loss = loss * 0.0  # (not a skipped backward) keeps DDP ranks in step
                    skipped += 1
                (loss / n_micro).backward()
                policy_losses.append(pg_loss.item())
                value_losses.append(vf_loss.item())
                clipfracs.append(clipfrac.item())
                value_clipfracs.append(vf_clipfrac.item())
                approx_kls.append(approx_kl.item())
                ratios.append(ratio_mean.item())
                epoch_kls.append(approx_kl.item())
            if args.max_grad_norm is not None:
                norm = nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                grad_norms.append((norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item())  # FSDP
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if args.target_kl is not None and mean_over_processes({"kl": fmean(epoch_kls)}, device)["kl"] > args.target_kl:
            break  # early stopping (decided together by all processes): the policy moved far enough
    model.train(was_training)
    train_time = time.perf_counter() - start

    # 5. Adaptive KL update and statistics
    mean_kl = global_masked_mean(sequence_kl, torch.ones_like(sequence_kl)).item()
    kl_ctl.update(mean_kl, batch_size * args.world_size)
    real = response_mask.bool()
    var_returns = returns[real].var(unbiased=False)
    explained_var = (1 - (returns[real] - values[real]).var(unbiased=False) / var_returns).item()
    n_tokens = response_mask.sum().item()
    return mean_over_processes({
        "objective/scores": raw_scores.mean().item(),
        "objective/scores_std": raw_scores.std().item() if batch_size > 1 else 0.0,
        "objective/kl": mean_kl,
        "objective/kl_coef": kl_coef,
        "objective/non_score_reward": (-kl_coef * kl).sum(1).mean().item(),
        "objective/entropy": masked_mean(entropy, response_mask).item(),
        "losses/policy_loss": fmean(policy_losses),
        "losses/value_loss": fmean(value_losses),
        "losses/approx_kl": fmean(approx_kls),
        "losses/clipfrac": fmean(clipfracs),
        "losses/value_clipfrac": fmean(value_clipfracs),
        "losses/ratio_mean": fmean(ratios),
        "losses/explained_variance": explained_var,
        "losses/grad_norm": fmean(grad_norms) if grad_norms else float("nan"),
        "losses/skipped_micro_batches": float(skipped),  # (a float: averaged over processes)
        "losses/epochs": epoch + 1,
        "charts/response_length": response_mask.sum(1).mean().item(),
        "perf/train_tokens_per_s": n_tokens * (epoch + 1) / train_time * args.world_size,
    }, device)


# Training -------------------------------------------------------------------------------------------------------------
def load_inputs(args: Args):
    """Everything the user gave, checked before any weights load: the reward functions, the model's config and
    tokenizer, the prompts (and that the longest + a response fit the model's context) and the sampling settings."""
    reward_fns = load_reward_fns(args.reward_fn)
    config = from_pretrained(AutoConfig, args.model, "--model", trust_remote_code=args.trust_remote_code)
    if config.is_encoder_decoder:
        raise UserError(f"--model {args.model!r} is an encoder-decoder model; use ppo_seq2seq.py for it")
    tokenizer = from_pretrained(AutoTokenizer, args.model, "--model", trust_remote_code=args.trust_remote_code)
    check_tokenizer(tokenizer, config, "--model")  # no id past the embedding; pads with EOS if it has no pad token
    dataset, field, conversations = load_dataset(args.dataset, args.dataset_split), args.dataset_text_field, None
    if args.chat_prompts:  # each text becomes the user's one message
        texts = dataset[field] if field in dataset.column_names else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise UserError(f"--chat-prompts needs --dataset-text-field {field!r} to be a column of texts (the "
                            f"columns: {dataset.column_names}); a column of chat messages needs no flag")
        if tokenizer.chat_template is None:
            raise UserError("--chat-prompts: the tokenizer of --model has no chat template")
        dataset = dataset.map(lambda row: {field: [{"role": "user", "content": row[field]}]})
    if field in dataset.column_names and len(dataset) and isinstance(dataset[0][field], list):  # chat messages
        # whole conversations with the chat template's generation prompt (as sft.py trains chats); too long: dropped
        prompts, kept = render_prompts(dataset, tokenizer, field, args.prompt_max_tokens,
                                       ("--dataset-text-field", "--prompt-max-tokens"))
        conversations = [dataset[field][i] for i in kept]
    else:
        prompts = build_prompts(dataset, tokenizer, field, args.prompt_min_tokens, args.prompt_max_tokens, args.seed,
                                args.prompt_truncation)
    longest = max(len(p) for p in prompts)
    check_context(config, longest + args.response_length,
                  f"the longest prompt ({longest} tokens) + --response-length {args.response_length}")
    gen_config, stop_id = make_generation_config(args, tokenizer)
    return tokenizer, (prompts, conversations), reward_fns, gen_config, stop_id


def make_policy(args: Args, device, resume_from: Optional[Path]):
    """The policy (LM + value head, LoRA adapters if asked), the module that trains it (under torchrun: DDP's wrapper,
    or the policy sharded in place by FSDP; else the policy) and the frozen reference model (None under LoRA: the
    policy with its adapters disabled is the reference, no second copy in memory; --ref-shared-layers: a copy that
    shares the policy's embeddings and first blocks; --ref-offload: its weights on the CPU between its forwards)."""
    torch.manual_seed(args.seed)  # value-head init (DDP also broadcasts rank 0's weights)
    lm = from_pretrained(AutoModelForCausalLM, args.model, "--model", trust_remote_code=args.trust_remote_code,
                         dtype=weights_dtype(args.dtype, device, trained=args.lora_r == 0),
                         **quantization(args, device))
    fuse_gelu(disable_dropout(lm))  # dropout off for good (see below); the GELU swap is for speed only
    frozen = weights_dtype(args.dtype, device, trained=False)  # the reference's dtype (--dtype)
    ref_lm = None if args.lora_r > 0 else reference_model(lm, args.ref_shared_layers,
                                                          "cpu" if args.ref_offload else device, frozen)
    lm = add_lora(enable_checkpointing(lm) if args.gradient_checkpointing else lm, args, task_type="CAUSAL_LM")
    policy = PolicyAndValue(lm, lm.config.get_text_config().hidden_size).to(device)
    # Dropout off (disable_dropout): the update's log-probs equal the rollout's at the first step (ratio 1). Eval mode,
    # but the update in train mode with --gradient-checkpointing (needs it; generating in it would lose the KV cache).
    policy.eval()
    if resume_from is not None:
        load_weights(resume_from, policy)
    ones = torch.ones(1, 2, dtype=torch.long, device=device)  # a 1-token query and 1-token response
    train_policy = distribute(policy, device, args.fsdp, lms=(policy.lm, ref_lm) if ref_lm else (policy.lm,),
                              units=(policy.v_head,), example_inputs=(ones, ones, 1, 1.0))
    return policy, train_policy, ref_lm


def reward_model_texts(prompt_texts, completions, conversations, reward_model, tokenizer) -> list[str]:
    """What the reward model reads: prompt + completion text, or (chat prompts) each conversation with its completion
    as the assistant's turn, rendered with the reward model's chat template (reward.py renders chat pairs with its
    own tokenizer's), or the policy's if it has none."""
    if conversations is None:
        return [p + c for p, c in zip(prompt_texts, completions)]
    template_owner = reward_model.tokenizer if reward_model is not None and reward_model.tokenizer.chat_template \
        else tokenizer
    return [template_owner.apply_chat_template(list(c) + [{"role": "assistant", "content": text}], tokenize=False)
            for c, text in zip(conversations, completions)]


def main(args: Args):
    device, rank, world_size = init_distributed(args.device)  # one process, or one per GPU/CPU under torchrun
    args = check_args(args, world_size)
    is_main = rank == 0  # only the first process logs, tracks and saves
    quiet_libraries()
    # Checked before any weights load: paths, the output folder (--resume/--overwrite), then load_inputs
    check_paths(("--model", args.model), ("--reward-model", args.reward_model), ("--dataset", args.dataset))
    resume_from = prepare_output_dir(args, is_main, length_flags=("total_episodes",), scheduled=args.anneal_lr,
                                     may_change=("ref_offload",))  # where the reference waits changes no number
    out_dir, ckpt_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoint"
    tokenizer, (prompts, conversations), reward_fns, gen_config, stop_id = load_inputs(args)

    # Models: policy + value head, reference, reward model; the optimizer; the state a resumed run continues from
    policy, train_policy, ref_lm = make_policy(args, device, resume_from)  # train_policy: DDP / FSDP / policy
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=args.learning_rate,
                                 fused=True)  # one kernel for all tensors (CPU and CUDA)
    reward_model = RewardModel(args.reward_model, args.reward_label, device, args.trust_remote_code,
                               weights_dtype(args.dtype, device, trained=False)) if args.reward_model else None
    kl_ctl = KLController(args.kl_coef, args.kl_target, args.kl_horizon, args.adaptive_kl)
    score_moments = RunningMoments()
    start_iteration = 0
    if resume_from is not None:
        state = load_training_state(resume_from, policy, optimizer, args.fsdp)
        start_iteration, kl_ctl.kl_coef = state["step"], state["kl_coef"]
        score_moments.mean, score_moments.var, score_moments.count = state["score_moments"]
    if is_main:
        tracker = Tracker(out_dir, args, start_iteration, args.track, args.wandb_project)
        print(f"PPO: {args.num_iterations} iterations x {args.batch_size} episodes on {world_size} x {device}; "
              f"{len(prompts)} prompts; outputs in {out_dir}"
              + (f"; resumed from {resume_from} after iteration {start_iteration}" if resume_from else ""))

    def respond(lm, q):  # the sample table's reference responses, sampled as in the rollout
        return truncate_after_stop(generate(lm, q, tokenizer.pad_token_id, gen_config, device, args.fsdp), stop_id)[0]

    bar = tqdm(range(start_iteration, args.num_iterations), desc="ppo", initial=start_iteration,
               total=args.num_iterations, dynamic_ncols=True, disable=not is_main)
    for iteration in bar:
        # Seeded from (seed, iteration, rank): a resumed run samples what an uninterrupted one would, each rank its own
        torch.manual_seed(args.seed + 100_000 * iteration + rank)
        generator = torch.Generator().manual_seed(args.seed + 100_000 * iteration + rank)  # mini-batch shuffling
        if args.anneal_lr:
            for group in optimizer.param_groups:
                group["lr"] = args.learning_rate * (1 - iteration / args.num_iterations)

        # Rollout: this process's share of the iteration's prompts, responses cut after the stop token
        start = time.perf_counter()
        indices = batch_indices(iteration, args.batch_size, len(prompts), args.seed, rank, world_size)
        queries = [prompts[i] for i in indices]
        generated = generate(policy.lm, queries, tokenizer.pad_token_id, gen_config, device, synced=args.fsdp)
        responses, contains_stop = truncate_after_stop(generated, stop_id)
        if args.response_length_min is not None:  # each response cut to its own drawn maximum length
            responses, contains_stop = cut_to_drawn_lengths(responses, contains_stop, args.response_length_min,
                                                            args.response_length)
        generate_time = time.perf_counter() - start

        # Score: the reward model reads prompt + response as text (chat prompts: the conversation with the response as
        # the assistant's turn, rendered as reward.py trains on chat pairs); reward functions get both and the ids
        prompt_texts = tokenizer.batch_decode(queries, skip_special_tokens=True)
        completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
        texts = reward_model_texts(prompt_texts, completions, conversations and [conversations[i] for i in indices],
                                   reward_model, tokenizer)
        scores, parts = total_reward(reward_model, reward_fns, args.reward_weights, texts, prompt_texts, completions,
                                     responses, args.micro_batch_size, f"iteration {iteration + 1}")
        if args.missing_eos_penalty is not None and stop_id is not None:
            scores[~contains_stop] -= args.missing_eos_penalty
        rollout_time = time.perf_counter() - start

        # Update: KL-shaped rewards, advantages, PPO epochs (ppo_step)
        stats = ppo_step(args, train_policy, ref_lm, optimizer, queries, responses, scores, kl_ctl, score_moments,
                         tokenizer.pad_token_id, generator)

        # Log and save
        iteration_time = time.perf_counter() - start
        stats.update(mean_over_processes({
            "iteration": iteration + 1, "episodes": (iteration + 1) * args.batch_size,
            "charts/learning_rate": optimizer.param_groups[0]["lr"],
            "charts/stop_fraction": contains_stop.float().mean().item(),
            **{f"rewards/{name}": part.mean().item() for name, part in parts.items()},
            "perf/rollout_tokens_per_s": sum(len(r) for r in responses) / generate_time * world_size,
            "perf/rollout_s": rollout_time, "perf/iteration_s": iteration_time,
            "perf/episodes_per_s": args.batch_size / iteration_time, "perf/peak_memory_mb": peak_memory_mb(device),
        }, device))
        last = iteration + 1 == args.num_iterations
        sampling = args.sample_every and ((iteration + 1) % args.sample_every == 0 or last)
        samples = sample_table(respond, policy.lm, ref_lm, tokenizer, queries[:4], completions[:4], scores[:4],
                               device) if sampling else None  # every process (FSDP); rank 0 logs
        if is_main:
            tracker.log(stats, samples=samples)
            bar.write(summary(stats))
        if (iteration + 1) % args.save_every == 0 or last:
            state = full_state_dicts(policy, optimizer, args.fsdp)  # every process: FSDP gathers the shards
            if is_main:
                save_checkpoint(ckpt_dir, policy, tokenizer, state, iteration + 1, kl_coef=kl_ctl.kl_coef,
                                score_moments=[score_moments.mean, score_moments.var, score_moments.count])

    save_final_model(out_dir, policy, tokenizer, args.lora_r > 0, args.fsdp, is_main)
    if is_main:
        tracker.close()
        print(f"done: policy in {out_dir} (AutoModelForCausalLM.from_pretrained), metrics in {tracker.path}, "
              f"resumable checkpoint in {ckpt_dir}")
    finish()  # under torchrun: nobody leaves before rank 0 has saved
    return out_dir / "metrics.jsonl" if is_main else None


def summary(stats: dict) -> str:
    """One line per iteration on the terminal."""
    return (f"iter {stats['iteration']:>4} | score {stats['objective/scores']:+.3f} | kl {stats['objective/kl']:+.3f} "
            f"| kl_coef {stats['objective/kl_coef']:.3f} | entropy {stats['objective/entropy']:.2f} "
            f"| pg {stats['losses/policy_loss']:+.4f} | vf {stats['losses/value_loss']:.4f} "
            f"| len {stats['charts/response_length']:.1f} | {stats['perf/episodes_per_s']:.1f} ep/s")


if __name__ == "__main__":
    cli(main, Args)
