"""Throughput and peak memory of sft.py and reward.py on fixed tiny configurations (offline assets).

    python benchmarks/bench_sft_reward.py                 # 3 repeats of each, prints a table
    python benchmarks/bench_sft_reward.py --repeats 5 --steps 30 --threads 1

- sft:    the quickstart's model, a GPT-2 of 4.2M parameters (4 layers, 256 wide) trained from scratch on IMDB
          text, blocks of 256 tokens packed, 16 blocks per step: real (non-pad) tokens per second of training.
- reward: the pretrained MiniLM-L6 encoder (22.7M) with a one-output head, pairs of short IMDB reviews truncated
          to 128 tokens, 8 pairs per step: pairs per second of training.
Each repeat is a fresh process running the script's `main` (so peak RSS is that run's own). A repeat's figure is
the median of its per-step rates (first two steps dropped: warm-up); the table gives the median over repeats and
their range. Evaluation and checkpoint time is not counted. CPU figures depend on other load on the machine:
with other jobs running, torch's OpenMP threads spin-wait for each other and --threads 1 can be several times
faster than the default (one thread per core).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_one(kind: str, steps: int, out: Path, threads: int) -> dict:
    """One benchmark run in this process: returns the per-step rates and the peak memory."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from utils.assets import build, read_jsonl, write_jsonl
    from utils.data import imdb, sentiment_pairs

    assets = build()
    if kind == "sft":
        import sft

        write_jsonl(out / "data.jsonl", read_jsonl(assets / "imdb" / "train.jsonl")[:2000])
        args = sft.Args(model=str(assets / "policy"), tokenizer=str(assets / "tokenizer"), from_scratch=True,
                        config_overrides=["n_layer=4", "n_embd=256", "n_head=4", "n_positions=256"],
                        dataset=str(out / "data.jsonl"), eval_fraction=0.0, max_seq_length=256, packing=True,
                        batch_size=16, max_steps=steps, learning_rate=1e-3, save_every=10**9,
                        output_dir=str(out / "run"))
        metrics_path, rate = sft.main(args), "perf/tokens_per_s"
    else:
        import reward

        write_jsonl(out / "data.jsonl", sentiment_pairs(imdb("train", assets), 8 * steps, seed=0, max_words=100))
        args = reward.Args(model=str(assets / "minilm"), dataset=str(out / "data.jsonl"), eval_fraction=0.0,
                           max_seq_length=128, batch_size=8, max_steps=steps, learning_rate=1e-4, save_every=10**9,
                           output_dir=str(out / "run"))
        metrics_path, rate = reward.main(args), "perf/pairs_per_s"
    metrics = [json.loads(line) for line in open(metrics_path)]
    return {"rates": [m[rate] for m in metrics if "step" in m and m["step"] > 2],
            "peak_memory_mb": max(m["perf/peak_memory_mb"] for m in metrics if "perf/peak_memory_mb" in m)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per benchmark")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per repeat")
    parser.add_argument("--only", choices=["sft", "reward"], help="run one benchmark only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--one", choices=["sft", "reward"], help=argparse.SUPPRESS)  # a child process
    a = parser.parse_args()
    if a.one:
        with tempfile.TemporaryDirectory() as tmp:
            print("RESULT " + json.dumps(run_one(a.one, a.steps, Path(tmp), a.threads)))
        return
    print(f"{os.cpu_count()} CPUs, torch threads {a.threads or 'default'}; load average at start "
          f"{os.getloadavg()[0]:.2f}")
    rows = []
    for kind, unit in (("sft", "tokens/s"), ("reward", "pairs/s")):
        if a.only and a.only != kind:
            continue
        medians, peaks = [], []
        for _ in range(a.repeats):
            proc = subprocess.run([sys.executable, __file__, "--one", kind, "--steps", str(a.steps),
                                   "--threads", str(a.threads)], cwd=ROOT, capture_output=True, text=True)
            line = next((text for text in proc.stdout.splitlines() if text.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{kind} benchmark failed:\n{proc.stderr[-3000:]}")
            result = json.loads(line[len("RESULT "):])
            medians.append(statistics.median(result["rates"]))
            peaks.append(result["peak_memory_mb"])
        rows.append((kind, unit, statistics.median(medians), min(medians), max(medians), max(peaks)))
    print(f"load average at end {os.getloadavg()[0]:.2f}\n")
    print("| script | throughput (median of repeats) | range | peak RSS |")
    print("|---|---|---|---|")
    for kind, unit, median, low, high, peak in rows:
        print(f"| {kind}.py | {median:,.1f} {unit} | {low:,.1f} - {high:,.1f} | {peak:,.0f} MiB |")


if __name__ == "__main__":
    main()
