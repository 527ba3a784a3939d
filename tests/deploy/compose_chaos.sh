#!/usr/bin/env bash
# Compose chaos test: validates the compose file with and without the `otel` profile (and that
# coordinators publish only their public and metrics ports while peers and workers dial the
# cluster port), builds the image with no registry, brings up deploy/docker-compose.yml
# (3 coordinators + 3 workers), and checks that the cluster answers with the real model, that
# the public port refuses the cluster protocol, that every worker's metrics endpoint counts the steps it computed, that a
# new leader serves after `docker kill` of the Raft leader, that a worker cut off the network
# fails in-flight requests with UNAVAILABLE while new ones succeed on a re-planned cluster, that
# the worker rejoins when reconnected, and that `down -v` leaves nothing behind.
#
# Skips (exit 0, with a message) where no Docker engine runs. Prints "compose: N checks passed".
# Env: TESSERA_BIN (host binary used for the image and as the client; default: the debug build),
#      TESSERA_HOME (host model cache holding smollm2-135m-instruct).
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! docker info >/dev/null 2>&1; then
  echo "compose: skipped (no Docker engine here)"
  exit 0
fi
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null; then
  compose=(docker-compose)
else
  echo "compose: skipped (neither 'docker compose' nor docker-compose is installed)"
  exit 0
fi

project=tessera-ci
file=deploy/docker-compose.yml
dc() { "${compose[@]}" -p "$project" -f "$file" "$@"; }
bin=${TESSERA_BIN:-${CARGO_TARGET_DIR:-target}/debug/tessera}
[ -x "$bin" ] || cargo build -q --locked -p tessera-cli
home=${TESSERA_HOME:-$HOME/.cache/tessera}
model_dir="$home/models/smollm2-135m-instruct"
[ -d "$model_dir" ] || "$bin" model pull smollm2-135m-instruct >/dev/null

checks=0
pass() { checks=$((checks + 1)); echo "ok: $*"; }
fail() { echo "FAILED: $*" >&2; dc logs --no-color --tail 40 >&2 || true; exit 1; }

# The `otel` profile: its collector image cannot be pulled here (no registry), so the profile is
# validated, not started. The collector belongs to that profile only, and span export is off
# unless TESSERA_OTLP_ENDPOINT names it.
plain=$(dc config) || fail "compose config is invalid"
collector=$(awk '/^  otel-collector:$/ {on=1; next} on && /^  [a-z0-9-]+:$/ {on=0} on' <<<"$plain")
grep -Eq -- "^ +- otel$" <<<"$collector" || fail "the collector is not limited to the otel profile"
grep -q "OTEL_EXPORTER_OTLP_ENDPOINT: ''" <<<"$plain" || fail "span export is not off by default"
otel=$(TESSERA_OTLP_ENDPOINT=http://otel-collector:4317 dc --profile otel config) \
  || fail "compose config --profile otel is invalid"
grep -q "image: otel/opentelemetry-collector:[0-9]" <<<"$otel" || fail "collector image not pinned"
grep -q "otel-collector.yaml:/etc/otelcol/config.yaml" <<<"$otel" || fail "collector config not mounted"
[ "$(grep -c "OTEL_EXPORTER_OTLP_ENDPOINT: http://otel-collector:4317" <<<"$otel")" -ge 6 ] \
  || fail "coordinators and workers do not export to the collector under the otel profile"
pass "compose config valid, with and without the otel profile"
# Two ports: coordinators publish the public API and metrics, never the cluster port (50052 in
# the containers), which the peers and workers dial on the private network.
! grep -Eq -- "(:50052/tcp|target: 50052)$" <<<"$plain" || fail "a coordinator's cluster port is published"
[ "$(grep -c -- "--cluster-listen=0.0.0.0:50052" <<<"$plain")" = 3 ] || fail "coordinators lack --cluster-listen"
[ "$(grep -c -- "--peers=1=coordinator-1:50052,2=coordinator-2:50052,3=coordinator-3:50052" <<<"$plain")" = 3 ] \
  || fail "--peers does not name the cluster ports"
[ "$(grep -c -- "--coordinator=http://coordinator-1:50052,http://coordinator-2:50052,http://coordinator-3:50052" <<<"$plain")" = 3 ] \
  || fail "workers do not register at the cluster ports"
pass "only public and metrics ports published; peers and workers use the cluster port"
cleanup() { dc down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup

TESSERA_BIN="$bin" scripts/build-image.sh tessera:0.1.0
pass "image built without a registry"

# Containers here cannot reach a package index: seed the shared model volume from the host
# cache; the compose `model` service then verifies it and pulls nothing.
dc run --rm --no-deps -v "$model_dir:/src:ro" --entrypoint cp model \
  -r /src /var/lib/tessera/models/smollm2-135m-instruct

dc up -d >/dev/null
ep=http://127.0.0.1:50051
endpoints=(http://127.0.0.1:50051 http://127.0.0.1:50052 http://127.0.0.1:50053)

wait_ready() { # $1 = endpoint, $2 = seconds
  local deadline=$((SECONDS + $2))
  until "$bin" status --endpoint "$1" 2>/dev/null | grep -q " ready "; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 1
  done
}
gen() { # $1 = endpoint, rest = extra args
  local e=$1; shift
  "$bin" generate --endpoint "$e" --temperature 0 --max-tokens 12 "$@" "The capital of France is"
}
wait_ready $ep 240 || fail "cluster not ready within 240 s"
pass "3 coordinators + 3 workers up and planned"
answer=$(gen $ep 2>/dev/null)
[ -n "$answer" ] || fail "empty answer"
pass "generate answers: $answer"
# Membership is cluster protocol: the published (public) port refuses it.
if out=$("$bin" cluster remove-coordinator --endpoint $ep --id 3 2>&1) \
  || ! grep -q "does not serve the cluster protocol" <<<"$out"; then
  fail "the public port accepted (or mis-refused) a membership change: $out"
fi
pass "the public port refuses the cluster protocol (UNIMPLEMENTED)"

# Every worker holds a stage, so each computed steps; their metrics are published on 9101-9103.
scrape() { # $1 = port: GET /metrics over bash's /dev/tcp (no curl in the base image or here)
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'GET /metrics HTTP/1.1\r\nHost: tessera\r\n\r\n' >&3
  cat <&3
  exec 3<&-
}
for port in 9101 9102 9103; do
  steps=$(scrape $port | awk '/^tessera_worker_steps_total / {print $2}')
  [ "${steps:-0}" -gt 0 ] 2>/dev/null || fail "worker metrics on :$port show no steps (${steps:-none})"
done
pass "worker metrics endpoints count their steps"

# Kill the Raft leader's container; a new leader must serve within the failover bound.
# `tessera status` prints "leader ID=HOST:PORT"; ids 1..3 are services coordinator-1..3.
leader=$("$bin" status --endpoint $ep | awk '/^leader/ {print $2}')
n=${leader%%=*}
case "$n" in 1|2|3) ;; *) fail "no leader in status ($leader)";; esac
container=$(dc ps -q "coordinator-$n")
start=$(date +%s%N)
docker kill "$container" >/dev/null
served=""
while [ $(( ($(date +%s%N) - start) / 1000000 )) -lt 10000 ]; do
  for i in 1 2 3; do
    [ "$i" = "$n" ] && continue
    if out=$(gen "${endpoints[$((i - 1))]}" 2>/dev/null) && [ "$out" = "$answer" ]; then served=$i; break 2; fi
  done
  sleep 0.2
done
ms=$(( ($(date +%s%N) - start) / 1000000 ))
[ -n "$served" ] || fail "no coordinator served within 10 s of killing the leader"
pass "leader coordinator-$n killed: coordinator-$served served the same answer after ${ms} ms"
ep=${endpoints[$((served - 1))]}

# Cut a worker off the network mid-request: the stream must end UNAVAILABLE, new requests succeed.
net=$(docker network ls -q --filter "name=${project}_tessera" | head -1)
worker=$(dc ps -q worker-2)
err=$(mktemp)
"$bin" generate --endpoint "$ep" --temperature 0 --max-tokens 4000 "Count: one, two," >/dev/null 2>"$err" &
gen_pid=$!
sleep 3
docker network disconnect "$net" "$worker"
cut=$(date +%s%N)
wait $gen_pid && fail "the in-flight request succeeded although a worker was cut off"
ms=$(( ($(date +%s%N) - cut) / 1000000 ))
grep -q "Unavailable" "$err" || fail "in-flight request did not end UNAVAILABLE: $(cat "$err")"
pass "worker cut off: in-flight request ended UNAVAILABLE after ${ms} ms"
wait_ready "$ep" 60 || fail "no re-plan after losing a worker"
out=$(gen "$ep" 2>/dev/null) || fail "generate failed after the re-plan"
[ "$out" = "$answer" ] || fail "re-planned cluster answered differently: $out"
pass "re-planned cluster serves the same answer"
docker network connect "$net" "$worker"
deadline=$((SECONDS + 60))
until [ "$("$bin" status --endpoint "$ep" | grep -c 'stage ')" = 3 ]; do
  [ $SECONDS -lt $deadline ] || fail "worker did not rejoin the plan"
  sleep 1
done
pass "reconnected worker rejoined the plan"

dc down -v --remove-orphans >/dev/null
left=$(docker ps -aq --filter "label=com.docker.compose.project=$project"; docker volume ls -q --filter "label=com.docker.compose.project=$project"; docker network ls -q --filter "label=com.docker.compose.project=$project")
[ -z "$left" ] || fail "down -v left: $left"
pass "down -v left nothing behind"
echo "compose: $checks checks passed"
