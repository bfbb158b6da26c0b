#!/usr/bin/env bash
# Train on one node with NPROC processes.
#
# Usage: launch/torchrun.sh CONFIG.yaml [key=value ...]
#   NPROC=8 launch/torchrun.sh configs/olmoe-1b-7b.yaml parallelism.ep=8
#
# Environment (defaults in brackets):
#   NPROC        processes on this node, one per GPU [8]
#   MASTER_PORT  rendezvous port on localhost [29500]
#   PYTHON       interpreter with olmoe installed [python3]
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi

NPROC=${NPROC:-8}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python3}

exec "$PYTHON" -m torch.distributed.run \
  --standalone \
  --nproc_per_node "$NPROC" \
  --master_port "$MASTER_PORT" \
  -m olmoe.train.cli "$@"
