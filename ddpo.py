"""Denoising Diffusion Policy Optimization (DDPO) for text-to-image diffusion models, in one file.

Black et al. 2023, "Training Diffusion Models with Reinforcement Learning": denoising is a multi-step MDP whose
actions are the sampler's steps x_t -> x_{t-1}. With stochastic DDIM (eta > 0) each step is a Gaussian, so its
log-probability is exact and PPO's clipped importance-ratio objective applies (DDPO_IS, sec. 4.3). Defaults follow
the reference implementation (kvablack/ddpo-pytorch), as TRL's DDPOTrainer did (TRL 1.16 no longer ships it).
Read top to bottom: arguments, the DDIM step with its log-probability (tested against diffusers and
torch.distributions), advantages, rewards, prompts, sampling, the PPO update, checkpoints, and the loop in `main`.

    python ddpo.py --model runwayml/stable-diffusion-v1-5 --reward jpeg-incompressibility --lora-r 4
    python -m utils.tiny_sd && python ddpo.py --model tiny/sd --reward jpeg-compressibility  # offline, ~1 min/epoch
    python ddpo.py --model tiny/sd --num-epochs 10 --num-steps 5 --guidance-scale 1 --sample-batch-size 32 \
        --num-batches-per-epoch 1 --train-batch-size 32 --gradient-accumulation-steps 1 --lora-r 0 \
        --learning-rate 1e-3    # offline, ~3 s/epoch on one CPU thread: the reward visibly rises
    torchrun --nproc_per_node 8 ddpo.py --sample-batch-size 64 --train-batch-size 32 ...  # DDP: batch sizes are global

Under torchrun each process samples its share of every batch and trains a DDP copy of the UNet (or its LoRA); the
advantages are computed from all processes' rewards, metrics are averaged, and only the first process logs and saves.

On a busy CPU, OMP_NUM_THREADS=1 is often much faster for the tiny pipeline (threads wait on each other).
"""

import io
import math
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import tyro
from PIL import Image
from tqdm.auto import tqdm

from utils.distributed import all_gather, distribute, finish, init_distributed, mean_over_processes
from utils.hub import UserError, check_paths, from_pretrained, go_offline_if_unreachable, quiet_libraries
from utils.models import check_dtype, weights_dtype
from utils.rewards import call_reward_fn, load_function
from utils.runtime import (Tracker, atomic_dir, autocast, check_positive, cli, exact_div, peak_memory_mb,
                           prepare_output_dir)


@dataclass
class Args:
    # experiment
    exp_name: str = "ddpo"
    """name of the run (wandb run name prefix)"""
    seed: int = 42
    """seed of the run: with the same seed a CPU run is repeatable"""
    output_dir: str = "runs/ddpo"
    """where checkpoints, metrics.jsonl, sample grids (samples/) and the final model go"""
    resume: bool = False
    """continue the run in --output-dir from its checkpoint; these may differ: --num-epochs, speed/logging flags"""
    overwrite: bool = False
    """replace the run in --output-dir (without it or --resume, a folder holding a run is refused)"""
    save_every: int = 20
    """save a checkpoint every this many epochs (and always at the end)"""
    track: bool = False
    """log metrics and sample images to Weights & Biases (WANDB_MODE=offline works without network)"""
    wandb_project: str = "rlhf-ddpo"
    """wandb project name"""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... ('auto': cuda if available; bf16 autocast on CUDA); torchrun: a GPU per process"""

    # model
    model: str = "runwayml/stable-diffusion-v1-5"
    """diffusers pipeline: hub id or local folder (text-to-image like Stable Diffusion, or unconditional)"""
    lora_r: int = 4
    """LoRA rank on the UNet's attention projections (0: train the whole UNet)"""
    lora_alpha: int = 4
    """LoRA alpha (alpha = r: scale 1, as the reference's LoRA attention processors)"""
    ema_decay: Optional[float] = None
    """keep an exponential moving average of the trained weights with this decay and save it as the final model"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: trained weights fp32, frozen (VAE, text encoder, LoRA base, reward CLIP) bf16 on CUDA; else one for all"""
    gradient_checkpointing: bool = False
    """recompute the UNet blocks' activations in the backward pass: less memory, ~30% slower"""

    # prompts and reward
    prompts: str = "animals"
    """'animals' (45 common animals, built in) or a text file with one prompt per line"""
    reward_fn: Annotated[str, tyro.conf.arg(aliases=("--reward",))] = "jpeg-compressibility"
    """jpeg-compressibility, jpeg-incompressibility, aesthetic, or file.py:fn(images, prompts) -> floats"""
    aesthetic_clip: str = "openai/clip-vit-large-patch14"
    """CLIP model of the aesthetic reward (hub id or folder)"""
    aesthetic_mlp: str = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"
    """aesthetic MLP weights: a local .pth/.safetensors file or hub_repo_id/filename"""

    # sampling
    num_epochs: int = 100
    """epochs; each samples a batch of images with the current model, then trains on them"""
    num_steps: int = 50
    """DDIM steps per image"""
    eta: float = 1.0
    """DDIM stochasticity in (0, 1]: 1 is DDPM-like; 0 (deterministic) has no log-probability to train on"""
    guidance_scale: float = 5.0
    """classifier-free guidance weight, in sampling and training (1: no guidance)"""
    sample_batch_size: int = 8
    """images per sampling forward pass, over all processes (under torchrun each samples sample_batch_size / world)"""
    num_batches_per_epoch: int = 4
    """sampling batches per epoch (the reference: 8 GPUs x 8 images x 4 batches = 256 images an epoch)"""

    # advantages
    per_prompt_stat_tracking: bool = True
    """normalise rewards with each prompt's own mean/std (else with the epoch's mean/std)"""
    stat_buffer_size: int = 16
    """rewards remembered per prompt, across epochs"""
    stat_min_count: int = 16
    """below this many remembered rewards a prompt uses the epoch's mean/std"""
    adv_clip_max: float = 5.0
    """clip advantages to plus or minus this value"""

    # PPO
    train_batch_size: int = 4
    """samples per training forward pass, over all processes (under torchrun each trains on train_batch_size / world)"""
    gradient_accumulation_steps: int = 2
    """train batches per optimizer step (each also accumulates over its trained timesteps)"""
    ppo_epochs: int = 1
    """passes over each epoch's samples ('num_inner_epochs' in the reference)"""
    learning_rate: float = 3e-4
    """AdamW learning rate (betas 0.9/0.999, eps 1e-8, as the reference)"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """clip the gradient norm to this value"""
    cliprange: float = 1e-4
    """PPO clip range on the ratio; tiny because per-step log-probs are averaged over pixels"""
    timestep_fraction: float = 1.0
    """fraction of each sample's stochastic steps to train on (a random subset per sample)"""

    # computed at runtime from the above (not flags)
    world_size: tyro.conf.Suppress[int] = 1
    """number of processes (torchrun's WORLD_SIZE)"""
    samples_per_epoch: tyro.conf.Suppress[int] = 0
    """images per epoch over all processes = sample_batch_size * num_batches_per_epoch"""
    local_sample_batch_size: tyro.conf.Suppress[int] = 0
    """images per sampling forward pass on this process = sample_batch_size / world_size"""
    local_samples_per_epoch: tyro.conf.Suppress[int] = 0
    """images per epoch on this process = samples_per_epoch / world_size"""
    local_train_batch_size: tyro.conf.Suppress[int] = 0
    """samples per training forward pass on this process = train_batch_size / world_size"""
    num_train_timesteps: tyro.conf.Suppress[int] = 0
    """int(timestep_fraction * stochastic steps), filled once the scheduler is loaded"""


def check_args(args: Args, world_size: int = 1) -> Args:
    """Fail loudly on inconsistent settings and fill the derived sizes (per process for `world_size` processes)."""
    check_positive(args, "num_epochs", "sample_batch_size", "num_batches_per_epoch", "train_batch_size",
                   "gradient_accumulation_steps", "ppo_epochs", "learning_rate", "save_every", "stat_buffer_size")
    if not 0 < args.eta <= 1:
        raise UserError(f"--eta {args.eta}: DDPO needs stochastic DDIM steps, 0 < eta <= 1 (eta = 0 makes every step "
                        "deterministic: sigma = 0, log sigma = -inf, nothing to compute a policy ratio on)")
    args.samples_per_epoch = args.sample_batch_size * args.num_batches_per_epoch
    train_batches = exact_div(args.samples_per_epoch, args.train_batch_size,
                              "--sample-batch-size x --num-batches-per-epoch / --train-batch-size")
    exact_div(train_batches, args.gradient_accumulation_steps, "train batches / --gradient-accumulation-steps")
    # The batch sizes count over all processes, so a run means the same thing on any number of them
    args.world_size = world_size
    args.local_sample_batch_size = exact_div(args.sample_batch_size, world_size,
                                             "--sample-batch-size (over all processes) / number of processes")
    args.local_train_batch_size = exact_div(args.train_batch_size, world_size,
                                            "--train-batch-size (over all processes) / number of processes")
    args.local_samples_per_epoch = args.local_sample_batch_size * args.num_batches_per_epoch
    if not 0 < args.timestep_fraction <= 1:
        raise UserError("--timestep-fraction must be in (0, 1]")
    check_dtype(args.dtype, args.lora_r)
    if args.stat_min_count > args.stat_buffer_size:
        raise UserError("--stat-min-count > --stat-buffer-size: a prompt's buffer would never be used")
    if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
        raise UserError("--ema-decay must be in [0, 1)")
    if args.num_steps < 1 or args.cliprange <= 0 or args.adv_clip_max <= 0:
        raise UserError("--num-steps, --cliprange and --adv-clip-max must be positive")
    return args


# The policy: one stochastic DDIM step and its Gaussian log-probability ------------------------------------------------
def ddim_alphas(scheduler, timesteps):
    """ᾱ_t and ᾱ_{t-1} of DDIM timesteps [batch] (ᾱ is "α" in the DDIM paper), each [batch].
    The step after the last has no entry in the table: its ᾱ is `final_alpha_cumprod`, which is 1 for schedulers
    with set_alpha_to_one=True, so that step has σ = 0. (ddpo-pytorch clamps the index to 0 before testing it,
    so it always uses ᾱ_0 there: the same value for Stable Diffusion, whose set_alpha_to_one is False.)"""
    prev_timesteps = timesteps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)
    alpha_prod_t = alphas_cumprod[timesteps]
    final = scheduler.final_alpha_cumprod.to(timesteps.device)
    alpha_prod_prev = torch.where(prev_timesteps >= 0, alphas_cumprod[prev_timesteps.clamp(min=0)], final)
    return alpha_prod_t, alpha_prod_prev


def ddim_std(alpha_prod_t, alpha_prod_prev, eta: float):
    """σ_t(η) = η sqrt((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_{t-1})  (DDIM, Song et al. 2021, eq. 16)"""
    return eta * ((1 - alpha_prod_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)) ** 0.5


def ddim_step_with_logprob(scheduler, model_output, timesteps, sample, eta: float, prev_sample=None,
                           generators=None):
    """One DDIM step x_t -> x_{t-1} and log p_θ(x_{t-1} | x_t), the policy's log-probability of that action.

    With ε = ε_θ(x_t, t) (Song et al. 2021, eq. 12):
        x̂_0     = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)                    "predicted x_0"
        μ_t     = sqrt(ᾱ_{t-1}) x̂_0 + sqrt(1 - ᾱ_{t-1} - σ_t²) ε          "direction pointing to x_t"
        x_{t-1} = μ_t + σ_t z,  z ~ N(0, I),  σ_t from eq. 16
    so p_θ(x_{t-1} | x_t) = N(μ_t, σ_t² I) and
        log p = -(x_{t-1} - μ_t)² / (2σ_t²) - log σ_t - log sqrt(2π),
    averaged (not summed) over channels and pixels, as ddpo-pytorch: that is what makes its clip range 1e-4.
    x_{t-1} is detached: the gradient flows through μ_t only. A step with σ_t = 0 (the last one when
    set_alpha_to_one=True) is deterministic, not an action: its log-prob is reported as 0 and never trained on.

    model_output, sample, prev_sample: [batch, C, h, w]; timesteps: [batch] (may differ per sample).
    prev_sample given: only score it; else draw it with `generators`, one CPU torch.Generator per sample.
    Returns x_{t-1} and log_prob [batch].
    """
    alpha_prod_t, alpha_prod_prev = (a.view(-1, 1, 1, 1) for a in ddim_alphas(scheduler, timesteps))
    if scheduler.config.prediction_type == "epsilon":
        eps = model_output
    elif scheduler.config.prediction_type == "v_prediction":  # v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0 (SD 2.x)
        eps = alpha_prod_t**0.5 * model_output + (1 - alpha_prod_t) ** 0.5 * sample
    else:
        raise ValueError(f"prediction_type {scheduler.config.prediction_type!r} is not supported")
    pred_x0 = (sample - (1 - alpha_prod_t) ** 0.5 * eps) / alpha_prod_t**0.5
    if scheduler.config.clip_sample:  # as diffusers' DDIMScheduler.step
        pred_x0 = pred_x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    std = ddim_std(alpha_prod_t, alpha_prod_prev, eta)  # [batch, 1, 1, 1]
    mean = alpha_prod_prev**0.5 * pred_x0 + (1 - alpha_prod_prev - std**2) ** 0.5 * eps  # μ_t: [batch, C, h, w]
    if prev_sample is None:
        noise = randn(sample.shape, generators).to(sample.device, sample.dtype)
        prev_sample = mean + std * noise
    safe_std = torch.where(std > 0, std, torch.ones_like(std))  # no 0/0 (and NaN gradients) on deterministic steps
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std)
                - math.log(math.sqrt(2 * math.pi)))
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))  # [batch]
    return prev_sample, torch.where(std.flatten() > 0, log_prob, torch.zeros_like(log_prob))


def randn(shape, generators) -> torch.Tensor:
    """Standard normal noise [batch, ...] on the CPU, row i from generators[i]: a sample's noise does not depend on
    the samples beside it in the batch (or on other processes)."""
    return torch.stack([torch.randn(shape[1:], generator=g) for g in generators])


def predict_noise(unet, latents, timesteps, prompt_embeds, negative_embeds, guidance_scale: float):
    """ε_θ(x_t, t, c), with classifier-free guidance when guidance_scale != 1: ε(∅) + w (ε(c) - ε(∅))
    (Ho & Salimans 2022, eq. 6, whose w is guidance_scale - 1). Both branches in one batch of 2 x batch.
    latents [batch, C, h, w], timesteps [batch], embeds [batch, tokens, dim] (None: unconditional model),
    negative_embeds [1, tokens, dim]. Returns fp32 [batch, C, h, w]. The inputs are cast to the UNet's dtype
    (--dtype; outside autocast, i.e. on the CPU, a bf16 UNet takes no fp32 latents)."""
    dtype = getattr(unet, "module", unet).dtype  # under DDP: the wrapped UNet's (with LoRA: its base's)
    latents = latents.to(dtype)
    if prompt_embeds is None:
        return unet(latents, timesteps).sample.float()
    prompt_embeds = prompt_embeds.to(dtype)
    if guidance_scale == 1.0:
        return unet(latents, timesteps, encoder_hidden_states=prompt_embeds).sample.float()
    embeds = torch.cat([negative_embeds.to(dtype).expand_as(prompt_embeds), prompt_embeds])  # [2 x batch, tokens, dim]
    eps = unet(torch.cat([latents] * 2), torch.cat([timesteps] * 2), encoder_hidden_states=embeds).sample.float()
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def policy_loss(log_prob, old_log_prob, advantages, cliprange: float):
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) as a loss, for one timestep of a batch (all [batch]).
    Returns (loss, clipfrac, ratio mean, approx KL = 0.5 E[(log ratio)^2]), the same statistics as ppo.py."""
    logratio = log_prob - old_log_prob
    ratio = torch.exp(logratio)
    losses = -advantages * ratio
    clipped_losses = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = torch.max(losses, clipped_losses).mean()
    return loss, (clipped_losses > losses).float().mean(), ratio.mean(), 0.5 * (logratio**2).mean()


# Advantages: rewards normalised per prompt (ddpo-pytorch's stat_tracking.py) or over the epoch ------------------------
class PerPromptStatTracker:
    """Each prompt's last `buffer_size` rewards, kept across epochs. A prompt's advantages are its rewards
    standardised with its buffer's mean/std once the buffer holds `min_count` rewards, with the whole batch's
    mean/std before that. Population std + 1e-6, as the reference."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count, self.buffers = buffer_size, min_count, {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """prompts: n strings, rewards [n] -> advantages [n]."""
        advantages = torch.empty_like(rewards)
        for prompt in sorted(set(prompts)):
            mask = torch.tensor([p == prompt for p in prompts])
            self.buffers[prompt] = (self.buffers.get(prompt, []) + rewards[mask].tolist())[-self.buffer_size:]
            stats = torch.tensor(self.buffers[prompt]) if len(self.buffers[prompt]) >= self.min_count else rewards
            advantages[mask] = (rewards[mask] - stats.mean()) / (stats.std(unbiased=False) + 1e-6)
        return advantages


# Rewards: functions (images: list of PIL images, prompts: list of str) -> one float per image -------------------------
JPEG_QUALITY = 95  # as the reference: sizes compare across runs only at the same quality


def jpeg_size_kb(image: Image.Image) -> float:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell() / 1000


def jpeg_incompressibility(images, prompts):
    """JPEG file size in kB: detailed, noisy images score high."""
    return [jpeg_size_kb(image) for image in images]


def jpeg_compressibility(images, prompts):
    """Minus the JPEG file size in kB: flat, simple images score high."""
    return [-jpeg_size_kb(image) for image in images]


def aesthetic_scorer(clip_name: str, mlp_name: str, device, dtype: torch.dtype = torch.float32) -> Callable:
    """LAION's aesthetic predictor, as the reference: an MLP on the unit-norm CLIP image embedding, trained to
    predict human 1-10 ratings. CLIP's weights in `dtype` (--dtype, frozen), the small MLP in float32. Fails within
    seconds, in one line, when the weights cannot be loaded."""
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, CLIPModel

    try:
        go_offline_if_unreachable(clip_name)
        clip = CLIPModel.from_pretrained(clip_name, dtype=dtype).to(device).eval()
        processor = AutoImageProcessor.from_pretrained(clip_name)
        mlp_path = mlp_name
        if not Path(mlp_name).is_file():
            from huggingface_hub import hf_hub_download

            go_offline_if_unreachable(mlp_name)
            mlp_path = hf_hub_download(*mlp_name.rsplit("/", 1))
    except (OSError, ValueError) as err:
        raise UserError(f"--reward-fn aesthetic: could not load --aesthetic-clip {clip_name!r} and --aesthetic-mlp "
                        f"{mlp_name!r} ({type(err).__name__}); download both where the hub is reachable and pass "
                        "a local CLIP folder and MLP file") from None
    state = load_file(mlp_path) if mlp_path.endswith(".safetensors") else \
        torch.load(mlp_path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("layers."): v for k, v in state.items()}
    mlp = nn.Sequential(nn.Linear(state["0.weight"].shape[1], 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                        nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    mlp.load_state_dict(state)
    mlp.to(device).eval()

    @torch.no_grad()
    def aesthetic(images, prompts):
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device, clip.dtype)
        # transformers 5: get_image_features returns an output object whose pooler_output is the projection
        embeds = clip.get_image_features(pixel_values=pixel_values).pooler_output.float()  # [batch, projection_dim]
        return mlp(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(1).tolist()

    return aesthetic


REWARD_FUNCTIONS = {"jpeg-compressibility": jpeg_compressibility, "jpeg-incompressibility": jpeg_incompressibility}


def load_reward_fn(args: Args, device) -> Callable:
    """A built-in reward, or your own function as `path/to/file.py:function` (or `module:function`), called as
    fn(images: list[PIL.Image.Image], prompts: list[str]) and returning one float per image."""
    if args.reward_fn == "aesthetic":  # built from its own flags: it loads two models
        return aesthetic_scorer(args.aesthetic_clip, args.aesthetic_mlp, device,
                                weights_dtype(args.dtype, torch.device(device), trained=False))
    return load_function(args.reward_fn, "--reward-fn", REWARD_FUNCTIONS | {"aesthetic": None})  # named in errors


# Prompts, sampling, images --------------------------------------------------------------------------------------------
# 45 common animals, like the paper's prompt set for aesthetic quality (its compressibility runs drew from the 398
# ImageNet animal classes: write them to a file, one per line, and pass --prompts file.txt)
ANIMALS = ("cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf lizard "
           "beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose bee "
           "pig turkey fly llama camel bat gorilla hedgehog kangaroo").split()


def load_prompts(spec: str) -> list[str]:
    if spec == "animals":
        return ANIMALS
    if not Path(spec).is_file():
        raise UserError(f"--prompts {spec!r}: neither the built-in list 'animals' nor an existing file")
    prompts = [line.strip() for line in Path(spec).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {spec!r} has no prompts: write one prompt per line")
    return prompts


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device):
    """Text-encoder hidden states [n, max_length, dim], padded to the tokenizer's max length as Stable Diffusion
    was trained (None for an unconditional model)."""
    if getattr(pipe, "text_encoder", None) is None:
        return None
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(device)).last_hidden_state


def make_generator(seed: int, epoch: int, use: str, index: int = 0) -> torch.Generator:
    """A CPU generator for one use in one epoch: "prompts" (the epoch's prompts), "noise" (of the epoch's image
    number `index`) or "shuffle" (training order on process `index`), seeded from (seed, epoch, use, index) through
    numpy's SeedSequence, which makes distinct keys independent streams. Nothing to save for --resume, and the
    images of a seed do not depend on the number of processes or how the batches are split between them."""
    keys = [seed, epoch, ("prompts", "noise", "shuffle").index(use), index]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0]))


@torch.no_grad()
def sample_trajectories(pipe, scheduler, prompt_embeds, negative_embeds, args: Args, generators, device):
    """Run the stochastic DDIM chain from x_T ~ N(0, I), recording every latent and every step's log-prob, for
    n = len(generators) images. Returns latents [n, num_steps + 1, C, h, w] (x_T ... x_0), log_probs [n, num_steps],
    images [n, 3, H, W] in [0, 1]. All of image i's noise is drawn on the CPU from generators[i]: a seed gives the
    same images on any device and in any batch."""
    unet, size, n = pipe.unet, pipe.unet.config.sample_size, len(generators)
    shape = (n, unet.config.in_channels, *(size if isinstance(size, (list, tuple)) else (size, size)))
    x = randn(shape, generators).to(device) * scheduler.init_noise_sigma  # x_T: [n, C, h, w]
    latents, log_probs = [x], []
    for t in scheduler.timesteps:
        timesteps = t.repeat(n).to(device)  # [n]
        with autocast(device):
            noise_pred = predict_noise(unet, x, timesteps, prompt_embeds, negative_embeds, args.guidance_scale)
        x, log_prob = ddim_step_with_logprob(scheduler, noise_pred, timesteps, x, args.eta, generators=generators)
        latents.append(x)
        log_probs.append(log_prob)
    with autocast(device):
        images = decode(pipe, x)
    return torch.stack(latents, 1), torch.stack(log_probs, 1), images


def decode(pipe, latents):
    """Latents [n, C, h, w] -> images [n, 3, H, W] in [0, 1]. Models without a VAE sample pixels in [-1, 1]."""
    vae = getattr(pipe, "vae", None)
    images = latents if vae is None else vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_pil(images) -> list[Image.Image]:
    """[n, 3, H, W] in [0, 1] -> n RGB images (rounded to 8 bits, as any saved image)."""
    return [Image.fromarray(a) for a in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()]


def save_grid(images: list[Image.Image], path: Path, columns: int = 4):
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, math.ceil(len(images) / columns) * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    grid.save(path)


# Training: PPO-clip over the recorded trajectories --------------------------------------------------------------------
def train_on_samples(args: Args, unet, scheduler, optimizer, params, ema_params, samples, negative_embeds,
                     trainable_steps, generator, device) -> dict:
    """--ppo-epochs passes over one epoch's samples (DDPO_IS with clipping). Each pass shuffles the samples and,
    independently per sample, picks num_train_timesteps of its stochastic steps in random order. The optimizer
    steps once per --gradient-accumulation-steps train batches, gradients summed over all their timesteps.
    Under torchrun `unet` is wrapped in DistributedDataParallel and each process passes its own share:
    samples: latents [n, steps + 1, C, h, w], log_probs [n, steps], advantages [n], prompt_embeds [n, tokens, dim].
    Returns the losses' statistics averaged over the processes."""
    n, stats = len(samples["advantages"]), defaultdict(list)
    accumulation = args.gradient_accumulation_steps * args.num_train_timesteps  # backward passes per optimizer step
    embeds = samples.get("prompt_embeds")
    ddp = isinstance(unet, nn.parallel.DistributedDataParallel)
    for _ in range(args.ppo_epochs):
        order = torch.randperm(n, generator=generator)
        step_choice = torch.stack([trainable_steps[torch.randperm(len(trainable_steps), generator=generator)]
                                   for _ in range(n)])[:, :args.num_train_timesteps]  # [n, num_train_timesteps]
        for b, start in enumerate(range(0, n, args.local_train_batch_size)):
            idx = order[start : start + args.local_train_batch_size]  # [micro_batch] (CPU indices work on any device)
            advantages = samples["advantages"][idx].clamp(-args.adv_clip_max, args.adv_clip_max)
            for j in range(args.num_train_timesteps):
                step = step_choice[idx, j]  # [micro_batch]: which step of each sample's chain
                x_t, x_prev = samples["latents"][idx, step], samples["latents"][idx, step + 1]  # [micro_batch, C, h, w]
                timesteps = scheduler.timesteps[step].to(device)  # [micro_batch]
                # DDP averages the gradients over the processes in the optimizer step's last backward pass only;
                # as every process has the same number of samples, the mean of their mean losses is the
                # single-process loss, and the clipping and the step below see the same gradient everywhere
                last = (b + 1) % args.gradient_accumulation_steps == 0 and j == args.num_train_timesteps - 1
                with unet.no_sync() if ddp and not last else nullcontext():
                    with autocast(device):
                        noise_pred = predict_noise(unet, x_t, timesteps, None if embeds is None else embeds[idx],
                                                   negative_embeds, args.guidance_scale)
                    _, log_prob = ddim_step_with_logprob(scheduler, noise_pred, timesteps, x_t, args.eta,
                                                         prev_sample=x_prev)  # [micro_batch]
                    loss, clipfrac, ratio_mean, approx_kl = policy_loss(
                        log_prob, samples["log_probs"][idx, step], advantages, args.cliprange)
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"non-finite PPO loss (ratio mean {ratio_mean.item()}): lower "
                                           "--learning-rate")
                    (loss / accumulation).backward()
                for key, value in (("policy_loss", loss), ("clipfrac", clipfrac), ("ratio_mean", ratio_mean),
                                   ("approx_kl", approx_kl)):
                    stats[key].append(value.item())
            if (b + 1) % args.gradient_accumulation_steps == 0:
                stats["grad_norm"].append(nn.utils.clip_grad_norm_(params, args.max_grad_norm).item())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema_params is not None:
                    for ema, p in zip(ema_params, params):
                        ema.lerp_(p.detach(), 1 - args.ema_decay)
    return mean_over_processes({f"losses/{k}": sum(v) / len(v) for k, v in stats.items()}, device)


# Checkpoints: weights diffusers loads + training state, written atomically --------------------------------------------
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the attention projections, as the reference


def save_weights(pipe, path: Path, lora: bool):
    """LoRA: pytorch_lora_weights.safetensors, for `pipe.load_lora_weights(path)`; else the UNet in path/unet."""
    if lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        # the adapter config travels as metadata: without it load_lora_weights assumes alpha = r
        type(pipe).save_lora_weights(path, unet_lora_layers=state,
                                     unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    else:
        pipe.unet.save_pretrained(path / "unet")


def save_pipeline(pipe, scheduler, model: str, path: Path) -> str:
    """The whole pipeline, with the trained UNet and the DDIM scheduler, in path; returns how to load it. One dtype,
    the UNet's: under --dtype auto on a GPU the VAE and text encoder ran in bf16 beside a float32 UNet, so `model`'s
    own copies are saved instead (nothing rounded; a pipeline of mixed dtypes fails in diffusers' own sampling)."""
    dtype = pipe.unet.dtype
    pipe.scheduler = scheduler
    if any(isinstance(part, nn.Module) and part.dtype != dtype for part in pipe.components.values()):
        from diffusers import DiffusionPipeline

        kept = {k: v for k, v in pipe.components.items() if k in ("unet", "scheduler", "safety_checker")}
        pipe = from_pretrained(DiffusionPipeline, model, "--model", dtype=dtype, **kept)
    pipe.save_pretrained(path)
    # without dtype= diffusers loads the VAE and UNet in float32, transformers the text encoder as saved: a mix
    load_dtype = "" if dtype == torch.float32 else f", dtype={dtype}"
    return f"DiffusionPipeline.from_pretrained({str(path)!r}{load_dtype})"


def save_checkpoint(path: Path, pipe, lora, optimizer, stat_tracker, ema_params, epoch):
    """Weights + training state, written to a temporary folder and swapped in (atomic_dir): a crash mid-save
    never leaves a half checkpoint. No RNG state: every epoch seeds its own generators (make_generator), and all
    of this is the same on every process, so the checkpoint resumes on any number of processes."""
    with atomic_dir(path) as tmp:
        save_weights(pipe, tmp, lora)
        torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(),
                    "stat_buffers": stat_tracker.buffers if stat_tracker else None, "ema": ema_params},
                   tmp / "training_state.pt")


def load_checkpoint(path: Path, pipe, lora, optimizer, stat_tracker, ema_params) -> int:
    """Restore what save_checkpoint wrote; returns the number of epochs done."""
    if lora:
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(path / "pytorch_lora_weights.safetensors")
        set_peft_model_state_dict(pipe.unet, convert_unet_state_dict_to_peft(
            {k.removeprefix("unet."): v for k, v in state.items()}))
    else:
        pipe.unet.load_state_dict(type(pipe.unet).from_pretrained(path / "unet").state_dict())
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if stat_tracker is not None:
        stat_tracker.buffers = state["stat_buffers"]
    if ema_params is not None:
        for ema, saved in zip(ema_params, state["ema"]):
            ema.copy_(saved)
    return state["epoch"]


# Training loop --------------------------------------------------------------------------------------------------------
def load_pipeline(args: Args, device):
    """The diffusers pipeline with every part frozen but the UNet (or its LoRA adapters), and the DDIM scheduler that
    is the policy, whatever scheduler the checkpoint ships (SD 1.x ships PNDM). Also sets args.num_train_timesteps.
    --dtype: the UNet loads in the trained weights' dtype (with LoRA: the frozen one, and the adapters train in
    float32), the VAE and text encoder in the frozen one. Returns (pipe, scheduler, the indices of the stochastic
    steps)."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    dtypes = {"unet": weights_dtype(args.dtype, device, trained=args.lora_r == 0),
              "default": weights_dtype(args.dtype, device, trained=False)}  # every other part: frozen
    try:
        pipe = from_pretrained(DiffusionPipeline, args.model, "--model", dtype=dtypes)
    except UserError as err:
        raise UserError(f"{err} For DDPO offline: python -m utils.tiny_sd --out tiny/sd; --model tiny/sd") from None
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # never run (rewards score the raw images): free its memory
    if getattr(pipe, "text_encoder", None) is None and args.guidance_scale != 1.0:
        raise UserError(f"--guidance-scale {args.guidance_scale}: --model {args.model!r} has no text encoder (an "
                        "unconditional model), so there is no prompt to guide towards; pass --guidance-scale 1")
    if getattr(pipe, "text_encoder_2", None) is not None or not hasattr(pipe, "unet"):
        raise UserError(f"--model {args.model!r}: {type(pipe).__name__} is not supported (a UNet pipeline with at "
                        "most one text encoder is, e.g. Stable Diffusion 1.x/2.x)")
    if args.lora_r > 0 and not hasattr(pipe, "load_lora_weights"):
        raise UserError(f"--lora-r: {type(pipe).__name__} cannot load LoRA weights; pass --lora-r 0 to train the UNet")
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(args.num_steps)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction") or scheduler.config.thresholding:
        raise UserError(f"--model {args.model!r}: only epsilon/v_prediction schedulers without thresholding "
                        "are supported")
    stds = ddim_std(*ddim_alphas(scheduler, scheduler.timesteps), args.eta)  # [num_steps]
    trainable_steps = torch.nonzero(stds > 0).flatten()  # all but a deterministic last step
    args.num_train_timesteps = int(args.timestep_fraction * len(trainable_steps))
    if args.num_train_timesteps < 1:
        raise UserError("--timestep-fraction x --num-steps leaves no timestep to train on")
    pipe.to(device)
    for component in pipe.components.values():  # frozen: VAE, text encoder (and the UNet unless trained below)
        if isinstance(component, nn.Module):
            component.requires_grad_(False)
    if args.lora_r > 0:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        pipe.unet.add_adapter(LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=LORA_TARGETS))
        cast_training_params(pipe.unet, torch.float32)  # peft makes adapters in their base's dtype: train them in fp32
    else:
        pipe.unet.requires_grad_(True)
    if args.gradient_checkpointing:  # diffusers checkpoints whenever gradients are on, in eval mode too
        pipe.unet.enable_gradient_checkpointing()
    # Eval mode in sampling *and* training: SD's UNet has no dropout, LoRA dropout is 0, so the training log-probs
    # equal the sampling ones before the first update (ratio = 1 up to batch-shape numerics).
    pipe.unet.eval()
    return pipe, scheduler, trainable_steps


def main(args: Args):
    device, rank, world_size = init_distributed(args.device)  # one process, or one per GPU/CPU under torchrun
    args = check_args(args, world_size)
    is_main = rank == 0  # only the first process logs, tracks and saves
    quiet_libraries()
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    # The output folder first (a run in it is never lost: --resume or --overwrite), then the model's path
    check_paths(("--model", args.model))
    resume_from = prepare_output_dir(args, is_main, length_flags=("num_epochs",))
    out_dir, ckpt_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoint"
    torch.manual_seed(args.seed)  # LoRA's initial weights (the same on every process; DDP also broadcasts rank 0's)

    # Reward and prompts first: bad input fails before the (large) pipeline loads
    reward_fn = load_reward_fn(args, device)
    prompts = load_prompts(args.prompts)

    pipe, scheduler, trainable_steps = load_pipeline(args, device)
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                  eps=1e-8, fused=True)  # one kernel for all tensors (CPU and CUDA)
    ema_params = [p.detach().clone() for p in params] if args.ema_decay is not None else None
    stat_tracker = PerPromptStatTracker(args.stat_buffer_size, args.stat_min_count) \
        if args.per_prompt_stat_tracking else None
    negative_embeds = encode_prompts(pipe, [""], device)  # the empty prompt: CFG's unconditional branch
    start_epoch = 0
    if resume_from is not None:
        start_epoch = load_checkpoint(resume_from, pipe, args.lora_r > 0, optimizer, stat_tracker, ema_params)
        if is_main:
            print(f"resumed from {resume_from} after epoch {start_epoch}")
    ddp_unet = distribute(pipe.unet, device, fsdp=False)  # under torchrun: DDP averages gradients in the backward

    # Outputs: args.json + metrics.jsonl (+ wandb with --track), a grid of samples per epoch
    if is_main:
        tracker = Tracker(out_dir, args, start_epoch, args.track, args.wandb_project, step_key="epoch")
        (out_dir / "samples").mkdir(exist_ok=True)
        print(f"DDPO: {args.num_epochs} epochs x {args.samples_per_epoch} images ({args.num_steps} DDIM steps, eta "
              f"{args.eta}, guidance {args.guidance_scale}) on {world_size} x {device}; training "
              f"{args.num_train_timesteps} of {len(trainable_steps)} stochastic steps per image; "
              f"{'LoRA r=%d' % args.lora_r if args.lora_r else 'full UNet'} ({sum(p.numel() for p in params):,} "
              f"trained parameters); {len(prompts)} prompts; outputs in {out_dir}")

    bar = tqdm(range(start_epoch, args.num_epochs), desc="ddpo", initial=start_epoch,
               total=args.num_epochs, dynamic_ncols=True, disable=not is_main)
    for epoch in bar:
        # 1. Sample trajectories with the current policy and score the final images. The epoch's prompts are drawn
        # for all processes at once and each takes its share; each image's noise has its own generator (keyed by
        # the image's number in the epoch), so a seed gives the same images on any number of processes.
        start = time.perf_counter()
        picks = torch.randint(len(prompts), (args.samples_per_epoch,),
                              generator=make_generator(args.seed, epoch, "prompts"))  # with replacement
        epoch_prompts = [prompts[i] for i in picks]  # all processes' prompts, in the order all_gather concatenates
        first = rank * args.local_samples_per_epoch  # this process's share: images first ... first + local - 1
        samples, local_rewards, images = defaultdict(list), [], []
        for start_index in range(first, first + args.local_samples_per_epoch, args.local_sample_batch_size):
            indices = range(start_index, start_index + args.local_sample_batch_size)
            batch_prompts = [epoch_prompts[i] for i in indices]
            prompt_embeds = encode_prompts(pipe, batch_prompts, device)  # [batch, tokens, dim] or None
            latents, log_probs, batch_images = sample_trajectories(
                pipe, scheduler, prompt_embeds, negative_embeds, args,
                [make_generator(args.seed, epoch, "noise", i) for i in indices], device)
            batch_images = to_pil(batch_images)
            local_rewards.append(call_reward_fn(reward_fn, len(batch_images), f"epoch {epoch + 1}", batch_images,
                                                batch_prompts))
            samples["latents"].append(latents), samples["log_probs"].append(log_probs)
            if prompt_embeds is not None:
                samples["prompt_embeds"].append(prompt_embeds)
            images += batch_images
        samples = {k: torch.cat(v) for k, v in samples.items()}  # leading dim: local_samples_per_epoch
        sample_time = time.perf_counter() - start

        # 2. Advantages: rewards standardised per prompt (or over the epoch), clipped in the loss. Every process
        # computes them from all processes' rewards, so the statistics (and the stat buffers a checkpoint saves)
        # are the single-process ones, the same everywhere; each keeps the advantages of its own share.
        rewards = all_gather(torch.cat(local_rewards).to(device)).cpu()  # [samples_per_epoch], as epoch_prompts
        if stat_tracker is not None:
            advantages = stat_tracker.update(epoch_prompts, rewards)
        else:
            advantages = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-8)
        samples["advantages"] = advantages[first : first + args.local_samples_per_epoch].to(device)

        # 3. PPO updates on the recorded steps (each process shuffles its own share)
        train_start = time.perf_counter()
        stats = train_on_samples(args, ddp_unet, scheduler, optimizer, params, ema_params, samples, negative_embeds,
                                 trainable_steps, make_generator(args.seed, epoch, "shuffle", rank), device)
        train_time = time.perf_counter() - train_start

        # 4. Logging, sample grid, checkpoint
        epoch_time = time.perf_counter() - start
        stats.update({"epoch": epoch + 1, "samples": (epoch + 1) * args.samples_per_epoch,
                      "objective/scores": rewards.mean().item(),
                      "objective/scores_std": rewards.std(unbiased=False).item()})
        stats.update(mean_over_processes({
            "perf/sample_s": sample_time, "perf/train_s": train_time, "perf/epoch_s": epoch_time,
            "perf/samples_per_s": args.samples_per_epoch / epoch_time,
            "perf/peak_memory_mb": peak_memory_mb(device),  # per process
        }, device))
        if not is_main:
            continue
        save_grid(images[:16], out_dir / "samples" / f"epoch_{epoch + 1:04d}.png")  # the first process's images
        media = {}
        if args.track:
            import wandb

            media["images"] = [wandb.Image(image, caption=f"{prompt:.25} | {reward:.2f}")  # (its share comes first)
                               for image, prompt, reward in zip(images[:16], epoch_prompts, rewards.tolist())]
        tracker.log(stats, **media)
        bar.write(f"epoch {epoch + 1:>4} | reward {stats['objective/scores']:+.3f} "
                  f"± {stats['objective/scores_std']:.3f} "
                  f"| pg {stats['losses/policy_loss']:+.1e} | kl {stats['losses/approx_kl']:.2e} "
                  f"| clipfrac {stats['losses/clipfrac']:.2f} | sample {sample_time:.1f}s train {train_time:.1f}s")
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.num_epochs:
            save_checkpoint(ckpt_dir, pipe, args.lora_r > 0, optimizer, stat_tracker, ema_params, epoch + 1)

    finish()  # under torchrun: wait for rank 0's last checkpoint, then leave the process group
    if not is_main:
        return None
    # Final model in the output folder (the EMA weights when --ema-decay is set)
    if ema_params is not None:
        for p, ema in zip(params, ema_params):
            p.data.copy_(ema)
    if args.lora_r > 0:
        save_weights(pipe, out_dir, lora=True)
        how = f"DiffusionPipeline.from_pretrained({args.model!r}).load_lora_weights({str(out_dir)!r})"
    else:
        how = save_pipeline(pipe, scheduler, args.model, out_dir)
    tracker.close()
    print(f"done: model in {out_dir} ({how}), metrics in {tracker.path}, sample grids in {out_dir / 'samples'}, "
          f"resumable checkpoint in {ckpt_dir}")
    return tracker.path


if __name__ == "__main__":
    cli(main, Args)
