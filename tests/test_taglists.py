"""Tag lists: the upstream's whole list once per TTL, paged by the mirror as the spec
says, and served stale (and paged) through an outage."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.cache import taglists
from mirror.config import CacheConfig, RedisConfig, UpstreamConfig
from mirror.upstream import client as upstream_client
from tests import images
from tests.conftest import MakeClient
from tests.fakehub import FakeHub
from tests.services import DistributionRegistry

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


# --- the whole list, fetched once per TTL and paged here --------------------------------------

MANY = ["b", "a10", "a2", "c", "a1", "latest", "1.0"]  # lexical: 1.0 a1 a10 a2 b c latest


def link_target(resp: Any) -> str:
    link = str(resp.headers["Link"])
    assert link.endswith('>; rel="next"'), link
    return link[1 : link.index(">")]


async def paged_hub_client(
    hub: FakeHub, make_client: MakeClient, redis: RedisConfig | None = None, **cache: Any
) -> Any:
    """A mirror in front of a hub that pages its tag lists by 3, with a Link."""
    for tag in MANY:
        hub.content.add_image("library/app", tag, [f"layer {tag}".encode()])
    hub.tags_page_size = 3
    return await make_client(
        cache=CacheConfig(**{"tag_ttl": 600, **cache}), redis=redis or RedisConfig(url=None)
    )


async def test_the_upstreams_pages_are_followed_into_one_list(
    hub: FakeHub, make_client: MakeClient
) -> None:
    client = await paged_hub_client(hub, make_client)

    resp = await client.get("/v2/library/app/tags/list")

    assert resp.status == 200
    assert await resp.json() == {"name": "library/app", "tags": sorted(MANY)}
    assert "Link" not in resp.headers
    assert hub.stats["tags_list"] == 3
    asked = [path for app, _, path in hub.stats.requests if "tags/list" in path]
    assert list(dict.fromkeys(asked)) == [  # the first one twice: a 401, then with a token
        "/v2/library/app/tags/list",
        "/v2/library/app/tags/list?last=a10&n=3",
        "/v2/library/app/tags/list?last=c&n=3",
    ]


async def test_query_variants_share_one_fetch_per_ttl(
    hub: FakeHub, make_client: MakeClient, metadata_config: RedisConfig
) -> None:
    client = await paged_hub_client(hub, make_client, metadata_config, tag_ttl=0.5)
    variants = [
        "",
        "?n=2",
        "?n=2&last=a10",
        "?last=b",
        "?n=100&last=zzz",
        "?n=0",
        "?foo=bar&n=3",
        "?n=1&last=",
    ]
    pages = await asyncio.gather(*(client.get(f"/v2/library/app/tags/list{q}") for q in variants))
    assert [resp.status for resp in pages] == [200] * len(variants)
    for query in variants:  # and again, one by one, from the kept list
        assert (await client.get(f"/v2/library/app/tags/list{query}")).status == 200
    assert hub.stats["tags_list"] == 3  # one fetch sequence: three pages of three

    hub.content.add_image("library/app", "d", [b"new"])
    await asyncio.sleep(0.6)  # the list's TTL passes
    resp = await client.get("/v2/library/app/tags/list?n=2&last=c")

    assert (await resp.json())["tags"] == ["d", "latest"]
    assert hub.stats["tags_list"] == 6


async def test_pages_in_lexical_order_after_last(hub: FakeHub, make_client: MakeClient) -> None:
    client = await paged_hub_client(hub, make_client)

    pages, path = [], "/v2/library/app/tags/list?n=2"
    while path:
        resp = await client.get(path)
        pages.append((await resp.json())["tags"])
        path = link_target(resp) if "Link" in resp.headers else ""
        if path:
            assert resp.headers["Link"] == (
                f'</v2/library/app/tags/list?last={pages[-1][-1]}&n=2>; rel="next"'
            )

    assert pages == [["1.0", "a1"], ["a10", "a2"], ["b", "c"], ["latest"]]
    for query, tags, more in [
        ("last=a10", ["a2", "b", "c", "latest"], False),  # `last` itself left out
        ("last=a15&n=2", ["a2", "b"], True),  # a `last` that is no tag of the list
        ("last=c&n=1", ["latest"], False),  # exactly the rest: no next page
        ("last=latest&n=5", [], False),
        ("last=zzz", [], False),
    ]:
        resp = await client.get(f"/v2/library/app/tags/list?{query}")
        assert (await resp.json())["tags"] == tags, query
        assert ("Link" in resp.headers) == more, query


async def test_n_zero_is_an_empty_page(hub: FakeHub, make_client: MakeClient) -> None:
    client = await paged_hub_client(hub, make_client)

    resp = await client.get("/v2/library/app/tags/list?n=0")

    assert resp.status == 200
    assert await resp.json() == {"name": "library/app", "tags": []}
    assert "Link" not in resp.headers


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("n=-1", "PAGINATION_NUMBER_INVALID"),
        ("n=two", "PAGINATION_NUMBER_INVALID"),
        ("n=1.5", "PAGINATION_NUMBER_INVALID"),
        ("n=%201", "PAGINATION_NUMBER_INVALID"),
        ("n=%C2%B2", "PAGINATION_NUMBER_INVALID"),  # a superscript two: no ASCII digit
        ("n=", "PAGINATION_NUMBER_INVALID"),
        ("last=-dash", "TAG_INVALID"),
        ("last=a%2Bb", "TAG_INVALID"),
        ("n=2&last=" + "a" * 129, "TAG_INVALID"),
    ],
)
async def test_bad_n_or_last_is_400_before_any_upstream_request(
    hub: FakeHub, make_client: MakeClient, query: str, code: str
) -> None:
    client = await paged_hub_client(hub, make_client)

    resp = await client.get(f"/v2/library/app/tags/list?{query}")

    assert resp.status == 400
    assert (await resp.json())["errors"][0]["code"] == code
    assert hub.stats["tags_list"] == 0


async def test_n_is_capped(
    hub: FakeHub, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(taglists, "MAX_PAGE_SIZE", 3)
    client = await paged_hub_client(hub, make_client)

    resp = await client.get("/v2/library/app/tags/list?n=100000")

    assert (await resp.json())["tags"] == ["1.0", "a1", "a10"]
    assert resp.headers["Link"] == '</v2/library/app/tags/list?last=a10&n=3>; rel="next"'


async def test_link_keeps_ns_and_drops_unknown_parameters(
    hub: FakeHub, make_client: MakeClient
) -> None:
    client = await paged_hub_client(hub, make_client)

    resp = await client.get("/v2/library/app/tags/list?n=3&ns=docker.io&foo=bar&last=a1")

    assert (await resp.json())["tags"] == ["a10", "a2", "b"]
    target = link_target(resp)
    assert target == "/v2/library/app/tags/list?last=b&n=3&ns=docker.io"
    follow = await client.get(target)
    assert (await follow.json())["tags"] == ["c", "latest"]
    assert "Link" not in follow.headers
    assert hub.stats["tags_list"] == 3


async def test_stale_pages_cut_from_the_kept_list(hub: FakeHub, make_client: MakeClient) -> None:
    client = await paged_hub_client(hub, make_client, tag_ttl=0)
    await (await client.get("/v2/library/app/tags/list?n=1")).read()
    hub.registry_status = 503

    resp = await client.get("/v2/library/app/tags/list?n=2&last=a2")

    assert (await resp.json())["tags"] == ["b", "c"]
    assert resp.headers["Warning"].startswith("110")
    assert resp.headers["Link"] == '</v2/library/app/tags/list?last=c&n=2>; rel="next"'


# --- a real docker-registry 2.8 upstream: unsorted, `n` and `last` ignored ------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real docker-registry holding one image under every tag of MANY."""
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (make test installs it)")
    with DistributionRegistry(tmp_path_factory.mktemp("tags-registry")) as reg:
        image = images.busybox_image()
        for tag in MANY:
            images.push_image(reg.url, "library/app", tag, image)
        yield reg.url


@pytest.mark.parametrize("page_size", [None, 3])
async def test_a_real_registry_is_paged_by_the_mirror(
    registry: str, make_client: MakeClient, page_size: int | None
) -> None:
    async with FakeHub(backend=registry) as upstream:
        upstream.tags_page_size = page_size  # None: the registry's own unsorted answer
        client = await make_client(
            upstream=UpstreamConfig(url=upstream.registry_url, connect_timeout=2, read_timeout=5)
        )

        whole = await client.get("/v2/library/app/tags/list")
        page = await client.get("/v2/library/app/tags/list?n=2&last=a10")

        assert (await whole.json())["tags"] == sorted(MANY)
        assert (await page.json())["tags"] == ["a2", "b"]
        assert page.headers["Link"] == '</v2/library/app/tags/list?last=b&n=2>; rel="next"'
        assert upstream.stats["tags_list"] == (1 if page_size is None else 3)


# --- an upstream that would make the mirror hold too much -----------------------------------


async def hostile_client(
    aiohttp_server: Any, make_client: MakeClient, answer: Callable[[int, web.Request], Any]
) -> tuple[Any, list[str]]:
    """A mirror in front of an upstream whose every tag-list answer `answer` makes."""
    asked: list[str] = []

    async def tags(request: web.Request) -> web.Response:
        asked.append(request.path_qs)
        return answer(len(asked), request)

    app = web.Application()
    app.router.add_get("/v2/{name:.+}/tags/list", tags)
    server: TestServer = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    return await make_client(upstream=UpstreamConfig(url=url)), asked


def endless(number: int, request: web.Request) -> web.Response:
    link = f'</v2/x/tags/list?last=t{number:06}>; rel="next"'
    return web.json_response({"name": "x", "tags": [f"t{number:06}"]}, headers={"Link": link})


async def test_page_count_is_bounded(
    aiohttp_server: Any, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(taglists, "MAX_PAGES", 5)
    client, asked = await hostile_client(aiohttp_server, make_client, endless)

    resp = await client.get("/v2/x/tags/list")

    assert resp.status == 502
    assert len(asked) == 5


async def test_tag_count_is_bounded(
    aiohttp_server: Any, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(taglists, "MAX_TAGS", 3)
    client, asked = await hostile_client(aiohttp_server, make_client, endless)

    resp = await client.get("/v2/x/tags/list")

    assert resp.status == 502
    assert len(asked) == 4


async def test_bytes_are_bounded_across_pages(
    aiohttp_server: Any, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(taglists, "MAX_LIST_BYTES", 200)
    client, asked = await hostile_client(aiohttp_server, make_client, endless)

    resp = await client.get("/v2/x/tags/list")

    assert resp.status == 502
    assert len(asked) == 200 // len(json.dumps({"name": "x", "tags": ["t000001"]})) + 1


async def test_a_link_back_to_a_page_already_read_is_refused(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    def looping(number: int, request: web.Request) -> web.Response:
        link = '</v2/x/tags/list?last=a&n=1>; rel="next"'  # ignores `last`, as 2.8 does
        return web.json_response({"name": "x", "tags": ["a"]}, headers={"Link": link})

    client, asked = await hostile_client(aiohttp_server, make_client, looping)

    resp = await client.get("/v2/x/tags/list")

    assert resp.status == 502
    assert asked == ["/v2/x/tags/list", "/v2/x/tags/list?last=a&n=1"]


async def test_a_link_out_of_the_tag_list_is_not_followed(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    def leaving(number: int, request: web.Request) -> web.Response:
        link = f'</v2/other/tags/list?last={"a" if number == 1 else "b"}>; rel="next"'
        return web.json_response({"name": "x", "tags": ["a"]}, headers={"Link": link})

    client, asked = await hostile_client(aiohttp_server, make_client, leaving)

    resp = await client.get("/v2/x/tags/list")

    assert resp.status == 502
    assert asked == ["/v2/x/tags/list"]


async def test_a_link_that_is_no_url_is_refused(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    def broken(number: int, request: web.Request) -> web.Response:
        link = '<http://[::1/v2/x/tags/list?last=a>; rel="next"'
        return web.json_response({"name": "x", "tags": ["a"]}, headers={"Link": link})

    client, asked = await hostile_client(aiohttp_server, make_client, broken)

    resp = await client.get("/v2/x/tags/list")

    assert resp.status == 502
    assert (await resp.json())["errors"][0]["code"] == "MANIFEST_INVALID"
    assert asked == ["/v2/x/tags/list"]


async def test_a_list_nested_past_the_parsers_depth_is_refused(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    def nested(number: int, request: web.Request) -> web.Response:
        return web.Response(body=b'{"tags": ' + b"[" * 100_000, content_type="application/json")

    client, _ = await hostile_client(aiohttp_server, make_client, nested)

    resp = await client.get("/v2/x/tags/list")

    assert resp.status == 502
    assert (await resp.json())["errors"][0]["code"] == "MANIFEST_INVALID"


async def test_null_and_odd_entries_in_an_upstream_list(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    def odd(number: int, request: web.Request) -> web.Response:
        if request.path.startswith("/v2/empty/"):
            return web.json_response({"name": "empty", "tags": None})
        return web.json_response({"name": "x", "tags": ["b", 3, "../etc", "a", "b"]})

    client, _ = await hostile_client(aiohttp_server, make_client, odd)

    assert (await (await client.get("/v2/x/tags/list")).json())["tags"] == ["a", "b"]
    assert (await (await client.get("/v2/empty/tags/list")).json())["tags"] == []


# --- an upstream whose pages come slowly ------------------------------------------------------

# Each exchange within 0.2 + 2 × 0.4 s; the pages of one list within two of them.
SLOW_UPSTREAM = {"connect_timeout": 0.2, "read_timeout": 0.4}
PAGING_DEADLINE = 2 * (0.2 + 2 * 0.4)


@pytest.mark.parametrize("kept", [True, False])
async def test_slow_pages_end_at_the_paging_deadline(
    aiohttp_server: Any, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch, kept: bool
) -> None:
    """Pages each well within their own deadline, endless: the fetch is given up at the
    paging deadline as an upstream failure, and the kept list served stale (else 503).
    Without the deadline: 40 pages of 0.2 s, then a 502."""
    monkeypatch.setattr(upstream_client, "PAGED_EXCHANGES", 2)
    monkeypatch.setattr(taglists, "MAX_PAGES", 40)
    slow = not kept

    async def tags(request: web.Request) -> web.Response:
        if not slow:
            return web.json_response({"name": "x", "tags": ["1.0"]})
        await asyncio.sleep(0.2)
        return endless(int(request.query.get("last", "t0").removeprefix("t")) + 1, request)

    app = web.Application()
    app.router.add_get("/v2/{name:.+}/tags/list", tags)
    url = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    client = await make_client(
        upstream=UpstreamConfig(url=url, **SLOW_UPSTREAM), cache=CacheConfig(tag_ttl=0)
    )
    if kept:
        assert (await (await client.get("/v2/x/tags/list")).json())["tags"] == ["1.0"]
        slow = True

    started = time.monotonic()
    resp = await client.get("/v2/x/tags/list")

    assert time.monotonic() - started < PAGING_DEADLINE + 1.5
    if kept:
        assert resp.status == 200
        assert resp.headers["Warning"].startswith("110")
        assert (await resp.json())["tags"] == ["1.0"]
    else:
        assert resp.status == 503
        assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
