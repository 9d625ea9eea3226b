"""Loading models and datasets by hub id or local path, failing fast and clearly when the hub is unreachable.

Plain `from_pretrained("gpt2")` without network retries for ~50 s and ends in a long traceback. Here we probe
the hub once (a TCP connect with a short timeout); when it is unreachable we switch the libraries to offline
mode, so a cached copy still loads and anything else fails at once with a message naming the flag to change.
"""

import os
import socket
import threading
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse


def quiet_libraries():
    """Silence the per-file progress bars of transformers/datasets; our scripts show one bar of their own."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


@contextmanager
def quiet_load_report():
    """Keep transformers' multi-line load report (missing / mismatched weights) and its warnings quiet while a
    model whose new head is expected loads; the script says so in one line of its own."""
    import transformers

    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


class UserError(Exception):
    """Bad input from the user (a flag, a file, a dataset): the scripts print it as one line and exit."""


@lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True if a TCP connection to the hub endpoint opens within `timeout` seconds (DNS included)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    result = []

    def probe():
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout + 1)
    return bool(result)


def go_offline_if_unreachable(name: str):
    """For a name that is not a local path, turn on offline mode of huggingface_hub/transformers/datasets when
    the hub cannot be reached, so loading uses the local cache only instead of retrying for a minute."""
    if Path(name).exists() or hub_reachable():
        return
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:
        pass


DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".py", ".safetensors", ".bin", ".arrow")


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path: ./x, ../x, /x, ~/x, a/b/c (hub ids have one slash at most), x.jsonl.
    ("org/model" is a hub id unless a folder of that name exists.)"""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix in DATA_SUFFIXES


def check_paths(*flags_and_names):
    """Fail at once, before anything loads, for a flag whose value can only be a local path and does not exist:
    check_paths(("--model", args.model), ("--dataset", args.dataset), ...). None values are skipped."""
    for flag, name in flags_and_names:
        if name and looks_like_path(str(name)) and not Path(name).expanduser().exists():
            raise UserError(f"{flag} {name!r}: no such file or folder")


def first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else ""


def explain(flag: str, name: str, err: Exception) -> UserError:
    local = Path(name).exists()
    if "trust_remote_code" in str(err):
        return UserError(f"{flag} {name!r} needs Python code from its repository to load: pass --trust-remote-code "
                         "if you trust that code (it runs on your machine)")
    if local:
        why = f"the local path could not be loaded ({type(err).__name__}: {first_line(err)})"
    elif looks_like_path(name):
        return UserError(f"{flag} {name!r}: no such file or folder")
    elif not hub_reachable():
        why = "the Hugging Face hub cannot be reached, no cached copy was found, and it is no local file or folder"
    else:
        why = f"it could not be loaded from the hub ({type(err).__name__}: {first_line(err)})"
    return UserError(
        f"{flag} {name!r}: {why}. Pass a local folder or file instead, e.g. build the offline assets with "
        f"`python -m utils.assets` and use {flag} tiny/... (see README, 'Offline')."
    )


def from_pretrained(cls, name: str, flag: str, **kwargs):
    """`cls.from_pretrained(name, **kwargs)` with a one-line UserError naming `flag` when it cannot be loaded."""
    go_offline_if_unreachable(name)
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise explain(flag, name, err) from None


def load_dataset(name: str, split: str, flag: str = "--dataset", config: Optional[str] = None):
    """A dataset split from a hub id (with its configuration `config`, e.g. gsm8k's "main"), a `save_to_disk`
    folder, a folder of data files, or one .json/.jsonl/.csv/.parquet/.txt file (a file or a folder without splits is
    the "train" split)."""
    import datasets

    go_offline_if_unreachable(name)
    path = Path(name)
    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
    try:
        if path.is_file():
            if not path.read_bytes().strip():
                raise UserError(f"{flag} {name!r} is empty: there is nothing to train on")
            if path.suffix not in builders:
                raise UserError(f"{flag} {name!r}: unknown file type; use one of {sorted(builders)}")
            ds = datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
            return ds if split == "train" else _split_error(flag, name, split, ["train"])
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                return ds[split] if split in ds else _split_error(flag, name, split, list(ds))
            return ds
        return datasets.load_dataset(name, config, split=split)
    except UserError:
        raise
    except (ValueError, KeyError) as err:  # unknown split and similar
        if "split" in str(err).lower():
            raise UserError(f"{flag} {name!r}: {str(err).splitlines()[0]}") from None
        raise explain(flag, name, err) from None
    except (OSError, ConnectionError, FileNotFoundError) as err:
        raise explain(flag, name, err) from None
    except Exception as err:  # datasets raises its own DatasetNotFoundError & co.
        if type(err).__module__.startswith("datasets"):
            raise explain(flag, name, err) from None
        raise


def _split_error(flag, name, split, available):
    raise UserError(f"{flag} {name!r} has no split {split!r}; available: {available} (set --dataset-split)")


def check_tokenizer(tokenizer, config, flag: str = "--model"):
    """A tokenizer the model can use (checked on the config, before the weights load): no token id beyond the
    model's embedding, and a pad token. Without one it pads with EOS, the usual default: safe in our scripts, whose
    masks come from sequence lengths, never from comparing ids with the pad id, so a real EOS is never mistaken
    for padding."""
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab and len(tokenizer) > vocab:
        raise UserError(f"the tokenizer of {flag} has {len(tokenizer)} tokens but the model's embedding only {vocab}: "
                        "use the model's own tokenizer (or resize the model's embeddings and save it first)")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UserError(f"the tokenizer of {flag} has neither a pad nor an EOS token: give it one "
                            "(tokenizer.pad_token = ..., then save_pretrained) and pass that folder")
        tokenizer.pad_token = tokenizer.eos_token
