#!/usr/bin/env bash
# Multi-node training by hand (no SLURM): run this once on every node, with the same arguments
# except NODE_RANK (0 on the master node).
#
#   launch/multinode.sh NNODES NODE_RANK MASTER_ADDR NPROC_PER_NODE CONFIG [key=value ...]
#
# e.g. two 8-GPU machines, the first at 10.0.0.1:
#   node 10.0.0.1:  launch/multinode.sh 2 0 10.0.0.1 8 configs/experiments/ssv2_vitl14.yaml train.output_dir=/shared/runs/l14
#   node 10.0.0.2:  launch/multinode.sh 2 1 10.0.0.1 8 configs/experiments/ssv2_vitl14.yaml train.output_dir=/shared/runs/l14
#
# train.output_dir and the shards must be reachable from every node (shared file system, or
# http/s3 shards). torchrun starts the local processes and sets RANK, LOCAL_RANK, WORLD_SIZE,
# LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; side4video.distributed reads them and picks gloo's
# network interface (the one that reaches MASTER_ADDR) unless GLOO_SOCKET_IFNAME is set. For NCCL
# on machines with several networks, set NCCL_SOCKET_IFNAME yourself.
# SIDE4VIDEO_PYTHON: the interpreter (default .venv/bin/python if present); MASTER_PORT (29500).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 5 || ! $1 =~ ^[1-9][0-9]*$ || ! $2 =~ ^[0-9]+$ || ! $4 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 NNODES NODE_RANK MASTER_ADDR NPROC_PER_NODE CONFIG [key=value ...]" >&2; exit 2
fi
NNODES=$1 NODE_RANK=$2 MASTER=$3 NPROC=$4; shift 4
[[ $NODE_RANK -lt $NNODES ]] || { echo "$0: NODE_RANK must be below NNODES" >&2; exit 2; }
if [[ -z ${SIDE4VIDEO_PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then SIDE4VIDEO_PYTHON=.venv/bin/python; else SIDE4VIDEO_PYTHON=python3; fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$SIDE4VIDEO_PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --nproc-per-node "$NPROC" --master-addr "$MASTER" --master-port "${MASTER_PORT:-29500}" \
    -m side4video.cli train "$@"
