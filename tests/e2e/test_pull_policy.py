"""Pull policies with a real Docker daemon: `docker login` to the mirror, then pulls that
the rules allow and refuse, and what Docker prints for a refusal.

    docker login + pull ──> mirror (htpasswd, rules, deny glob) ──> fake hub ──> docker-registry

The mirror's log is JSON, so its audit lines are read back as objects. Run with
`python -m pytest tests/e2e/test_pull_policy.py -q -s -m e2e`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.clients_helpers import Ran, Transcript, write_htpasswd, write_mirror_config
from tests.e2e.test_clients import needs, needs_docker
from tests.images import busybox_image, busybox_layer, file_layer, push_image, single_image
from tests.services import DistributionRegistry, DockerDaemon, FakeHubProcess, MirrorProcess

pytestmark = [pytest.mark.e2e, needs("docker-registry")]

USER, PASSWORD = "dev", "dev-Pa55-e2e-8Jw3"
REFUSAL = "is not allowed by this mirror's policy"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("policy")


@pytest.fixture(scope="module")
def pushed(policy_dir: Path) -> Iterator[tuple[DistributionRegistry, dict[str, str]]]:
    """busybox as library/busybox:latest and :latest-rc1, a private team/secret:v1."""
    images = {
        ("library/busybox", "latest"): busybox_image(),
        ("library/busybox", "latest-rc1"): single_image("rc", [busybox_layer()]),
        ("team/secret", "v1"): single_image("secret", [file_layer("secret.txt", "s3cr3t")]),
    }
    with DistributionRegistry(policy_dir / "registry") as registry:
        digests = {}
        for (repo, tag), image in images.items():
            push_image(registry.url, repo, tag, image)
            digests[f"{repo}:{tag}"] = image.manifest.digest
        yield registry, digests


@pytest.fixture(scope="module")
def policy_hub(
    policy_dir: Path, pushed: tuple[DistributionRegistry, dict[str, str]]
) -> Iterator[FakeHubProcess]:
    with FakeHubProcess(pushed[0].url, workdir=policy_dir / "fakehub") as hub:
        yield hub


@pytest.fixture(scope="module")
def policy_mirror(policy_dir: Path, policy_hub: FakeHubProcess) -> Iterator[MirrorProcess]:
    workdir = policy_dir / "mirror"
    htpasswd = write_htpasswd(workdir / "htpasswd", {USER: PASSWORD})
    config = {
        "upstreams": {
            "docker.io": {"url": policy_hub.registry_url, "deny": ["library/*:latest-rc*"]}
        },
        "auth": {
            "htpasswd": str(htpasswd),
            "groups": {"platform": ["ci-bot"]},
            "rules": [
                {"who": ["platform"], "pull": ["**"]},
                {"who": ["*"], "pull": ["docker.io/library/*"]},
            ],
        },
        "log": {"format": "json"},
    }
    path = write_mirror_config(workdir / "mirror.yml", config)
    args = ["--config", str(path)]
    with MirrorProcess(workdir, policy_hub.registry_url, extra_args=args) as proc:
        yield proc


@pytest.fixture(scope="module")
def policy_docker(policy_dir: Path, policy_mirror: MirrorProcess) -> Iterator[DockerDaemon]:
    """A dockerd with no registry mirror: it talks to the mirror as a registry."""
    with DockerDaemon(policy_dir / "docker", None) as daemon:
        yield daemon


def audit_lines(mirror: MirrorProcess, at_least: int) -> list[dict[str, Any]]:
    """The mirror's audit lines; the last may be written just after the client exits."""
    deadline = time.monotonic() + 5
    while True:
        lines = [
            json.loads(line)
            for line in mirror.log_path.read_text().splitlines()
            if line.startswith("{")
        ]
        audit = [line for line in lines if line.get("logger") == "mirror.audit"]
        if len(audit) >= at_least or time.monotonic() > deadline:
            return audit
        time.sleep(0.05)


@needs_docker
def test_docker_login_then_allowed_and_refused_pulls(
    policy_dir: Path,
    policy_docker: DockerDaemon,
    policy_mirror: MirrorProcess,
    policy_hub: FakeHubProcess,
    pushed: tuple[DistributionRegistry, dict[str, str]],
) -> None:
    transcript = Transcript(policy_dir / "client-output.log")
    host = f"127.0.0.1:{policy_mirror.port}"
    digests = pushed[1]

    def run(shown: str, *args: str, stdin: str | None = None) -> Ran:
        started = time.monotonic()
        done = policy_docker.docker(*args, check=False, input=stdin)
        return transcript.record(shown, done, time.monotonic() - started)

    login = ["login", host, "--username", USER, "--password-stdin"]
    logged_in = run(f"docker {' '.join(login)}", *login, stdin=PASSWORD + "\n")
    assert logged_in.ok() and "Login Succeeded" in logged_in.output, logged_in.output
    policy_hub.reset()

    allowed = run(f"docker pull {host}/library/busybox:latest", "pull", f"{host}/library/busybox")
    assert allowed.ok(), allowed.output
    assert f"Digest: {digests['library/busybox:latest']}" in allowed.output

    # Refused by the rules (dev is not in the platform group): the token /token gave has no
    # actions for team/secret, and the manifest request is a 403 DENIED naming it.
    secret = run(f"docker pull {host}/team/secret:v1", "pull", f"{host}/team/secret:v1")
    assert not secret.ok()
    # Docker prints: Error response from daemon: pull access denied for <host>/team/secret,
    # repository does not exist or may require 'docker login': denied: <our message>
    assert f"pull access denied for {host}/team/secret" in secret.output, secret.output
    assert f"denied: pulling team/secret:v1 {REFUSAL}" in secret.output, secret.output
    # Refused by the upstream's deny glob, by tag.
    rc = run(
        f"docker pull {host}/library/busybox:latest-rc1",
        "pull",
        f"{host}/library/busybox:latest-rc1",
    )
    assert not rc.ok()
    assert f"denied: pulling library/busybox:latest-rc1 {REFUSAL}" in rc.output, rc.output

    # Nothing of the refused pulls reached the upstream.
    asked = [path for _, _, path in policy_hub.stats()["requests"]]
    assert asked and not [p for p in asked if "team/secret" in p or "latest-rc1" in p], asked

    audit = audit_lines(policy_mirror, at_least=4)
    picked = [
        (line["user"], line["method"], line["repository"], line["reference"], line["outcome"])
        for line in audit
    ]
    digest = digests["library/busybox:latest"]
    assert (USER, "HEAD", "library/busybox", "latest", "served") in picked, picked
    assert (USER, "GET", "library/busybox", digest, "served") in picked, picked
    # Docker HEADs the tag, and on the 403 tries a GET: both refused, both audited.
    for method in ("HEAD", "GET"):
        assert (USER, method, "team/secret", "v1", "denied") in picked, picked
        assert (USER, method, "library/busybox", "latest-rc1", "denied") in picked, picked
    assert all(line["client"] == "127.0.0.1" for line in audit)
    assert PASSWORD not in policy_mirror.log_path.read_text()


@pytest.fixture(scope="module")
def open_mirror(policy_dir: Path, policy_hub: FakeHubProcess) -> Iterator[MirrorProcess]:
    """Anonymous clients may pull library/*; team/* only the user."""
    workdir = policy_dir / "open-mirror"
    htpasswd = write_htpasswd(workdir / "htpasswd", {USER: PASSWORD})
    config = {
        "upstreams": {"docker.io": {"url": policy_hub.registry_url}},
        "auth": {
            "htpasswd": str(htpasswd),
            "rules": [
                {"who": [USER], "pull": ["docker.io/team/*"]},
                {"who": ["anonymous", "*"], "pull": ["docker.io/library/*"]},
            ],
        },
    }
    path = write_mirror_config(workdir / "mirror.yml", config)
    with MirrorProcess(
        workdir, policy_hub.registry_url, extra_args=["--config", str(path)]
    ) as proc:
        yield proc


@needs_docker
def test_where_anonymous_clients_may_pull_a_login_pulls_what_only_users_may(
    policy_dir: Path,
    policy_docker: DockerDaemon,
    open_mirror: MirrorProcess,
    pushed: tuple[DistributionRegistry, dict[str, str]],
) -> None:
    """Docker sends its login only once challenged: without a challenge for what only users
    may pull, a logged-in user got the anonymous client's refusal."""
    transcript = Transcript(policy_dir / "open-client-output.log")
    host = f"127.0.0.1:{open_mirror.port}"
    digests = pushed[1]

    def run(shown: str, *args: str, stdin: str | None = None) -> Ran:
        started = time.monotonic()
        done = policy_docker.docker(*args, check=False, input=stdin)
        return transcript.record(shown, done, time.monotonic() - started)

    public = run(f"docker pull {host}/library/busybox", "pull", f"{host}/library/busybox")
    assert public.ok(), public.output
    anonymous = run(f"docker pull {host}/team/secret:v1", "pull", f"{host}/team/secret:v1")
    assert not anonymous.ok()
    assert f"denied: pulling team/secret:v1 {REFUSAL}" in anonymous.output, anonymous.output
    login = ["login", host, "--username", USER, "--password-stdin"]
    logged_in = run(f"docker {' '.join(login)}", *login, stdin=PASSWORD + "\n")
    assert logged_in.ok() and "Login Succeeded" in logged_in.output, logged_in.output
    secret = run(f"docker pull {host}/team/secret:v1", "pull", f"{host}/team/secret:v1")
    assert secret.ok(), secret.output
    assert f"Digest: {digests['team/secret:v1']}" in secret.output, secret.output
