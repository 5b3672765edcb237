"""The config every bench mirror runs with: a pull policy on, as a production config has one.

The audit line of every manifest request needs no setting (it is always written, on the
`mirror.audit` logger); the policy does: allow and deny lists on the upstream and a rule
for anonymous clients, so each request is matched against both, as it would be in front of
a fleet. Everything the bench pulls is under `library/`, which the policy allows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.bench.clients import BenchError
from tests.services import MirrorProcess, http_status

PRODUCTION = "audit on, pull policy on"
POLICY_SUMMARY = "upstream allow library/*, deny library/*:*-rc*; anonymous may pull library/*"


def production(upstream_url: str) -> dict[str, Any]:
    """The policy's keys for a mirror of upstream_url (the rule names it as its registry)."""
    registry = urlsplit(upstream_url).netloc
    return {
        "upstream": {"url": upstream_url, "allow": ["library/*"], "deny": ["library/*:*-rc*"]},
        "auth": {"rules": [{"who": ["anonymous"], "pull": [f"{registry}/library/*"]}]},
    }


def write_config(path: Path, upstream_url: str, **keys: Any) -> Path:
    """A config file of the production keys plus `keys` (JSON is YAML); its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**production(upstream_url), **keys}) + "\n")
    return path


def check_production(mirror: MirrorProcess, timeout: float = 10.0) -> None:
    """The policy holds (a repository outside library/ is refused) and the refusal's audit
    line reaches the mirror's log: the rows' "audit on, pull policy on" is true."""
    url = f"{mirror.url}/v2/someone/app/manifests/latest"
    if (status := http_status(url, timeout=10)) != 403:
        raise BenchError(f"GET {url}: {status}, not 403: the pull policy is off")
    deadline = time.monotonic() + timeout
    while "outcome=denied" not in mirror.log_path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise BenchError(f"no audit line for the refused GET in {mirror.log_path}")
        time.sleep(0.2)
