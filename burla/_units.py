"""Sizes in words, for the client's error messages."""

from __future__ import annotations


def size_text(n: int) -> str:
    """Bytes as people read them: "512 bytes", "800.0 kB", "1.5 MB", "100 MB"."""
    if n < 1000:
        return f"{n:,} bytes"
    if n < 1000**2:
        return f"{n / 1000:.1f} kB"
    return f"{n / 1000**2:,.1f} MB".replace(".0 MB", " MB")
