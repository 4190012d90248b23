"""`lorakit train RECIPE --publish URL`: the adapter, once written and verified, is loaded into a running server
(lorakit serve, or vLLM with runtime loading on) through vLLM's runtime-loading API, under its folder's name;
a retrained adapter replaces the one served (load_inplace). The server is asked first, before training, so
that a wrong address fails before hours go into a run."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import LorakitError

TIMEOUT_S = 600  # loading a large adapter (a chain flattened first) on a busy server


def check_server(url: str, api_key: str | None) -> None:
    """The server at `url` answers /v1/models (with the key, if one is given)."""
    if not url.startswith(("http://", "https://")):
        raise LorakitError(f"--publish {url!r}: expected the server's address, like http://127.0.0.1:8000")
    _request(url, "/v1/models", None, api_key, "before training: nothing was trained")


def publish(url: str, folder: Path, api_key: str | None) -> tuple[str, float]:
    """Load `folder` into the server as its folder's name; returns (name, seconds the server took)."""
    name, started = folder.name, time.monotonic()
    _request(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder.resolve()),
                                            "load_inplace": True}, api_key,
             f"the adapter is written at {folder}; load it later with POST {url.rstrip('/')}/v1/load_lora_adapter")
    return name, time.monotonic() - started


def _request(url: str, path: str, body: dict | None, api_key: str | None, after: str) -> str:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(body).encode() if body else None,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.read().decode()
    except urllib.error.HTTPError as exc:
        raise LorakitError(f"{url}{path} answered {exc.code}: {_message(exc.read())} ({after})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise LorakitError(f"{url} does not answer ({reason}); {after}") from None


def _message(raw: bytes) -> str:
    """The error's message from an OpenAI-shaped (or vLLM) error body, else the body itself."""
    try:
        error = json.loads(raw).get("error")
        return str(error.get("message") if isinstance(error, dict) else error)
    except (ValueError, AttributeError):
        return raw.decode(errors="replace")[:300]
