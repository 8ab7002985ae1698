#!/usr/bin/env bash
# A throwaway 3-master Redis Cluster on 127.0.0.1 for tests (no persistence).
#
#   scripts/redis-cluster.sh start   # start it (idempotent), print the node list
#   scripts/redis-cluster.sh stop    # stop it and remove its files
#   scripts/redis-cluster.sh nodes   # print the node list
#   scripts/redis-cluster.sh status  # exit 0 when the cluster is up and ready
#
# Then run the cluster tests with
#   DTM_TEST_REDIS_CLUSTER=$(scripts/redis-cluster.sh nodes) cargo test -p dtm-store --test redis
# and the scenario tests on the cluster with
#   DTM_TEST_STORE=redis STORE_HOST=$(scripts/redis-cluster.sh nodes) cargo test -p dtm-server
#
# Ports: REDIS_CLUSTER_PORTS (default "7001 7002 7003"); files: REDIS_CLUSTER_DIR
# (default /tmp/dtm-redis-cluster).
set -euo pipefail

ports=(${REDIS_CLUSTER_PORTS:-7001 7002 7003})
dir=${REDIS_CLUSTER_DIR:-/tmp/dtm-redis-cluster}

nodes() {
  local out=()
  for p in "${ports[@]}"; do out+=("127.0.0.1:$p"); done
  (IFS=,; echo "${out[*]}")
}

need() {
  command -v "$1" >/dev/null || { echo "$1 not found: install redis-server (apt-get install -y redis-server)" >&2; exit 1; }
}

start() {
  need redis-server
  need redis-cli
  mkdir -p "$dir"
  for p in "${ports[@]}"; do
    if redis-cli -p "$p" ping >/dev/null 2>&1; then
      continue
    fi
    redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file "$dir/nodes-$p.conf" --cluster-node-timeout 5000 \
      --save '' --appendonly no --dir "$dir" --daemonize yes \
      --pidfile "$dir/redis-$p.pid" --logfile "$dir/redis-$p.log"
  done
  for p in "${ports[@]}"; do
    for _ in $(seq 50); do
      redis-cli -p "$p" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
    redis-cli -p "$p" ping >/dev/null 2>&1 || { echo "node $p did not start; see $dir/redis-$p.log" >&2; exit 1; }
  done
  if ! redis-cli -p "${ports[0]}" cluster info | grep -q 'cluster_state:ok'; then
    local addrs=()
    for p in "${ports[@]}"; do addrs+=("127.0.0.1:$p"); done
    if [ "$(redis-cli -p "${ports[0]}" cluster info | grep -c 'cluster_known_nodes:1')" = 1 ]; then
      redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
    fi
    for _ in $(seq 100); do
      redis-cli -p "${ports[0]}" cluster info | grep -q 'cluster_state:ok' && break
      sleep 0.1
    done
    redis-cli -p "${ports[0]}" cluster info | grep -q 'cluster_state:ok' \
      || { echo "the cluster did not become ready; see $dir/*.log" >&2; exit 1; }
  fi
  nodes
}

status() {
  command -v redis-cli >/dev/null && redis-cli -p "${ports[0]}" cluster info 2>/dev/null | grep -q 'cluster_state:ok'
}

stop() {
  for p in "${ports[@]}"; do
    if [ -f "$dir/redis-$p.pid" ]; then
      kill "$(cat "$dir/redis-$p.pid")" 2>/dev/null || true
    fi
  done
  for p in "${ports[@]}"; do
    for _ in $(seq 50); do
      redis-cli -p "$p" ping >/dev/null 2>&1 || break
      sleep 0.1
    done
  done
  rm -rf "$dir"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  nodes) nodes ;;
  status) status ;;
  *) echo "usage: $0 start|stop|nodes|status" >&2; exit 2 ;;
esac
