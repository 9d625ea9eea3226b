"""Throughput of ddpo.py's pieces on one device, against diffusers' own sampler as the baseline.

    python -m utils.tiny_sd && python benchmarks/bench_ddpo.py --model tiny/sd          # offline, CPU
    python benchmarks/bench_ddpo.py --model runwayml/stable-diffusion-v1-5 --device cuda

Measures, best of --repeats (the first call warms up and is not counted):
  diffusers   StableDiffusionPipeline.__call__ with the same steps/eta/guidance (no log-probs): the baseline
  sample      ddpo.sample_trajectories (records latents and log-probs at every step)
  train       ddpo.train_on_samples: one PPO pass over the sampled batch, every stochastic timestep
and prints one JSON line (images/s, timesteps/s) after a readable table. Numbers from different machines or a
loaded machine do not compare: rerun the baseline in the same call.
"""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ddpo  # noqa: E402
from utils.hub import from_pretrained, quiet_libraries  # noqa: E402


@dataclass
class BenchArgs:
    model: str = "tiny/sd"
    """pipeline to measure (hub id or folder)"""
    num_steps: int = 50
    """DDIM steps per image"""
    batch_size: int = 8
    """images per sampling batch (also the train batch: one optimizer step per pass)"""
    guidance_scale: float = 5.0
    """classifier-free guidance weight"""
    lora_r: int = 4
    """LoRA rank (0: full UNet)"""
    repeats: int = 3
    """timed repeats after one warm-up; the best is reported"""
    device: str = "auto"
    """cpu, cuda, ... ('auto': cuda if available)"""


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: kernel selection, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main(bench: BenchArgs):
    import diffusers
    from diffusers import DDIMScheduler, DiffusionPipeline
    from peft import LoraConfig

    quiet_libraries()
    diffusers.utils.logging.disable_progress_bar()
    device = torch.device(bench.device if bench.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    args = ddpo.check_args(ddpo.Args(model=bench.model, num_steps=bench.num_steps, guidance_scale=bench.guidance_scale,
                                     sample_batch_size=bench.batch_size, num_batches_per_epoch=1,
                                     train_batch_size=bench.batch_size, gradient_accumulation_steps=1,
                                     lora_r=bench.lora_r))
    pipe = from_pretrained(DiffusionPipeline, bench.model, "--model").to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(args.num_steps)
    stds = ddpo.ddim_std(*ddpo.ddim_alphas(scheduler, scheduler.timesteps), args.eta)
    trainable_steps = torch.nonzero(stds > 0).flatten()
    args.num_train_timesteps = len(trainable_steps)
    prompts = ddpo.ANIMALS[: bench.batch_size]
    generator = torch.Generator().manual_seed(0)
    prompt_embeds = ddpo.encode_prompts(pipe, prompts, device)
    negative_embeds = ddpo.encode_prompts(pipe, [""], device)

    def diffusers_call():
        with ddpo.autocast(device):
            pipe(prompts, num_inference_steps=args.num_steps, eta=args.eta, guidance_scale=args.guidance_scale,
                 output_type="pt")

    def our_sampler():
        return ddpo.sample_trajectories(pipe, scheduler, prompt_embeds, negative_embeds, bench.batch_size, args,
                                        generator, device)

    results = {"model": bench.model, "device": str(device), "num_steps": args.num_steps, "batch_size": bench.batch_size,
               "guidance_scale": args.guidance_scale, "lora_r": bench.lora_r, "threads": torch.get_num_threads()}
    results["diffusers_images_per_s"] = bench.batch_size / best_time(diffusers_call, bench.repeats)
    results["sample_images_per_s"] = bench.batch_size / best_time(our_sampler, bench.repeats)

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    if bench.lora_r > 0:
        pipe.unet.add_adapter(LoraConfig(r=bench.lora_r, lora_alpha=bench.lora_r, target_modules=ddpo.LORA_TARGETS))
    else:
        pipe.unet.requires_grad_(True)
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    latents, log_probs, _ = our_sampler()
    samples = {"latents": latents, "log_probs": log_probs, "prompt_embeds": prompt_embeds,
               "advantages": torch.randn(bench.batch_size, generator=generator).to(device)}
    train_s = best_time(lambda: ddpo.train_on_samples(args, pipe, scheduler, optimizer, params, None, samples,
                                                      negative_embeds, trainable_steps, generator, device),
                        bench.repeats)
    results["train_timesteps_per_s"] = bench.batch_size * args.num_train_timesteps / train_s
    results["train_images_per_s"] = bench.batch_size / train_s
    results["peak_memory_mb"] = ddpo.peak_memory_mb(device)

    print(f"{'':10} {'images/s':>10}")
    print(f"{'diffusers':10} {results['diffusers_images_per_s']:10.2f}   (StableDiffusionPipeline call, baseline)")
    print(f"{'sample':10} {results['sample_images_per_s']:10.2f}   (ddpo sampler with log-probs)")
    print(f"{'train':10} {results['train_images_per_s']:10.2f}   ({results['train_timesteps_per_s']:.1f} timesteps/s)")
    print(json.dumps(results))


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
