#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine, laid out like the production clusters: a head node with no CPUs
# or GPUs (Serve's control plane and HTTP entry only), a CPU worker node for the Ingress and Preprocessor replicas,
# and two GPU worker nodes that declare one logical GPU each (separate raylets with their own ports, resources and a
# custom resource naming them); then serve_config.yaml deployed on it. Like every production node, each starts Ray
# with HAProxy: the head's HAProxy on 127.0.0.1:8000 forwards to the ingress replicas on the CPU node (one HTTP
# entry, on the head, because the nodes share one machine and so its port 8000).
#
#   cluster/local.sh up | down | status | stop-worker N | start-worker N
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=.venv/bin/ray
SERVE=.venv/bin/serve
PY=.venv/bin/python
# Like the production clusters: gRPC between replicas and HAProxy in front of them (whatever the caller's environment).
export RAY_AUTH_MODE=token RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1
CONFIG=/tmp/waterbirds-local-cluster.yaml

head_address() {
  $PY - <<'PY'
import ray._private.services as s
print(f"{s.get_node_ip_address()}:6379")
PY
}

start_cpu_worker() {  # the Ingress and Preprocessor replicas: logical CPUs, no GPU
  $RAY start --address="$(head_address)" --num-cpus=6 --num-gpus=0 --resources='{"cpu_node": 1}' \
    --node-manager-port=62380 --object-manager-port=62390 --metrics-export-port=8090 \
    --dashboard-agent-listen-port=52360 --dashboard-agent-grpc-port=52370 --runtime-env-agent-port=52380 \
    --min-worker-port=13000 --max-worker-port=13999 --disable-usage-stats >/dev/null
  echo "CPU worker node started"
}

start_worker() {  # one GPU node: 1 logical GPU and no CPUs, so that only a Classifier replica fits there
  local n=$1
  $RAY start --address="$(head_address)" --num-cpus=0 --num-gpus=1 --resources="{\"gpu_node_$n\": 1}" \
    --node-manager-port=6238$n --object-manager-port=6239$n --metrics-export-port=808$n \
    --dashboard-agent-listen-port=5236$n --dashboard-agent-grpc-port=5237$n --runtime-env-agent-port=5238$n \
    --min-worker-port=1${n}000 --max-worker-port=1${n}999 --disable-usage-stats >/dev/null
  echo "GPU worker node $n started"
}

stop_worker() {  # stop one node's raylet; its worker processes exit with it
  local n=$1
  pkill -TERM -f -- "--node_manager_port=6238$n" || true
  echo "GPU worker node $n stopped"
}

case "${1:-}" in
  up)
    [ -f ~/.ray/auth_token ] || [ -n "${RAY_AUTH_TOKEN:-}" ] || $RAY get-auth-token --generate >/dev/null
    $RAY start --head --port=6379 --num-cpus=0 --num-gpus=0 --resources='{"head_node": 1}' \
      --dashboard-host=127.0.0.1 --metrics-export-port=8080 --min-worker-port=10002 --max-worker-port=10999 \
      --disable-usage-stats >/dev/null
    echo "head node started (no CPUs or GPUs: no replica lands there)"
    start_cpu_worker
    start_worker 1
    start_worker 2
    $PY - "$CONFIG" <<'PY'
import sys, yaml
config = yaml.safe_load(open("serve_config.yaml"))
config["http_options"]["host"] = "127.0.0.1"
config["proxy_location"] = "HeadOnly"
# The GPU nodes advertise no CPUs (they share this machine's cores anyway), so a Preprocessor can never take
# the CPU a Classifier needs there; the Classifier asks for its GPU only.
# Two GPU nodes: keep a Classifier on each, so that losing a node never leaves none (the file's min is 1, for
# machines with one GPU).
for d in config["applications"][0]["deployments"]:
    if d["name"] == "Classifier":
        d["ray_actor_options"]["num_cpus"] = 0
        d["autoscaling_config"]["min_replicas"] = 2
open(sys.argv[1], "w").write(yaml.safe_dump(config, sort_keys=False))
PY
    $SERVE deploy "$CONFIG"
    echo "deployed serve_config.yaml; http://127.0.0.1:8000  (cluster/local.sh status)"
    ;;
  down) $PY -c 'import os; from serve_app.run import stop_ray; stop_ray(dict(os.environ), force=True)' ;;
  status) $RAY status; $SERVE status ;;
  stop-worker) stop_worker "${2:?which worker: 1 or 2}" ;;
  start-worker) start_worker "${2:?which worker: 1 or 2}" ;;
  *) echo "usage: $0 up | down | status | stop-worker N | start-worker N" >&2; exit 2 ;;
esac
