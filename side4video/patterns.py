"""Splitting lists that contain bracketed ranges: shard specs (`a-{0..3}.tar,b.tar`, braces) and
SLURM node lists (`gpu[1-2,4],cpu1`, square brackets): a comma inside brackets does not split."""

from __future__ import annotations

from typing import List


def split_outside_brackets(text: str, brackets: str = "{}[]") -> List[str]:
    """'a[1-2,4],b{0,1}' -> ['a[1-2,4]', 'b{0,1}']: non-empty, stripped parts."""
    opening, closing = brackets[0::2], brackets[1::2]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in opening
        depth -= ch in closing
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]
