"""Memory per process of DDP and FSDP (--fsdp) under torchrun: what each process holds of the model's training
state, measured on the live tensors after a few optimizer steps of sft.py's model set-up (`sft.distribute`).

    python benchmarks/bench_fsdp.py        # GPT-2-small-shaped model (12 x 768, 4096-token vocab), 2 processes
    python benchmarks/bench_fsdp.py --layers 4 --width 256 --nproc 4

For each mode a 2-process (gloo, CPU) torchrun job builds the model, wraps it as sft.py does (DDP, or FSDP on each
transformer block + the root), trains 3 steps with AdamW on random tokens, then every process sums the bytes of
what it holds: parameters (the local shard under FSDP), gradients and Adam's two moments. (DDP also keeps flat
gradient buckets for its all-reduce, about one more copy of the gradients, not counted.) On CUDA
torch.cuda.max_memory_allocated would add activations and FSDP's transient all-gathered block; on CPU
there is no allocator statistic, and the process's peak RSS is dominated by loading the whole model before it is
sharded and by gathering it for the checkpoint, so it is not a useful measure here.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def nbytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t  # FSDP: this process's shard only
    return t.numel() * t.element_size()


def worker(mode: str, layers: int, width: int):
    """Run under torchrun: build, wrap, train 3 steps, print this process's bytes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import sft
    from utils.distributed import distribute, init_distributed

    device, rank, world = init_distributed("cpu")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_layer=layers, n_embd=width, n_head=max(width // 64, 1),
                                       n_positions=128))
    args = sft.check_args(sft.Args(fsdp=mode == "fsdp", batch_size=2 * world), world)
    wrapped = distribute(model, device, args.fsdp, lms=(model,))
    params = [p for p in wrapped.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for _ in range(3):
        ids = torch.randint(0, 4096, (2, 64))
        wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated: they count
    held = {"parameters": sum(nbytes(p) for p in params), "gradients": sum(nbytes(p.grad) for p in params),
            "adam": sum(nbytes(v) for s in optimizer.state.values() for k, v in s.items() if k != "step")}
    if rank == 0:
        print("RESULT", " ".join(f"{k}={v}" for k, v in held.items()), f"total={sum(held.values())}", flush=True)
    torch.distributed.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        return worker(a.worker, a.layers, a.width)
    totals = {}
    print(f"model: GPT-2 shape, {a.layers} layers x {a.width}, 4096-token vocab; {a.nproc} processes (gloo, CPU)\n")
    print("| mode | parameters | gradients | Adam moments | total per process |")
    print("|---|---|---|---|---|")
    for mode in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
               __file__, "--worker", mode, "--layers", str(a.layers), "--width", str(a.width)]
        out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
        line = next(text for text in out.splitlines() if text.startswith("RESULT"))
        mb = {k: int(v) / 2**20 for k, v in (f.split("=") for f in line.split()[1:])}
        totals[mode] = mb["total"]
        print(f"| {mode} | {mb['parameters']:.0f} MB | {mb['gradients']:.0f} MB | {mb['adam']:.0f} MB | "
              f"{mb['total']:.0f} MB |", flush=True)
    print(f"\nFSDP holds {totals['fsdp'] / totals['ddp']:.0%} of DDP's training state per process "
          f"({totals['ddp'] - totals['fsdp']:.0f} MB less)")


if __name__ == "__main__":
    main()
