#!/usr/bin/env bash
# The main job end to end on this machine, until a default model ships in models/:
# make a labelled data set, train a U-Net, export a bundle, generate with it (twice, to show
# a seed reproduces its image byte for byte).
set -euo pipefail
work=${1:-runs/quickstart}
steps=${STEPS:-300}
mkdir -p "$work"
ddpm-rt data shapes --out "$work/shapes.npz" --num 2000
if [ -f "$work/ckpt/config.json" ]; then
  ddpm-rt train --data "$work/shapes.npz" --out "$work/ckpt" --steps "$steps" --resume
else
  ddpm-rt train --data "$work/shapes.npz" --out "$work/ckpt" --steps "$steps"
fi
ddpm-rt export "$work/ckpt" --out "$work/bundle"
ddpm-rt --model "$work/bundle" --prompt "red circle" --seed 1 --num 16 --out "$work/red_circle.png" --scale 4
ddpm-rt --model "$work/bundle" --prompt "red circle" --seed 1 --num 16 --out "$work/red_circle_again.png" --scale 4
cmp "$work/red_circle.png" "$work/red_circle_again.png" && echo "same seed, same bytes: $work/red_circle.png"
ddpm-rt --model "$work/bundle" --prompt "blue square" --sampler ddim --steps 25 --seed 1 --num 16 \
  --out "$work/blue_square_ddim25.png" --scale 4
