"""Throughput of ppo.py on a fixed configuration: episodes/s, rollout tokens/s, training tokens/s, peak memory.

    python benchmarks/bench_ppo.py                      # tiny policy (2x64 GPT-2), CPU, 3 repeats
    python benchmarks/bench_ppo.py --size gpt2 --device cuda --batch-size 64   # GPT-2-sized (124M) random init

Each repeat is a fresh process (so peak memory is per run) running `ppo.py` for a few iterations on the
offline assets; the first iteration (warm-up) is dropped and the rest averaged. Prints the median and
min/max over the repeats. Compare two versions of the code in one session: timings drift between sessions.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {"tiny": None, "small": dict(n_layer=4, n_embd=256, n_head=4), "gpt2": dict(n_layer=12, n_embd=768, n_head=12)}
KEYS = ["perf/episodes_per_s", "perf/rollout_tokens_per_s", "perf/train_tokens_per_s", "perf/peak_memory_mb"]


def policy_of_size(assets: Path, size: str, workdir: Path) -> Path:
    if SIZES[size] is None:
        return assets / "policy"
    from transformers import AutoTokenizer

    from utils.assets import build_policy

    out = workdir / f"policy-{size}"
    build_policy(AutoTokenizer.from_pretrained(assets / "tokenizer"), out, n_positions=1024, **SIZES[size])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mini-batch-size", type=int, default=32)
    parser.add_argument("--response-length", type=int, default=24)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extra", default="", help="extra ppo.py flags, e.g. '--lora-r 8'")
    a = parser.parse_args()

    from utils.assets import build

    assets = build()
    with tempfile.TemporaryDirectory() as tmp:
        model = policy_of_size(assets, a.size, Path(tmp))
        runs = []
        for repeat in range(a.repeats):
            out = Path(tmp) / f"run{repeat}"
            cmd = [sys.executable, str(ROOT / "ppo.py"), "--model", str(model),
                   "--reward-model", str(assets / "reward"),
                   "--dataset", str(assets / "prompts.jsonl"), "--output-dir", str(out), "--device", a.device,
                   "--batch-size", str(a.batch_size), "--mini-batch-size", str(a.mini_batch_size),
                   "--total-episodes", str(a.batch_size * a.iterations), "--response-length", str(a.response_length),
                   "--stop-token", "none", "--save-every", "100000", *a.extra.split()]
            subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
            metrics = [json.loads(line) for line in open(out / "metrics.jsonl")][1:]  # drop the warm-up iteration
            runs.append({k: statistics.mean(m[k] for m in metrics) for k in KEYS[:3]} | {KEYS[3]: metrics[-1][KEYS[3]]})
    print(f"ppo.py, size={a.size}, device={a.device}, batch={a.batch_size}, mini-batch={a.mini_batch_size}, "
          f"response={a.response_length}, {a.iterations - 1} timed iterations x {a.repeats} runs {a.extra}")
    print(f"{'metric':<28}{'median':>12}{'min':>12}{'max':>12}")
    for k in KEYS:
        values = [r[k] for r in runs]
        print(f"{k:<28}{statistics.median(values):>12.1f}{min(values):>12.1f}{max(values):>12.1f}")


if __name__ == "__main__":
    main()
