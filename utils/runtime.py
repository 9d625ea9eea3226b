"""Run plumbing shared by the scripts: device and precision, outputs (metrics.jsonl, wandb, stdout), the output
folder and atomic writes, argument checks and the command line. Nothing here is part of an algorithm."""

import dataclasses
import errno
import json
import math
import os
import resource
import shutil
import sys
import time
import typing
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch

from utils.distributed import distributed
from utils.hub import UserError


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU (fp32 there: bf16 matmuls on CPU are slow and less exact)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA, else the peak resident memory of the process (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Tracker:
    """Writes args.json and one JSON line per step to metrics.jsonl in the output folder (and sample rows, if any, to
    samples.jsonl), mirrors them to wandb with `track=True` (samples as a table). On resume, lines past the
    checkpoint's step are dropped so no step appears twice."""

    def __init__(self, out_dir: Path, args, resume_step: int = 0, track: bool = False, project: str = "",
                 step_key: str = "iteration"):
        self.path, self.step_key, self.wandb = Path(out_dir) / "metrics.jsonl", step_key, None
        self.samples_path = Path(out_dir) / "samples.jsonl"
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
        for path in (self.path, self.samples_path):
            kept = []
            if resume_step and path.exists():
                kept = [line for line in path.read_text().splitlines() if _step_of(line, step_key) <= resume_step]
            with disk_full_is_an_error(out_dir):
                if path == self.path or kept:
                    path.write_text("".join(line + "\n" for line in kept))
                else:
                    path.unlink(missing_ok=True)
        if track:
            import wandb

            self.wandb = wandb.init(project=project, name=f"{args.exp_name}_{args.seed}",
                                    config=dataclasses.asdict(args), dir=str(out_dir),
                                    id=f"{args.exp_name}-{args.seed}-{int(time.time())}")

    def log(self, stats: dict, samples: Optional[list] = None, **media):
        """One step's statistics; samples: rows (dicts with the same keys) written to samples.jsonl with the step."""
        with disk_full_is_an_error(self.path.parent), open(self.path, "a") as f:
            f.write(json.dumps(stats) + "\n")
        if samples:
            with disk_full_is_an_error(self.path.parent), open(self.samples_path, "a") as f:
                f.write("".join(json.dumps({self.step_key: stats[self.step_key], **row}) + "\n" for row in samples))
        if self.wandb is not None:
            if samples:
                import wandb

                columns = list(samples[0])
                media["samples"] = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in samples])
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
                       may_change: tuple = (), before_flags: Optional[dict] = None) -> Optional[Path]:
    """Check --output-dir before anything loads, and protect the run it may hold. Returns the checkpoint to resume
    from (None: start from scratch).
    - an existing file, or a folder that cannot be written to: refused;
    - a folder holding a run (args.json, metrics.jsonl or a checkpoint): refused unless --resume continues it or
      --overwrite replaces it (its checkpoints, metrics and args are deleted first);
    - --resume with flags that change the result (anything but RESUME_MAY_CHANGE, the run's length
      `length_flags` and the script's `may_change`): refused, naming them. Derived fields (tyro.conf.Suppress) are
      not compared. A longer (or shorter) run changes nothing done so far: allowed; when a learning-rate schedule
      depends on the length (`scheduled`), one warning line says the steps to come follow the new schedule.
      before_flags: {field: value} for flags added since older runs were saved, whose args.json lacks them: the
      value those runs had (e.g. reward.py's disable_dropout: False), compared like a saved one."""
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
        saved = {**(before_flags or {}), **json.loads((out / "args.json").read_text())}
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


def learning_rate_at(step: int, num_steps: int, warmup_steps: int, peak: float, schedule: str) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup from 0, then cosine/linear decay to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps) / max(1, num_steps - warmup_steps)
    return peak * (1 - progress) if schedule == "linear" else peak * 0.5 * (1 + math.cos(math.pi * progress))


def exact_div(a: int, b: int, what: str) -> int:
    """a / b for batch sizes that must divide: a UserError naming the flags (`what`) otherwise."""
    if b <= 0 or a % b:
        raise UserError(f"{what}: {a} is not divisible by {b}")
    return a // b


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
