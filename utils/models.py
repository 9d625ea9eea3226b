"""Model set-up shared by the scripts: LoRA adapters (peft), and speed-only module swaps and compilation that leave
the function and the saved weights unchanged. Nothing here is part of an algorithm."""

import torch


def add_lora(model, args, task_type: str):
    """The model with LoRA adapters (peft) from --lora-r/--lora-alpha/--lora-dropout/--lora-target-modules, or the
    model itself when --lora-r is 0. task_type: CAUSAL_LM, SEQ_2_SEQ_LM or SEQ_CLS (peft then trains and saves a
    classifier's fresh head in full beside the adapters)."""
    if args.lora_r <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                            target_modules=args.lora_target_modules, task_type=task_type))


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
