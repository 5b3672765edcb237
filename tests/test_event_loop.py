"""`event_loop`: `auto` by default (uvloop where it is installed, else asyncio's own loop),
`asyncio` to turn uvloop off, `uvloop` to insist on it; with `cluster:` too, since bodies go
out by sendfile on either loop (tests/test_sendfile.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mirror.config import ConfigError, config_from_mapping, load_config
from mirror.web.server import loop_factory


def test_default_is_auto() -> None:
    assert load_config(None).event_loop == "auto"
    assert config_from_mapping({"event_loop": "UVLOOP"}).event_loop == "uvloop"
    assert config_from_mapping({"event_loop": "asyncio"}).event_loop == "asyncio"


def test_unknown_loop_is_refused() -> None:
    with pytest.raises(ConfigError, match="event_loop: expected auto, asyncio or uvloop"):
        config_from_mapping({"event_loop": "trio"})


def test_asyncio_is_asyncios_own() -> None:
    assert loop_factory("asyncio") is None


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop has no Windows build")
def test_auto_and_uvloop_use_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")
    for choice in ("auto", "uvloop"):
        factory = loop_factory(choice)
        assert factory is not None
        loop = factory()
        try:
            assert isinstance(loop, uvloop.Loop)
        finally:
            loop.close()


def test_replicas_may_run_uvloop(tmp_path: Path) -> None:
    """A replica's peer transfers no longer need asyncio's loop.sendfile."""
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-shared-by-replicas\n")
    cluster = {"advertise_url": "http://10.0.0.5:8083/", "secret_file": str(secret)}
    raw = {"event_loop": "uvloop", "redis": {"url": "redis://127.0.0.1/0"}, "cluster": cluster}
    assert config_from_mapping(raw).event_loop == "uvloop"


def test_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails as if not installed
    assert loop_factory("auto") is None
    with pytest.raises(ConfigError, match="event_loop: uvloop is not installed"):
        loop_factory("uvloop")
