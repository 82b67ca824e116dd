"""Reading ``torch.save`` files that others publish (the authors' CausalFusion checkpoint, MAR's
kl16.ckpt) without running their pickles: ``torch.load(..., weights_only=True)`` with an allow-list
of exactly the classes such a file needs. Anything else in the file is refused in one line before
it is built, so a crafted file cannot run code or create files."""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import torch

# The release's full checkpoints store the training script's argparse.Namespace as "args".
ALLOWED_CLASSES = (argparse.Namespace,)


class TorchFileError(ValueError):
    """A torch.save file that is missing, damaged, or holds something other than plain data."""


def load_torch_file(path: str | Path, allowed: tuple[type, ...] = ALLOWED_CLASSES) -> object:
    """The object stored in ``path`` (tensors memory-mapped where the file allows), built only from
    tensors, containers, numbers, strings and the ``allowed`` classes."""
    path = Path(path)
    if not path.is_file():
        raise TorchFileError(f"{path} {'is a directory, not a checkpoint file' if path.is_dir() else 'not found'}")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # a file in torch's older (not zip) format cannot be mapped
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a class outside the allow-list: nothing of it was built
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" (it asks for {found[1]})" if found else ""
        raise TorchFileError(f"{path} holds objects other than tensors and plain data{what}; refused, nothing "
                             f"in it was run") from None
    except Exception as e:  # a truncated or damaged file: torch raises several error types
        first = re.split(r"(?<=\.) ", str(e).strip().splitlines()[0])[0] if str(e).strip() else ""
        raise TorchFileError(f"{path} is not a readable torch checkpoint, truncated or damaged? "
                             f"({type(e).__name__}: {first})") from None
