#!/bin/bash
# B A A B at the H200's speed and at time_scale 4, then fractional GPUs (2 replicas) for both.
out=${OUT:-/tmp/classifier-ab}; mkdir -p $out
run() { # name dir args...
  local name=$1 dir=$2; shift 2
  (cd $dir && PYTHONPATH=$dir timeout 600 /work/main/.venv/bin/python -m load.bench --profile classifier --seconds 20 "$@" --out $out/$name.json > $out/$name.log 2>&1)
  echo "$name $(tail -1 $out/$name.log | cut -c1-330)"
}
for scale in 1 4; do
  run before-s$scale-1 /work/wt-base --time-scale $scale
  run after-s$scale-1 /work/main --time-scale $scale
  run after-s$scale-2 /work/main --time-scale $scale
  run before-s$scale-2 /work/wt-base --time-scale $scale
done
run before-s1-x2 /work/wt-base --time-scale 1 --classifiers-per-gpu 2
run after-s1-x2 /work/main --time-scale 1 --classifiers-per-gpu 2
