"""`side4video` entry point: parse the command line, call the command's function, turn bad
input into one line and exit status 2.

Heavy modules (torch, DALI, DeepSpeed) are imported inside the command functions so that
`--help` and `config` answer instantly.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

from side4video.bench import BENCHES
from side4video.cli.configs import cmd_config, cmd_plan
from side4video.cli.convert import cmd_convert_official
from side4video.cli.data import cmd_inspect, cmd_make_shards, cmd_make_synthetic, cmd_merge_shards
from side4video.cli.demo import cmd_demo
from side4video.cli.run import cmd_eval, cmd_predict, cmd_train
from side4video.cli.submit import cmd_submit
from side4video.errors import RunFailed, UserError

PROG = "side4video"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2) instead of the usage block."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{message} (see {self.prog} --help)")


def cmd_bench(args) -> int:
    from side4video.bench import run_bench

    run_bench(args.what, args.out, config=args.config, overrides=args.overrides, quick=args.quick)
    return 0


# -------------------------------------------------------------------------------------- parser
def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="experiment YAML (e.g. configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Side4Video: memory-efficient image-to-video transfer learning.")
    parser.add_argument("--version", action="version", version=f"{PROG} 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands: Dict[str, Callable] = {}

    def add(name: str, fn: Callable, help: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=f"{help}\n\nexample: {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        commands[name] = fn
        p.set_defaults(_fn=fn)
        return p

    p = add(
        "config",
        cmd_config,
        "print the resolved config (secrets redacted)",
        "side4video config configs/demo.yaml train.lr=0.5",
    )
    _add_config_args(p, required=False)
    p.add_argument("--schema", action="store_true", help="list every key with its type, default and meaning")

    p = add(
        "plan",
        cmd_plan,
        "per-GPU memory plan of a config and whether it fits (no memory allocated)",
        "side4video plan configs/experiments/ssv2_eva02e14.yaml --gpus 32 --gpu-mem 80",
    )
    _add_config_args(p)
    p.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="GPUs in the job (default: slurm.nodes x slurm.gpus_per_node; 0 there: a CPU job); "
        "8 per node unless slurm.gpus_per_node says",
    )
    p.add_argument(
        "--gpu-mem",
        type=float,
        default=None,
        metavar="GB",
        help="memory per GPU in GiB (e.g. 80): gives a fits / does-not-fit verdict",
    )
    p.add_argument(
        "--link-gbs",
        type=float,
        default=None,
        metavar="GB/S",
        help="host link bandwidth for offload traffic (default 25 GB/s, PCIe 4.0 x16)",
    )
    p.add_argument(
        "--source",
        default="1920x1080",
        metavar="WxH",
        help="largest source video: DALI's decode buffers grow to it (default 1920x1080; "
        "make-shards --short-side bounds it)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")

    p = add(
        "convert-official",
        cmd_convert_official,
        "convert a reference Side4Video checkpoint to ours",
        "side4video convert-official side4video_k400_b16.pt converted.pt",
    )
    p.add_argument("input", help="reference checkpoint (.pt/.pth)")
    p.add_argument("output", help="output file (our format)")
    p.add_argument("--frames", type=int, default=8, help="frames the model was trained with (default 8)")

    p = add(
        "make-shards",
        cmd_make_shards,
        "write WebDataset shards + manifest.json from videos and an annotation list",
        "side4video make-shards --list train.csv --format k400 --root /data/k400 --out s3://bucket/k400/train",
    )
    p.add_argument(
        "--list",
        required=True,
        help="annotation file (CSV, JSON or 'path label' lines; retrieval: "
        "also a split list such as MSRVTT_train.9k.csv or test_list.txt)",
    )
    p.add_argument("--format", required=True, choices=["k400", "ssv2", "msrvtt", "msvd", "vatex", "list"])
    p.add_argument(
        "--root",
        required=True,
        help="where the annotation's video paths are relative to: a folder, s3://bucket/prefix or http(s)://",
    )
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--labels", default=None, help="class list: SSv2 labels.json, or a text file (one name per line)")
    p.add_argument("--split", default=None, help="keep only this split (Kinetics CSV 'split' column, MSR-VTT 'split')")
    p.add_argument(
        "--captions",
        default=None,
        help="retrieval caption file for a split list: MSRVTT_data.json, MSVD raw-captions.pkl "
        "(plain data only), VATEX vatex_data.json",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="retrieval formats: quarantine listed videos not found under --root instead of refusing",
    )
    p.add_argument(
        "--shard-samples",
        type=int,
        default=1000,
        help="videos per planned shard (default 1000); the plan decides every shard's videos before writing",
    )
    p.add_argument(
        "--shard-size",
        default="1GB",
        help="byte cap per shard file, e.g. 512MB (default 1GB): a planned shard over it continues in a second file",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle of the list before planning (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the list order (shards then follow the list)")
    p.add_argument("--part", type=int, default=None, help="write only part K (0-based) of --parts; merge-shards after")
    p.add_argument("--parts", type=int, default=1, help="number of parts the plan is split into (default 1)")
    p.add_argument("--workers", type=int, default=1, help="worker processes for probing/transcoding")
    p.add_argument("--validate", action="store_true", help="probe and decode every video; failures are quarantined")
    p.add_argument("--transcode", choices=["none", "vp9", "h264"], default="none")
    p.add_argument("--short-side", type=int, default=0, help="resize the short side when transcoding (e.g. 320)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = add(
        "merge-shards",
        cmd_merge_shards,
        "write manifest.json of a make-shards output from its finished parts (make-shards --part K --parts N)",
        "side4video merge-shards s3://bucket/k400/train",
    )
    p.add_argument("out", help="the parts' common --out (folder or s3://bucket/prefix)")

    p = add(
        "make-synthetic",
        cmd_make_synthetic,
        "generate a motion-only synthetic video dataset (VP9 WebM shards)",
        "side4video make-synthetic data/synth --videos 256 --classes 8",
    )
    p.add_argument("out", help="output folder (train/ and val/ with manifest.json each)")
    p.add_argument("--videos", type=int, default=256, help="training videos")
    p.add_argument("--val-videos", type=int, default=None, help="validation videos (default videos // 4)")
    p.add_argument("--classes", type=int, default=8, help="motion classes (at most 8)")
    p.add_argument("--frames", type=int, default=16, help="frames per video")
    p.add_argument("--size", type=int, default=64, help="frame side in pixels")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-samples", type=int, default=32, help="videos per shard")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--captions",
        action="store_true",
        help="retrieval data: forwards/backwards pairs of one shape, captioned with what moves and "
        "which way ('a red square drifting left'); val captions in held-apart sentence frames",
    )

    p = add(
        "inspect",
        cmd_inspect,
        "stream a shard spec and report samples, classes, sizes and bad samples",
        "side4video inspect 's3://bucket/k400/train/manifest.json' --decode --json",
    )
    p.add_argument("spec", help="shard spec: brace pattern, comma-separated list or manifest URL")
    p.add_argument("--config", default=None, help="config whose data section (decoder, s3, ...) applies")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--decode", action="store_true", help="decode every video through the configured pipeline")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")

    p = add(
        "train",
        cmd_train,
        "train (one process, or one rank of a launcher/SLURM job)",
        "side4video train configs/experiments/ssv2_vitb16.yaml train.lr=5e-4 data.frames=16",
    )
    _add_config_args(p)

    p = add(
        "eval",
        cmd_eval,
        "evaluate a checkpoint (multi-view: eval.crops x eval.clips)",
        "side4video eval configs/demo.yaml checkpoint=runs/demo/side4video eval.crops=3 eval.clips=2",
    )
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")

    p = add(
        "predict",
        cmd_predict,
        "top-k classes of one video file (retrieval exports: captions ranked against it)",
        "side4video predict runs/demo/side4video/export clip.webm\n"
        "         side4video predict runs/demo/retrieval/side4video/export clip.webm "
        "--caption 'a red square drifting left' --caption 'a red square drifting right'",
    )
    p.add_argument("export", help="export folder (model.safetensors + model.json)")
    p.add_argument("video", help="video file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. eval.crops=3)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument(
        "--caption",
        action="append",
        metavar="TEXT",
        help="retrieval exports: a caption to rank against the video (repeat for several)",
    )
    p.add_argument("--json", action="store_true")

    p = add(
        "submit",
        cmd_submit,
        "submit training (or evaluation) to SLURM through submitit",
        "side4video submit configs/experiments/ssv2_eva02e14.yaml slurm.nodes=4 slurm.gpus_per_node=8 --wait",
    )
    _add_config_args(p)
    p.add_argument("--command", choices=["train", "eval"], default="train", help="what the job runs")
    p.add_argument("--wait", action="store_true", help="follow the job to its end; exit with its status")

    p = add("bench", cmd_bench, "benchmarks writing OUT/*.json, *.md and *.png", "side4video bench memory --out bench/")
    p.add_argument(
        "what",
        choices=list(BENCHES),
        help="data: decode clips/s (DALI vs PyAV); memory: methods side by side; vite: EVA ViT-E/14 "
        "training; stream: shard streaming MB/s from a folder, HTTP and S3 (readers vs raw clients); "
        "checkpoint: ViT-E side network checkpoints, save and load on 1 and 2 ranks; fp16: the largest activation "
        "per EVA ViT-E/14 block stored in fp16 against fp16's 65504",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", default=None, help="config to benchmark (default: built-in small setup)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--quick", action="store_true", help="smallest settings (for smoke tests)")

    p = add(
        "demo",
        cmd_demo,
        "synthetic data -> 2-process side network + linear probe on CPU -> results table",
        "side4video demo",
    )
    p.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    p.add_argument("--videos", type=int, default=1024, help="training videos to generate")
    p.add_argument("--fresh", action="store_true", help="delete earlier demo runs first")
    p.add_argument(
        "--task",
        choices=["recognition", "retrieval"],
        default="recognition",
        help="recognition (motion classes) or retrieval (captions naming the motion): OUT/retrieval/",
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # key=value overrides may come after --flags too (argparse stops a nargs='*' positional at
        # the first flag and leaves the rest unknown)
        overrides = [a for a in extra if "=" in a and not a.startswith("-")]
        if extra != overrides or (overrides and not hasattr(args, "overrides")):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if overrides:
            args.overrides = list(args.overrides or []) + overrides
        if not getattr(args, "_fn", None):
            parser.print_help()
            return 2
        return int(args._fn(args) or 0)
    except (UserError, RunFailed) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
