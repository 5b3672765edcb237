"""Tag lists: live from the upstream, served stale (and paged) through an outage."""

from __future__ import annotations

from typing import Any

from mirror.config import CacheConfig
from tests.conftest import MakeClient
from tests.fakehub import FakeHub

TAGS = ["1.0", "1.1", "2.0", "2.1", "latest"]


async def cached_client(hub: FakeHub, make_client: MakeClient, **cache: Any) -> Any:
    for tag in TAGS:
        hub.content.add_image("library/app", tag, [f"layer {tag}".encode()])
    return await make_client(cache=CacheConfig(tag_ttl=0, **cache))


async def test_tag_list_is_live_while_the_upstream_answers(
    hub: FakeHub, make_client: MakeClient
) -> None:
    client = await cached_client(hub, make_client)
    await (await client.get("/v2/library/app/tags/list")).read()
    hub.content.add_image("library/app", "3.0", [b"new"])

    resp = await client.get("/v2/library/app/tags/list")

    assert (await resp.json())["tags"] == [*TAGS[:4], "3.0", "latest"]
    assert "Warning" not in resp.headers
    assert hub.stats["tags_list"] == 2


async def test_same_pages_served_stale_through_an_outage(
    hub: FakeHub, make_client: MakeClient
) -> None:
    client = await cached_client(hub, make_client)
    first = await client.get("/v2/library/app/tags/list?n=2")
    link = first.headers["Link"]
    second = await client.get(link[1 : link.index(">")])
    before = [await first.json(), await second.json(), second.headers["Link"]]
    hub.registry_status = 503

    first = await client.get("/v2/library/app/tags/list?n=2")
    second = await client.get(first.headers["Link"][1 : first.headers["Link"].index(">")])

    assert [await first.json(), await second.json(), second.headers["Link"]] == before
    assert first.headers["Warning"].startswith("110")
    assert (await first.json())["tags"] == ["1.0", "1.1"]
    assert first.headers["Link"] == '</v2/library/app/tags/list?last=1.1&n=2>; rel="next"'


async def test_any_page_cut_from_the_whole_list_through_an_outage(
    hub: FakeHub, make_client: MakeClient
) -> None:
    client = await cached_client(hub, make_client)
    await (await client.get("/v2/library/app/tags/list")).read()
    hub.registry_status = 503

    pages, path = [], "/v2/library/app/tags/list?n=2&last=1.0"
    while path:
        resp = await client.get(path)
        assert resp.status == 200
        assert resp.headers["Warning"].startswith("110")
        pages.append((await resp.json())["tags"])
        link = resp.headers.get("Link")
        path = link[1 : link.index(">")] if link else ""

    assert pages == [["1.1", "2.0"], ["2.1", "latest"]]


async def test_prefixed_name_and_ns_kept_in_stale_links(
    hub: FakeHub, make_client: MakeClient
) -> None:
    client = await cached_client(hub, make_client)
    await (await client.get("/v2/library/app/tags/list?ns=docker.io")).read()
    hub.registry_status = 503

    resp = await client.get("/v2/library/app/tags/list?n=1&ns=docker.io")

    assert (await resp.json()) == {"name": "library/app", "tags": ["1.0"]}
    assert resp.headers["Link"] == (
        '</v2/library/app/tags/list?last=1.0&n=1&ns=docker.io>; rel="next"'
    )


async def test_outage_past_the_stale_window_fails(hub: FakeHub, make_client: MakeClient) -> None:
    client = await cached_client(hub, make_client, stale_if_error=0)
    await (await client.get("/v2/library/app/tags/list")).read()
    hub.registry_status = 503

    resp = await client.get("/v2/library/app/tags/list")

    assert resp.status == 503


async def test_never_listed_repository_fails_in_an_outage(
    hub: FakeHub, make_client: MakeClient
) -> None:
    client = await cached_client(hub, make_client)
    hub.registry_status = 503

    resp = await client.get("/v2/library/app/tags/list")

    assert resp.status == 503
    assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"


async def test_listing_tags_does_not_put_a_repository_in_the_catalog(
    hub: FakeHub, make_client: MakeClient
) -> None:
    client = await cached_client(hub, make_client)
    await (await client.get("/v2/library/app/tags/list")).read()

    resp = await client.get("/v2/_catalog")

    assert (await resp.json())["repositories"] == []
