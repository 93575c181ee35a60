#!/usr/bin/env bash
# Train every semantic architecture on the built-in shapes data and print the README table.
# Two lanes run side by side, one torch thread each (so each model gets one of the 2 cores).
# Usage: bash scripts/train_zoo.sh [RUNS_DIR]   (about 35 minutes on a 2-core machine)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/zoo}
PW=${PIXELWISE:-.venv/bin/pixelwise}
DATA=$RUNS/data
[ -f "$DATA/classes.json" ] || $PW data synth --out "$DATA" --num-train 400 --num-val 100 --size 128 --seed 0
lane() {
  for name in "$@"; do
    $PW train --config "configs/${name}_shapes.yaml" --data "$DATA" --out "$RUNS/$name" --threads 1 --quiet \
      > "$RUNS/$name.log" 2>&1 || echo "$name failed: see $RUNS/$name.log"
  done
}
lane fcn8s pspnet deeplabv3plus_effnet_pretrained deeplabv3plus &
lane segnet unet deeplabv3 deeplabv3plus_effnet_scratch &
wait
.venv/bin/python scripts/zoo_table.py "$RUNS"
