"""The Hugging Face Hub: whether it can be reached, and pushing files to it.

Offline, the hub client would retry each request for about 25 s before failing, so macft asks once
and quickly first, then reads only the local cache (or says in one line what it cannot do).

    if reason := unreachable():       # "HF_HUB_OFFLINE is set", "huggingface.co cannot be reached (...)"
        ...                           # use the cache, or one line saying what is missing
    token = hub_token("me/my-adapter")                        # --push-to-hub: before any work
    url = push_files({"adapter_config.json": path}, card, "me/my-adapter", token)

The token is huggingface_hub's own (``HF_TOKEN`` or ``hf auth login``): it is passed to the client in
memory and never written anywhere macft writes. Before an upload, one request (``whoami``, with a
time limit) checks the token. The uploaded folder is staged as links in a temporary folder: exactly
the listed files and the card, nothing else from the output's folder (macft's records hold local paths).
"""

from __future__ import annotations

import functools
import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from macft.errors import MacftError

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


WHOAMI_SECONDS = 15  # how long the token check may take before the Hub counts as unreachable
LOGIN_HINT = "run `hf auth login` (or set HF_TOKEN to a token with write access) and try again"


def hub_token(repo: str) -> str:
    """The token to push ``repo`` with; a bad repo id, offline mode or no token is one line."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise MacftError(f"--push-to-hub {repo} is not a Hugging Face repo id (owner/name).") from None
    if constants.is_offline_mode():
        raise MacftError(f"HF_HUB_OFFLINE is set, so nothing can be pushed to {repo}; unset it on a machine that reaches the Hub.")
    token = get_token()
    if not token:
        raise MacftError(f"Not logged in to the Hugging Face Hub, so nothing can be pushed to {repo}: {LOGIN_HINT}.")
    return token


def push_files(files: dict[str, Path], card: str, repo: str, token: str, *, message: str = "Upload from macft") -> str:
    """Upload ``files`` (name in the repo -> local file) and ``card`` as README.md to the model repo ``repo``
    (created when missing); returns the repo's URL. Failures are one line; nothing is retried after the first
    request fails."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    from macft.phases import phase

    if reason := unreachable():
        raise MacftError(f"Could not reach the Hugging Face Hub ({reason}); nothing was pushed to {repo}.")
    api = HfApi(token=token)
    try:  # the client's own whoami has no timeout: a Hub behind a silent firewall would hang here
        probe = get_session().get(f"{constants.ENDPOINT}/api/whoami-v2", headers=build_hf_headers(token=token), timeout=WHOAMI_SECONDS)
        hf_raise_for_status(probe)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise MacftError(f"The Hugging Face Hub refused the token (invalid or expired): {LOGIN_HINT}.") from None
        raise MacftError(f"The Hugging Face Hub answered {status}; nothing was pushed to {repo}.") from None
    except Exception as exc:  # no network, DNS, proxy, TLS: the client raises many types
        raise MacftError(f"Could not reach the Hugging Face Hub ({_reason(exc)}); nothing was pushed to {repo}.") from None
    with tempfile.TemporaryDirectory(prefix="macft-hub-") as staging, phase(f"Uploading to {repo}"):
        for name, path in files.items():
            os.symlink(Path(path).resolve(), Path(staging) / name)
        (Path(staging) / "README.md").write_text(card)
        try:
            url = api.create_repo(repo, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=staging, commit_message=message)
        except Exception as exc:
            raise MacftError(f"Pushing to {repo} failed ({_reason(exc)}); the files are still here, push again when it is fixed.") from None
    return str(url)


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text or type(exc).__name__
