"""Peak memory of one PPO iteration and of SFT steps at GPT-2-small and GPT-2-medium shapes (random weights, our
4,096-token vocabulary, built offline from configs) under the memory options: float32, --dtype bfloat16, LoRA,
LoRA over a bfloat16 base, activation checkpointing, LoRA over a 4-bit or 8-bit base (--quantize, bitsandbytes);
and, for PPO only, a reference that shares the policy's embeddings and first half or all of its blocks
(--ref-shared-layers: those then do not train, so they also need no gradients or Adam state) or waits on the CPU
(--ref-offload: saves GPU memory only; on a CPU-only run the CPU is the device, nothing moves and nothing is saved),
or is frozen in bfloat16 beside a float32 policy, as --dtype auto loads it on a bf16 GPU (on any device here).

    python benchmarks/bench_memory.py --out runs/bench_memory            # CPU: peak RSS of each process
    python benchmarks/bench_memory.py --sizes small --device cuda        # GPU: peak CUDA memory allocated
    python benchmarks/bench_memory.py --sizes small --variants float32 "ref shared: half the blocks"   # some rows

Each cell is a fresh process running the script as a user would (a small batch: what changes between the rows
is the weights, gradients, Adam state and activations); the figure is the script's own perf/peak_memory_mb (on CPU
the process's peak resident memory, so it includes Python, torch and transformers, about 0.5 GB; on CUDA the peak
allocated by torch).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"small": dict(n_layer=12, n_embd=768, n_head=12), "medium": dict(n_layer=24, n_embd=1024, n_head=16)}
VARIANTS = {"float32": [], "bfloat16 (--dtype)": ["--dtype", "bfloat16"], "LoRA r=16": ["--lora-r", "16"],
            "LoRA r=16, bfloat16 base": ["--lora-r", "16", "--dtype", "bfloat16"],
            "activation checkpointing": ["--gradient-checkpointing"],
            "LoRA r=16, 4-bit base": ["--lora-r", "16", "--quantize", "4bit"],
            "LoRA r=16, 8-bit base": ["--lora-r", "16", "--quantize", "8bit"]}
# PPO only (sft.py has no reference model): flags of a model shape. GPU_AUTO: --dtype auto as on a bf16 GPU (the
# policy float32, the reference and reward model bfloat16) on any device, through run_as_on_a_bf16_gpu
GPU_AUTO = "bf16 frozen models (auto on a GPU)"
PPO_VARIANTS = {"ref shared: half the blocks": lambda shape: ["--ref-shared-layers", shape["n_layer"] // 2],
                "ref shared: all the blocks": lambda shape: ["--ref-shared-layers", shape["n_layer"]],
                "ref offload": lambda shape: ["--ref-offload"],
                GPU_AUTO: lambda shape: []}


def build_model(tokenizer_dir: Path, out: Path, shape: dict) -> int:
    """A randomly initialised GPT-2 of the given shape with our tokenizer, saved as a normal checkpoint."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    if (out / "config.json").exists():
        return json.loads((out / "n_params.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPT2Config(n_positions=1024, vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "n_params.json").write_text(json.dumps(n_params))
    return n_params


def run_as_on_a_bf16_gpu(script: str, argv: list):
    """Run `script` with `argv` as its command line in this process, with utils.models.weights_dtype picking for
    --dtype auto as on a bf16 GPU: bfloat16 for frozen weights (patched before the script imports it)."""
    import runpy

    import torch

    import utils.models

    pick = utils.models.weights_dtype

    def as_on_a_bf16_gpu(name, device, trained=True):
        return torch.bfloat16 if name == "auto" and not trained else pick(name, device, trained)

    utils.models.weights_dtype = as_on_a_bf16_gpu
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def peak_mb(cmd: list, out: Path, device: str, gpu_auto: bool = False) -> float:
    """Run one of our scripts (gpu_auto: through run_as_on_a_bf16_gpu); the largest perf/peak_memory_mb it logged."""
    python = [sys.executable, __file__, "--run-as-on-a-bf16-gpu"] if gpu_auto else [sys.executable]
    proc = subprocess.run([*python, *map(str, cmd), "--device", device, "--output-dir", out, "--overwrite"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return max(r["perf/peak_memory_mb"] for r in rows if "perf/peak_memory_mb" in r)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_memory")
    p.add_argument("--tiny", default="tiny", help="the offline assets (tokenizer, reward model, prompts)")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="+", default=[*VARIANTS, *PPO_VARIANTS], choices=[*VARIANTS, *PPO_VARIANTS],
                   help="the rows to measure (default: all)")
    a = p.parse_args()
    out, tiny = Path(a.out).resolve(), Path(a.tiny).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    for size in a.sizes:
        model = out / f"gpt2-{size}-shaped"
        n_params = build_model(tiny / "tokenizer", model, SIZES[size])
        for name in a.variants:
            flags = VARIANTS[name] if name in VARIANTS else PPO_VARIANTS[name](SIZES[size])
            ppo = peak_mb(["ppo.py", "--model", model, "--reward-model", tiny / "reward", "--dataset",
                           tiny / "prompts.jsonl", "--total-episodes", 8, "--batch-size", 8, "--mini-batch-size", 8,
                           "--response-length", 32, "--stop-token", "none", "--sample-every", 0, "--save-every",
                           10_000, *flags], out / "ppo", a.device, gpu_auto=name == GPU_AUTO)
            sft = peak_mb(["sft.py", "--model", model, "--dataset", tiny / "prompts.jsonl", "--packing",
                           "--max-seq-length", 256, "--batch-size", 4, "--max-steps", 2, "--eval-fraction", 0,
                           "--save-every", 10_000, *flags], out / "sft", a.device) if name in VARIANTS else None
            result[f"{size} | {name}"] = {"params": n_params, "flags": " ".join(map(str, flags)),
                                          "ppo_iteration_peak_mb": ppo, "sft_step_peak_mb": sft}
            print(f"{size:<6} ({n_params / 1e6:.0f}M) | {name:<27} | PPO iteration {ppo:8.0f} MiB | SFT step "
                  + (f"{sft:8.0f} MiB" if sft is not None else "       - (no reference)"), flush=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run-as-on-a-bf16-gpu"]:  # a cell of the GPU_AUTO row (see peak_mb)
        sys.path.insert(0, str(ROOT))
        run_as_on_a_bf16_gpu(sys.argv[2], sys.argv[3:])
    else:
        main()
