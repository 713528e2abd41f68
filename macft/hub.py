"""Whether the Hugging Face hub can be reached, asked once and quickly: offline, the hub client
would retry each request for about 25 s before failing, so macft checks first and reads only the
local cache when the hub is out of reach.

    if reason := unreachable():       # "HF_HUB_OFFLINE is set", "huggingface.co cannot be reached (...)"
        ...                           # use the cache, or one line saying what is missing
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROBE_SECONDS = 3.0  # a reachable hub answers a TCP connection well within this
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@functools.cache
def unreachable() -> str | None:
    """Why the hub cannot be reached now, or None when it can (or when a proxy stands in the way
    of knowing: the client then finds out itself)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        return f"{host} cannot be reached ({exc.strerror or type(exc).__name__}; offline?)"
    return None
