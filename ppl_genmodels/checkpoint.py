"""Checkpoints: atomic writes, safe loads, and the random-number state for exact resumes.

A checkpoint is a plain dictionary of tensors, numbers, strings, lists and
dicts, so it loads with ``torch.load(..., weights_only=True)``: loading never
unpickles arbitrary objects. It is written to a temporary file in the same
folder and then renamed over the target (``os.replace`` is atomic on POSIX),
so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "atomic_write_text", "rng_state", "set_rng_state"]


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or of the wrong kind (one-line message)."""


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, then rename)."""
    _atomic(Path(path), lambda fh: fh.write(text.encode("utf-8")))


def save_checkpoint(path, payload: dict) -> None:
    """Save ``payload`` (tensors, numbers, strings, lists, dicts) atomically to ``path``."""
    _atomic(Path(path), lambda fh: torch.save(payload, fh))


def load_checkpoint(path, map_location=None) -> dict:
    """Load a checkpoint saved by :func:`save_checkpoint` without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {first}") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"checkpoint {path} is not a ppl-genmodels checkpoint (no model state)")
    return payload


def rng_state() -> dict:
    """The state of every random-number generator training touches, as checkpointable values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
         state["numpy_has_gauss"], state["numpy_gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
