"""Model set-up shared by the scripts: LoRA adapters (peft), and speed-only module swaps and compilation that leave
the function and the saved weights unchanged. Nothing here is part of an algorithm."""

import torch


def weights_dtype(name: str, device, trained: bool = True) -> torch.dtype:
    """--dtype: the dtype a model's weights are loaded in. 'auto': weights that train in float32 (master weights: small
    updates are not rounded away; on CUDA the compute runs in bf16 under autocast), frozen weights (a reference or
    reward model, a LoRA base) in bfloat16 on a CUDA GPU that has it, else float32. float32 / bfloat16 / float16:
    every model in that dtype (Adam's state then follows the trained weights'; LoRA adapters stay float32)."""
    if name == "auto":
        half = not trained and device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if half else torch.float32
    return getattr(torch, name)


def check_dtype(name: str, lora_r: int):
    """float16 weights cannot be trained without loss scaling, which the scripts do not do: LoRA or bfloat16."""
    from utils.hub import UserError

    if name == "float16" and lora_r == 0:
        raise UserError("--dtype float16 would train float16 weights, which needs loss scaling: use --dtype bfloat16, "
                        "or LoRA (--lora-r; the adapters stay float32 over a float16 base)")


def check_quantize(args):
    """--quantize quantizes the frozen base of a LoRA run; refused without LoRA, under FSDP, without bitsandbytes."""
    import importlib.util

    from utils.hub import UserError

    if args.quantize == "none":
        return
    if args.lora_r <= 0:
        raise UserError("--quantize needs LoRA (--lora-r > 0): quantized weights do not train, the adapters do")
    if getattr(args, "fsdp", False):
        raise UserError("--quantize does not run under --fsdp here: use DDP (torchrun without --fsdp)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--quantize needs bitsandbytes: pip install bitsandbytes")


def quantization(args, device, keep: tuple = ()) -> dict:
    """from_pretrained's keywords for --quantize (bitsandbytes): '4bit' stores the linear layers' weights in 4-bit
    NF4 with double quantization and computes in the frozen weights' dtype (--dtype; QLoRA, Dettmers et al. 2023);
    '8bit' in int8 (LLM.int8()). Layers named in keep (a classifier's fresh head) stay unquantized. 'none': {}."""
    if args.quantize == "none":
        return {}
    import logging

    from transformers import BitsAndBytesConfig

    # On CPU bitsandbytes logs a missing optional kernel at import and a float16 cast at every 8-bit matmul
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if args.quantize == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=weights_dtype(args.dtype, device, trained=False),
                                    llm_int8_skip_modules=list(keep) or None)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(keep) or None)
    return {"quantization_config": config, "device_map": {"": device}}


def add_lora(model, args, task_type: str):
    """The model with LoRA adapters (peft) from --lora-r/--lora-alpha/--lora-dropout/--lora-target-modules, or the
    model itself when --lora-r is 0. task_type: CAUSAL_LM, SEQ_2_SEQ_LM or SEQ_CLS (peft then trains and saves a
    classifier's fresh head in full beside the adapters). A quantized base (--quantize) is prepared as QLoRA does:
    its remaining (norm, embedding) weights in float32, everything frozen but the adapters."""
    if args.lora_r <= 0:
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_quantized", False):
        # activation checkpointing is enable_checkpointing's (non-reentrant: no input gradients needed)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for module in model.modules():  # bitsandbytes 0.50 on CPUs with AVX512-BF16: a 4-bit layer that runs in
            if hasattr(module, "support_avx512bf16_for_cpu"):  # eval mode repacks its weights for a kernel without
                module.support_avx512bf16_for_cpu = False  # a backward, and gradients through it would be lost
    return get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                            target_modules=args.lora_target_modules, task_type=task_type))


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off for good: every dropout module's probability, and every float attribute named *dropout that some
    models pass to functional dropout (BART's `dropout`, Llama's `attention_dropout`), set to 0 (TRL's
    disable_dropout_in_model does the first only). The model can then train in train mode, which activation
    checkpointing needs (transformers checkpoints modules in training mode only), with the outputs of eval mode.
    Returns the model."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


def enable_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """--gradient-checkpointing: each transformer block's activations are recomputed in the backward pass instead
    of kept (less memory, ~30% more compute); non-reentrant, so it works with frozen (LoRA) base weights. Active
    only while the model is in train mode. A UserError for models that do not support it."""
    from utils.hub import UserError

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
    model.activation_checkpointing_enable()
    return model


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


def lm_head_weight(model, inputs: dict, fsdp: bool):
    """The LM head's weight W if the model's logits are exactly last_hidden_state @ W.T (a bias-free linear head, no
    logit scaling or soft-capping: checked on the last position of a real batch `inputs`), else None. Scripts then
    apply the head to the positions that need logits only (sft.py in chunks, dpo.py at completion tokens). Under FSDP
    the head's weight exists whole only inside the forward: None."""
    from utils.runtime import autocast

    head = model.get_output_embeddings()
    if fsdp or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    with torch.no_grad(), autocast(inputs["input_ids"].device):
        out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        logits = out.hidden_states[-1][:, -1:] @ head.weight.T
        same = torch.allclose(logits.float(), out.logits.float(), atol=1e-3, rtol=1e-3)
    return head.weight if same else None


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


def block_list(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The name and the ModuleList of a model's transformer blocks: the one list whose items are all of the model's
    `_no_split_modules` classes (e.g. `transformer.h` of GPT-2, `model.layers` of Llama). A UserError where there is
    not exactly one (an encoder-decoder has two)."""
    from utils.hub import UserError

    block_types = set(getattr(model, "_no_split_modules", None) or [])
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)
             and all(type(block).__name__ in block_types for block in m)]
    if len(lists) != 1:
        raise UserError(f"--ref-shared-layers: {type(model).__name__} has {len(lists)} lists of transformer blocks, "
                        "not one: use --ref-shared-layers 0")
    return lists[0]


def own_weights(module: torch.nn.Module, other: torch.nn.Module) -> list:
    """The parameters and buffers of `module` that are not also `other`'s (a reference model's own weights, without
    those it shares with the policy)."""
    import itertools

    others = {id(t) for t in itertools.chain(other.parameters(), other.buffers())}
    return [t for t in itertools.chain(module.parameters(), module.buffers()) if id(t) not in others]


def reference_model(model: torch.nn.Module, num_shared_layers: int, device, dtype: torch.dtype) -> torch.nn.Module:
    """PPO's frozen reference: a copy of `model` (taken before training) in eval mode, its weights on `device` in
    `dtype` (floating-point ones). num_shared_layers N > 0 (TRL's create_reference_model(model, num_shared_layers)):
    the reference's embeddings (the nn.Embedding modules before the blocks: token and learned positions) and first N
    transformer blocks are `model`'s own modules, not copies (never copied, so no transient second copy either), and
    they are frozen in `model` too: they cannot train, so the reference computes what a full frozen copy does. A
    head tied to the token embedding (GPT-2's) is that embedding, shared and frozen as well, as in TRL. The shared
    modules keep `model`'s device and dtype; the rest of the reference is a frozen copy at the initial weights. A
    UserError where N exceeds the number of blocks or the embeddings are not found before them."""
    import copy

    from utils.hub import UserError

    shared = []
    if num_shared_layers > 0:
        name, blocks = block_list(model)
        if num_shared_layers > len(blocks):
            raise UserError(f"--ref-shared-layers {num_shared_layers}: the model has {len(blocks)} blocks; use at "
                            f"most {len(blocks)}")
        siblings = list(model.get_submodule(name.rpartition(".")[0]).children())  # embeddings, blocks, final norm
        before = siblings[: next(i for i, m in enumerate(siblings) if m is blocks)]
        embeddings = [m for m in before if isinstance(m, torch.nn.Embedding)]
        if not any(m is model.get_input_embeddings() for m in embeddings):
            raise UserError(f"--ref-shared-layers: {type(model).__name__}'s token embedding is not found before its "
                            "blocks: use --ref-shared-layers 0")
        shared = embeddings + list(blocks[:num_shared_layers])
    # deepcopy takes what its memo holds as already copied: the shared modules (and their weights, which a tied head
    # also holds) are the copy's own
    memo = {id(x): x for m in shared for x in [*m.modules(), *m.parameters(), *m.buffers()]}
    reference = copy.deepcopy(model, memo).requires_grad_(False).eval()  # freezes the shared modules in `model` too
    for t in own_weights(reference, model):
        t.data = t.data.to(device, dtype if t.is_floating_point() else None)
    return reference


def on_device(reference, device, keep: torch.nn.Module):
    """A context in which the reference model's own weights (not those it shares with `keep`, the policy) that live
    elsewhere (on the CPU under --ref-offload) are on `device`; back where they were after it, so that on a GPU the
    reference holds no GPU memory outside its forward. A no-op for weights already on `device` and for None."""
    import contextlib

    @contextlib.contextmanager
    def moved():
        tensors = [] if reference is None else [t for t in own_weights(reference, keep) if t.device != device]
        homes = [t.device for t in tensors]
        for t in tensors:
            t.data = t.data.to(device)
        try:
            yield reference
        finally:
            for t, home in zip(tensors, homes):
                t.data = t.data.to(home)

    return moved()


@torch.no_grad()
def sample_table(sample, lm, ref_lm, tokenizer, queries, completions, scores, device) -> list[dict]:
    """Rows {prompt, response, score, reference_response} of a few episodes, the reference's response sampled now for
    the same prompt (ref_lm, or the LoRA policy with its adapters disabled): what the policy learned to say instead.
    sample(model, queries) -> responses: the script's own sampling (its generate, cut after the stop token)."""
    if ref_lm is None:
        with lm.disable_adapter():
            ref_responses = sample(lm, queries)
    else:
        with on_device(ref_lm, device, keep=lm):  # an offloaded reference: on the device for this generation
            ref_responses = sample(ref_lm, queries)
    prompts = tokenizer.batch_decode(queries, skip_special_tokens=True)
    references = tokenizer.batch_decode(ref_responses, skip_special_tokens=True)
    return [{"prompt": p, "response": c, "score": float(s), "reference_response": r}
            for p, c, s, r in zip(prompts, completions, scores, references)]
