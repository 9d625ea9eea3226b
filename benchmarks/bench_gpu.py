"""ppo.py and sft.py on one GPU with a GPT-2-small-shaped model (12 layers x 768, 12 heads, 1024 positions; our
4,096-token BPE vocabulary, so built offline from a config): throughput, peak memory and model FLOPs utilisation.

    python benchmarks/bench_gpu.py --out runs/bench_gpu      # needs `python -m utils.assets` (tiny/) and a GPU

Both scripts run as a user runs them (bf16 autocast on CUDA, fp32 master weights and Adam state, as they do
today). MFU counts 6 x parameters FLOPs per trained token (forward + backward; attention's own FLOPs and the
embedding lookup are left out, so it is slightly low) against the H100/H200 SXM dense bf16 peak of 989 TFLOP/s:
- SFT: tokens/s of the optimizer steps (packed blocks: no padding);
- PPO, training phase only: the PPO epochs' forward + backward over every query+response position (padding
  included, as the GPU computes it), timed from ppo.py's own train_tokens_per_s (response tokens x epochs / time).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16


def build_model(tokenizer_dir: Path, out: Path) -> int:
    """A randomly initialised GPT-2-small-shaped LM with our tokenizer, saved as a normal checkpoint."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def run(cmd: list, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed: see {log}\n" + log.read_text()[-3000:])
    return time.perf_counter() - start


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/bench_gpu")
    parser.add_argument("--tiny", default="tiny")
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--sft-batch", type=int, default=32)
    parser.add_argument("--sft-length", type=int, default=512)
    parser.add_argument("--ppo-iterations", type=int, default=8)
    parser.add_argument("--ppo-batch", type=int, default=128)
    parser.add_argument("--ppo-mini-batch", type=int, default=32)
    parser.add_argument("--response-length", type=int, default=64)
    a = parser.parse_args()
    out, tiny = Path(a.out).resolve(), Path(a.tiny).resolve()
    out.mkdir(parents=True, exist_ok=True)
    n_params = build_model(tiny / "tokenizer", out / "gpt2-small-shaped")
    model = out / "gpt2-small-shaped"
    result = {"params": n_params, "peak_flops": PEAK_FLOPS}

    sft_wall = run(["sft.py", "--model", model, "--dataset", tiny / "prompts.jsonl", "--max-seq-length", a.sft_length,
                    "--packing", "--batch-size", a.sft_batch, "--max-steps", a.sft_steps, "--learning-rate", "1e-4",
                    "--eval-fraction", 0, "--save-every", 10_000, "--output-dir", out / "sft", "--overwrite"],
                   out / "sft.log")
    steps = [m for m in metrics(out / "sft" / "metrics.jsonl") if "perf/tokens_per_s" in m][3:]  # warm-up left out
    tok_s = statistics.median(m["perf/tokens_per_s"] for m in steps)
    result["sft"] = {"steps_timed": len(steps), "tokens_per_s_median": tok_s,
                     "peak_memory_mb": max(m["perf/peak_memory_mb"] for m in steps),
                     "mfu": 6 * n_params * tok_s / PEAK_FLOPS, "process_wall_s": sft_wall,
                     "batch": f"{a.sft_batch} packed blocks of {a.sft_length} tokens"}

    ppo_wall = run(["ppo.py", "--model", model, "--reward-model", tiny / "reward", "--dataset", tiny / "prompts.jsonl",
                    "--total-episodes", a.ppo_iterations * a.ppo_batch, "--batch-size", a.ppo_batch,
                    "--mini-batch-size", a.ppo_mini_batch, "--response-length", a.response_length,
                    "--stop-token", "none", "--learning-rate", "1e-5", "--save-every", 10_000,
                    "--output-dir", out / "ppo", "--overwrite"], out / "ppo.log")
    its = metrics(out / "ppo" / "metrics.jsonl")[1:]  # the first iteration warms up
    ppo_epochs = 4  # ppo.py's default
    width = 8 + a.response_length  # --prompt-max-tokens (default 8) + the response: the padded forward
    train_s = [a.ppo_batch * m["charts/response_length"] * ppo_epochs / m["perf/train_tokens_per_s"] for m in its]
    train_flops = 6 * n_params * a.ppo_batch * width * ppo_epochs
    result["ppo"] = {"iterations_timed": len(its),
                     "episodes_per_s_median": statistics.median(m["perf/episodes_per_s"] for m in its),
                     "rollout_tokens_per_s_median": statistics.median(m["perf/rollout_tokens_per_s"] for m in its),
                     "train_tokens_per_s_median": statistics.median(m["perf/train_tokens_per_s"] for m in its),
                     "rollout_s_median": statistics.median(m["perf/rollout_s"] for m in its),
                     "iteration_s_median": statistics.median(m["perf/iteration_s"] for m in its),
                     "peak_memory_mb": max(m["perf/peak_memory_mb"] for m in its),
                     "train_phase_mfu": train_flops / statistics.median(train_s) / PEAK_FLOPS,
                     "process_wall_s": ppo_wall,
                     "batch": f"{a.ppo_batch} episodes, mini-batch {a.ppo_mini_batch}, {a.response_length} tokens, "
                              f"{ppo_epochs} epochs"}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
