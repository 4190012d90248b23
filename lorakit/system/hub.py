"""Whether the model hub can be reached, found out once and quickly.

Written here because huggingface_hub retries an unreachable host five times with back-off (about 25 s
per file) before transformers falls back to the local cache; offline mode goes to the cache at once.
"""

from __future__ import annotations

import functools
import socket
from urllib.parse import urlparse

from ..log import say


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """One connection probe (3 s at most); when it fails, huggingface_hub is switched to offline mode,
    so loads use the local cache at once."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), 3).close()
    except OSError:
        constants.HF_HUB_OFFLINE = True
        say(f"the model hub ({url.hostname}) is unreachable: using the local cache only")
        return False
    return True
