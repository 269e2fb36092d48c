#!/usr/bin/env bash
# Train with several processes on this machine (one per GPU; on a CPU host, CPU ranks with gloo).
#
#   launch/local.sh NPROC CONFIG [key=value ...]
#   LAUNCHER=torchrun launch/local.sh 2 configs/demo.yaml train.output_dir=runs/demo2
#
# LAUNCHER: deepspeed (default) or torchrun. Both start NPROC copies of `side4video train` with
# RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set; side4video.distributed reads them.
# SIDE4VIDEO_PYTHON: the interpreter (default: .venv/bin/python if present, else python3).
# MASTER_PORT: rendezvous port (default 29500).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 2 && $1 =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 NPROC CONFIG [key=value ...]" >&2; exit 2; }
NPROC=$1; shift
if [[ -z ${SIDE4VIDEO_PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then SIDE4VIDEO_PYTHON=.venv/bin/python; else SIDE4VIDEO_PYTHON=python3; fi
fi
PORT=${MASTER_PORT:-29500}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

case ${LAUNCHER:-deepspeed} in
    deepspeed)
        # --num_gpus is the process count; on a CPU host DeepSpeed starts CPU ranks.
        exec "$SIDE4VIDEO_PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "$PORT" --no_local_rank \
            --module side4video.cli train "$@" ;;
    torchrun)
        exec "$SIDE4VIDEO_PYTHON" -m torch.distributed.run --nnodes 1 --nproc-per-node "$NPROC" \
            --master-addr 127.0.0.1 --master-port "$PORT" -m side4video.cli train "$@" ;;
    *) echo "$0: LAUNCHER must be deepspeed or torchrun, got ${LAUNCHER}" >&2; exit 2 ;;
esac
