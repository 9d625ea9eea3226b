"""Run plumbing shared by the scripts: device and precision, outputs (metrics.jsonl, wandb, stdout), atomic
checkpoints, and user-supplied Python functions. Nothing here is part of an algorithm."""

import dataclasses
import errno
import importlib
import importlib.util
import json
import os
import resource
import shutil
import sys
import time
import traceback
import typing
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

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
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line, step_key) <= resume_step]
        with disk_full_is_an_error(out_dir):
            self.path.write_text("".join(line + "\n" for line in kept))
        if track:
            import wandb

            self.wandb = wandb.init(project=project, name=f"{args.exp_name}_{args.seed}",
                                    config=dataclasses.asdict(args), dir=str(out_dir),
                                    id=f"{args.exp_name}-{args.seed}-{int(time.time())}")

    def log(self, stats: dict, **media):
        with disk_full_is_an_error(self.path.parent), open(self.path, "a") as f:
            f.write(json.dumps(stats) + "\n")
        if self.wandb is not None:
            self.wandb.log({**stats, **media}, step=stats[self.step_key])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def _step_of(line: str, step_key: str) -> float:
    """The step of a metrics.jsonl line; inf for a line cut short by a kill during its write (dropped on resume)."""
    try:
        return json.loads(line)[step_key]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


@contextmanager
def disk_full_is_an_error(folder: Path):
    """Turn "no space left on device" while writing into `folder` into a one-line UserError naming it."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"the disk holding {folder} is full (no space left to write {err.filename or 'into it'}): "
                        "free some space, then rerun with --resume") from None


@contextmanager
def atomic_dir(path: Path):
    """Yield a temporary folder; when the block succeeds, swap it in at `path`. The checkpoint it replaces is kept
    as `path.old` (one previous checkpoint), so a crash mid-save never leaves a half-written checkpoint at `path`,
    and a checkpoint damaged later still has a complete predecessor to resume from (complete_checkpoint)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_full_is_an_error(path.parent):
            tmp.mkdir(parents=True)
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: give back what the half-written copy took
        raise
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)


def damaged_file(folder: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be resumed from ("<file>: <reason>"), or None if it looks complete: every
    safetensors file's header matches its size, every torch.save file is a whole zip archive, and the training
    state is there. Reads headers only (cheap even for a 7B checkpoint)."""
    from safetensors import safe_open

    if not (folder / "training_state.pt").is_file():
        return f"{folder / 'training_state.pt'}: missing"
    for file in sorted(folder.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt"):
                    pass
            elif file.suffix in (".pt", ".bin"):
                zipfile.ZipFile(file).close()
        except Exception as err:  # safetensors' own error type, zipfile.BadZipFile, OSError
            return f"{file}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return None


def complete_checkpoint(path: Path):
    """The newest complete checkpoint written by atomic_dir at `path`, else the previous one kept at `path.old`
    (after a crash between atomic_dir's two renames, or when the newest is damaged: a warning names the file),
    else None when there is none. A damaged checkpoint with no complete predecessor is a UserError naming it."""
    path = Path(path)
    damage = None
    for candidate in (path, path.with_name(path.name + ".old")):
        if not candidate.is_dir():
            continue
        why = damaged_file(candidate)
        if why is None:
            if damage:
                print(f"warning: checkpoint damaged ({damage}); resuming from the previous one, {candidate}",
                      file=sys.stderr)
            return candidate
        damage = damage or why
    if damage:
        raise UserError(f"--resume: the checkpoint is damaged ({damage}) and no complete earlier one is kept; "
                        "pass --overwrite to start the run again")
    return None


# Flags that change where a run writes, what it logs, or its speed and memory, never what it computes (up to
# float rounding: the loss is normalised over the global batch however it is split): a --resume may change them.
RESUME_MAY_CHANGE = ("resume", "overwrite", "output_dir", "save_every", "track", "wandb_project", "exp_name", "device",
                     "fsdp", "gradient_accumulation_steps", "gradient_checkpointing", "compile", "loss_chunk_size")


def prepare_output_dir(args, is_main: bool, length_flags: tuple = (), scheduled: bool = False,
                       may_change: tuple = ()) -> Optional[Path]:
    """Check --output-dir before anything loads, and protect the run it may hold. Returns the checkpoint to resume
    from (None: start from scratch).
    - an existing file, or a folder that cannot be written to: refused;
    - a folder holding a run (args.json, metrics.jsonl or a checkpoint): refused unless --resume continues it or
      --overwrite replaces it (its checkpoints, metrics and args are deleted first);
    - --resume with flags that change the result (anything but RESUME_MAY_CHANGE, the run's length
      `length_flags` and the script's `may_change`): refused, naming them. Derived fields (tyro.conf.Suppress) are
      not compared. A longer (or shorter) run changes nothing done so far: allowed; when a learning-rate schedule
      depends on the length (`scheduled`), one warning line says the steps to come follow the new schedule."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is an existing file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / f".write_test_{os.getpid()}").touch()
        (out / f".write_test_{os.getpid()}").unlink()
    except OSError as err:
        raise UserError(f"--output-dir {out} cannot be written to ({err.strerror or err})") from None
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --output-dir and --overwrite replaces it: pass one of them")
    run_files = [out / name for name in ("args.json", "metrics.jsonl", "checkpoint", "checkpoint.old")]
    holds_run = any(f.exists() for f in run_files)
    if holds_run and not (args.resume or args.overwrite):
        raise UserError(f"--output-dir {out} already holds a run: pass --resume to continue it or --overwrite to "
                        "replace it (or choose another --output-dir)")
    if args.overwrite:
        if is_main:
            for f in run_files + [out / "checkpoint.tmp"]:
                shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
        if distributed():
            import torch.distributed as dist

            dist.barrier()  # the other processes see the folder emptied
        return None
    if not args.resume:
        return None
    if (out / "args.json").exists():
        saved = json.loads((out / "args.json").read_text())
        changed = changed_flags(args, saved, RESUME_MAY_CHANGE + tuple(length_flags) + tuple(may_change))
        if changed:
            raise UserError(f"--resume with flags that change the result: {'; '.join(changed)}. Rerun with the "
                            "run's own flags (see its args.json), or pass --overwrite to start again")
        longer = [f for f in changed_flags(args, saved, RESUME_MAY_CHANGE + tuple(may_change)) if f not in changed]
        if longer and scheduled and is_main:
            print(f"warning: --resume with another run length ({'; '.join(longer)}): the learning-rate schedule "
                  "depends on it, so the steps to come follow the new schedule (those done followed the old one)",
                  file=sys.stderr)
    resume_from = complete_checkpoint(out / "checkpoint")
    if resume_from is None and is_main:
        print(f"--resume: no checkpoint in {out}, starting from scratch")
    return resume_from


def changed_flags(args, saved: dict, may_change: tuple) -> list:
    """'--flag old -> new' for every flag whose value differs from the saved run's (args.json), but those in
    `may_change` and the derived fields. A flag missing from an older args.json counts as unchanged."""
    import tyro

    hints = typing.get_type_hints(type(args), include_extras=True)
    suppress = typing.get_args(tyro.conf.Suppress[int])[1]  # tyro's marker of fields that are not flags
    derived = {name for name, hint in hints.items() if suppress in getattr(hint, "__metadata__", ())}
    now = json.loads(json.dumps(dataclasses.asdict(args)))  # the same types as read back from args.json
    return [f"--{name.replace('_', '-')} {saved[name]} -> {value}" for name, value in now.items()
            if name not in may_change and name not in derived and name in saved and saved[name] != value]


def check_positive(args, *names: str):
    """Each named field must be > 0 (a count, a rate, a length): one line naming the flag otherwise."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0 (got {value})")


def cli(main: Callable, args_class):
    """`python script.py --flags`: parse the flags into `args_class` with tyro and run `main(args)`. Bad input
    (UserError) and a full disk end in one `error:` line on stderr and exit status 1, never a traceback."""
    import tyro

    args = tyro.cli(args_class)
    try:
        main(args)
    except UserError as err:
        sys.exit(f"error: {err}")
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        sys.exit(f"error: the disk holding {args.output_dir} is full (no space left to write "
                 f"{err.filename or 'into it'}): free some space, then rerun with --resume")


def load_function(spec: str, flag: str, builtins: dict) -> Callable:
    """A function named `spec`: a key of `builtins`, `path/to/file.py:function` or `package.module:function`."""
    if spec in builtins:
        return builtins[spec]
    if ":" not in spec:
        raise UserError(f"{flag} {spec!r}: not a built-in ({', '.join(builtins)}) "
                        "and not of the form path/to/file.py:function or module:function")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py") and not Path(where).is_file():
        raise UserError(f"{flag} {spec!r}: no such file {where!r}")
    try:
        if where.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ModuleNotFoundError as err:
        if err.name and (where == err.name or where.startswith(err.name + ".")):  # the module itself is missing
            raise UserError(f"{flag} {spec!r}: module {where!r} not found") from None
        raise UserError(f"{flag} {spec!r}: importing {where} failed: {_user_error(err)}") from None
    except Exception as err:  # the user's own code failed while it was imported: show its error, not ours
        raise UserError(f"{flag} {spec!r}: importing {where} failed: {_user_error(err)}") from None
    if not callable(getattr(module, name, None)):
        raise UserError(f"{flag} {spec!r}: {where} has no function {name!r}")
    return getattr(module, name)


def _user_error(err: Exception) -> str:
    """'Error: message (file:line)' at the innermost frame of the user's code where `err` was raised."""
    if isinstance(err, SyntaxError):
        return f"SyntaxError: {err.msg} ({err.filename}:{err.lineno})"
    frames = traceback.extract_tb(err.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{where}"


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
