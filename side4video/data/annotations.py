"""Annotation lists in their native formats -> entries (video file, key, label, captions).

Formats:
- k400:   Kinetics CSV `label,youtube_id,time_start,time_end,split` (header optional). Files are
          looked up as {root}/[{split}/][{label}/]{youtube_id}_{start:06d}_{end:06d}.{ext} or
          {root}/[...]{youtube_id}.{ext}.
- ssv2:   Something-Something v2 JSON list of {"id", "template" | "label", ...} plus its
          labels.json ({"class name": "index"}); files {root}/{id}.webm. Test lists without labels
          get label -1.
- msrvtt: MSR-VTT JSON {"videos": [{"video_id", "category", "split"}], "sentences": [{"video_id",
          "caption"}]}, or a list of {"video_id", "caption"}; or, as the reference's retrieval
          loaders read it, a split CSV with a `video_id` column: MSRVTT_train.9k.csv (captions
          from --captions MSRVTT_data.json) or MSRVTT_JSFUSION_test.csv (its `sentence` column:
          the 1k-A test, one caption per video); files {root}/{video_id}.mp4.
- msvd:   JSON {video_id: [captions]} or a list of {"video_id", "caption"}; or the reference's
          {train,val,test}_list.txt (one video id per line) with --captions raw-captions.pkl
          ({video_id: [[word, ...], ...]}, read by a restricted unpickler); files {root}/{video_id}.avi.
- vatex:  JSON list of {"videoID", "enCap": [...]}; or the reference's {train,val,test}_list.txt
          with --captions vatex_data.json ({videoID: {"enCap": [...]}}); files {root}/{videoID}.mp4.
- list:   lines `relative/path label` (label: an index, or a class name); `#` starts a comment.

Keys are the file's path relative to root without its extension, with dots replaced (webdataset
splits a member name at its first dot); a key that would leave the dataset folder is an error.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

from side4video.data import sources
from side4video.data.sample import VIDEO_EXTS, check_key
from side4video.errors import UserError, first_line

FORMATS = ("k400", "ssv2", "msrvtt", "msvd", "vatex", "list")
CAPTION_FORMATS = ("msrvtt", "msvd", "vatex")  # retrieval: captions, no classes


@dataclass
class Entry:
    key: str
    path: Optional[str]  # absolute path of the video file; None when not found
    rel: str  # the name the annotation used (for messages)
    label: int = -1
    label_name: Optional[str] = None
    captions: List[str] = field(default_factory=list)


def make_key(rel: str) -> str:
    """A shard key from a path relative to the root (no extension, no dots, no escaping)."""
    rel = rel.replace("\\", "/")
    base = re.sub(r"\.(%s)$" % "|".join(VIDEO_EXTS), "", rel, flags=re.I)
    check_key(base)
    head, _, leaf = base.rpartition("/")
    leaf = leaf.replace(".", "_")
    return f"{head}/{leaf}" if head else leaf


_s3_listings: Dict[str, FrozenSet[str]] = {}


def _is_file(root: str, rel: str) -> bool:
    """Whether `rel` exists under `root`: a local folder, an s3:// prefix (listed once) or an
    http(s):// base (a HEAD request)."""
    kind = sources.url_kind(root)
    if kind == "local":
        return os.path.isfile(os.path.join(root, rel))
    if kind == "s3":
        if root not in _s3_listings:
            try:
                _s3_listings[root] = frozenset(sources.list_names(root))
            except OSError as e:
                raise UserError(f"--root {root}: cannot list it ({first_line(e)})") from None
        return rel in _s3_listings[root]
    if kind == "http":
        return sources.exists(f"{root.rstrip('/')}/{rel}")
    raise UserError(f"--root {root!r}: a local folder, s3://bucket/prefix or http(s):// URL expected")


def _join(root: str, rel: str) -> str:
    return os.path.join(root, rel) if sources.url_kind(root) == "local" else f"{root.rstrip('/')}/{rel}"


def find_video(root: str, candidates: Sequence[str]) -> Tuple[Optional[str], str]:
    """First existing file among candidates (with or without a video extension): its path or URL."""
    for rel in candidates:
        if _is_file(root, rel):
            return _join(root, rel), rel
        for ext in VIDEO_EXTS:
            if _is_file(root, f"{rel}.{ext}"):
                return _join(root, f"{rel}.{ext}"), f"{rel}.{ext}"
    return None, candidates[0]


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def read_class_list(path: Optional[str]) -> Optional[List[str]]:
    """--labels: SSv2 labels.json ({name: index}), a JSON list, or a text file (one name per line)."""
    if not path:
        return None
    if not os.path.isfile(path):
        raise UserError(f"labels file not found: {path}")
    if path.endswith(".json"):
        data = _read_json(path)
        if isinstance(data, dict):
            by_index = sorted(((int(v), k) for k, v in data.items()), key=lambda t: t[0])
            if [i for i, _ in by_index] != list(range(len(by_index))):
                raise UserError(f"{path}: class indices must be 0..{len(by_index) - 1}")
            return [k for _, k in by_index]
        if isinstance(data, list):
            return [str(x) for x in data]
        raise UserError(f"{path}: expected {{name: index}} or a list of names")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _label_index(name: str, classes: List[str], fixed: bool, where: str) -> int:
    if name in classes:
        return classes.index(name)
    if fixed:
        raise UserError(f"{where}: label {name!r} is not in the labels file")
    classes.append(name)
    return len(classes) - 1


def read_kinetics(list_file: str, root: str, classes: Optional[List[str]], split: Optional[str]):
    with open(list_file, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if rows and rows[0] and rows[0][0].strip().lower() == "label":
        rows = rows[1:]
    rows = [r for r in rows if r and len(r) >= 4]
    if split:
        rows = [r for r in rows if len(r) < 5 or r[4].strip() == split]
    fixed = classes is not None
    names = list(classes) if fixed else sorted({r[0].strip() for r in rows})
    entries = []
    for line, r in enumerate(rows, 1):
        label, yid, start, end = r[0].strip(), r[1].strip(), r[2].strip(), r[3].strip()
        sp = r[4].strip() if len(r) > 4 else ""
        try:
            stem = f"{yid}_{int(float(start)):06d}_{int(float(end)):06d}"
        except ValueError:
            raise UserError(f"{list_file}: line {line}: time_start/time_end must be numbers") from None
        cands = [f"{d}{stem}" for d in _prefixes(sp, label)] + [f"{d}{yid}" for d in _prefixes(sp, label)]
        path, rel = find_video(root, cands)
        idx = _label_index(label, names, True, f"{list_file}: line {line}")
        entries.append(Entry(make_key(stem), path, rel, idx, label))
    return entries, names


def _prefixes(split: str, label: str) -> List[str]:
    out = [""]
    for d in (f"{label}/", f"{label.replace(' ', '_')}/"):
        out.append(d)
        if split:
            out.append(f"{split}/{d}")
    if split:
        out.append(f"{split}/")
    return out


def read_ssv2(list_file: str, root: str, classes: Optional[List[str]]):
    data = _read_json(list_file)
    if not isinstance(data, list):
        raise UserError(f"{list_file}: expected the Something-Something v2 list of videos")
    if classes is None and any("template" in d or "label" in d for d in data if isinstance(d, dict)):
        raise UserError(f"{list_file}: give the class list with --labels labels.json")
    entries = []
    for d in data:
        vid = str(d.get("id", "")).strip()
        if not vid:
            raise UserError(f"{list_file}: an entry without 'id'")
        template = d.get("template") or d.get("label")
        label, name = -1, None
        if template is not None:
            name = template.replace("[", "").replace("]", "")
            if name not in classes:
                raise UserError(f"{list_file}: video {vid}: class {name!r} is not in the labels file")
            label = classes.index(name)
        path, rel = find_video(root, [vid])
        entries.append(Entry(make_key(vid), path, rel, label, name))
    return entries, classes


def _captions_by_video(items, id_key: str, cap_key: str) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for it in items:
        out.setdefault(str(it[id_key]), []).append(str(it[cap_key]))
    return out


def read_msrvtt(list_file: str, root: str, split: Optional[str], captions: Optional[str] = None):
    if list_file.lower().endswith(".csv"):
        return _caption_entries(_msrvtt_csv_rows(list_file, captions), root), None
    data = _read_json(list_file)
    if isinstance(data, dict) and "videos" in data:
        videos = [v for v in data["videos"] if not split or v.get("split") == split]
        caps = _captions_by_video(data.get("sentences", []), "video_id", "caption")
        rows = [(str(v["video_id"]), int(v.get("category", -1)), caps.get(str(v["video_id"]), [])) for v in videos]
    elif isinstance(data, list):
        caps = _captions_by_video(data, "video_id", "caption")
        rows = [(vid, -1, c) for vid, c in caps.items()]
    else:
        raise UserError(f"{list_file}: expected MSR-VTT JSON ({{'videos', 'sentences'}} or a caption list)")
    return _caption_entries(rows, root), None


def _msrvtt_csv_rows(list_file: str, captions: Optional[str]):
    """A split CSV: its `sentence` column (JSFusion 1k-A test) or MSRVTT_data.json's sentences."""
    with open(list_file, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "video_id" not in columns:
            raise UserError(
                f"{list_file}: not an MSR-VTT split CSV (no 'video_id' column; columns: {', '.join(columns) or 'none'})"
            )
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    order = list(dict.fromkeys(r["video_id"] for r in rows if r.get("video_id")))
    if "sentence" in columns:
        by_video: Dict[str, List[str]] = {}
        for r in rows:
            if r.get("video_id"):
                by_video.setdefault(r["video_id"], []).append(r.get("sentence", ""))
        return [(vid, -1, by_video[vid]) for vid in order]
    if not captions:
        raise UserError(f"{list_file} lists videos without captions: give --captions MSRVTT_data.json")
    data = _read_json(captions)
    if not (isinstance(data, dict) and isinstance(data.get("sentences"), list)):
        raise UserError(f"{captions}: not MSRVTT_data.json (expected {{'videos', 'sentences'}})")
    try:
        caps = _captions_by_video(data["sentences"], "video_id", "caption")
        category = {str(v["video_id"]): int(v.get("category", -1)) for v in data.get("videos", [])}
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{captions}: not MSRVTT_data.json (sentences need 'video_id' and 'caption')") from None
    _check_captioned(order, caps, list_file, captions)
    return [(vid, category.get(vid, -1), caps[vid]) for vid in order]


def read_msvd(list_file: str, root: str, captions: Optional[str] = None):
    if not list_file.lower().endswith(".json"):
        order = _read_id_list(list_file)
        caps = _msvd_captions(captions, list_file)
        _check_captioned(order, caps, list_file, captions)
        return _caption_entries([(vid, -1, caps[vid]) for vid in order], root), None
    data = _read_json(list_file)
    if isinstance(data, dict):
        rows = [(str(k), -1, [str(c) for c in (v if isinstance(v, list) else [v])]) for k, v in data.items()]
    elif isinstance(data, list):
        rows = [(vid, -1, c) for vid, c in _captions_by_video(data, "video_id", "caption").items()]
    else:
        raise UserError(f"{list_file}: expected MSVD captions ({{video_id: [captions]}} or a caption list)")
    return _caption_entries(rows, root), None


def _msvd_captions(path: Optional[str], list_file: str) -> Dict[str, List[str]]:
    """raw-captions.pkl ({video_id: [[word, ...], ...]}) or the same as JSON -> {video_id: [caption]}."""
    if not path:
        raise UserError(f"{list_file} lists video ids only: give --captions raw-captions.pkl")
    data = _read_json(path) if path.lower().endswith(".json") else read_plain_pickle(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected {{video_id: [captions]}}, found a {type(data).__name__}")
    out = {}
    for vid, caps in data.items():
        if isinstance(caps, str) or not isinstance(caps, (list, tuple)):
            raise UserError(f"{path}: video {vid!r}: expected a list of captions")
        out[str(vid)] = [c if isinstance(c, str) else " ".join(str(w) for w in c) for c in caps]
    return out


def read_vatex(list_file: str, root: str, captions: Optional[str] = None):
    if not list_file.lower().endswith(".json"):
        order = _read_id_list(list_file)
        if not captions:
            raise UserError(f"{list_file} lists video ids only: give --captions vatex_data.json")
        caps = _vatex_captions(_read_json(captions), captions)
        _check_captioned(order, caps, list_file, captions)
        return _caption_entries([(vid, -1, caps[vid]) for vid in order], root), None
    data = _read_json(list_file)
    if not isinstance(data, list):
        raise UserError(f"{list_file}: expected the VATEX list of {{'videoID', 'enCap'}}")
    return _caption_entries([(vid, -1, c) for vid, c in _vatex_captions(data, list_file).items()], root), None


def _vatex_captions(data: Any, path: str) -> Dict[str, List[str]]:
    """VATEX's English captions: {videoID: {"enCap": [...]}} (the reference's vatex_data.json) or
    the release's list of {"videoID", "enCap"}."""
    items = (
        data.items()
        if isinstance(data, dict)
        else (((d.get("videoID"), d) for d in data if isinstance(d, dict)) if isinstance(data, list) else None)
    )
    if items is None:
        raise UserError(
            f"{path}: expected VATEX captions ({{videoID: {{'enCap': [...]}}}} or a list of {{'videoID', 'enCap'}})"
        )
    out = {}
    for vid, entry in items:
        caps = entry.get("enCap") if isinstance(entry, dict) else None
        if vid is None or not isinstance(caps, list):
            raise UserError(f"{path}: every VATEX entry needs a videoID and an 'enCap' list of captions")
        out[str(vid)] = [str(c) for c in caps]
    return out


def _read_id_list(path: str) -> List[str]:
    """A split list: one video id per line (blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip()]
    if any(len(i.split()) > 1 for i in ids):
        raise UserError(f"{path}: expected one video id per line (the reference's split lists)")
    return list(dict.fromkeys(ids))


def _check_captioned(order: Sequence[str], caps: Dict[str, List[str]], list_file: str, captions) -> None:
    missing = [vid for vid in order if not caps.get(vid)]
    if missing:
        raise UserError(
            f"{list_file} names {len(missing)} videos with no captions in {captions} "
            f"(e.g. {', '.join(repr(m) for m in missing[:3])})"
        )


class _Refused(pickle.UnpicklingError):
    pass


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds only what pickle's own opcodes build; anything needing an import (classes, functions,
    and so every code-running payload) is refused."""

    def find_class(self, module, name):
        raise _Refused(f"refuses {module}.{name}")

    def persistent_load(self, pid):
        raise _Refused("refuses persistent ids")


PLAIN_TYPES = (dict, list, str, tuple)


def read_plain_pickle(path: str):
    """A pickle holding only dict/list/str/tuple; anything else -> UserError, nothing executed.

    Pickle is code: a caption file from elsewhere must not be able to run anything on load."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"captions file not found: {path}") from None
    try:
        data = _PlainDataUnpickler(io.BytesIO(raw)).load()
    except _Refused as e:
        raise UserError(f"{path}: not a plain-data pickle ({e}); only dict, list, str and tuple are accepted") from None
    except Exception as e:  # truncated or not a pickle at all
        raise UserError(f"{path}: not a readable pickle ({type(e).__name__}: {first_line(e)})") from None
    stack = [data]
    while stack:
        item = stack.pop()
        if not isinstance(item, PLAIN_TYPES):
            raise UserError(f"{path}: holds a {type(item).__name__}; only dict, list, str and tuple are accepted")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif not isinstance(item, str):
            stack.extend(item)
    return data


def _caption_entries(rows, root: str) -> List[Entry]:
    entries = []
    for vid, label, caps in rows:
        path, rel = find_video(root, [vid])
        entries.append(Entry(make_key(vid), path, rel, label, None, caps))
    return entries


def read_plain_list(list_file: str, root: str, classes: Optional[List[str]]):
    fixed = classes is not None
    names = list(classes) if fixed else []
    raw = []
    with open(list_file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.rsplit(None, 1)
            rel, label = (parts[0], parts[1]) if len(parts) == 2 else (parts[0], None)
            raw.append((n, rel, label))
    numeric = all(lab is None or lab.lstrip("-").isdigit() for _, _, lab in raw)
    if not fixed and not numeric:
        names = sorted({lab for _, _, lab in raw if lab is not None})
    entries = []
    for n, rel, label in raw:
        where = f"{list_file}: line {n}"
        try:
            key = make_key(rel)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if label is None:
            idx, name = -1, None
        elif numeric:
            idx = int(label)
            name = names[idx] if 0 <= idx < len(names) else None
        else:
            idx, name = _label_index(label, names, fixed, where), label
        path, found = find_video(root, [rel])
        entries.append(Entry(key, path, found, idx, name))
    if numeric and not names:
        top = max((e.label for e in entries), default=-1)
        names = None if top < 0 else [str(i) for i in range(top + 1)]
    return entries, names


def read_annotations(
    fmt: str,
    list_file: str,
    root: str,
    labels: Optional[str] = None,
    split: Optional[str] = None,
    captions: Optional[str] = None,
) -> Tuple[List[Entry], Optional[List[str]]]:
    """Entries and class names (None for caption-only datasets). `captions`: the caption file of
    a caption dataset given as a split list (MSRVTT_data.json, raw-captions.pkl, vatex_data.json)."""
    if fmt not in FORMATS:
        raise UserError(f"annotation format {fmt!r}: allowed {', '.join(FORMATS)}")
    if not os.path.isfile(list_file):
        raise UserError(f"annotation file not found: {list_file}")
    if sources.url_kind(root) == "local" and not os.path.isdir(root):
        raise UserError(f"video root is not a folder: {root}")
    if sources.url_kind(root) not in ("local", "s3", "http"):
        raise UserError(f"video root {root!r}: a local folder, s3://bucket/prefix or http(s):// URL expected")
    if captions and fmt not in CAPTION_FORMATS:
        raise UserError(f"--captions applies to the caption formats ({', '.join(CAPTION_FORMATS)}), not {fmt}")
    if captions and not os.path.isfile(captions):
        raise UserError(f"captions file not found: {captions}")
    classes = read_class_list(labels)
    if fmt == "k400":
        entries, names = read_kinetics(list_file, root, classes, split)
    elif fmt == "ssv2":
        entries, names = read_ssv2(list_file, root, classes)
    elif fmt == "msrvtt":
        entries, names = read_msrvtt(list_file, root, split, captions)
    elif fmt == "msvd":
        entries, names = read_msvd(list_file, root, captions)
    elif fmt == "vatex":
        entries, names = read_vatex(list_file, root, captions)
    else:
        entries, names = read_plain_list(list_file, root, classes)
    for e in entries:
        if e.label_name is None and names and 0 <= e.label < len(names):
            e.label_name = names[e.label]
    return entries, names
