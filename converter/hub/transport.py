"""Talking to the Hub: the token (never shown), the transfer protocol (Xet or git-LFS), and every
network or HTTP failure turned into one clear line that says what was being done."""

from __future__ import annotations

import importlib
import importlib.util
import re
from contextlib import contextmanager
from urllib.parse import quote

from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import build_hf_headers, get_session, get_token, hf_raise_for_status

from converter.errors import HubError

PREFLIGHT_TIMEOUT_S = 30.0


_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{20,}")


def resolve_token(token: str | None) -> str:
    try:
        token = token or get_token()
    except Exception as e:  # noqa: BLE001 - e.g. a failed OIDC exchange; its message holds no token
        raise HubError(f"could not obtain a Hugging Face token: {e}") from e
    if not token:
        raise HubError("no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`")
    return token


def check_token(endpoint: str, token: str) -> None:
    """One bounded request first, so a dead endpoint or a bad token fails fast and clearly
    (huggingface_hub's own calls have no timeout and retry for a while)."""
    response = get_session().get(f"{endpoint}/api/whoami-v2", headers=build_hf_headers(token=token),
                                 timeout=PREFLIGHT_TIMEOUT_S)
    if response.status_code != 429:  # rate-limited whoami says nothing about the token
        hf_raise_for_status(response)


def client_prefers_xet() -> bool:
    """huggingface_hub's own rule: Xet whenever hf_xet is installed, unless HF_HUB_DISABLE_XET."""
    return importlib.util.find_spec("hf_xet") is not None and not getattr(constants, "HF_HUB_DISABLE_XET", False)


def offers_xet(endpoint: str, repo_id: str, revision: str | None, token: str) -> bool:
    """Whether the endpoint hands out Xet write tokens. huggingface.co does; a mirror or a proxy may
    not, and huggingface_hub (which decides on the client side alone) would then fail instead of
    falling back to git-LFS."""
    rev = quote(revision or constants.DEFAULT_REVISION, safe="")
    response = get_session().get(f"{endpoint}/api/models/{repo_id}/xet-write-token/{rev}",
                                 headers=build_hf_headers(token=token), timeout=PREFLIGHT_TIMEOUT_S)
    if response.status_code == 404:
        return False
    hf_raise_for_status(response)
    return True


@contextmanager
def transfer_protocol(kind: str | None):
    """Make huggingface_hub use git-LFS for this push when the endpoint has no Xet. Its switch is
    the module-level HF_HUB_DISABLE_XET, read at each upload; it is restored afterwards."""
    if kind != "lfs" or getattr(constants, "HF_HUB_DISABLE_XET", True):
        yield
        return
    constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = False


def network_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exceptions of whichever HTTP client this huggingface_hub uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]  # OfflineModeIsEnabled too
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


@contextmanager
def hub_errors(endpoint: str, repo_id: str, token: str, doing: str, *, resume: bool = False):
    """Turn whatever huggingface_hub or the network raises into one HubError line."""
    try:
        yield
    except HubError as e:
        raise HubError(scrub(e.message, token)) from e
    except (OSError, RuntimeError, ValueError, *network_errors()) as e:
        message = describe(e, endpoint, repo_id, doing)
        if resume:
            message += "; re-run the same command to resume (files already on the Hub are skipped)"
        raise HubError(scrub(message, token)) from e


def describe(exc: BaseException, endpoint: str, repo_id: str, doing: str) -> str:
    http = find_in_chain(exc, HfHubHTTPError)
    if http is not None and getattr(http, "response", None) is not None:
        status = http.response.status_code
        if status == 401:
            return (f"the Hub at {endpoint} rejected the token (401 Unauthorized) while {doing}: pass a valid "
                    "--token, set HF_TOKEN, or run `hf auth login`")
        if status == 403:
            return (f"the token may not write to {repo_id} on {endpoint} (403 Forbidden) while {doing}: "
                    "use a token with write access to that namespace")
        if status == 404 and "RepoNotFound" in type(http).__name__ + str(http.response.headers.get("X-Error-Code")):
            return f"{repo_id} was not found on {endpoint}, or the token cannot see it (404), while {doing}"
        detail = http.server_message or str(http).splitlines()[0]
        return f"the Hub at {endpoint} answered HTTP {status} while {doing}: {detail.strip()}"
    transport = find_in_chain(exc, network_errors())
    if transport is not None:
        return f"cannot reach the Hub at {endpoint} while {doing}: {transport} (check HF_ENDPOINT and the network)"
    return f"{doing} failed: {exc}"


def find_in_chain(exc: BaseException | None, kind) -> BaseException | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def scrub(message: str, token: str | None) -> str:
    if token:
        message = message.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", message)
