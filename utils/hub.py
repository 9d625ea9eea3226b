"""Loading models and datasets by hub id or local path, failing fast and clearly when the hub is unreachable.

Plain `from_pretrained("gpt2")` without network retries for ~50 s and ends in a long traceback. Here we probe
the hub once (a TCP connect with a short timeout); when it is unreachable we switch the libraries to offline
mode, so a cached copy still loads and anything else fails at once with a message naming the flag to change.
"""

import os
import socket
import threading
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse


def quiet_libraries():
    """Silence the per-file progress bars of transformers/datasets; our scripts show one bar of their own."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


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


def explain(flag: str, name: str, err: Exception) -> UserError:
    local = Path(name).exists()
    if local:
        why = f"the local path could not be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    elif not hub_reachable():
        why = "the Hugging Face hub cannot be reached and no cached copy was found"
    else:
        why = f"it could not be loaded from the hub ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
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


def load_dataset(name: str, split: str, flag: str = "--dataset"):
    """A dataset split from a hub id, a `save_to_disk` folder, a folder of data files, or one
    .json/.jsonl/.csv/.parquet/.txt file (a file or a folder without splits is the "train" split)."""
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
        return datasets.load_dataset(name, split=split)
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
