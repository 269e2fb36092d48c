"""Data commands: `make-shards`, `merge-shards`, `make-synthetic`, `inspect`."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Dict, Iterator

from side4video.cli.common import print_json
from side4video.logs import LOGGER_NAME


@contextlib.contextmanager
def task_log() -> Iterator[None]:
    """The command's progress and quarantine lines on stderr (the task's log), for its duration."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    level = logger.level
    logger.addHandler(handler)
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def cmd_make_shards(args) -> int:
    with task_log():
        return _make_shards(args)


def _make_shards(args) -> int:
    from side4video.data.shards import make_shards

    manifest = make_shards(
        list_file=args.list,
        fmt=args.format,
        root=args.root,
        out=args.out,
        labels=args.labels,
        split=args.split,
        shard_size=args.shard_size,
        workers=args.workers,
        validate=args.validate,
        transcode=args.transcode,
        short_side=args.short_side,
        progress=not args.no_progress,
        captions=args.captions,
        allow_missing=args.allow_missing,
        shard_samples=args.shard_samples,
        seed=args.seed,
        shuffle=not args.no_shuffle,
        part=args.part,
        parts=args.parts,
    )
    n = sum(s["samples"] for s in manifest["shards"])
    where = f"part {args.part} of {args.parts}: " if args.part is not None else ""
    print(
        f"{where}wrote {len(manifest['shards'])} shards, {n} samples, {len(manifest['quarantine'])} quarantined "
        f"-> {args.out}"
    )
    if args.part is not None:
        print(f"when all {args.parts} parts are done: side4video merge-shards {args.out}")
    return 0


def cmd_merge_shards(args) -> int:
    from side4video.data.parts import merge_parts

    with task_log():
        manifest = merge_parts(args.out)
    print(
        f"merged {manifest['parts']} part(s): {len(manifest['shards'])} shards, {manifest['samples']} samples, "
        f"{len(manifest['quarantine'])} quarantined -> {args.out}/manifest.json"
    )
    return 0


def cmd_make_synthetic(args) -> int:
    from side4video.data.synthetic import make_synthetic

    report = make_synthetic(
        args.out,
        videos=args.videos,
        classes=args.classes,
        val_videos=args.val_videos,
        frames=args.frames,
        size=args.size,
        fps=args.fps,
        seed=args.seed,
        shard_samples=args.shard_samples,
        workers=args.workers,
        captions=args.captions,
    )
    kind = "captioned forwards/backwards pairs" if args.captions else "classes"
    print(f"wrote {report['train']} train and {report['val']} val videos of {args.classes} {kind} -> {args.out}")
    return 0


def cmd_inspect(args) -> int:
    from side4video.config import load_config
    from side4video.data.inspect import inspect_shards
    from side4video.engine.factory import eval_batch_size

    cfg = load_config(args.config, args.overrides)
    report = inspect_shards(
        args.spec,
        cfg.data,
        batch_size=eval_batch_size(cfg),
        decode=args.decode,
        progress=not args.json,
    )
    if args.json:
        print_json(report)
    else:
        print(format_report(report))
    return 0


def format_report(report: Dict[str, Any]) -> str:
    lines = [
        f"spec:      {report['spec']}",
        f"shards:    {report['shards']}",
        f"samples:   {report['samples']}"
        + (f" (manifest: {report['manifest_samples']})" if report.get("manifest_samples") is not None else ""),
        f"bytes:     {report['bytes']:,}",
        f"codecs:    {', '.join(f'{k} x{v}' for k, v in report['codecs'].items()) or '-'}",
    ]
    for key in ("frames", "width", "height"):
        r = report.get(key)
        lines.append(f"{key + ':':<10} {r['min']}..{r['max']}" if r else f"{key + ':':<10} -")
    lines.append(f"classes:   {len(report['classes'])}")
    for name, n in report["classes"].items():
        lines.append(f"  {n:>7}  {name}")
    mixing = report.get("mixing")
    if mixing:
        d, share = mixing["distinct_classes"], mixing["largest_class_share"]
        lines.append(
            f"mixing:    {d['min']}..{d['max']} classes per shard (mean {d['mean']}); largest class "
            f"{share['min']:.0%}..{share['max']:.0%} of a shard (mean {share['mean']:.0%})"
        )
        if mixing["nearly_single_class"]:
            lines.append(
                "warning: shards are nearly single-class: write them with make-shards (shuffled) or "
                "keep data.interleave and data.shuffle_buffer large enough to mix batches"
            )
    checked = "decoded" if report["decoded"] else "probed"
    lines.append(f"bad samples ({checked}): {len(report['bad_samples'])}")
    for key in report["bad_samples"]:
        lines.append(f"  {key}: {report['bad_reasons'].get(key, '')}")
    if report["damaged_shards"]:
        lines.append(f"damaged shards: {len(report['damaged_shards'])}")
        for url, reason in report["damaged_shards"].items():
            lines.append(f"  {url}: {reason}")
    return "\n".join(lines)
