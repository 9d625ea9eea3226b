"""Several processes under torchrun: joining the process group, collectives that the scripts' statistics need,
and wrapping a model for training (DDP: a whole copy per process; FSDP: parameters, gradients and optimizer state
sharded). In one process every function here is a no-op, so the scripts read the same either way."""

import os
import warnings

import torch
import torch.nn as nn


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


def distribute(model: nn.Module, device, fsdp: bool, lms: tuple = (), units: tuple = (), example_inputs=None):
    """The module to train under torchrun; `model` itself in one process.

    DDP (default) keeps a whole copy on each process and averages the gradients during the backward pass. FSDP
    (`fsdp`) splits each transformer block's parameters, gradients and optimizer state over the processes and
    gathers a block's weights only while it computes: `lms` are the transformers to shard block by block (inside
    `model`, or frozen beside it such as a reference model), `units` small modules of `model` sharded on their own
    (a value head), then `model` becomes the root. example_inputs: the arguments of one tiny forward of `model`,
    run once so that FSDP takes `model` as its root before anything else (generation) calls a sub-module."""
    if not distributed():
        return model
    if not fsdp:
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")  # never edited in place
    for lm in lms:
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # under a LoRA wrapper
        blocks = set(getattr(base, "_no_split_modules", None) or [])  # the model's layer classes, e.g. GPT2Block
        for module in lm.modules():
            if type(module).__name__ in blocks:
                fully_shard(module)  # one all-gather per block: only one block's full weights exist at a time
        fully_shard(lm)  # embeddings, final norm, head
        # generate (of peft's wrapper, or an encoder-decoder's encoder) calls modules outside lm's forward: gather
        # lm's own weights for the whole call
        register_fsdp_forward_method(lm, "generate")
    for unit in units:
        fully_shard(unit)
    if not any(model is lm for lm in lms):
        fully_shard(model)
    if example_inputs is not None:
        with torch.no_grad():
            model(*example_inputs)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (FSDP shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def finish():
    """Under torchrun: wait until every process (rank 0 saving the final model) is done, then leave the group."""
    if distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
