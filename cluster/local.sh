#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine, laid out like the production clusters: a head node with no CPUs
# or GPUs (Serve's control plane and HTTP entry only), a CPU worker node for the Ingress and Preprocessor replicas,
# and two GPU worker nodes that declare one logical GPU each (separate raylets with their own ports, resources and a
# custom resource naming them); then serve_config.yaml deployed on it. Like every production node, each starts Ray
# with HAProxy: the head's HAProxy on 127.0.0.1:8000 forwards to the ingress replicas on the CPU node (one HTTP
# entry, on the head, because the nodes share one machine and so its port 8000).
#
# The GCS keeps its state in a local Redis (Debian's redis-server), as every production cluster file does, so the
# head can die and come back with the cluster's state; `GCS_FT=0 cluster/local.sh up` runs it in memory instead.
#
#   cluster/local.sh up | down | status | stop-worker N | start-worker N | kill-gcs | kill-head | restart-head
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=.venv/bin/ray
SERVE=.venv/bin/serve
PY=.venv/bin/python
# Like the production clusters: gRPC between replicas and HAProxy in front of them (whatever the caller's environment).
export RAY_AUTH_MODE=token RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1
export RAY_SERVE_HAPROXY_BINARY_PATH="$PWD/.venv/bin/waterbirds-haproxy"  # client addresses for fair admission
CONFIG=/tmp/waterbirds-local-cluster.yaml
REDIS_DIR=/tmp/waterbirds-redis
REDIS_PORT=6380

start_redis() {  # the GCS's external store: password-protected, on loopback, appending every write to its log
  command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install redis-server" >&2; exit 1; }
  mkdir -p "$REDIS_DIR"
  [ -s "$REDIS_DIR/password" ] || (umask 077; $PY -c 'import secrets; print(secrets.token_hex(24))' > "$REDIS_DIR/password")
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --requirepass "$(cat "$REDIS_DIR/password")" \
    --dir "$REDIS_DIR" --appendonly yes --save "" --daemonize yes --pidfile "$REDIS_DIR/redis.pid" \
    --logfile "$REDIS_DIR/redis.log"
  echo "Redis started on 127.0.0.1:$REDIS_PORT"
}

stop_redis() {
  if [ -f "$REDIS_DIR/redis.pid" ]; then kill "$(cat "$REDIS_DIR/redis.pid")" 2>/dev/null || true; fi
  rm -rf "$REDIS_DIR"
}

start_head() {  # Serve's controller and HTTP entry; with Redis, a head started again recovers the cluster's state
  local redis=()
  if [ -s "$REDIS_DIR/password" ]; then
    export RAY_REDIS_ADDRESS="127.0.0.1:$REDIS_PORT"
    redis=(--redis-password="$(cat "$REDIS_DIR/password")")
  fi
  $RAY start --head --port=6379 --num-cpus=0 --num-gpus=0 --resources='{"head_node": 1}' "${redis[@]}" \
    --dashboard-host=127.0.0.1 --metrics-export-port=8080 --min-worker-port=10002 --max-worker-port=10999 \
    --disable-usage-stats >/dev/null
  unset RAY_REDIS_ADDRESS
}

kill_head() {  # SIGKILL every process of the head node: GCS, raylet and its workers (Serve's controller), dashboard, HAProxy
  $PY - <<'PY'
import psutil
head = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].endswith("/raylet")
        and any("head_node" in a for a in p.info["cmdline"])]
victims = set(head)
for raylet in head:
    victims.update(raylet.children(recursive=True))
for p in psutil.process_iter(["cmdline", "name"]):
    line = " ".join(p.info["cmdline"] or [])
    if (line.split(" ")[0].endswith("/gcs_server") or "dashboard/dashboard.py" in line or "log_monitor.py" in line
            or "ray.util.client.server" in line or "autoscaler/_private/monitor.py" in line
            or p.info["name"] == "haproxy"):
        victims.add(p)
for p in victims:
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass
psutil.wait_procs(list(victims), timeout=30)
print(f"head killed ({len(victims)} processes)")
PY
}

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
    stop_redis
    [ "${GCS_FT:-1}" = 0 ] || start_redis
    start_head
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
  down) $PY -c 'import os; from serve_app.run import stop_ray; stop_ray(dict(os.environ), force=True)'; stop_redis ;;
  kill-gcs) pkill -KILL -f -- "/gcs_server " && echo "GCS killed" ;;
  kill-head) kill_head ;;
  restart-head)
    # `ray start --head` refuses to start where it finds the last cluster's address and a raylet pointing at it:
    # here the worker nodes' raylets, on this same machine. A real head runs on a machine of its own.
    rm -f /tmp/ray/ray_current_cluster
    start_head
    echo "head node started again" ;;
  status) $RAY status; $SERVE status ;;
  stop-worker) stop_worker "${2:?which worker: 1 or 2}" ;;
  start-worker) start_worker "${2:?which worker: 1 or 2}" ;;
  *) echo "usage: $0 up | down | status | stop-worker N | start-worker N | kill-gcs | kill-head | restart-head" >&2; exit 2 ;;
esac
