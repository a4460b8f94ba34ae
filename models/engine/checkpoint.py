"""Training checkpoints: atomic writes, integrity checks, clear errors.

A checkpoint is one ``torch.save`` file holding a dict (model, optimizer, scheduler, scaler,
epoch, RNG states, config, history). It is written to a temporary file in the same folder,
flushed to disk and renamed over the target, so the target is always either the previous
complete checkpoint or the new complete one, whatever kills the process and when. A SHA-256
of every tensor in the dict is stored alongside them and checked on load, because a zip
archive with damaged tensor bytes still loads without complaint.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Sequence, Tuple

import torch

FORMAT_VERSION = 1
_DIGEST_KEY = "sha256"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def _tensors(obj: Any, path: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}/{i}")


def digest(state: Dict[str, Any]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every tensor in ``state``."""
    h = hashlib.sha256()
    for name, t in _tensors({k: v for k, v in state.items() if k != _DIGEST_KEY}):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(state: Dict[str, Any], path) -> None:
    """Writes ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(state)
    state["format_version"] = FORMAT_VERSION
    state[_DIGEST_KEY] = digest(state)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def link_checkpoint(src, dst) -> None:
    """Makes ``dst`` the same complete checkpoint as ``src``, atomically: a hard link (no
    second write; later replacing ``src`` leaves ``dst`` alone), or a copy where the file
    system has no hard links."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def remove_stale_temporaries(folder) -> None:
    """Deletes temporary files that a killed save left behind in ``folder``."""
    for p in Path(folder).glob(".*.tmp-*"):
        p.unlink(missing_ok=True)


def load_checkpoint(
    path, required: Sequence[str] = ("model",), map_location="cpu"
) -> Dict[str, Any]:
    """Reads and verifies a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: missing file, unreadable or truncated archive, damaged tensors
            (digest mismatch), or a missing entry of ``required``; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted and cannot be read "
            f"({type(e).__name__}: {first[:200]}); resume from another checkpoint (e.g. "
            "best.pt) or start afresh"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, not a training checkpoint dict"
        )
    if _DIGEST_KEY in state and digest(state) != state[_DIGEST_KEY]:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: its tensors do not match the "
            "SHA-256 recorded when it was written"
        )
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {missing}: not a training checkpoint of tools.train"
        )
    return state
