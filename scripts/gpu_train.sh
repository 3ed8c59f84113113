#!/usr/bin/env bash
# Issue 19 on a lent GPU (the H200 of docs/latent.md): the latent U-Net with the course block
# and two int8-friendlier blocks, and the 107-concept pixel block experiment, all at once, the
# step counts fitted to SECONDS from a 200-step probe of the same runs side by side.
#
#   bash scripts/gpu_train.sh OUT [SECONDS] [DEVICE]   (env: RUNS="name kind norm act batch\n…",
#                                                     NFEAT=64, STATE=name, PROBE=200)
#
# Needs only torch, numpy, safetensors, tokenizers, onnxruntime, tqdm (the package runs from
# the source tree, nothing installed). Its inputs are in $DATA (default runs/gpu, carried):
# latents64.npz (encode-latents), emoji16c.npz (data emoji --concepts classic), their caption
# caches lat_cache.npz / pix_cache.npz (a training run's caption_embeddings.npz) and
# minilm/text.json (the text encoder's record: with the caches, no encoder graph is needed).
# Each run comes back as OUT/NAME.tgz (config, EMA weights, metrics, log); STATE=NAME also
# returns that run's optimiser state in 15 MB parts (for --resume elsewhere).
set -u
OUT=${1:?out}; BUDGET=${2:-400}; DEV=${3:-cuda}
ROOT=$(cd "$(dirname "$0")/.." && pwd); G=$(cd "${DATA:-$ROOT/runs/gpu}" && pwd)
PY=${PY:-python3}
W=/tmp/ddpmgpu; rm -rf $W; mkdir -p $W/site
# the package as ddpm_rt without an install: runtime/ is ddpm_rt, the rest linked in
cp -r "$ROOT/runtime" $W/site/ddpm_rt
for d in training export models; do ln -s "$ROOT/$d" $W/site/ddpm_rt/$d; done
export PYTHONPATH=$W/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
CLI="$PY -m ddpm_rt.cli"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee $OUT/probe.txt
$PY -c "import torch;print('torch',torch.__version__,torch.cuda.is_available())" | tee -a $OUT/probe.txt
PROBE=${PROBE:-200}; MIN=${MINSTEPS:-1000}
# name kind norm act batch
RUNS=${RUNS:-"lat_gn lat group gelu 256
lat_bn lat batch relu 256
lat_ws lat ws relu 256
pix_gn pix group gelu 100
pix_bn pix batch relu 100
pix_ws pix ws relu 100"}
train() { # name kind norm act batch steps dir
  local data cache
  if [ $2 = lat ]; then data=$G/latents64.npz; cache=$G/lat_cache.npz; else data=$G/emoji16c.npz; cache=$G/pix_cache.npz; fi
  mkdir -p $7; cp $cache $7/caption_embeddings.npz
  timeout $TO $CLI train --data $data --text-encoder $G/minilm --out $7 --steps $6 --batch-size $5 \
    --context-gate tanh --n-feat ${NFEAT:-64} --norm $3 --activation $4 --sample-every 0 \
    --checkpoint-every 1000 --no-progress --device $DEV > $7.log 2>&1
}
t0=$(date +%s)
TO=150
while read n k nm a b; do train $n $k $nm $a $b $PROBE $W/probe_$n & done <<< "$RUNS"; wait
for n in $(cut -d' ' -f1 <<< "$RUNS"); do echo "probe $n: $(tail -1 $W/probe_$n.log)"; done | tee -a $OUT/probe.txt
echo "probe took $(( $(date +%s) - t0 )) s" | tee -a $OUT/probe.txt
rate() { sed -n 's/.* at \([0-9.]*\) it\/s.*/\1/p' $W/probe_$1.log; }
# pixel runs: equal steps for the three blocks; latent runs: what fits the budget, <= 100k
grep -q ' pix ' <<< "$RUNS" && P=$($PY -c "r=min(float(x or 0) for x in '$(rate pix_gn) $(rate pix_bn) $(rate pix_ws)'.split());print(max($MIN,min(8000,int(r*$BUDGET*0.5)//500*500)))")
declare -A S
for n in $(grep ' lat ' <<< "$RUNS" | cut -d' ' -f1); do S[$n]=$($PY -c "r=float('$(rate $n)' or 0);print(max($MIN,min(100000,int(r*$BUDGET*0.85)//1000*1000)))"); done
echo "steps: pixel ${P:-}, latent ${S[*]}" | tee -a $OUT/probe.txt
t1=$(date +%s)
TO=$(( BUDGET + 40 ))
while read n k nm a b; do
  if [ $k = lat ]; then s=${S[$n]}; else s=$P; fi
  train $n $k $nm $a $b $s $W/$n &
done <<< "$RUNS"; wait
echo "main took $(( $(date +%s) - t1 )) s" | tee -a $OUT/probe.txt
for n in $(cut -d' ' -f1 <<< "$RUNS"); do
  echo "$n: $(tail -1 $W/$n.log) | $(tail -1 $W/$n/metrics.jsonl)" | tee -a $OUT/probe.txt
  rm -f $W/$n/caption_embeddings.npz
  tar -C $W -czf $OUT/$n.tgz $n/config.json $n/model.safetensors $n/metrics.jsonl $n.log 2>/dev/null
done
[ -n "${STATE:-}" ] && split -b 15M $W/$STATE/train_state.safetensors $OUT/${STATE}_state.part-
ls -la $OUT
