#!/usr/bin/env bash
# Train across NNODES nodes; run this script once on every node.
#
# Usage: launch/multinode.sh CONFIG.yaml [key=value ...]
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 launch/multinode.sh configs/olmoe-1b-7b.yaml
#
# Environment (defaults in brackets):
#   NNODES       number of nodes [1]
#   NODE_RANK    this node's rank, 0..NNODES-1 [0]
#   NPROC        processes per node, one per GPU [8]
#   MASTER_ADDR  address of node 0, reachable from every node [127.0.0.1]
#   MASTER_PORT  rendezvous port on node 0 [29500]
#   RDZV_ID      rendezvous id shared by the nodes of one job [olmoe]
#   PYTHON       interpreter with olmoe installed [python3]
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,15p' "$0" >&2
  exit 2
fi

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC=${NPROC:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-olmoe}
PYTHON=${PYTHON:-python3}

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" \
  --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC" \
  --rdzv_backend c10d \
  --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  --rdzv_id "$RDZV_ID" \
  -m olmoe.train.cli "$@"
