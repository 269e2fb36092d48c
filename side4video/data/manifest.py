"""manifest.json: the list of a dataset's shards with sample counts and bytes, plus class names.

Shard URLs in a manifest are relative to the manifest itself, so a dataset folder can be copied or
uploaded whole. Layout:

    {"version": 1,
     "shards": [{"url": "shard-000000.tar", "samples": 32, "bytes": 123456, "keys": ["...", ...]}, ...],
     "samples": 1024, "classes": ["...", ...], "num_classes": 8, "quarantine": [{"path", "reason"}],
     "format": "ssv2", "created": "2026-...",
     make-shards adds: "shuffle": true, "seed": 0, "shard_samples": 1000, "parts": 4, "transcode", "validated"}

A shard's `keys` (its samples' keys in tar order; optional) let a run resumed on another number of
ranks place the samples consumed before without reading a shard (data/remainder.py).
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Optional, Sequence

from side4video.errors import UserError

MANIFEST_NAME = "manifest.json"
VERSION = 1


def build_manifest(
    shards: Sequence[Dict[str, Any]],
    classes: Optional[Sequence[str]],
    quarantine: Sequence[Dict[str, str]],
    fmt: str,
    **extra: Any,
) -> Dict[str, Any]:
    return {
        "version": VERSION,
        "shards": [dict(s) for s in shards],
        "samples": int(sum(s["samples"] for s in shards)),
        "classes": list(classes) if classes is not None else None,
        "num_classes": len(classes) if classes is not None else None,
        "quarantine": list(quarantine),
        "format": fmt,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    }


def dumps(manifest: Dict[str, Any]) -> str:
    """Indented JSON with one line per shard (a shard's keys make it long; a line per key would
    make a Kinetics manifest 240k lines)."""
    shards = manifest["shards"]
    text = json.dumps({**manifest, "shards": [i for i in range(len(shards))]}, indent=1, ensure_ascii=False)
    lines = ",\n  ".join(json.dumps(s, ensure_ascii=False) for s in shards)
    before, _, after = text.partition('"shards": [')
    _, _, after = after.partition("]")
    return (
        f'{before}"shards": [\n  {lines}\n ]{after}\n'
        if shards
        else json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    )


def parse_manifest(text: bytes | str, where: str) -> Dict[str, Any]:
    """Parse and check a manifest; UserError with one line naming what is wrong."""
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: not a JSON manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise UserError(f"{where}: a manifest needs a 'shards' list")
    shards: List[Dict[str, Any]] = []
    for i, entry in enumerate(manifest["shards"]):
        if isinstance(entry, str):
            entry = {"url": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise UserError(f"{where}: shards[{i}] needs a 'url' string")
        samples = entry.get("samples")
        if samples is not None and (not isinstance(samples, int) or samples < 0):
            raise UserError(f"{where}: shards[{i}].samples must be a non-negative integer")
        keys = entry.get("keys")
        if keys is not None and not (
            isinstance(keys, list)
            and all(isinstance(k, str) for k in keys)
            and (samples is None or len(keys) == samples)
        ):
            raise UserError(f"{where}: shards[{i}].keys must list the shard's {samples} sample keys")
        shards.append(entry)
    manifest["shards"] = shards
    classes = manifest.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise UserError(f"{where}: 'classes' must be a list of names")
    return manifest
