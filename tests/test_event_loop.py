"""`event_loop`: asyncio's own loop by default, uvloop on request (not with `cluster:`)."""

from __future__ import annotations

import sys

import pytest

from mirror.config import ConfigError, config_from_mapping, load_config
from mirror.web.server import loop_factory


def test_default_is_asyncio() -> None:
    assert load_config(None).event_loop == "asyncio"
    assert config_from_mapping({"event_loop": "UVLOOP"}).event_loop == "uvloop"


def test_unknown_loop_is_refused() -> None:
    with pytest.raises(ConfigError, match="event_loop: expected auto, asyncio or uvloop"):
        config_from_mapping({"event_loop": "trio"})


def test_asyncio_is_asyncios_own() -> None:
    assert loop_factory("asyncio") is None


def test_replicas_keep_sendfile() -> None:
    """Peer transfers need loop.sendfile, which uvloop lacks."""
    assert loop_factory("auto", cluster=True) is None
    with pytest.raises(ConfigError, match="event_loop: uvloop has no sendfile"):
        loop_factory("uvloop", cluster=True)


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


def test_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails as if not installed
    assert loop_factory("auto") is None
    with pytest.raises(ConfigError, match="event_loop: uvloop is not installed"):
        loop_factory("uvloop")
