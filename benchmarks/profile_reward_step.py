"""Where one reward.py training step spends its time: torch.profiler over reward.py's own forward (trimmed last block),
Bradley-Terry loss, backward and fused AdamW step, on random token ids of one length, 1 thread.

    python benchmarks/profile_reward_step.py --model DIR --tokens 92                    # dropout off (default)
    python benchmarks/profile_reward_step.py --model DIR --tokens 252 --no-disable-dropout

DIR: a GPT-2 (e.g. from utils.assets.build_tokenizer + build_policy). Prints the median step time of 4 steps after
a warm-up, the profiler's top operators and the shares of matrix products (mm, addmm, bmm) and of dropout's
Bernoulli masks.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import reward  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", type=int, default=92, help="tokens per text")
    p.add_argument("--pairs", type=int, default=16, help="pairs per step")
    p.add_argument("--no-disable-dropout", action="store_true", help="keep the config's dropout")
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    tok.pad_token = tok.pad_token or tok.eos_token
    args = reward.Args(model=a.model, disable_dropout=not a.no_disable_dropout)
    model = reward.load_model(args, tok, torch.device("cpu"), verbose=False).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    last_mlp = reward.last_block_mlp(model)
    ids = torch.randint(0, len(tok), (2 * a.pairs, a.tokens))
    ids[ids == tok.pad_token_id] = 0 if tok.pad_token_id else 1  # no pad inside a text
    pairs = [(ids[i].tolist(), ids[a.pairs + i].tolist(), 0.0) for i in range(a.pairs)]

    def step():
        chosen, rejected, _ = reward.pair_rewards(model, pairs, tok.pad_token_id, torch.device("cpu"),
                                                  last_mlp=last_mlp)
        reward.bradley_terry_loss(chosen, rejected).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(4):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(f"step: median {statistics.median(times):.3f} s over 4 ({2 * a.pairs} texts x {a.tokens} tokens, dropout "
          f"{'on' if a.no_disable_dropout else 'off'})")
    with torch.profiler.profile() as prof:
        step()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    total = sum(e.self_cpu_time_total for e in events)
    matmuls = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    masks = sum(e.self_cpu_time_total for e in events if e.key == "aten::bernoulli_")
    print(f"matrix products (mm, addmm, bmm): {matmuls / total:.1%}; dropout masks (bernoulli_): {masks / total:.1%}")


if __name__ == "__main__":
    main()
