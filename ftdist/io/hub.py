"""The Hugging Face hub, asked before a hub id is loaded: without network, transformers and
datasets retry for half a minute, printing a line per try, before their one message."""

from __future__ import annotations

import socket
from typing import Optional
from urllib.parse import urlparse

from ftdist.errors import UserError

PROBE_TIMEOUT_S = 5.0


def check_reachable(key: str, repo_id: str, cached_file: Optional[str] = "config.json") -> None:
    """A UserError naming `key` when the hub cannot be reached and `repo_id` is not in the local
    cache (checked by `cached_file`; None: not checked, and offline mode (HF_HUB_OFFLINE) is
    left to the library, which reads its cache only)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if cached_file and isinstance(try_to_load_from_cache(repo_id, cached_file), str):
        return
    if constants.HF_HUB_OFFLINE:
        if cached_file is None:
            return  # datasets keeps a cache of its own: left to it
        raise UserError(f"{key} {repo_id}: not a local path, and not in the local Hugging Face cache, which is all "
                        "there is with HF_HUB_OFFLINE set; download it where there is network and point "
                        f"{key} at the copy (a local directory or s3://), or unset HF_HUB_OFFLINE")
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return
    except OSError as e:
        reason = e.strerror or type(e).__name__
    raise UserError(f"{key} {repo_id}: not a local path, and the Hugging Face hub ({constants.ENDPOINT}) cannot be "
                    f"reached ({reason}); download it where there is network and point {key} at the copy "
                    "(a local directory or s3://), or set HF_HUB_OFFLINE=1 to use the local cache")
