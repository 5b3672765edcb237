"""The package's layers, held to the code: every import of `mirror/` read from the source
(top level, inside functions and under TYPE_CHECKING alike), at file level.

- no import circle between files;
- an import from a lower layer up to a higher one only where it carries a `# up:` reason,
  and at most MAX_UP of them;
- only `web/` imports aiohttp.web; `cluster/` and `storage/` read no app keys;
- aiohttp client responses are handled in `upstream/` alone.

`python -m tests.test_layout` prints the counts.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mirror"
# Top to bottom. A file belongs to the first entry that is its top-level name under
# mirror/; files directly in mirror/ are the entry points.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("",),  # __main__, cli, commands, healthcheck, allocator
    ("web",),
    ("cache",),
    ("cluster",),
    ("upstream", "access"),
    ("storage",),
    ("metadata",),
    ("net",),
    ("oci", "observe"),
    ("config", "util"),
)
MAX_UP = 5
UP_MARK = "# up:"


@dataclass(frozen=True)
class Import:
    source: Path
    target: Path
    line: int
    reason: str | None


def module_path(dotted: str) -> Path | None:
    """The file a dotted mirror module name is: a module file or a package's __init__."""
    parts = dotted.split(".")[1:]
    base = PACKAGE.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imports(path: Path) -> Iterator[Import]:
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from mirror.x import y` is mirror/x/y.py when y is a module, else mirror/x.
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            if name != "mirror" and not name.startswith("mirror."):
                continue
            target = module_path(name)
            if target is None or (isinstance(node, ast.ImportFrom) and name == node.module
                                  and _submodules_only(node)):  # fmt: skip
                continue
            above = lines[node.lineno - 2] if node.lineno > 1 else ""
            here = lines[node.lineno - 1]
            reason = next((t for t in (here, above) if UP_MARK in t), None)
            yield Import(path, target, node.lineno, reason)


def _submodules_only(node: ast.ImportFrom) -> bool:
    """`from mirror.web import handlers` names the module, not the package's __init__."""
    assert node.module is not None
    return all(module_path(f"{node.module}.{alias.name}") for alias in node.names)


def layer(path: Path) -> int:
    relative = path.relative_to(PACKAGE)
    top = relative.parts[0] if len(relative.parts) > 1 else ""
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{relative} is in no layer: add its package to LAYERS")


def all_imports() -> list[Import]:
    found = {
        (i.source, i.target, i.line): i
        for path in sorted(PACKAGE.rglob("*.py"))
        for i in imports(path)
        if i.target != i.source
    }
    return list(found.values())


def circles(edges: list[Import]) -> list[list[Path]]:
    """Strongly connected sets of more than one file (Tarjan)."""
    graph: dict[Path, set[Path]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    found: list[list[Path]] = []

    def visit(node: Path) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward(edges: list[Import]) -> list[Import]:
    return [e for e in edges if layer(e.target) < layer(e.source)]


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def test_no_import_circle() -> None:
    found = circles(all_imports())
    assert not found, "import circles: " + "; ".join(
        " → ".join(_name(p) for p in group) for group in found
    )


def test_imports_run_down_the_layers() -> None:
    ups = upward(all_imports())
    unexplained = [f"{_name(e.source)}:{e.line} → {_name(e.target)}" for e in ups if not e.reason]
    assert not unexplained, f"imports up a layer without a '{UP_MARK}' reason: {unexplained}"
    assert len(ups) <= MAX_UP, [f"{_name(e.source)}:{e.line}" for e in ups]


def test_only_the_web_layer_imports_aiohttp_web() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "web":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("aiohttp", "aiohttp.web"):
                if node.module == "aiohttp.web" or any(a.name == "web" for a in node.names):
                    offenders.append(f"{_name(path)}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(
                a.name.startswith("aiohttp.web") for a in node.names
            ):
                offenders.append(f"{_name(path)}:{node.lineno}")
    assert not offenders, offenders


def test_cluster_and_storage_read_no_app_keys() -> None:
    offenders = [
        f"{_name(e.source)}:{e.line}"
        for e in all_imports()
        if e.source.relative_to(PACKAGE).parts[0] in ("cluster", "storage")
        and e.target == PACKAGE / "web" / "keys.py"
    ]
    assert not offenders, offenders


def test_upstream_responses_stay_in_the_upstream_package() -> None:
    """Above upstream/, blobs arrive as a BlobBody and documents as a Document: nothing
    else handles an aiohttp client response (its status, its Content-Range)."""
    offenders = [
        _name(path)
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] != "upstream" and "ClientResponse" in path.read_text()
    ]
    assert not offenders, offenders


def test_config_and_util_are_leaves() -> None:
    leaves = ("config", "util")
    offenders = [
        f"{_name(e.source)}:{e.line} → {_name(e.target)}"
        for e in all_imports()
        if (top := e.source.relative_to(PACKAGE).parts[0]) in leaves
        and e.target.relative_to(PACKAGE).parts[0] != top
    ]
    assert not offenders, offenders


if __name__ == "__main__":
    edges = all_imports()
    ups = upward(edges)
    print(f"{len(list(PACKAGE.rglob('*.py')))} files, {len(edges)} imports between them")
    print(f"circles: {len(circles(edges))}")
    for group in circles(edges):
        print("  " + " → ".join(_name(p) for p in group))
    print(f"imports up a layer: {len(ups)}")
    for e in ups:
        print(f"  {_name(e.source)}:{e.line} → {_name(e.target)}  {e.reason or ''}".rstrip())
