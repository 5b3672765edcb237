"""Sizes for people to read."""


def human_size(n: float) -> str:
    """`173 B`, `1.1 KiB`, `2.5 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
