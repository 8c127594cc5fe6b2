"""Secrets out of what is written or logged: URLs' credentials, the webhook's key, free text holding URLs."""
from __future__ import annotations

import re
from typing import Any

from omegaconf import OmegaConf

from orchestrator.config.base import to_dict


REDACTED = "***"


# Query parameters whose values are credentials: S3's access_key/secret_key/session_token, presigned URLs'
# X-Amz-Signature/X-Amz-Credential, Azure SAS sig, OAuth access_token, api keys, passwords.
_SECRET_PARAM = re.compile(r"token|key|secret|pass|pwd|sig|auth|credential|session|cookie|private", re.IGNORECASE)


_SECRET_URLS = ("monitor.webhook_url",)   # the whole URL is the credential (Slack, PagerDuty keys in the path)


def redact_url(url: str, keep_path: bool = True) -> str:
    """`url` safe to write or log: user info (`s3://KEY:SECRET@bucket`, `https://user:pass@host`) and the values of
    credential-looking query parameters (`?token=...`) become ***, a fragment goes; with keep_path=False the path
    and query too (a webhook URL, whose path is its key). A string that is not a URL comes back unchanged.

    Parsed by hand, not with urllib: a secret written unencoded may hold '/', which would end urllib's netloc
    early and leave the rest of the secret in the path; here everything up to the last '@' before the query goes."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    body, qsep, query = rest.partition("#")[0].partition("?")
    if "@" in body:
        body = REDACTED + "@" + body.rsplit("@", 1)[1]
    if not keep_path:
        host = body.split("/", 1)[0]
        return f"{scheme}://{host}" + (f"/{REDACTED}" if body[len(host):].strip("/") or query else "")
    items = []
    for item in query.split("&") if query else []:
        name, eq, _ = item.partition("=")
        items.append(f"{name}={REDACTED}" if eq and _SECRET_PARAM.search(name) else item)
    return f"{scheme}://{body}" + (qsep + "&".join(items) if qsep else "")


def redacted(cfg: Any) -> dict[str, Any]:
    """The config as a plain dict with its secrets redacted: what config.yaml, the report, MLflow params and logs
    get. Every string that is a URL loses its credentials (redact_url); monitor.webhook_url keeps only its host."""

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        if isinstance(value, str):
            return redact_url(value, keep_path=key not in _SECRET_URLS)
        return value

    return walk(cfg if isinstance(cfg, dict) else to_dict(cfg), "")


def redacted_yaml(cfg: Any) -> str:
    """The resolved config as YAML, secrets redacted (a run directory's config.yaml)."""
    return OmegaConf.to_yaml(OmegaConf.create(redacted(cfg)))


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_text(text: str) -> str:
    """Free text (an error message, a log line, a YAML file that does not parse) with every URL in it redacted."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
