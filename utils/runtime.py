"""Run plumbing shared by the scripts: device and precision, outputs (metrics.jsonl, wandb, stdout), atomic
checkpoints, and user-supplied Python functions. Nothing here is part of an algorithm."""

import dataclasses
import importlib
import importlib.util
import json
import os
import resource
import shutil
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from utils.hub import UserError


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; TF32 matmuls on CUDA (bf16 autocast does the rest)."""
    device = torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def init_distributed(device_name: str):
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs (one per local rank),
    gloo on CPUs. Returns (device, rank, world_size); (pick_device(device_name), 0, 1) in a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return pick_device(device_name), 0, 1
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and device_name != "cpu":
        torch.cuda.set_device(local_rank)
        device = pick_device(f"cuda:{local_rank}")
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device, dist.get_rank(), world_size


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor of the same shape from every process (rank order); itself in one process."""
    if not distributed():
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def mean_over_processes(stats: dict, device: torch.device) -> dict:
    """Average every float statistic over the processes (one all-reduce); unchanged in one process."""
    if not distributed():
        return stats
    import torch.distributed as dist

    keys = [k for k, v in stats.items() if isinstance(v, float)]  # ints (iteration, counts) stay as they are
    values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return {**stats, **dict(zip(keys, (values / dist.get_world_size()).tolist()))}


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU (fp32 there: bf16 matmuls on CPU are slow and less exact)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def fuse_gelu(model: torch.nn.Module) -> int:
    """Swap transformers' NewGELUActivation (GPT-2's and T5 v1.1's "gelu_new": the tanh formula written as eight
    tensor ops, each a pass over the MLP's widest activation, several kept for backward) for torch's fused tanh
    GELU, the same function in one kernel (they differ by float rounding, ~1e-7). Only the module changes: the
    config still says gelu_new, so the saved model loads and computes as before. Returns how many were swapped."""
    from transformers.activations import NewGELUActivation

    swaps = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is NewGELUActivation]
    for parent, name in swaps:
        setattr(parent, name, torch.nn.GELU(approximate="tanh"))
    return len(swaps)


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> int:
    """torch.compile each transformer block in place (regional compilation: the blocks share their code, so one
    compilation serves them all and starts in seconds, not minutes; parameter names stay as they are, so
    checkpoints are unchanged). The blocks are the model's `_no_split_modules` classes. Returns how many."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a LoRA wrapper
    block_types = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_types]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA, else the peak resident memory of the process (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Tracker:
    """Writes args.json and one JSON line per step to metrics.jsonl in the output folder, mirrors them to wandb
    with `track=True`. On resume, lines past the checkpoint's step are dropped so no step appears twice."""

    def __init__(self, out_dir: Path, args, resume_step: int = 0, track: bool = False, project: str = "",
                 step_key: str = "iteration"):
        self.path, self.step_key, self.wandb = Path(out_dir) / "metrics.jsonl", step_key, None
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
        kept = []
        if resume_step and self.path.exists():
            kept = [l for l in self.path.read_text().splitlines() if json.loads(l)[step_key] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        if track:
            import wandb

            self.wandb = wandb.init(project=project, name=f"{args.exp_name}_{args.seed}", config=dataclasses.asdict(args),
                                    dir=str(out_dir), id=f"{args.exp_name}-{args.seed}-{int(time.time())}")

    def log(self, stats: dict, **media):
        with open(self.path, "a") as f:
            f.write(json.dumps(stats) + "\n")
        if self.wandb is not None:
            self.wandb.log({**stats, **media}, step=stats[self.step_key])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


@contextmanager
def atomic_dir(path: Path):
    """Yield a temporary folder; when the block succeeds, swap it in at `path` (old copy kept as `path.old`
    until the swap is done). A crash mid-save never leaves a half-written checkpoint at `path`."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def complete_checkpoint(path: Path):
    """The last complete checkpoint written by atomic_dir at `path` (or its `.old` twin after a crash
    between the two renames), or None."""
    path = Path(path)
    for candidate in (path, path.with_name(path.name + ".old")):
        if candidate.is_dir():
            return candidate
    return None


def load_function(spec: str, flag: str, builtins: dict) -> Callable:
    """A function named `spec`: a key of `builtins`, `path/to/file.py:function` or `package.module:function`."""
    if spec in builtins:
        return builtins[spec]
    if ":" not in spec:
        raise UserError(f"{flag} {spec!r}: not a built-in ({', '.join(builtins)}) "
                        "and not of the form path/to/file.py:function or module:function")
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except (FileNotFoundError, ModuleNotFoundError):
        raise UserError(f"{flag} {spec!r}: {where!r} not found") from None
    if not callable(getattr(module, name, None)):
        raise UserError(f"{flag} {spec!r}: {where} has no function {name!r}")
    return getattr(module, name)


def call_reward_fn(fn: Callable, n: int, where: str, *inputs) -> torch.Tensor:
    """Call a user's reward function on a batch of `n` samples and check that it returned one finite float
    per sample. Its own errors come back with its traceback and the batch (`where`) they happened on."""
    name = getattr(fn, "__name__", repr(fn))
    try:
        scores = fn(*inputs)
    except Exception as err:
        frames = traceback.format_exception(type(err), err, err.__traceback__.tb_next)  # drop this frame
        raise UserError(f"reward function {name} raised on the batch of {where}:\n{''.join(frames).rstrip()}") from None
    try:
        scores = torch.as_tensor([float(s) for s in scores], dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise UserError(f"reward function {name} must return one float per sample ({err}), {where}") from None
    if len(scores) != n:
        raise UserError(f"reward function {name} returned {len(scores)} scores for {n} samples, {where}")
    if not torch.isfinite(scores).all():
        bad = torch.nonzero(~torch.isfinite(scores)).flatten().tolist()
        raise UserError(f"reward function {name} returned NaN/inf for samples {bad[:10]} of the batch of {where}")
    return scores
