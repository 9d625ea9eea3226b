"""A tiny offline Stable-Diffusion-like pipeline (and an unconditional one) for tests and the DDPO quickstart.

Our machines cannot reach the Hugging Face hub, so ddpo.py is tested on pipelines built here from configs with
random weights. The folder has the layout of a real Stable Diffusion checkpoint and loads with
`StableDiffusionPipeline.from_pretrained(folder)` (or `DiffusionPipeline.from_pretrained`):

    python -m utils.tiny_sd --out tiny/sd          # builds tiny/sd and tiny/sd-uncond (a few seconds, cached)
    python ddpo.py --model tiny/sd --reward-fn jpeg-compressibility

    tiny/sd/        unet/          UNet2DConditionModel, 16x16x4 latents, 2 levels (32, 64 channels), cross-attention
                    vae/           AutoencoderKL, 2 levels: 16x16x4 latents <-> 32x32 RGB images (scale factor 2)
                    text_encoder/  CLIPTextModel, 2 layers, 32 wide, 77 positions
                    tokenizer/     CLIPTokenizer over a character-level vocabulary written below (no merges)
                    scheduler/     DDIMScheduler with Stable Diffusion v1's schedule
    tiny/sd-uncond/ unet/ + scheduler/: an unconditional DDPMPipeline (UNet2DModel on 16x16 RGB pixels, no VAE,
                    no text encoder), to check how ddpo.py treats a model without a text encoder.

Weights are random (seeded), so images are coloured noise at first; a random VAE decoder is still a smooth fixed
map from latents to pixels, which is all a JPEG-size reward needs to be learnable. No safety checker.
`python -m utils.assets` replaces the whole tiny/ folder when its own version changes: build this again after it
(the tests call `build`, which is a cheap check when the folder is there).
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

TINY_SD_VERSION = "2"  # bump when the recipe below changes: cached folders are rebuilt
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "tiny" / "sd"
# Stable Diffusion v1's noise schedule (its scheduler_config.json), with DDIM instead of PNDM
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def bytes_to_unicode():
    """GPT-2/CLIP's map from the 256 bytes to printable characters (byte-level BPE works on these)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return dict(zip(range(256), chars))


def write_tokenizer_files(folder: Path):
    """vocab.json + merges.txt of a character-level CLIP BPE: every byte, alone and word-final ('a</w>'), plus
    the two special tokens. With no merges a word is one token per character: enough to tell prompts apart."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(tokens)


def build_sd(out: Path, seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULE), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    write_tokenizer_files(out / "tokenizer")  # beside tokenizer.json, as real SD checkpoints ship them


def build_unconditional(out: Path, seed: int = 0):
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULE)).save_pretrained(out)


def _build_cached(builder, out: Path):
    """Build into a temporary folder and rename it into place, so an interrupted build is never mistaken for a
    cached one; skip when `out` already holds this version."""
    stamp = out / ".tiny-sd-version"
    if stamp.exists() and stamp.read_text() == TINY_SD_VERSION:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    builder(tmp)
    (tmp / ".tiny-sd-version").write_text(TINY_SD_VERSION)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def build(out_dir=DEFAULT_DIR) -> Path:
    """Build (or reuse) the tiny text-to-image pipeline in `out_dir` and the unconditional one beside it
    (`<out_dir>-uncond`). Returns `out_dir`."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():  # building must not change the caller's random state
        _build_cached(build_sd, out)
        _build_cached(build_unconditional, out.with_name(out.name + "-uncond"))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_DIR), help="folder of the text-to-image pipeline")
    out = build(parser.parse_args().out)
    print(f"tiny pipelines in {out} (StableDiffusionPipeline) and {out.with_name(out.name + '-uncond')} "
          f"(DDPMPipeline, no text encoder); try: python ddpo.py --model {out}")
