"""Checkpoints of sft.py and reward.py (full_state_dicts serves ppo.py and ppo_seq2seq.py too): an HF-format
model (or LoRA adapter) + tokenizer + training state, written atomically (utils.runtime.atomic_dir). The optimizer
state is saved by parameter name, whole (gathered from the shards under FSDP), so a checkpoint resumes in one
process, under DDP or under FSDP with any number of processes that divides the batch. No RNG state: every step
seeds itself (see the scripts' main), so a resumed run is the uninterrupted one. (ppo.py and ppo_seq2seq.py also
save a value head and their KL controller: their own save/load functions.)"""

from pathlib import Path

import torch

from utils.runtime import atomic_dir


def full_state_dicts(model, optimizer, fsdp: bool):
    """(model weights, optimizer state by parameter name), unsharded: the weights only under FSDP (None otherwise:
    the model holds them whole), the optimizer state only if an optimizer is given. Under FSDP every process must
    call this (it gathers the shards to rank 0's CPU memory)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=fsdp, cpu_offload=fsdp, ignore_frozen_params=True)  # LoRA: no base
    weights = get_model_state_dict(model, options=options) if fsdp else None
    return weights, get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None


def save_checkpoint(path: Path, model, tokenizer, state: tuple, step: int):
    """HF-format model (or LoRA adapter) + tokenizer + optimizer state (from full_state_dicts), swapped into place
    atomically."""
    weights, optimizer_state = state
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer_state}, tmp / "training_state.pt")


def load_weights(path: Path, model):
    """Load a checkpoint's weights (or LoRA adapter) into the model, before it is wrapped for DDP/FSDP."""
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_peft_weights(str(path)))
    else:
        model.load_state_dict(type(model).from_pretrained(path).state_dict())


def load_training_state(path: Path, model, optimizer, fsdp: bool) -> int:
    """Restore the optimizer state saved by save_checkpoint (no pickle: weights_only); returns the steps done."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)  # any device
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=fsdp))
    return state["step"]
