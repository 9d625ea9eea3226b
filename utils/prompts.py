"""Prompts for the RL scripts: prompts cut from a dataset's texts (the IMDB-style first tokens of a review, or
whole texts), padding, sampling and the stop token. Nothing here is part of an
algorithm."""

from typing import Optional

import torch

from utils.hub import UserError
from utils.runtime import autocast


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds before and after a text when it adds special tokens, as sft.py and reward.py
    tokenize (Llama/Mistral: [<s>] and []; T5: [] and [</s>]; BART: [<s>] and [</s>]; GPT-2: [] and []). Scripts
    that cut prompts out of texts add them back, so the policy sees prompts in the format it was trained on."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def build_prompts(dataset, tokenizer, text_field: str, min_tokens: int, max_tokens: int, seed: int,
                  truncate: bool = True):
    """Tokenize each text and keep its first L tokens, L ~ U[min, max] drawn with a fixed generator (truncate),
    or the whole text (not truncate). Texts shorter than min_tokens (or, whole, longer than max_tokens) are
    dropped. A nested field is named with dots (prompt.text). The tokens the tokenizer puts before a text (a
    Llama/Mistral BOS) lead each prompt, as sft.py trained on them (not counted in L). Returns 1-D LongTensors."""
    if text_field not in dataset.column_names and "." in text_field:
        dataset = dataset.flatten()  # struct columns become "prompt.text", ...
    if text_field not in dataset.column_names:
        raise UserError(f"--dataset has no column {text_field!r}; its columns are {dataset.column_names} "
                        "(set --dataset-text-field)")
    if len(dataset) == 0:
        raise UserError("--dataset is empty: there is nothing to make prompts from")
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_tokens, max_tokens + 1, (len(dataset),), generator=generator).tolist()
    texts = [t if isinstance(t, str) else "" for t in dataset[text_field]]
    token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos = special_tokens(tokenizer)[0]  # [] for GPT-2, [<s>] for Llama; no EOS: the prompt is to be continued
    if not truncate:
        lengths = [max_tokens if len(ids) <= max_tokens else -1 for ids in token_ids]  # -1: too long, dropped
    prompts = [torch.tensor(bos + ids[:n]) for ids, n in zip(token_ids, lengths) if len(ids) >= min_tokens and n >= 0]
    if not prompts:
        raise UserError(f"no text in --dataset column {text_field!r} has at least {min_tokens} tokens"
                        + ("" if truncate else f" and at most {max_tokens} (--prompt-max-tokens)"))
    return prompts


def render_prompts(dataset, tokenizer, field: str, max_tokens: int, flags=("--prompt-field", "--max-prompt-length")):
    """Token ids of each example's whole prompt: a text (after the tokens the tokenizer puts before a text, as
    build_prompts) or a list of chat messages ({"role", "content"}) rendered with the tokenizer's chat template and
    its generation prompt, so the model answers as the assistant, as sft.py trained it. Prompts longer than
    max_tokens are dropped. flags: the script's names of `field` and `max_tokens`, for the errors.
    Returns (list of 1-D LongTensors, the indices of the examples kept)."""
    if field not in dataset.column_names:
        raise UserError(f"--dataset has no column {field!r}; its columns are {dataset.column_names} "
                        f"(set {flags[0]})")
    if len(dataset) == 0:
        raise UserError("--dataset is empty: there are no prompts")
    values = dataset[field]
    if isinstance(values[0], list):
        if tokenizer.chat_template is None:
            raise UserError(f"--dataset column {field!r} holds chat messages but the tokenizer has no chat template "
                            "(train the model with sft.py --chat-template, or give prompts as text)")
        texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in values]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template wrote the special tokens
    else:
        bos = special_tokens(tokenizer)[0]
        ids = [bos + t for t in tokenizer([str(v) for v in values], add_special_tokens=False)["input_ids"]]
    kept = [i for i, t in enumerate(ids) if 0 < len(t) <= max_tokens]
    if not kept:
        raise UserError(f"no prompt in --dataset column {field!r} has 1 to {max_tokens} tokens ({flags[1]})")
    return [torch.tensor(ids[i]) for i in kept], kept


def apply_template(prompt_texts, tokenizer, template: str):
    """Encoder inputs: `template` with {text} replaced by each text, tokenized with the tokenizer's special
    tokens (T5 appends </s>, BART wraps in <s> ... </s>, as in their pre-training). Returns 1-D LongTensors."""
    texts = [template.replace("{text}", t) for t in prompt_texts]
    return [torch.tensor(ids) for ids in tokenizer(texts)["input_ids"]]


def left_pad(sequences, pad_id: int):
    """List of 1-D tensors -> left-padded [batch, max_len] ids and attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, width - len(s) :], mask[i, width - len(s) :] = s, 1
    return ids, mask


def right_pad(sequences, pad_id: int):
    """List of 1-D tensors -> right-padded [batch, max_len] ids and mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def check_context(config, tokens: int, what: str, fix: str = "lower --prompt-max-tokens or --response-length"):
    """Refuse inputs longer than the model's positions (a model with relative positions, as T5, has no bound)."""
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    if context and tokens > context:
        raise UserError(f"{what} exceed the model's context of {context} positions: {fix}")


def stop_token_id(tokenizer, stop_token: Optional[str]) -> Optional[int]:
    """The id after which responses end: 'eos' the tokenizer's EOS, 'none' (or None) no stop token, else a text
    that must be one token."""
    if stop_token in (None, "none"):
        return None
    if stop_token == "eos":
        return tokenizer.eos_token_id
    ids = tokenizer(stop_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(f"--stop-token {stop_token!r} is {len(ids)} tokens for this tokenizer; it must be one")
    return ids[0]


@torch.no_grad()
def sample(lm, input_ids, attention_mask, gen_config, device, synced: bool = False, num_samples: int = 1):
    """lm.generate with `gen_config` alone: our generation config replaces the model's own for the call
    (transformers would otherwise fill our unset fields from it, e.g. eos_token_id=None, or the beams, minimum
    lengths, n-gram bans and forced first token of hub BART configs: sampling would no longer be the policy).
    synced: every process runs the same number of decoding steps (FSDP: each step gathers weights together).
    num_samples (causal LMs, left-padded inputs): each input is continued that many times, its samples consecutive;
    the input is read once and its keys/values repeated (the same samples as repeating the input, without its
    repeated compute). Returns the output ids on the CPU (a causal LM's include the input; an encoder-decoder's the
    start token)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    saved, base.generation_config = base.generation_config, gen_config
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    try:
        with autocast(device):
            cache = None
            if num_samples > 1 and input_ids.shape[1] > 1:  # all but the last token: generate starts from it
                positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
                cache = lm(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                           position_ids=positions[:, :-1], use_cache=True, logits_to_keep=1).past_key_values
                cache.batch_repeat_interleave(num_samples)
            out = lm.generate(input_ids=input_ids.repeat_interleave(num_samples, 0), synced_gpus=synced,
                              attention_mask=attention_mask.repeat_interleave(num_samples, 0), past_key_values=cache)
    finally:
        base.generation_config = saved
    return out.cpu()
