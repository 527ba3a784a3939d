#!/usr/bin/env bash
# Compose chaos test: validates the compose file with and without the `otel` profile (and that
# coordinators publish exactly their public gRPC, HTTP and metrics ports while peers and workers
# dial the cluster port, and that API keys reach the coordinators only), builds the image with
# no registry, brings up deploy/docker-compose.yml (3 coordinators + 3 workers), and checks that
# the cluster answers with the real model, that a follower's published HTTP API is ready and
# answers chat completions whole and streamed, that the public port refuses the cluster
# protocol, that every worker's metrics endpoint counts the steps it computed, that a new leader
# serves gRPC and HTTP after `docker kill` of the Raft leader, that a request in flight when a
# worker is cut off the network migrates and finishes with the same tokens while new ones succeed
# on the re-planned cluster, that the worker rejoins when reconnected, and that `down -v` leaves nothing behind.
#
# Skips (exit 0, with a message) where no Docker engine runs; fails where curl or python3 (the
# HTTP client and its JSON parser) is missing, rather than pass without the HTTP checks.
# Prints "compose: N checks passed".
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
for tool in curl python3; do
  command -v $tool >/dev/null || { echo "FAILED: compose test needs $tool" >&2; exit 1; }
done

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
pass "no cluster port published; peers and workers use the cluster port"
# Mutual TLS on the cluster protocol: every coordinator and worker finds its certificate in the
# certs volume that the certs service fills; nothing runs --insecure-cluster.
[ "$(grep -c "TESSERA_CERTS: /var/lib/tessera/certs" <<<"$plain")" -ge 6 ] || fail "a process lacks TESSERA_CERTS"
grep -q -- "--insecure-cluster" <<<"$plain" && fail "a service runs --insecure-cluster"
grep -Eq "^  certs:$" <<<"$plain" || fail "no certs service"
pass "the cluster protocol runs on certificates from the certs service"

block() { # $1 = service: its lines in the `config` on stdin
  awk -v svc="  $1:" '$0 == svc {on = 1; next} on && /^  [^ ]/ {on = 0} on'
}
published() { # $1 = service: its published ports, one "HOST_IP:PUBLISHED:TARGET" a line, sorted
  # docker-compose v1 prints a port in the short form ("- 127.0.0.1:8000:8000/tcp"), docker
  # compose v2 as a mapping (mode, host_ip, target, published, protocol): both come out the same.
  block "$1" | awk '
    function flush() { if (t != "") print ip ":" p ":" t; ip = ""; p = ""; t = "" }
    /^    [a-z_]+:/ { flush(); inports = ($1 == "ports:"); next }
    !inports { next }
    /^ +- [0-9.]+:[0-9]+:[0-9]+\/tcp$/ { s = $2; sub(/\/tcp$/, "", s); print s; next }
    /^ +- / { flush(); sub(/- /, "") }
    $1 == "host_ip:" { ip = $2 }
    $1 == "target:" { t = $2 }
    $1 == "published:" { p = $2; gsub(/"/, "", p) }
    END { flush() }
  ' | sort
}
# The HTTP API: every coordinator serves it on 8000 in its container, published on localhost
# as 8000-8002 next to its gRPC (50051-50053) and metrics (9091-9093) ports, and nothing else.
[ "$(grep -c -- "--http-listen=0.0.0.0:8000" <<<"$plain")" = 3 ] || fail "coordinators lack --http-listen"
for i in 1 2 3; do
  want=$(printf '%s\n' "127.0.0.1:5005$i:50051" "127.0.0.1:800$((i - 1)):8000" "127.0.0.1:909$i:9090" | sort)
  got=$(published "coordinator-$i" <<<"$plain")
  [ "$got" = "$want" ] || fail "coordinator-$i publishes [$(echo $got)], want [$(echo $want)]"
done
pass "each coordinator serves the HTTP API, published on 127.0.0.1:8000-8002"
# API keys come from the host's TESSERA_API_KEYS, to the coordinators (which check them) only;
# unset, the value is empty, which the coordinator reads as no keys.
keyed=$(TESSERA_API_KEYS=k1,k2 dc config) || fail "compose config with TESSERA_API_KEYS is invalid"
for svc in coordinator-1 coordinator-2 coordinator-3; do
  grep -q "TESSERA_API_KEYS: k1,k2$" < <(block $svc <<<"$keyed") || fail "$svc does not get TESSERA_API_KEYS"
  grep -q "TESSERA_API_KEYS: ''$" < <(block $svc <<<"$plain") || fail "$svc has API keys by default"
done
for svc in model worker-1 worker-2 worker-3; do
  ! grep -q "TESSERA_API_KEYS" < <(block $svc <<<"$keyed") || fail "$svc gets the API keys"
done
pass "TESSERA_API_KEYS reaches the coordinators only, empty by default"
cleanup() { dc down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup

TESSERA_BIN="$bin" scripts/build-image.sh tessera:0.1.0
pass "image built without a registry"

# Containers here cannot reach a package index: the README's offline recipe, the host's model
# cache mounted in place of the `models` volume (TESSERA_MODELS); the compose `model` service
# verifies it and pulls nothing.
export TESSERA_MODELS="$(cd "$home/models" && pwd)"
grep -q -- "- $TESSERA_MODELS:/var/lib/tessera/models:ro" < <(dc config) \
  || grep -q "source: $TESSERA_MODELS$" < <(dc config) \
  || fail "TESSERA_MODELS does not replace the models volume"
pass "TESSERA_MODELS mounts the host's model directory (offline seeding)"

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

# The HTTP API of a follower: it forwards to the leader, so this is the path a load balancer in
# front of all coordinators takes two times out of three.
body=$(mktemp)
http() { # $1 = port, $2 = path, [$3 = JSON body: a POST]; the status code to stdout, the body to $body
  local args=(-s -o "$body" -w '%{http_code}' --max-time 60)
  [ $# -lt 3 ] || args+=(-H 'Content-Type: application/json' --data-binary "$3")
  curl "${args[@]}" "http://127.0.0.1:$1$2" || true # no connection: code 000, which no check accepts
}
chat='{"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": 8'
content() { # choices[0].message.content of the completion in $body
  python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])' <"$body"
}
streamed() { # the deltas of the SSE stream in $body, joined; fails unless the last event is [DONE]
  python3 -c '
import json, sys
events = [l[len("data: "):] for l in sys.stdin.read().splitlines() if l.startswith("data: ")]
assert events and events[-1] == "[DONE]", "the stream does not end with data: [DONE]: %r" % events[-1:]
print("".join(c["delta"].get("content") or "" for e in events[:-1] for c in json.loads(e)["choices"]))
' <"$body"
}
leader=$("$bin" status --endpoint $ep | awk '/^leader/ {print $2}')
case "${leader%%=*}" in 1|2|3) ;; *) fail "no leader in status ($leader)";; esac
for follower in 1 2 3; do [ "$follower" = "${leader%%=*}" ] || break; done
hp=$((7999 + follower)) # coordinator-N's HTTP API is published on 8000 + N - 1
# /ready needs the leader known and a plan: the follower learns the plan through Raft, so give it
# a few seconds after the cluster reported ready.
deadline=$((SECONDS + 30))
until [ "$(http $hp /ready)" = 200 ]; do
  [ $SECONDS -lt $deadline ] || fail "follower coordinator-$follower: GET /ready not 200 within 30 s: $(cat "$body")"
  sleep 1
done
pass "follower coordinator-$follower (leader ${leader%%=*}): GET /ready on 127.0.0.1:$hp is 200"
code=$(http $hp /health)
[ "$code" = 200 ] || fail "follower coordinator-$follower: GET /health is $code: $(cat "$body")"
pass "follower coordinator-$follower: GET /health is 200"
code=$(http $hp /v1/chat/completions "$chat}")
[ "$code" = 200 ] || fail "follower coordinator-$follower: chat completion is $code: $(cat "$body")"
http_answer=$(content) || fail "chat completion without choices[0].message.content: $(cat "$body")"
[ -n "$http_answer" ] || fail "chat completion with empty content: $(cat "$body")"
pass "follower coordinator-$follower: POST /v1/chat/completions answers: $http_answer"
code=$(http $hp /v1/chat/completions "$chat, \"stream\": true}")
[ "$code" = 200 ] || fail "follower coordinator-$follower: streamed chat completion is $code: $(cat "$body")"
out=$(streamed 2>&1) || fail "follower coordinator-$follower: $out"
# Greedy decoding of the same request: the stream must carry the same text as the whole answer.
[ "$out" = "$http_answer" ] || fail "streamed answer \"$out\" differs from the whole one \"$http_answer\""
pass "follower coordinator-$follower: the streamed chat completion ends with data: [DONE], same text"
# Membership is cluster protocol: the published (public) port refuses it.
# (--insecure-cluster: this client speaks plain gRPC, as the public port does.)
if out=$("$bin" cluster remove-coordinator --endpoint $ep --id 3 --insecure-cluster 2>&1) \
  || ! grep -q "does not serve the cluster protocol" <<<"$out"; then
  fail "the public port accepted (or mis-refused) a membership change: $out"
fi
pass "the public port refuses the cluster protocol (UNIMPLEMENTED)"

# Every worker holds a stage, so each computed steps; their metrics are published on 9101-9103.
scrape() { # $1 = port
  curl -fsS --max-time 10 "http://127.0.0.1:$1/metrics"
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
# Both survivors, the new leader and its follower, serve the HTTP API again, with the same answer.
for i in 1 2 3; do
  [ "$i" = "$n" ] && continue
  hp=$((7999 + i))
  deadline=$((SECONDS + 30))
  until [ "$(http $hp /v1/chat/completions "$chat}")" = 200 ] && [ "$(content 2>/dev/null)" = "$http_answer" ]; do
    [ $SECONDS -lt $deadline ] \
      || fail "coordinator-$i: no HTTP chat completion (the same answer) within 30 s of the leader's kill: $(cat "$body")"
    sleep 0.5
  done
  [ "$(http $hp /ready)" = 200 ] || fail "coordinator-$i: GET /ready after failover: $(cat "$body")"
done
pass "after the leader's kill, both surviving coordinators serve the HTTP API (ready, same answer)"

# Cut a worker off the network mid-request: the coordinator drops it, re-plans on the other two
# and migrates the request, which finishes with the tokens of an uninterrupted run.
net=$(docker network ls -q --filter "name=${project}_tessera" | head -1)
worker=$(dc ps -q worker-2)
count() { # the greedy reference request; $@ = extra args
  "$bin" generate --endpoint "$ep" --temperature 0 --max-tokens 160 "$@" "Count: one, two,"
}
expected=$(count 2>/dev/null) || fail "the reference count request failed"
err=$(mktemp)
got=$(mktemp)
count >"$got" 2>"$err" &
gen_pid=$!
# Cut only once tokens stream, so the cut lands mid-decode, not before the request began.
deadline=$((SECONDS + 30))
until [ -s "$got" ]; do
  [ $SECONDS -lt $deadline ] || fail "the count request streamed nothing within 30 s: $(cat "$err")"
  sleep 0.05
done
docker network disconnect "$net" "$worker"
cut=$(date +%s%N)
wait $gen_pid || fail "the in-flight request failed although it should migrate: $(cat "$err")"
ms=$(( ($(date +%s%N) - cut) / 1000000 ))
[ "$(cat "$got")" = "$expected" ] \
  || fail "the migrated request answered differently: $(cat "$got") (expected: $expected)"
pass "worker cut off mid-request: the request migrated and finished identical ${ms} ms after the cut"
wait_ready "$ep" 60 || fail "no re-plan after losing a worker"
out=$(gen "$ep" 2>/dev/null) || fail "generate failed after the re-plan"
[ "$out" = "$answer" ] || fail "re-planned cluster answered differently: $out"
pass "re-planned cluster serves the same answer"
# A healed partition keeps the worker's name: `network connect` alone would bring it back
# without the service alias (`worker-2`) compose gave it, and so unresolvable by its peers.
docker network connect --alias worker-2 "$net" "$worker"
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
