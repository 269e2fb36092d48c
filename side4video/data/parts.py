"""make-shards as independent parts: the deterministic plan, each part's progress file, the merge.

The plan is decided before anything is written, from the annotation list alone:

    entries (list order) -> duplicate keys set aside (quarantined) -> seeded shuffle (or list
    order with --no-shuffle) -> planned shards of `shard_samples` entries each, numbered 0..U-1
    -> part K of N writes planned shards K, K+N, K+2N, ...

A planned shard is written as `{prefix}-{u:06d}.tar`; when its samples pass the byte cap
(`--shard-size`) it continues in `{prefix}-{u:06d}-1.tar`, `-2`, ... (split at the same sample
for the same bytes), so shard names and contents do not depend on the number of parts: one
process and N parts write the same files. Sizing by sample count keeps the plan independent of
transcoded sizes; the byte cap only splits within a planned shard.

Every finished planned shard is recorded in the part's progress file
`parts/part-KKKK-of-NNNN.json` (written whole or not at all), with each file's bytes, sample
count and keys. A rerun after a crash keeps every recorded shard whose files are still there with
the recorded size (and, for local files, the recorded number of samples) and writes only the
others. The merge reads the N progress files, refuses parts made with other settings, and writes
`manifest.json` in planned-shard order.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from side4video.config import DataConfig
from side4video.data import sources
from side4video.data.annotations import Entry
from side4video.data.manifest import MANIFEST_NAME, build_manifest, dumps
from side4video.errors import UserError
from side4video.logs import get_logger

log = get_logger(__name__)

PARTS_DIR = "parts"


@dataclass(frozen=True)
class Plan:
    units: List[List[Entry]]  # planned shards in order, each a list of entries
    duplicates: List[Dict[str, str]]  # quarantine records of keys listed twice (later ones)

    def of_part(self, part: int, parts: int) -> List[int]:
        return list(range(part, len(self.units), parts))

    def digest(self) -> str:
        """A fingerprint of which keys go to which planned shard, in order."""
        h = hashlib.sha256()
        for unit in self.units:
            h.update("\0".join(e.key for e in unit).encode("utf-8") + b"\1")
        return h.hexdigest()[:16]


def plan_shards(entries: Sequence[Entry], shard_samples: int, seed: int, shuffle: bool) -> Plan:
    """The deterministic plan (module doc): a pure function of the list, the seed and the size."""
    if shard_samples < 1:
        raise UserError(f"--shard-samples {shard_samples}: must be at least 1")
    seen, kept, duplicates = set(), [], []
    for e in entries:
        if e.key in seen:
            duplicates.append({"key": e.key, "path": e.rel, "reason": "duplicate key"})
            continue
        seen.add(e.key)
        kept.append(e)
    if shuffle:
        order = np.random.default_rng([int(seed) % (1 << 63), 0x5B1D]).permutation(len(kept))
        kept = [kept[int(i)] for i in order]
    units = [kept[i : i + shard_samples] for i in range(0, len(kept), shard_samples)]
    return Plan(units, duplicates)


def shard_name(prefix: str, unit: int, piece: int) -> str:
    return f"{prefix}-{unit:06d}.tar" if piece == 0 else f"{prefix}-{unit:06d}-{piece}.tar"


def progress_url(out: str, part: int, parts: int) -> str:
    return f"{out.rstrip('/')}/{PARTS_DIR}/part-{part:04d}-of-{parts:04d}.json"


def _read_json(url: str, data_cfg: Optional[DataConfig]) -> Optional[Dict[str, Any]]:
    if sources.url_kind(url) == "local" and not os.path.isfile(sources.local_path(url)):
        return None
    if sources.url_kind(url) == "s3" and not sources.exists(url, data_cfg):
        return None
    try:
        return json.loads(sources.read_bytes(url, data_cfg))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{url}: not a make-shards progress file ({e})") from None


def settings_difference(a: Dict[str, Any], b: Dict[str, Any]) -> Optional[str]:
    """'name: a vs b' of the first setting that differs (the options before what follows from
    them: the plan, the list's classes and duplicates), or None."""
    derived = ("plan", "planned_shards", "classes", "duplicates")
    for name in sorted(set(a) | set(b), key=lambda n: (n in derived, n)):
        if a.get(name) != b.get(name):
            return f"{name}: {json.dumps(a.get(name))} vs {json.dumps(b.get(name))}"
    return None


def _local_samples(path: str) -> int:
    """Samples of a local tar: distinct member names without their extension (headers only)."""
    with tarfile.open(path) as tar:
        return len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})


def shard_intact(out: str, shard: Dict[str, Any], data_cfg: Optional[DataConfig]) -> bool:
    """A recorded shard is still there as written: its size, and (local) its sample count."""
    url = f"{out.rstrip('/')}/{shard['url']}"
    if sources.size_of(url, data_cfg) != shard["bytes"]:
        return False
    if sources.url_kind(url) == "local":
        try:
            return _local_samples(sources.local_path(url)) == shard["samples"]
        except (tarfile.TarError, OSError):
            return False
    return True


class PartProgress:
    """One part's record of its finished planned shards (module doc)."""

    def __init__(self, out: str, part: int, parts: int, settings: Dict[str, Any], data_cfg: Optional[DataConfig]):
        self.out, self.part, self.parts, self.settings, self.data_cfg = out.rstrip("/"), part, parts, settings, data_cfg
        self.url = progress_url(out, part, parts)
        found = _read_json(self.url, data_cfg)
        self.units: Dict[int, Dict[str, Any]] = {}
        if found is not None:
            diff = settings_difference(found.get("settings", {}), settings)
            if diff is not None:
                raise UserError(
                    f"{self.url} was made with other settings ({diff}): rerun with the same settings "
                    f"or write to another --out"
                )
            self.units = {int(u): rec for u, rec in found.get("units", {}).items()}

    def finished(self, unit: int) -> bool:
        """Recorded, and every file of it still intact (then it is kept, not rewritten)."""
        rec = self.units.get(unit)
        if rec is None:
            return False
        if all(shard_intact(self.out, s, self.data_cfg) for s in rec["shards"]):
            return True
        log.warning("part %d: planned shard %d is recorded but its files changed; writing it again", self.part, unit)
        del self.units[unit]
        return False

    def record(self, unit: int, shards: List[Dict[str, Any]], quarantine: List[Dict[str, str]]) -> None:
        self.units[unit] = {"shards": shards, "quarantine": quarantine}
        self._save(complete=False)

    def complete(self) -> None:
        self._save(complete=True)

    def _save(self, complete: bool) -> None:
        body = {
            "part": self.part,
            "parts": self.parts,
            "complete": complete,
            "settings": self.settings,
            "units": {str(u): self.units[u] for u in sorted(self.units)},
        }
        sources.write_text(self.url, json.dumps(body, ensure_ascii=False), self.data_cfg)


def merge_parts(out: str, data_cfg: Optional[DataConfig] = None) -> Dict[str, Any]:
    """The parts' progress files in `out` -> manifest.json (planned-shard order, quarantine of all
    parts); refuses missing or unfinished parts and parts made with other settings."""
    out = out.rstrip("/")
    try:
        names = [n for n in sources.list_names(f"{out}/{PARTS_DIR}", data_cfg) if n.endswith(".json")]
    except (FileNotFoundError, OSError):
        names = []
    if not names:
        raise UserError(f"{out}: no make-shards parts to merge (no {PARTS_DIR}/part-*.json)")
    found = [_read_json(f"{out}/{PARTS_DIR}/{n}", data_cfg) for n in names]
    first = found[0]
    parts = int(first["parts"])
    for name, body in zip(names, found):
        diff = settings_difference(first["settings"], body["settings"])
        if diff is not None or int(body["parts"]) != parts:
            diff = diff or f"parts: {parts} vs {body['parts']}"
            raise UserError(f"{out}: {names[0]} and {name} were made with other settings ({diff}); refusing to merge")
    by_part = {int(b["part"]): b for b in found}
    missing = [k for k in range(parts) if k not in by_part or not by_part[k]["complete"]]
    if missing:
        raise UserError(
            f"{out}: part(s) {', '.join(map(str, missing))} of {parts} not finished; run them "
            f"(make-shards --part K --parts {parts}) before the merge"
        )
    settings = first["settings"]
    units: Dict[int, Dict[str, Any]] = {}
    for body in found:
        units.update({int(u): rec for u, rec in body["units"].items()})
    if sorted(units) != list(range(settings["planned_shards"])):
        raise UserError(f"{out}: the parts record {len(units)} of {settings['planned_shards']} planned shards")
    shards = [s for u in sorted(units) for s in units[u]["shards"]]
    if not shards:
        raise UserError(f"{out}: no usable video in any part")
    quarantine = list(settings["duplicates"]) + [q for u in sorted(units) for q in units[u]["quarantine"]]
    if quarantine:
        log.warning("%d video(s) quarantined (listed in %s/%s)", len(quarantine), out, MANIFEST_NAME)
    extra = {k: settings[k] for k in ("transcode", "shuffle", "seed", "shard_samples")}
    manifest = build_manifest(
        shards,
        settings["classes"],
        quarantine,
        settings["format"],
        validated=settings["validate"],
        parts=parts,
        **extra,
    )
    sources.write_text(f"{out}/{MANIFEST_NAME}", dumps(manifest), data_cfg)
    return manifest
