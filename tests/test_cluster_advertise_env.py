"""`${NAME}` in cluster.advertise_url and cluster.replica_id: one config for every replica.

Kubernetes hands a pod its own IP and name only through environment variables (the
downward API); the replicated deploy/ files rely on this expansion.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror.config import ConfigError
from mirror.config.cluster import parse_cluster


@pytest.fixture
def secret(tmp_path: Path) -> str:
    path = tmp_path / "cluster-secret"
    path.write_text("s" * 43 + "\n")
    return str(path)


def test_pod_ip_and_name_come_from_the_environment(
    secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POD_IP", "10.42.1.7")
    monkeypatch.setenv("POD_NAME", "mirror-7d9f-x2x4k")
    got = parse_cluster(
        {
            "cluster": {
                "advertise_url": "http://${POD_IP}:8083",
                "replica_id": "${POD_NAME}",
                "secret_file": secret,
            }
        }
    )
    assert got is not None
    assert (got.advertise_url, got.replica_id) == ("http://10.42.1.7:8083", "mirror-7d9f-x2x4k")


def test_replica_id_defaults_to_the_expanded_address(
    secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADVERTISE_HOST", "mirror-2")
    got = parse_cluster(
        {"cluster": {"advertise_url": "http://${ADVERTISE_HOST}:8083/", "secret_file": secret}}
    )
    assert got is not None
    assert (got.advertise_url, got.replica_id) == ("http://mirror-2:8083", "mirror-2:8083")


@pytest.mark.parametrize("value", [None, ""])
@pytest.mark.parametrize("key", ["advertise_url", "replica_id"])
def test_an_unset_variable_names_the_key_and_the_variable(
    secret: str, monkeypatch: pytest.MonkeyPatch, key: str, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("POD_IP", raising=False)
    else:
        monkeypatch.setenv("POD_IP", value)
    section = {"advertise_url": "http://10.0.0.5:8083", "secret_file": secret}
    section[key] = "http://${POD_IP}:8083" if key == "advertise_url" else "${POD_IP}"
    with pytest.raises(ConfigError) as raised:
        parse_cluster({"cluster": section})
    assert raised.value.key == f"cluster.{key}"
    assert "POD_IP is not set" in str(raised.value)


def test_only_the_braced_form_is_expanded(secret: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_IP", "10.42.1.7")
    section = {"advertise_url": "http://a:8083", "replica_id": "$POD_IP", "secret_file": secret}
    got = parse_cluster({"cluster": section})
    assert got is not None and got.replica_id == "$POD_IP"
