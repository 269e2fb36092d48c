"""`side4video config` and `side4video plan`: what a config resolves to."""

from __future__ import annotations

from typing import Dict

from side4video.cli.common import load_run_config, print_json
from side4video.errors import UserError


def cmd_config(args) -> int:
    from side4video.config import describe_schema, load_config, to_yaml

    if args.schema:
        print(describe_schema())
        return 0
    if not args.config:
        raise UserError("config: give a CONFIG file (or --schema)")
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _source_size(text: str):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        width = height = 0
    if width <= 0 or height <= 0:
        raise UserError(f"plan: --source {text!r}: give the largest source video as WIDTHxHEIGHT, e.g. 1920x1080")
    return width, height


def cmd_plan(args) -> int:
    from side4video.engine.plan import DEFAULT_LINK_GBS, plan

    if args.gpus is not None and args.gpus < 1:
        raise UserError(f"plan: --gpus {args.gpus}: give at least 1 GPU")
    if args.gpu_mem is not None and args.gpu_mem <= 0:
        raise UserError(f"plan: --gpu-mem {args.gpu_mem}: give the memory of one GPU in GiB, e.g. 80")
    if args.link_gbs is not None and args.link_gbs <= 0:
        raise UserError(f"plan: --link-gbs {args.link_gbs}: give a bandwidth in GB/s, e.g. 25")
    report = plan(
        load_run_config(args),
        gpus=args.gpus,
        gpu_mem_gib=args.gpu_mem,
        link_gbs=args.link_gbs or DEFAULT_LINK_GBS,
        source=_source_size(args.source),
    )
    if args.json:
        print_json(report)
    else:
        print(format_plan(report))
    return 0


def _millions(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _layers(taps) -> str:
    if len(taps) > 6:
        step = taps[1] - taps[0]
        if all(b - a == step for a, b in zip(taps, taps[1:])):
            return f"{taps[0]}, {taps[1]}, ..., {taps[-1]} ({len(taps)})"
    return ", ".join(str(t) for t in taps)


def _table(rows) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def format_plan(report: Dict) -> str:
    """The plan as aligned text: the model, then what one GPU (or CPU rank) holds, and the verdict."""
    m = report["memory"]
    rows = [
        ("task", report["task"]),
        ("method", report["method"]),
        (
            "backbone",
            f"{report['backbone']} ({report['backbone_family']}): {report['backbone_layers']} blocks, width "
            f"{report['backbone_width']}, patch {report['patch_size']}",
        ),
        (
            "input",
            f"{report['frames']} frames x {report['image_size']} px ({report['patches_per_frame']} patches/frame), "
            f"{report['batch_size']} clips per micro-batch",
        ),
        (
            "precision",
            f"storage {report['storage_precision']}, compute {report['compute_precision']}, "
            f"training {report['train_precision']}",
        ),
    ]
    if report["side_blocks"]:
        rows += [
            (
                "side network",
                f"{report['side_variant']} variant, d={report['side_dim']}, {report['side_blocks']} "
                f"blocks, checkpointing {'on' if report['side_checkpointing'] else 'off'}",
            ),
            ("tap layers", _layers(report["tap_layers"])),
        ]
    rows += [
        ("backbone params", _millions(report["backbone_params"])),
        ("side params", _millions(report["side_params"])),
    ]
    if report.get("adapter_params"):
        rows.append(("adapter params", _millions(report["adapter_params"])))
    if report.get("text_params"):
        rows.append(("text tower params", _millions(report["text_params"])))
    rows += [
        ("head params", f"{report['head_params']:,}"),
        ("trainable params", _millions(report["trainable_params"])),
        (
            "backbone weights",
            f"{_gib(m['backbone_weights_bytes'])} ({report['storage_precision']}; fp32 would be "
            f"{_gib(m['backbone_weights_bytes_by_precision']['fp32'])})",
        ),
        (
            "trained weights+grads+optim",
            _gib(
                m["trainable_weights_bytes"]
                + m["gradients_bytes"]
                + m["master_weights_bytes"]
                + m["optimizer_state_bytes"]
            ),
        ),
    ]
    if "kept_taps_bytes_per_clip" in m:
        rows.append(("kept taps per clip", _gib(m["kept_taps_bytes_per_clip"])))
    if m.get("frozen_text_weights_bytes"):
        rows.append(("frozen text tower", _gib(m["frozen_text_weights_bytes"])))
    rows.append(("weights total", _gib(m["weights_total_bytes"])))
    if report["plan"] is None:  # retrieval: weights only
        return _table(rows)
    return _table(rows) + "\n\n" + format_rank_plan(report["plan"])


def _host_line(h: Dict) -> str:
    """The node's host memory: ranks x (offloaded partitions + the process baseline)."""
    return (
        f"{_gib(h['total'])} = {h['ranks']} ranks x ({_gib(h['frozen_partition_per_rank'])} frozen partition + "
        f"{_gib(h['trained_state_per_rank'])} trained state offloaded + {_gib(h['process_baseline_per_rank'])} "
        f"process baseline)"
    )


def format_rank_plan(p: Dict) -> str:
    z, fz, st, act = p["zero"], p["frozen_weights"], p["trained_state"], p["activations"]
    unit = "GPU" if p["device"] == "cuda" else "CPU rank"
    offload = [
        f"offload_param {z['offload_param']}" if z["offload_param"] != "none" else "",
        f"offload_optimizer {z['offload_optimizer']}" if z["offload_optimizer"] != "none" else "",
    ]
    head = (
        f"per {unit}: {p['ranks']} {unit}s ({p['ranks_per_node']} per node), ZeRO-{z['stage']}"
        + "".join(f", {o}" for o in offload if o)
        + f", micro-batch {p['micro_batch']} clips"
    )
    frozen = f"{_gib(fz['resident'])} resident"
    if z["stage"] == 3 and fz["total"]:
        where = "host" if z["offload_param"] != "none" else "device"
        frozen += (
            f" (partition {_gib(fz['partition'])} on the {where}, {_gib(fz['persistent'])} kept whole), "
            f"+ gathered block {_gib(fz['gathered_unit'])} + prefetch bucket {_gib(fz['prefetch'])}"
        )
    rows = [
        ("frozen weights", frozen),
        (
            "trained weights",
            _gib(st["weights"]) + (f" + gathered while used {_gib(st['gathered'])}" if st["gathered"] else ""),
        ),
        ("gradients", _gib(st["gradients"])),
        ("fp32 master copies", _gib(st["master"])),
        ("optimizer state", _gib(st["optimizer_state"]) + (" (offloaded)" if z["offload_optimizer"] != "none" else "")),
        ("reduce bucket", f"{_gib(st['reduce_bucket'])} (reduce_bucket_size {z['reduce_bucket_size']:,} elements)"),
        ("optimizer step", f"{_gib(st['step_temporaries'])} of temporaries (after the backward)"),
        (
            "activations, step peak",
            f"{_gib(act['step_peak'])} (kept for backward {_gib(act['kept'])}, {_gib(act['kept_per_clip'])} per clip)",
        ),
    ]
    if "side_kept_per_clip" in act:
        rows += [
            (
                "  side network per clip",
                f"{_gib(act['side_kept_per_clip'])} kept without checkpointing, "
                f"{_gib(act['side_kept_per_clip_checkpointed'])} with",
            ),
            ("  kept taps per clip", _gib(act["kept_taps_per_clip"])),
        ]
    rows.append(
        ("  one backbone block", f"{_gib(act['backbone_block_working_set'])} working set at {p['micro_batch']} clips")
    )
    dali = p["dali_buffers"]
    rows.append(
        (
            "DALI decode buffers",
            f"{_gib(dali['train'] + dali['val'])} (train {_gib(dali['train'])}, val "
            f"{_gib(dali['val'])}; {dali['source']} sources, outside torch)",
        )
    )
    rows.append((f"peak per {unit}", _gib(p["peak_per_rank"])))
    traffic = p["offload_traffic_per_step"]
    rows += [
        ("host memory per node", _host_line(p["host_per_node"])),
        (
            "offload traffic per step",
            f"{traffic['bytes'] / 1e9:.2f} GB per {unit}: {traffic['seconds']:.2f} s at {traffic['link_gbs']:g} GB/s",
        ),
    ]
    verdict = p.get("verdict")
    if verdict:
        usable = verdict["usable_bytes"]
        if verdict["fits"]:
            rows.append(
                (
                    "verdict",
                    f"fits: {_gib(p['peak_per_rank'])} of {_gib(usable)} usable "
                    f"({verdict['memory_gib']:g} GiB less {100 * verdict['headroom']:.0f}% headroom)",
                )
            )
        else:
            options = verdict.get("what_would_fit") or []
            rows.append(
                (
                    "verdict",
                    f"does NOT fit: {_gib(p['peak_per_rank'])} > {_gib(usable)} usable "
                    f"({verdict['memory_gib']:g} GiB less {100 * verdict['headroom']:.0f}% headroom)",
                )
            )
            for o in options:
                rows.append(("  would fit", f"{o['change']}: {_gib(o['peak_per_rank'])}"))
            if not options:
                rows.append(("  would fit", "none of: checkpointing, ZeRO-3, offloading, a smaller batch"))
    return head + "\n" + _table(rows)
