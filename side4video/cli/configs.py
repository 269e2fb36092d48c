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


def cmd_plan(args) -> int:
    from side4video.engine.plan import plan

    report = plan(load_run_config(args))
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


def format_plan(report: Dict) -> str:
    """The plan as an aligned text table."""
    m = report["memory"]
    rows = [
        ("method", report["method"]),
        ("backbone", f"{report['backbone']} ({report['backbone_family']}): {report['backbone_layers']} blocks, width "
                     f"{report['backbone_width']}, patch {report['patch_size']}"),
        ("input", f"{report['frames']} frames x {report['image_size']} px ({report['patches_per_frame']} patches/frame)"),
        ("precision", f"storage {report['storage_precision']}, compute {report['compute_precision']}"),
    ]
    if report["side_blocks"]:
        rows += [("side network", f"{report['side_variant']} variant, d={report['side_dim']}, {report['side_blocks']} blocks"),
                 ("tap layers", _layers(report["tap_layers"]))]
    rows += [
        ("backbone params", _millions(report["backbone_params"])),
        ("side params", _millions(report["side_params"])),
    ]
    if report.get("adapter_params"):
        rows.append(("adapter params", _millions(report["adapter_params"])))
    rows += [
        ("head params", f"{report['head_params']:,}"),
        ("trainable params", _millions(report["trainable_params"])),
        ("backbone weights", f"{_gib(m['backbone_weights_bytes'])} ({report['storage_precision']}; fp32 would be "
                             f"{_gib(m['backbone_weights_bytes_by_precision']['fp32'])})"),
        ("trained weights+grads+optim", _gib(m["trainable_weights_bytes"] + m["gradients_bytes"] + m["master_weights_bytes"]
                                            + m["optimizer_state_bytes"])),
    ]
    if "kept_taps_bytes_per_clip" in m:
        rows.append(("kept taps per clip", _gib(m["kept_taps_bytes_per_clip"])))
    rows.append(("weights total", _gib(m["weights_total_bytes"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
