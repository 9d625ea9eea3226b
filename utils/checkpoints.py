"""Checkpoints of every language-model script: an HF-format model (or its LoRA adapter), the value head of a
PPO policy if it has one, the tokenizer and the training state, written atomically (utils.runtime.atomic_dir).
The optimizer state is saved by parameter name, whole (gathered from the shards under FSDP), so a checkpoint
resumes in one process, under DDP or under FSDP with any number of processes that divides the batch. No RNG state:
every step seeds itself (see the scripts' main), so a resumed run is the uninterrupted one."""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from utils.runtime import atomic_dir

VALUE_HEAD = "value_head.safetensors"


def full_state_dicts(model, optimizer, fsdp: bool):
    """(model weights, optimizer state by parameter name), unsharded: the weights only under FSDP (None otherwise:
    the model holds them whole), the optimizer state only if an optimizer is given. Under FSDP every process must
    call this (it gathers the shards to rank 0's CPU memory)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=fsdp, cpu_offload=fsdp, ignore_frozen_params=True)  # LoRA: no base
    weights = get_model_state_dict(model, options=options) if fsdp else None
    return weights, get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None


def save_model(path: Path, model, weights=None):
    """The model in HF format (or its LoRA adapter), from `weights` (full_state_dicts) if given. A PPO policy (an
    `lm` with a `v_head`) saves its LM that way and the value head beside it, in value_head.safetensors."""
    if not hasattr(model, "v_head"):
        model.save_pretrained(path, state_dict=weights)
        return
    weights = weights if weights is not None else model.state_dict()

    def part(prefix):  # the weights whose names start with `prefix`, named without it
        return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}

    model.lm.save_pretrained(path, state_dict=part("lm."))
    save_file({k: v.contiguous() for k, v in part("v_head.").items()}, path / VALUE_HEAD)


def save_checkpoint(path: Path, model, tokenizer, state: tuple, step: int, **training_state):
    """Model (save_model) + tokenizer + optimizer state (state: full_state_dicts' pair) + the step and any other
    training state the algorithm keeps (plain numbers and lists: loaded without pickle), swapped in atomically."""
    weights, optimizer_state = state
    with atomic_dir(path) as tmp:
        save_model(tmp, model, weights)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer_state, **training_state}, tmp / "training_state.pt")


def load_weights(path: Path, model):
    """Load a checkpoint's weights (or LoRA adapter, and a PPO policy's value head) into the model, before it is
    wrapped for DDP/FSDP."""
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    lm = model.lm if hasattr(model, "v_head") else model
    if isinstance(lm, PeftModel):
        set_peft_model_state_dict(lm, load_peft_weights(str(path)))
    else:
        lm.load_state_dict(type(lm).from_pretrained(path).state_dict())
    if hasattr(model, "v_head"):
        model.v_head.load_state_dict(load_file(path / VALUE_HEAD))


def load_training_state(path: Path, model, optimizer, fsdp: bool) -> dict:
    """Restore the optimizer state saved by save_checkpoint (no pickle: weights_only) and return the rest of the
    training state: {"step": steps done, ...what the script saved}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)  # any device
    set_optimizer_state_dict(model, optimizer, state.pop("optimizer"), options=StateDictOptions(full_state_dict=fsdp))
    if "iteration" in state:  # checkpoints of ppo.py before the helpers moved here named the step so
        state["step"] = state.pop("iteration")
    return state


def save_final_model(path: Path, model, tokenizer, merge_lora: bool, fsdp: bool, is_main: bool):
    """The trained model at the top of the output folder, where from_pretrained(path) loads it: LoRA adapters merged
    into the weights if merge_lora, except under FSDP (merging needs the unsharded weights) and over a quantized base
    (--quantize: merging would round the weights): there the adapter alone is saved. Every process calls it (FSDP
    gathers the shards to rank 0's CPU memory); rank 0 writes."""
    weights = full_state_dicts(model, None, fsdp)[0]
    if not is_main:
        return
    merge_lora = merge_lora and not getattr(model.lm if hasattr(model, "v_head") else model, "is_quantized", False)
    if merge_lora and not fsdp and hasattr(model, "v_head"):
        model.lm = model.lm.merge_and_unload()
    elif merge_lora and not fsdp:
        model = model.merge_and_unload()
    save_model(path, model, weights)
    tokenizer.save_pretrained(path)
