"""One sample of a shard: a compressed video, its metadata, and the key that names it.

A shard holds `{key}.{webm|mp4|mkv|avi|mov}` video bytes and `{key}.json` metadata (label index
and name, captions, frame count, fps, width, height, codec). Keys are relative names: they never
contain `..` or start with `/`, so nothing derived from a key can escape a folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from side4video.errors import UserError

VIDEO_EXTS = ("webm", "mp4", "mkv", "avi", "mov")


class BadSample(Exception):
    """A sample that cannot be used (missing member, bad metadata, unsafe key, undecodable)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def key_problem(key: str) -> Optional[str]:
    """Why `key` is unsafe as a relative name, or None when it is fine."""
    if not key or not key.strip():
        return "empty key"
    if key.startswith("/") or key.startswith("\\") or (len(key) > 1 and key[1] == ":"):
        return "absolute path"
    parts = key.replace("\\", "/").split("/")
    if any(p in ("..", ".") for p in parts):
        return "'..' or '.' path component"
    if any(p == "" for p in parts):
        return "empty path component"
    if any(ord(c) < 32 for c in key):
        return "control character"
    return None


def check_key(key: str) -> str:
    """Return `key` if it is a safe relative name, else raise UserError naming it."""
    problem = key_problem(key)
    if problem:
        raise UserError(f"sample key {key!r} rejected: {problem} (keys must stay inside the dataset folder)")
    return key


@dataclass
class Sample:
    """A compressed video as read from a shard. `index` is its position in the rank's epoch
    stream, `occurrence` the pass over the rank's shards it came from (0 unless wrapped)."""

    key: str
    url: str
    video: bytes
    ext: str
    meta: Dict[str, Any] = field(default_factory=dict)
    index: int = -1
    occurrence: int = 0

    @property
    def label(self) -> int:
        value = self.meta.get("label", -1)
        return int(value) if value is not None else -1

    @property
    def label_name(self) -> Optional[str]:
        return self.meta.get("label_name")

    @property
    def captions(self) -> List[str]:
        caps = self.meta.get("captions") or []
        return [caps] if isinstance(caps, str) else list(caps)


def sample_from_members(key: str, url: str, members: Dict[str, bytes]) -> Sample:
    """Build a Sample from the tar members of one key; raise BadSample when it is unusable."""
    problem = key_problem(key)
    if problem:
        raise BadSample(key, f"unsafe key ({problem})")
    videos = [ext for ext in members if ext in VIDEO_EXTS]
    if len(videos) != 1:
        raise BadSample(key, f"expected one video member ({'|'.join(VIDEO_EXTS)}), found {sorted(members)}")
    if "json" not in members:
        raise BadSample(key, "missing .json metadata")
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample(key, f"metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise BadSample(key, "metadata is not a JSON object")
    video = members[videos[0]]
    if not video:
        raise BadSample(key, "empty video member")
    return Sample(key=key, url=url, video=bytes(video), ext=videos[0], meta=meta)
