#!/usr/bin/env bash
# Rebuild the demo suspects of assets/demo/suspects/ with the project's own `train` command.
# Usage: [WIDTH=16 POOL=0.1 POOL_OUT=1 OUT=dir] bash scripts/train_demo_suspects.sh [NAME ...]
#        (default: all five, the shipped bundle v2 recipe; ~8.5 min each at width 16 on 2 CPU cores)
set -euo pipefail
# WIDTH and POOL (the defense pool's share; POOL_OUT=1 keeps it out of training: a reviewer's own clean data)
# default to the shipped bundle's recipe (bundle v2, issue 13; v1 was WIDTH=8 POOL=0.05 POOL_OUT=0).
OUT=${OUT:-assets/demo/suspects}
WIDTH=${WIDTH:-16}
POOL=${POOL:-0.1}
COMMON="--data demo --model preact_resnet18 --width $WIDTH --epochs 20 --batch-size 128 --lr 0.05 --seed 0 --overwrite"
COMMON="$COMMON --pool-fraction $POOL"
if [ "${POOL_OUT:-1}" = "1" ]; then COMMON="$COMMON --keep-pool-out"; fi
names=${*:-"wanet sig badnets blended clean"}
for name in $names; do
  case $name in
    clean)   backdoor-lens train $COMMON --attack none --out "$OUT/clean" ;;
    badnets) backdoor-lens train $COMMON --attack badnets --poison-rate 0.1 --target 0 --out "$OUT/badnets" ;;
    blended) backdoor-lens train $COMMON --attack blended --attack-param alpha=0.2 --poison-rate 0.1 --target 0 --out "$OUT/blended" ;;
    sig)     backdoor-lens train $COMMON --attack sig --attack-param delta=40 --attack-param f=6 --poison-rate 0.08 --target 0 --out "$OUT/sig" ;;
    wanet)   backdoor-lens train $COMMON --attack wanet --attack-param s=1.0 --attack-param k=4 --poison-rate 0.1 --target 0 --out "$OUT/wanet" ;;
    *) echo "unknown demo suspect $name" >&2; exit 2 ;;
  esac
done
