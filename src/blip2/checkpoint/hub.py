"""Find a checkpoint's files: a local directory, or a Hugging Face hub id (local cache first)."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_dir(path_or_id: str, allow_patterns: list[str] | None = None) -> Path:
    """Return a local directory holding the checkpoint named by `path_or_id`.

    A directory that exists is used as is. Anything else is taken for a hub id: it is looked up
    in the local Hugging Face cache first and downloaded only when the network allows it.
    """
    p = Path(os.path.expanduser(str(path_or_id)))
    if p.is_dir():
        return p
    if p.exists():
        raise NotADirectoryError(f"{p} is a file; pass the checkpoint directory that holds config.json")
    if str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") > 1:
        raise FileNotFoundError(f"checkpoint directory {path_or_id} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise FileNotFoundError(
            f"{path_or_id} is not a local directory, and huggingface_hub is not installed to fetch it"
        ) from e
    patterns = None
    if allow_patterns is not None:
        patterns = list(allow_patterns) + ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(str(path_or_id), local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise FileNotFoundError(_not_found(path_or_id, "HF_HUB_OFFLINE is set"))
    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(_not_found(path_or_id, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")) from e


def _not_found(name: str, why: str) -> str:
    return (
        f"cannot find model {name!r}: it is not a local directory, not in the Hugging Face cache, "
        f"and it could not be downloaded ({why}). Download it on a machine with network access "
        f"(`huggingface-cli download {name}`) and copy the cache (~/.cache/huggingface/hub), "
        f"or pass the path of a local checkpoint directory."
    )
