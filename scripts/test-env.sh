#!/usr/bin/env bash
# test-env.sh: install and start everything the ci-exec integration tests need
# on a Debian 12 machine. Run as root:
#
#     bash scripts/test-env.sh
#
# Idempotent: every step checks first and is skipped when already done, so a
# re-run on a prepared machine takes a few seconds. Stop the daemons with
# scripts/test-env-down.sh; a later run of this script starts them again.
#
# Environment:
#   CI_EXEC_SKIP_APPTAINER=1   do not build Apptainer 1.5.3 (the build takes
#                              about 12 min on 2 cores). An Apptainer that is
#                              already in /opt/apptainer is still configured,
#                              checked and listed in the env file.
#
# What it sets up:
#   - Debian packages (Charliecloud 0.31, docker-registry, Slurm, munge, the
#     Apptainer build dependencies, ...).
#   - Users ciuser (uid 1001 if free) and ciuser2, with subuid/subgid ranges;
#     /dev/fuse mode 0666.
#   - A self-signed CA/server certificate for 127.0.0.1 trusted system-wide.
#   - Three docker-registry instances:
#       127.0.0.1:5443  TLS + htpasswd (users gitlab-ci-token and ciuser-reg)
#       127.0.0.1:5444  TLS, anonymous
#       127.0.0.1:5446  plain HTTP + the same htpasswd
#   - Offline busybox test images, built with ch-image and pushed:
#       127.0.0.1:5443/ci/tiny:latest      busybox only (sh, no bash), ID=citiny
#       127.0.0.1:5443/ci/tiny:v2          as tiny plus /etc/ci-exec-version = v2
#       127.0.0.1:5443/ci/tinybash:latest  as tiny plus /bin/bash, ID=citinybash
#       127.0.0.1:5444/pub/tiny:latest     tiny, anonymous registry
#       127.0.0.1:5446/ci/tiny:latest      tiny, plain-HTTP registry
#     A tag is pushed again when the registry holds a different manifest than
#     the one this script pushed last (e.g. a test re-pushed the tag).
#   - Single-node Slurm (munged, slurmctld, slurmd; partition "debug").
#   - Apptainer 1.5.3 in /opt/apptainer (non-setuid), built from its Go module,
#     plus a SIF of the tiny image.
#   - Debian's Podman 4.3 (rootless: uidmap, slirp4netns, catatonit), with
#     subuid/subgid ranges for root too, and a containers.conf drop-in
#     (/etc/containers/containers.conf.d/50-ci-exec-test.conf) for what this
#     kind of machine lacks: no systemd (cgroupfs, file events), hybrid
#     cgroups (runc instead of crun), no CAP_SYS_RESOURCE for root (lower
#     default ulimits). Checked: podman run --userns=keep-id as ciuser and
#     as root (without keep-id, which rootful Podman 4.3 refuses) against
#     the token and the anonymous registry.
#
# State lives in /var/lib/ci-exec-test (0755):
#   env                        KEY=VALUE lines for the Go tests (no quotes,
#                              no comments, no spaces; see write_env_file)
#   registry-token             password of gitlab-ci-token (0600, root)
#   registry-user-password     password of ciuser-reg (0600, root)
#   htpasswd                   bcrypt htpasswd of both users (0600)
#   auth.json                  docker-style auth file for gitlab-ci-token on
#                              5443 and 5446 (0600; skopeo/apptainer --authfile)
#   tls/ca.crt, tls/ca.key     CA = server certificate (CN/SAN 127.0.0.1, localhost)
#   registry/{auth,anon,http}/ config.yml, data/ (storage), registry.log,
#                              registry.pid, started.sha
#   images/{tiny,tinybash,tiny-v2}/
#                              build contexts: Dockerfile ("FROM scratch",
#                              "COPY rootfs/ /") and rootfs/, usable to build
#                              more images (copy them, do not modify in place)
#   images/pushed/             manifest digests this script pushed
#   ch-storage/                root's ch-image storage used for the builds
#   tiny.sif                   Apptainer SIF of images/tiny/rootfs
#   logs/                      apt, image build/push, apptainer build, daemon logs
#   build/                     Apptainer build tree (removed after a good build)
#
# Slurm: /etc/slurm/slurm.conf (generated), logs in /var/log/slurm/.

set -Eeuo pipefail
umask 022

STATE=/var/lib/ci-exec-test
LOGS=$STATE/logs
CA=$STATE/tls/ca.crt
CA_KEY=$STATE/tls/ca.key
SYS_CA=/usr/local/share/ca-certificates/ci-exec-test.crt
TOKEN_FILE=$STATE/registry-token
PW2_FILE=$STATE/registry-user-password
HTPASSWD=$STATE/htpasswd
AUTHFILE=$STATE/auth.json
CH_STORAGE=$STATE/ch-storage
ENV_FILE=$STATE/env
SIF=$STATE/tiny.sif

REG_AUTH=127.0.0.1:5443
REG_ANON=127.0.0.1:5444
REG_HTTP=127.0.0.1:5446
REG_USER=gitlab-ci-token
REG_USER2=ciuser-reg

IMAGE=$REG_AUTH/ci/tiny:latest
IMAGE_V2=$REG_AUTH/ci/tiny:v2
IMAGE_BASH=$REG_AUTH/ci/tinybash:latest
IMAGE_ANON=$REG_ANON/pub/tiny:latest
IMAGE_HTTP=$REG_HTTP/ci/tiny:latest

UNPRIV_USER=ciuser
UNPRIV_USER2=ciuser2

APPTAINER_VERSION=1.5.3
APPTAINER_PREFIX=/opt/apptainer
APPTAINER=$APPTAINER_PREFIX/bin/apptainer
APPTAINER_CONF=$APPTAINER_PREFIX/etc/apptainer/apptainer.conf

# Bump to force the test images (rootfs, local build, push) to be rebuilt.
IMAGE_RECIPE=2

PACKAGES=(
  charliecloud-runtime charliecloud-builders squashfs-tools squashfuse fuse3
  docker-registry apache2-utils openssl ca-certificates curl git skopeo umoci
  busybox-static hyperfine python3-requests python3-lark slurm-wlm munge
  libcap2-bin procps
  # Apptainer build dependencies (apptainer.md section 3)
  build-essential libseccomp-dev libtalloc-dev libattr1-dev libprotobuf-c-dev
  pkg-config uidmap fakeroot cryptsetup tzdata dh-apparmor libsubid-dev fuse2fs
  fuse-overlayfs gocryptfs autoconf automake libtool libfuse3-dev zlib1g-dev
  liblzo2-dev liblz4-dev liblzma-dev libzstd-dev
  # Podman 4.3 and what rootless Podman needs (uidmap, fuse-overlayfs above)
  podman slirp4netns catatonit
)

# Go (for the Apptainer build) is looked up in the caller's PATH before PATH
# is reset below.
GO_BIN=$(command -v go 2>/dev/null || true)
if [ -z "$GO_BIN" ] && [ -x /usr/local/go/bin/go ]; then
  GO_BIN=/usr/local/go/bin/go
fi

# System directories first: a pyenv/venv python3 earlier in PATH breaks
# ch-image (#!/usr/bin/env python3 without lark).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
export USER=root LOGNAME=root
export CH_IMAGE_CACHE=disabled
export DEBIAN_FRONTEND=noninteractive
# These would override the system trust store for python-requests and curl.
unset REQUESTS_CA_BUNDLE CURL_CA_BUNDLE CH_IMAGE_STORAGE CH_IMAGE_AUTH \
  CH_IMAGE_USERNAME CH_IMAGE_PASSWORD

T0=$(date +%s.%N)

log() { printf 'test-env: %s\n' "$*"; }
die() { printf 'test-env: ERROR: %s\n' "$*" >&2; exit 1; }
trap 'printf "test-env: ERROR: line %s: command failed (exit %s): %s\n" "$LINENO" "$?" "$BASH_COMMAND" >&2' ERR

elapsed() { # START -> seconds since START, one decimal
  awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}

# write_if_changed PATH MODE < CONTENT: returns 0 if PATH was (re)written,
# 1 if it already had that content. Always call it in a condition.
write_if_changed() {
  local path=$1 mode=$2 tmp
  tmp=$(mktemp "$path.XXXXXX")
  cat >"$tmp"
  if [ -f "$path" ] && cmp -s "$tmp" "$path"; then
    rm -f "$tmp"
    chmod "$mode" "$path"
    return 1
  fi
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$path"
  return 0
}

# alive PID: PID exists and is not a zombie. (Without systemd, PID 1 may
# reap orphaned daemons only every few seconds; kill -0 succeeds on zombies.)
alive() {
  local st
  st=$(awk '/^State:/ { print $2 }' "/proc/$1/status" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# alive_pids PID...: print the ones that are alive.
alive_pids() {
  local p
  for p in "$@"; do
    if alive "$p"; then echo "$p"; fi
  done
}

# stop_pid NAME PID: SIGTERM, wait up to 10 s, then SIGKILL.
stop_pid() {
  local name=$1 pid=$2 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 50); do
    alive "$pid" || return 0
    sleep 0.2
  done
  log "$name (pid $pid) did not stop after SIGTERM; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  sleep 0.2
}

# pid_alive PIDFILE COMM: the pid file names a live process called COMM.
pid_alive() {
  local pid
  [ -r "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && alive "$pid" &&
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# daemon_pid PIDFILE COMM: pid from the pid file, else the only process
# named exactly COMM; empty if none.
daemon_pid() {
  if pid_alive "$1" "$2"; then
    cat "$1"
  else
    # shellcheck disable=SC2046 # pid list
    alive_pids $(pgrep -x "$2" || true) | head -n 1
  fi
}

[ "$(id -u)" = 0 ] || die "must run as root"
[ -r /etc/debian_version ] || die "this script is for Debian 12"

# Close file descriptors inherited from the caller (other than stdio and
# bash's own 255) so that the daemons started below do not keep them open.
for fd in "/proc/$$/fd/"*; do
  fd=${fd##*/}
  case $fd in 0 | 1 | 2 | 255) ;; *) eval "exec $fd>&-" 2>/dev/null || true ;; esac
done

# Serialise concurrent runs. Daemons started below get fd 9 closed (9>&-),
# otherwise they would hold the lock forever.
mkdir -p /run/lock
exec 9>/run/lock/ci-exec-test-env.lock
if ! flock -n 9; then
  log "another test-env.sh is running; waiting for /run/lock/ci-exec-test-env.lock"
  flock -w 3600 9 || die "timed out waiting for the lock"
fi
cd /

install -d -m 0755 "$STATE" "$STATE/tls" "$STATE/registry" "$STATE/images" \
  "$STATE/images/pushed" "$LOGS" "$STATE/build"

###############################################################################
# a. Debian packages
###############################################################################
step_packages() {
  local installed missing=() p
  installed=$(dpkg-query -W -f='${Package} ${Status}\n' "${PACKAGES[@]}" 2>/dev/null |
    awk '$4 == "installed" { print $1 }' || true)
  for p in "${PACKAGES[@]}"; do
    grep -qxF "$p" <<<"$installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    log "packages: all ${#PACKAGES[@]} installed"
    return
  fi
  log "packages: installing ${#missing[@]} missing: ${missing[*]} (log: $LOGS/apt.log)"
  {
    apt-get -o DPkg::Lock::Timeout=900 update &&
      apt-get -o DPkg::Lock::Timeout=900 install -y --no-install-recommends "${PACKAGES[@]}"
  } >>"$LOGS/apt.log" 2>&1 </dev/null || {
    tail -n 20 "$LOGS/apt.log" >&2
    die "apt-get failed; see $LOGS/apt.log"
  }
  log "packages: installed"
}

###############################################################################
# b. Users, /dev/fuse, system python
###############################################################################
# next_sub_start FILE: first id after every range in /etc/subuid or subgid.
next_sub_start() {
  awk -F: 'BEGIN { m = 100000 } NF >= 3 { e = $2 + $3; if (e > m) m = e } END { print m }' "$1"
}

ensure_user() {
  local name=$1 uid=$2 args=() start
  if id -u "$name" >/dev/null 2>&1; then
    log "user $name already exists (uid $(id -u "$name"))"
  else
    args=(-m -d "/home/$name" -s /bin/bash -U)
    if ! getent passwd "$uid" >/dev/null && ! getent group "$uid" >/dev/null; then
      args+=(-u "$uid")
    fi
    useradd "${args[@]}" "$name"
    log "user $name created (uid $(id -u "$name"))"
  fi
  # useradd on Debian 12 adds subordinate ids; add them if missing anyway.
  ensure_subids "$name"
}

# ensure_subids NAME: NAME has subuid and subgid ranges (root has none by
# default; rootless tools in a user namespace need them).
ensure_subids() {
  local name=$1 f start
  for f in subuid subgid; do
    if ! grep -q "^$name:" "/etc/$f" 2>/dev/null; then
      start=$(next_sub_start "/etc/$f")
      usermod "--add-${f}s" "$start-$((start + 65535))" "$name"
      log "user $name: $f range $start+65536 added"
    fi
  done
}

step_system() {
  ensure_user "$UNPRIV_USER" 1001
  ensure_user "$UNPRIV_USER2" 1002
  ensure_subids root
  [ -c /dev/fuse ] || die "/dev/fuse missing (modprobe fuse?)"
  if [ "$(stat -c %a /dev/fuse)" = 666 ]; then
    log "/dev/fuse already 0666"
  else
    chmod 0666 /dev/fuse
    log "/dev/fuse set to 0666"
  fi
  /usr/bin/python3 -c 'import lark, requests' 2>/dev/null ||
    die "/usr/bin/python3 cannot import lark/requests (python3-lark, python3-requests)"
  log "system python3 has lark and requests"
}

###############################################################################
# c. CA, secrets, registries
###############################################################################
cert_ok() {
  [ -s "$CA" ] && [ -s "$CA_KEY" ] || return 1
  openssl x509 -in "$CA" -noout -checkend 2592000 >/dev/null 2>&1 || return 1
  openssl x509 -in "$CA" -noout -ext subjectAltName 2>/dev/null |
    grep -q 'IP Address:127.0.0.1' || return 1
  [ "$(openssl x509 -in "$CA" -noout -pubkey 2>/dev/null)" = \
    "$(openssl pkey -in "$CA_KEY" -pubout 2>/dev/null)" ]
}

step_ca() {
  if cert_ok; then
    log "CA/server certificate already present ($CA)"
  else
    (
      umask 077
      openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=127.0.0.1 \
        -addext subjectAltName=IP:127.0.0.1,DNS:localhost \
        -addext basicConstraints=critical,CA:TRUE \
        -keyout "$CA_KEY.tmp" -out "$CA.tmp" >>"$LOGS/openssl.log" 2>&1
    )
    chmod 0600 "$CA_KEY.tmp"
    chmod 0644 "$CA.tmp"
    mv -f "$CA_KEY.tmp" "$CA_KEY"
    mv -f "$CA.tmp" "$CA"
    log "CA/server certificate created ($CA)"
  fi
  # Trusted system-wide: the cert is in place and its body is in the bundle.
  if cmp -s "$CA" "$SYS_CA" &&
    grep -qF "$(sed -n 2p "$CA")" /etc/ssl/certs/ca-certificates.crt; then
    log "CA already trusted system-wide"
  else
    install -m 0644 "$CA" "$SYS_CA"
    update-ca-certificates >>"$LOGS/update-ca-certificates.log" 2>&1
    grep -qF "$(sed -n 2p "$CA")" /etc/ssl/certs/ca-certificates.crt ||
      die "update-ca-certificates did not add $SYS_CA"
    log "CA installed into the system trust store"
  fi
}

ensure_secret() {
  local f=$1
  if [ -s "$f" ]; then
    chown root:root "$f"
    chmod 0600 "$f"
    return 1
  fi
  (umask 077 && openssl rand -hex 20 >"$f.tmp")
  mv -f "$f.tmp" "$f"
  return 0
}

step_secrets() {
  local changed=0 b64a
  if ensure_secret "$TOKEN_FILE"; then changed=1; fi
  if ensure_secret "$PW2_FILE"; then changed=1; fi
  if [ "$changed" = 0 ] && [ -s "$HTPASSWD" ] &&
    htpasswd -v -i "$HTPASSWD" "$REG_USER" <"$TOKEN_FILE" >/dev/null 2>&1 &&
    htpasswd -v -i "$HTPASSWD" "$REG_USER2" <"$PW2_FILE" >/dev/null 2>&1; then
    log "registry passwords and htpasswd already present"
  else
    (
      umask 077
      {
        htpasswd -nBi "$REG_USER" <"$TOKEN_FILE"
        htpasswd -nBi "$REG_USER2" <"$PW2_FILE"
      } | grep -v '^$' >"$HTPASSWD.tmp"
    )
    mv -f "$HTPASSWD.tmp" "$HTPASSWD"
    log "registry passwords and htpasswd written ($TOKEN_FILE, $PW2_FILE)"
  fi
  b64a=$(printf '%s:%s' "$REG_USER" "$(cat "$TOKEN_FILE")" | base64 -w0)
  if write_if_changed "$AUTHFILE" 0600 <<EOF; then
{"auths":{"$REG_AUTH":{"auth":"$b64a"},"$REG_HTTP":{"auth":"$b64a"}}}
EOF
    log "auth file written ($AUTHFILE)"
  fi
}

reg_dir() { echo "$STATE/registry/$1"; }
reg_addr() {
  case $1 in auth) echo "$REG_AUTH" ;; anon) echo "$REG_ANON" ;; http) echo "$REG_HTTP" ;; esac
}
reg_scheme() { # HOST:PORT
  if [ "$1" = "$REG_HTTP" ]; then echo http; else echo https; fi
}

# curl_reg CREDS ARGS...: curl with our CA; CREDS "token" sends
# gitlab-ci-token's password (through stdin, not argv), "none" nothing.
curl_reg() {
  local creds=$1
  shift
  if [ "$creds" = token ]; then
    printf 'user = "%s:%s"\n' "$REG_USER" "$(cat "$TOKEN_FILE")" |
      curl -sS --max-time 5 --cacert "$CA" -K - "$@"
  else
    curl -sS --max-time 5 --cacert "$CA" "$@" </dev/null
  fi
}

# reg_code NAME CREDS: HTTP status of GET /v2/ (000 if nothing answers).
reg_code() {
  local addr
  addr=$(reg_addr "$1")
  curl_reg "$2" -o /dev/null -w '%{http_code}' "$(reg_scheme "$addr")://$addr/v2/" 2>/dev/null || true
}

reg_healthy() {
  case $1 in
  anon) [ "$(reg_code anon none)" = 200 ] ;;
  *) [ "$(reg_code "$1" none)" = 401 ] && [ "$(reg_code "$1" token)" = 200 ] ;;
  esac
}

port_open() { # HOST:PORT accepts TCP connections
  (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null
}

reg_pids() { # NAME: pids of our docker-registry for that config
  # shellcheck disable=SC2046 # pid list
  alive_pids $(pgrep -f -x "(/usr/bin/)?docker-registry serve $(reg_dir "$1")/config.yml" || true)
}

reg_inputs_sum() {
  local d
  d=$(reg_dir "$1")
  case $1 in
  auth) cat "$d/config.yml" "$CA" "$CA_KEY" "$HTPASSWD" ;;
  anon) cat "$d/config.yml" "$CA" "$CA_KEY" ;;
  http) cat "$d/config.yml" "$HTPASSWD" ;;
  esac | sha256sum | cut -d' ' -f1
}

reg_config() { # NAME
  local d addr
  d=$(reg_dir "$1")
  addr=$(reg_addr "$1")
  cat <<EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $d/data
  delete:
    enabled: true
http:
  addr: $addr
  secret: ci-exec-test-$1
EOF
  if [ "$1" != http ]; then
    cat <<EOF
  tls:
    certificate: $CA
    key: $CA_KEY
EOF
  fi
  if [ "$1" != anon ]; then
    cat <<EOF
auth:
  htpasswd:
    realm: ci-registry
    path: $HTPASSWD
EOF
  fi
}

ensure_registry() {
  local name=$1 d addr sum pids i
  d=$(reg_dir "$name")
  addr=$(reg_addr "$name")
  install -d -m 0755 "$d" "$d/data"
  if reg_config "$name" | write_if_changed "$d/config.yml" 0644; then :; fi
  sum=$(reg_inputs_sum "$name")
  pids=$(reg_pids "$name")
  if reg_healthy "$name"; then
    if [ -z "$pids" ]; then
      log "registry $addr ($name) already up (not started by this script; left alone)"
      return
    fi
    if [ "$(cat "$d/started.sha" 2>/dev/null)" = "$sum" ]; then
      log "registry $addr ($name) already up"
      return
    fi
    log "registry $addr ($name): config, certificate or htpasswd changed; restarting"
  elif [ -z "$pids" ] && port_open "$addr"; then
    die "port $addr is in use by a process that is not our $name registry (config $d/config.yml)"
  fi
  for i in $pids; do stop_pid "registry $name" "$i"; done
  setsid nohup /usr/bin/docker-registry serve "$d/config.yml" \
    >>"$d/registry.log" 2>&1 </dev/null 9>&- &
  echo $! >"$d/registry.pid"
  for i in $(seq 50); do
    [ "$(reg_code "$name" none)" != 000 ] && break
    sleep 0.2
  done
  if ! reg_healthy "$name"; then
    tail -n 15 "$d/registry.log" >&2
    die "registry $addr ($name) did not come up; see $d/registry.log"
  fi
  echo "$sum" >"$d/started.sha"
  log "registry $addr ($name) started"
}

###############################################################################
# d. Offline test images
###############################################################################
recipe_stamp() { # VARIANT
  printf '%s %s %s\n' "$IMAGE_RECIPE" "$1" "$(stat -Lc '%s:%Y' /bin/busybox /bin/bash | tr '\n' ' ')"
}

# make_rootfs VARIANT DIR: busybox rootfs; tinybash adds bash, tiny-v2 a
# version file. No /builds, /srv or data directories on purpose.
make_rootfs() {
  local variant=$1 r=$2 e dir target lib id pretty
  rm -rf "$r"
  install -d -m 0755 "$r" "$r/bin" "$r/sbin" "$r/usr/bin" "$r/usr/sbin" "$r/etc" \
    "$r/root" "$r/home" "$r/dev" "$r/proc" "$r/sys" "$r/mnt" "$r/var"
  install -d -m 1777 "$r/tmp" "$r/var/tmp"
  chmod 0700 "$r/root"
  install -m 0755 /bin/busybox "$r/bin/busybox"
  while read -r e; do
    case $e in */*) ;; *) continue ;; esac # skip "linuxrc"
    case ${e##*/} in bash | busybox) continue ;; esac
    dir=${e%/*}
    if [ "$dir" = bin ]; then
      target=busybox
    else # sbin -> ../bin/busybox, usr/bin -> ../../bin/busybox
      target=$(printf '%s\n' "$dir" | sed 's|[^/][^/]*|..|g')/bin/busybox
    fi
    [ -e "$r/$e" ] || [ -L "$r/$e" ] || ln -s "$target" "$r/$e"
  done < <(/bin/busybox --list-full)
  printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' \
    'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >"$r/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' >"$r/etc/group"
  id=citiny
  pretty="ci-exec tiny test image"
  case $variant in
  tinybash)
    id=citinybash
    pretty="ci-exec tiny test image with bash"
    install -m 0755 "$(readlink -f /bin/bash)" "$r/bin/bash"
    for lib in $(ldd /bin/bash | grep -o '/[^ ]*'); do
      install -D -m 0755 "$(readlink -f "$lib")" "$r$lib"
    done
    ;;
  tiny-v2)
    echo v2 >"$r/etc/ci-exec-version"
    ;;
  esac
  cat >"$r/etc/os-release" <<EOF
NAME="ci-exec tiny"
ID=$id
VERSION_ID=1
PRETTY_NAME="$pretty"
EOF
}

# ensure_rootfs VARIANT: (re)create images/VARIANT when the recipe changed.
ensure_rootfs() {
  local ctx=$STATE/images/$1 stamp
  stamp=$(recipe_stamp "$1")
  if [ -d "$ctx/rootfs" ] && [ "$(cat "$ctx/.recipe" 2>/dev/null)" = "$stamp" ]; then
    return
  fi
  install -d -m 0755 "$ctx"
  make_rootfs "$1" "$ctx/rootfs"
  printf 'FROM scratch\nCOPY rootfs/ /\n' >"$ctx/Dockerfile"
  echo "$stamp" >"$ctx/.recipe"
  log "image rootfs $ctx/rootfs created"
}

ch_image() { ch-image -s "$CH_STORAGE" "$@" </dev/null >>"$LOGS/images.log" 2>&1; }

# ensure_local_image VARIANT: built into $CH_STORAGE under the name VARIANT.
ensure_local_image() {
  local ctx=$STATE/images/$1
  ensure_rootfs "$1"
  if [ -d "$CH_STORAGE/img/$1" ] && [ "$(cat "$ctx/.built" 2>/dev/null)" = "$(cat "$ctx/.recipe")" ]; then
    return
  fi
  ch_image build -t "$1" -f "$ctx/Dockerfile" "$ctx" ||
    die "ch-image build of $1 failed; see $LOGS/images.log"
  cp "$ctx/.recipe" "$ctx/.built"
  log "image $1 built with ch-image"
}

# manifest_digest REF: Docker-Content-Digest of REF's manifest, empty if absent.
manifest_digest() {
  local ref=$1 host rest repo tag creds=token
  host=${ref%%/*}
  rest=${ref#*/}
  repo=${rest%:*}
  tag=${rest##*:}
  [ "$host" = "$REG_ANON" ] && creds=none
  curl_reg "$creds" -I \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    -H 'Accept: application/vnd.docker.distribution.manifest.list.v2+json' \
    -H 'Accept: application/vnd.oci.image.index.v1+json' \
    "$(reg_scheme "$host")://$host/v2/$repo/manifests/$tag" 2>/dev/null |
    tr -d '\r' |
    awk 'NR == 1 && $2 != 200 { exit } tolower($1) == "docker-content-digest:" { print $2 }' || true
}

# images/pushed/REF: line 1 the manifest digest pushed, line 2 the recipe
# stamp of the rootfs it was built from.
pushed_file() { echo "$STATE/images/pushed/$(printf '%s' "$1" | tr '/:' '__')"; }

# ensure_pushed REF VARIANT [FROM_REF]: REF holds what we pushed last;
# otherwise build (if needed) and push VARIANT with ch-image, or, for the
# plain-HTTP registry, copy FROM_REF with skopeo.
ensure_pushed() {
  local ref=$1 variant=$2 from=${3:-} have pf stamp
  pf=$(pushed_file "$ref")
  stamp=$(cat "$STATE/images/$variant/.recipe")
  have=$(manifest_digest "$ref")
  if [ -n "$have" ] && [ "$have" = "$(sed -n 1p "$pf" 2>/dev/null)" ] &&
    [ "$stamp" = "$(sed -n 2p "$pf" 2>/dev/null)" ]; then
    log "image $ref already in registry"
    return
  fi
  if [ -n "$have" ]; then
    log "image $ref: registry holds another manifest or an older recipe; pushing again"
  fi
  if [ -n "$from" ]; then
    skopeo copy --quiet --insecure-policy --authfile "$AUTHFILE" \
      --dest-tls-verify=false "docker://$from" "docker://$ref" \
      </dev/null >>"$LOGS/images.log" 2>&1 ||
      die "skopeo copy $from -> $ref failed; see $LOGS/images.log"
  else
    ensure_local_image "$variant"
    if [ "${ref%%/*}" = "$REG_ANON" ]; then
      ch_image push "$variant" "$ref" || die "ch-image push $ref failed; see $LOGS/images.log"
    else
      CH_IMAGE_USERNAME=$REG_USER CH_IMAGE_PASSWORD=$(cat "$TOKEN_FILE") \
        ch_image push "$variant" "$ref" || die "ch-image push $ref failed; see $LOGS/images.log"
    fi
  fi
  have=$(manifest_digest "$ref")
  [ -n "$have" ] || die "image $ref not in the registry after the push"
  printf '%s\n%s\n' "$have" "$stamp" >"$pf"
  log "image $ref pushed ($have)"
}

step_images() {
  # Rootfs dirs are always kept up to date: tests build more images from them.
  ensure_rootfs tiny
  ensure_rootfs tinybash
  ensure_rootfs tiny-v2
  ensure_pushed "$IMAGE" tiny
  ensure_pushed "$IMAGE_ANON" tiny
  ensure_pushed "$IMAGE_BASH" tinybash
  ensure_pushed "$IMAGE_V2" tiny-v2
  ensure_pushed "$IMAGE_HTTP" tiny "$IMAGE"
}

###############################################################################
# e. munge + Slurm (no systemd)
###############################################################################
SLURM_HOST=$(hostname -s)

slurm_conf() {
  local cpus mem
  cpus=$(nproc)
  mem=$(awk '/^MemTotal:/ { m = int($2 / 1024 * 0.9); print (m < 2048 ? m : 2048) }' /proc/meminfo)
  cat <<EOF
# Generated by ci-exec scripts/test-env.sh; rewritten when it differs.
ClusterName=ci
SlurmctldHost=$SLURM_HOST(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
KillWait=5
MinJobAge=300
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
NodeName=$SLURM_HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$SLURM_HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

step_munge() {
  local i
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    log "munge key created"
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  if [ -n "$(daemon_pid /run/munge/munged.pid munged)" ]; then
    log "munged already running"
  else
    runuser -u munge -- /usr/sbin/munged --force \
      </dev/null >>"$LOGS/munged.log" 2>&1 9>&- ||
      die "munged failed to start; see $LOGS/munged.log and /var/log/munge/munged.log"
    log "munged started"
  fi
  for i in $(seq 25); do
    munge_ok && break
    sleep 0.2
  done
  munge_ok || die "munge -n | unmunge failed"
  log "munge credential check ok"
}

# modified_since_start FILE PID: FILE's mtime is later than PID's start.
modified_since_start() {
  local et
  et=$(ps -o etimes= -p "$2" 2>/dev/null | tr -d ' ' || true)
  [ -n "$et" ] || return 1
  [ $(($(date +%s) - $(stat -c %Y "$1"))) -lt "$et" ]
}

node_state() { sinfo -h -n "$SLURM_HOST" -o %T 2>/dev/null | head -n 1 || true; }

step_slurm() {
  local ctl d st i resumed=0
  install -d -o slurm -g slurm -m 0755 /run/slurm /var/spool/slurmctld /var/log/slurm
  install -d -o root -g root -m 0755 /var/spool/slurmd /etc/slurm
  if slurm_conf | write_if_changed /etc/slurm/slurm.conf 0644; then
    log "slurm.conf written (host $SLURM_HOST, $(nproc) CPUs)"
  else
    log "slurm.conf unchanged"
  fi
  ctl=$(daemon_pid /run/slurm/slurmctld.pid slurmctld)
  d=$(daemon_pid /run/slurm/slurmd.pid slurmd)
  # Restart when slurm.conf was modified after a running daemon started.
  if { [ -n "$ctl" ] && modified_since_start /etc/slurm/slurm.conf "$ctl"; } ||
    { [ -n "$d" ] && modified_since_start /etc/slurm/slurm.conf "$d"; }; then
    log "slurm.conf changed; restarting slurmd and slurmctld"
    [ -n "$d" ] && stop_pid slurmd "$d"
    [ -n "$ctl" ] && stop_pid slurmctld "$ctl"
    ctl='' d=''
  fi
  if [ -n "$ctl" ]; then
    log "slurmctld already running"
  else
    /usr/sbin/slurmctld </dev/null >>"$LOGS/slurmctld.out" 2>&1 9>&- ||
      die "slurmctld failed to start; see /var/log/slurm/slurmctld.log"
    log "slurmctld started"
  fi
  if [ -n "$d" ]; then
    log "slurmd already running"
  else
    /usr/sbin/slurmd </dev/null >>"$LOGS/slurmd.out" 2>&1 9>&- ||
      die "slurmd failed to start; see /var/log/slurm/slurmd.log"
    log "slurmd started"
  fi
  for i in $(seq 75); do
    st=$(node_state)
    case $st in
    idle | mixed | allocated | completing) break ;;
    down | drained | draining | drain | fail | failing)
      if [ "$resumed" = 0 ]; then
        scontrol update nodename="$SLURM_HOST" state=resume >/dev/null 2>&1 || true
        resumed=1
        log "slurm node $SLURM_HOST was $st; resumed"
      fi
      ;;
    esac
    sleep 0.2
  done
  case $st in
  idle | mixed | allocated | completing) log "slurm node $SLURM_HOST is $st" ;;
  *) die "slurm node $SLURM_HOST is '${st:-unknown}' after 15 s; see /var/log/slurm/" ;;
  esac
}

###############################################################################
# f. Apptainer 1.5.3
###############################################################################
apptainer_ok() {
  [ -x "$APPTAINER" ] && [ "$("$APPTAINER" version 2>/dev/null)" = "$APPTAINER_VERSION" ]
}

# Runs in a subshell with its output in the build log.
apptainer_build_steps() {
  local json dir src=$STATE/build/apptainer-$APPTAINER_VERSION
  set -e
  [ -n "$GO_BIN" ] || { echo "go not found"; exit 1; }
  PATH="$(dirname "$GO_BIN"):$PATH"
  export PATH
  # Private build cache: the build runs "go clean -cache".
  export GOCACHE=$STATE/build/gocache GOWORK=off GO111MODULE=on
  go version
  cd "$STATE/build"
  json=$(go mod download -json "github.com/apptainer/apptainer@v$APPTAINER_VERSION")
  dir=$(printf '%s' "$json" | /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
  echo "module dir: $dir"
  [ -d "$src" ] && chmod -R u+w "$src" && rm -rf "$src"
  cp -a "$dir" "$src"
  chmod -R u+w "$src"
  cd "$src"
  # Module zips drop exec bits; scripts/get-version needs git or VERSION.
  grep -rlI '^#!' . | xargs -r chmod +x
  echo "$APPTAINER_VERSION" >VERSION
  ./mconfig --prefix="$APPTAINER_PREFIX" --without-suid
  make -C builddir
  make -C builddir install
}

set_conf() { # KEY VALUE in apptainer.conf
  local key=$1 value=$2
  if grep -qE "^[[:space:]]*${key}[[:space:]]*=[[:space:]]*${value}[[:space:]]*$" "$APPTAINER_CONF"; then
    return 1
  fi
  if grep -qE "^[[:space:]]*#?[[:space:]]*${key}[[:space:]]*=" "$APPTAINER_CONF"; then
    sed -i -E "0,/^[[:space:]]*#?[[:space:]]*${key}[[:space:]]*=.*/s//$key = $value/" "$APPTAINER_CONF"
  else
    printf '%s = %s\n' "$key" "$value" >>"$APPTAINER_CONF"
  fi
  log "apptainer.conf: $key = $value"
}

sif_check() { # USER: apptainer exec of the SIF works as USER
  local out
  if [ "$1" = root ]; then
    out=$("$APPTAINER" exec "$SIF" cat /etc/os-release </dev/null 2>&1) || { printf '%s\n' "$out" >&2; return 1; }
  else
    out=$(runuser -u "$1" -- "$APPTAINER" exec "$SIF" cat /etc/os-release </dev/null 2>&1) ||
      { printf '%s\n' "$out" >&2; return 1; }
  fi
  grep -q '^ID=citiny$' <<<"$out" || { printf '%s\n' "$out" >&2; return 1; }
}

step_apptainer() {
  local blog=$LOGS/apptainer-build.log t rc bnd last full caps granted
  if apptainer_ok; then
    log "apptainer $APPTAINER_VERSION already installed"
  elif [ "${CI_EXEC_SKIP_APPTAINER:-0}" = 1 ]; then
    log "apptainer: not installed; build skipped (CI_EXEC_SKIP_APPTAINER=1)"
    return
  else
    [ -n "$GO_BIN" ] || die "Go not found (Apptainer needs Go >= 1.25.7); install it or set CI_EXEC_SKIP_APPTAINER=1"
    log "apptainer: building $APPTAINER_VERSION from the Go module (about 12 min on 2 cores; log: $blog)"
    t=$(date +%s.%N)
    : >"$blog"
    trap - ERR
    set +e
    (apptainer_build_steps) </dev/null >>"$blog" 2>&1
    rc=$?
    set -e
    trap 'printf "test-env: ERROR: line %s: command failed (exit %s): %s\n" "$LINENO" "$?" "$BASH_COMMAND" >&2' ERR
    if [ "$rc" != 0 ] || ! apptainer_ok; then
      tail -n 30 "$blog" >&2
      die "apptainer build failed (exit $rc); see $blog"
    fi
    rm -rf "$STATE/build/apptainer-$APPTAINER_VERSION" "$STATE/build/gocache"
    log "apptainer $APPTAINER_VERSION built and installed in $(elapsed "$t") s"
  fi

  [ -f "$APPTAINER_CONF" ] || die "$APPTAINER_CONF missing"
  # No systemd as PID 1: the cgroupfs manager is needed for --cpus/--memory.
  if ! set_conf "systemd cgroups" no; then :; fi
  # Root's bounding set may lack capabilities (CAP_SYS_RESOURCE on Firecracker
  # VMs); "full" would then make every root exec fail.
  bnd=$(awk '/^CapBnd:/ { print $2 }' /proc/self/status)
  last=$(cat /proc/sys/kernel/cap_last_cap)
  full=$(((1 << (last + 1)) - 1))
  if [ "$((16#$bnd))" != "$full" ]; then
    if ! set_conf "root default capabilities" file; then :; fi
    caps=$(capsh --decode="$bnd" | sed 's/^[^=]*=//')
    # "root [user]: CAP_CHOWN,CAP_DAC_OVERRIDE,..."
    # (exits 255 "no capability set for user/group root" before the first add)
    granted=$({ "$APPTAINER" capability list root 2>/dev/null || true; } | sed -n 's/^root \[user\]: //p')
    if [ -z "$(comm -23 <(tr ',' '\n' <<<"${caps^^}" | sort) <(tr ',' '\n' <<<"$granted" | sort))" ]; then
      log "apptainer: root capabilities already granted (bounding set $bnd)"
    else
      "$APPTAINER" capability add --user root "$caps" >>"$LOGS/apptainer.log" 2>&1 ||
        die "apptainer capability add failed; see $LOGS/apptainer.log"
      log "apptainer: root granted its bounding set ($bnd) as file capabilities"
    fi
  fi

  ensure_rootfs tiny
  if [ -s "$SIF" ] && [ "$SIF" -nt "$STATE/images/tiny/.recipe" ]; then
    log "SIF $SIF already built"
  else
    "$APPTAINER" build --force "$SIF.tmp" "$STATE/images/tiny/rootfs" \
      </dev/null >>"$LOGS/apptainer.log" 2>&1 || die "apptainer build of $SIF failed; see $LOGS/apptainer.log"
    chmod 0644 "$SIF.tmp"
    mv -f "$SIF.tmp" "$SIF"
    log "SIF $SIF built"
  fi
}

# f2. Podman (Debian's 4.3)
###############################################################################
PODMAN_CONF=/etc/containers/containers.conf.d/50-ci-exec-test.conf

# podman_conf: the drop-in this machine needs (empty when it needs none).
podman_conf() {
  local containers=() engine=()
  # Root without CAP_SYS_RESOURCE (Firecracker VMs) cannot raise the
  # nofile/nproc limits rootful Podman sets by default (1048576/4194304):
  # every container would fail with "setrlimit ... operation not
  # permitted". Lowering a hard limit needs no capability.
  if [ "$(capsh --decode="$(awk '/^CapBnd:/ { print $2 }' /proc/self/status)" | grep -c cap_sys_resource)" = 0 ]; then
    containers+=('default_ulimits = ["nofile=1024:8192", "nproc=8192:8192"]')
  fi
  # crun 1.8 refuses hybrid cgroup hierarchies (v1 controllers plus a
  # cgroup2 mount); runc copes.
  if [ "$(stat -fc %T /sys/fs/cgroup)" != cgroup2fs ] && [ -d /sys/fs/cgroup/unified ]; then
    engine+=('runtime = "runc"')
  fi
  # Without systemd as PID 1 there is no systemd cgroup manager or journal.
  if [ "$(cat /proc/1/comm)" != systemd ]; then
    engine+=('cgroup_manager = "cgroupfs"' 'events_logger = "file"')
  fi
  [ ${#containers[@]} -gt 0 ] || [ ${#engine[@]} -gt 0 ] || return 0
  echo "# Written by ci-exec scripts/test-env.sh for this machine's quirks."
  if [ ${#containers[@]} -gt 0 ]; then printf '[containers]\n'; printf '%s\n' "${containers[@]}"; fi
  if [ ${#engine[@]} -gt 0 ]; then printf '[engine]\n'; printf '%s\n' "${engine[@]}"; fi
}

# podman_drop TMP: remove podman_check's storage as root (rootless layers
# belong to subordinate ids) after ending the rootless pause process that
# keeps the check's user namespace and unmounting what rootful storage keeps
# mounted (its overlay dir, on itself). No podman command: each would start
# a new pause process.
podman_drop() {
  local tmp=$1 m
  if [ -s "$tmp/xdg/libpod/tmp/pause.pid" ]; then
    kill "$(cat "$tmp/xdg/libpod/tmp/pause.pid")" 2>/dev/null || true
  fi
  awk -v t="$tmp/" 'index($2, t) == 1 { print $2 }' /proc/self/mounts | sort -r | while read -r m; do
    umount "$m" || umount -l "$m" || true
  done
  rm -rf "$tmp"
}

# podman_check USER REF [AUTHFILE]: USER runs REF with podman in throw-away
# storage, keep-id for users (rootful Podman 4.3 refuses it), and a file it
# writes to a bound dir belongs to USER.
podman_check() {
  local user=$1 ref=$2 auth=${3:-} tmp out args=() as=()
  tmp=$(mktemp -d /tmp/ci-exec-podman-check.XXXXXX)
  chmod 0700 "$tmp"
  if [ "$user" != root ]; then
    chown "$user:" "$tmp"
    as=(runuser -u "$user" --)
    args=(--userns=keep-id)
  fi
  if [ -n "$auth" ]; then
    install -m 0600 -o "$user" "$auth" "$tmp/auth.json"
    args+=(--authfile "$tmp/auth.json")
  fi
  # XDG_RUNTIME_DIR must exist, or rootless Podman falls back to
  # /tmp/podman-run-UID (and keeps its pause process there).
  mkdir -m 0700 "$tmp/work" "$tmp/xdg"
  [ "$user" = root ] || chown "$user:" "$tmp/work" "$tmp/xdg"
  if ! out=$(cd "$tmp" && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$tmp" XDG_RUNTIME_DIR="$tmp/xdg" \
    XDG_CONFIG_HOME="$tmp/config" XDG_DATA_HOME="$tmp/data" \
    "${as[@]}" podman --root "$tmp/root" --runroot "$tmp/run" --storage-driver overlay --log-level error \
    run --rm --network host "${args[@]}" --volume "$tmp/work:$tmp/work" "$ref" \
    sh -c 'cat /etc/os-release && echo ok >"$1/out"' sh "$tmp/work" </dev/null 2>&1); then
    printf '%s\n' "$out" >&2
    podman_drop "$tmp"
    return 1
  fi
  local owner
  owner=$(stat -c %U "$tmp/work/out" 2>/dev/null || echo none)
  podman_drop "$tmp"
  grep -q '^ID=citiny$' <<<"$out" || { printf '%s\n' "$out" >&2; return 1; }
  [ "$owner" = "$user" ] || { echo "a file written in the container belongs to $owner, not $user" >&2; return 1; }
}

step_podman() {
  local conf
  conf=$(podman_conf)
  install -d -m 0755 /etc/containers/containers.conf.d
  if [ -z "$conf" ]; then
    if [ -e "$PODMAN_CONF" ]; then rm -f "$PODMAN_CONF" && log "podman: drop-in $PODMAN_CONF removed (not needed)"; fi
  elif printf '%s\n' "$conf" | write_if_changed "$PODMAN_CONF" 0644; then
    log "podman: drop-in $PODMAN_CONF written"
  else
    log "podman: drop-in $PODMAN_CONF unchanged"
  fi
}

###############################################################################
# env file for the Go tests
###############################################################################
write_env_file() {
  {
    cat <<EOF
CI_EXEC_TEST_STATE_DIR=$STATE
CI_EXEC_TEST_REGISTRY=$REG_AUTH
CI_EXEC_TEST_REGISTRY_ANON=$REG_ANON
CI_EXEC_TEST_REGISTRY_HTTP=$REG_HTTP
CI_EXEC_TEST_REGISTRY_USER=$REG_USER
CI_EXEC_TEST_TOKEN_FILE=$TOKEN_FILE
CI_EXEC_TEST_REGISTRY_USER2=$REG_USER2
CI_EXEC_TEST_USER_PASSWORD_FILE=$PW2_FILE
CI_EXEC_TEST_AUTHFILE=$AUTHFILE
CI_EXEC_TEST_CA=$CA
CI_EXEC_TEST_IMAGE=$IMAGE
CI_EXEC_TEST_IMAGE_BASH=$IMAGE_BASH
CI_EXEC_TEST_IMAGE_V2=$IMAGE_V2
CI_EXEC_TEST_IMAGE_ANON=$IMAGE_ANON
CI_EXEC_TEST_IMAGE_HTTP=$IMAGE_HTTP
CI_EXEC_TEST_ROOTFS=$STATE/images/tiny/rootfs
CI_EXEC_TEST_ROOTFS_BASH=$STATE/images/tinybash/rootfs
CI_EXEC_TEST_ROOTFS_V2=$STATE/images/tiny-v2/rootfs
CI_EXEC_TEST_UNPRIV_USER=$UNPRIV_USER
CI_EXEC_TEST_UNPRIV_USER2=$UNPRIV_USER2
CI_EXEC_TEST_SLURM_PARTITION=debug
CI_EXEC_TEST_SLURM_NODE=$SLURM_HOST
EOF
    echo "CI_EXEC_TEST_PODMAN=$(command -v podman)"
    if apptainer_ok; then
      echo "CI_EXEC_TEST_APPTAINER=$APPTAINER"
      echo "CI_EXEC_TEST_SIF=$SIF"
    fi
  } | if write_if_changed "$ENV_FILE" 0644; then
    log "env file written ($ENV_FILE)"
  else
    log "env file unchanged ($ENV_FILE)"
  fi
}

###############################################################################
# g. Final checks
###############################################################################
step_verify() {
  local v tmp out st
  v=$(ch-run --version 2>&1) || die "ch-run --version failed: $v"
  log "check: ch-run $v"

  tmp=$(runuser -u "$UNPRIV_USER" -- mktemp -d /tmp/ci-exec-test-check.XXXXXX)
  if ! (
    export CH_IMAGE_USERNAME=$REG_USER
    CH_IMAGE_PASSWORD=$(cat "$TOKEN_FILE")
    export CH_IMAGE_PASSWORD
    runuser -u "$UNPRIV_USER" -- ch-image -s "$tmp/storage" --auth pull "$IMAGE"
  ) </dev/null >"$LOGS/check-pull.log" 2>&1; then
    rm -rf "$tmp"
    tail -n 10 "$LOGS/check-pull.log" >&2
    die "ch-image --auth pull $IMAGE as $UNPRIV_USER failed; see $LOGS/check-pull.log"
  fi
  out=$(runuser -u "$UNPRIV_USER" -- ch-run -s "$tmp/storage" "$IMAGE" -- cat /etc/os-release </dev/null 2>&1) || true
  rm -rf "$tmp"
  grep -q '^ID=citiny$' <<<"$out" || die "ch-run of the pulled $IMAGE as $UNPRIV_USER failed: $out"
  log "check: $UNPRIV_USER pulled $IMAGE with --auth and ran it"

  st=$(node_state)
  case $st in
  idle | mixed | allocated | completing) log "check: slurm node $SLURM_HOST $st" ;;
  *) die "slurm node $SLURM_HOST is '${st:-unknown}'" ;;
  esac

  podman_check root "$IMAGE" "$AUTHFILE" || die "podman run of $IMAGE as root failed"
  podman_check "$UNPRIV_USER" "$IMAGE" "$AUTHFILE" || die "podman run --userns=keep-id of $IMAGE as $UNPRIV_USER failed"
  podman_check "$UNPRIV_USER" "$IMAGE_ANON" || die "podman run --userns=keep-id of $IMAGE_ANON as $UNPRIV_USER failed"
  log "check: $(podman --version) runs $IMAGE as root and $UNPRIV_USER (keep-id), $IMAGE_ANON anonymously"

  if apptainer_ok; then
    sif_check root || die "apptainer exec $SIF as root failed"
    sif_check "$UNPRIV_USER" || die "apptainer exec $SIF as $UNPRIV_USER failed"
    log "check: apptainer $("$APPTAINER" version) runs $SIF as root and $UNPRIV_USER"
  elif [ "${CI_EXEC_SKIP_APPTAINER:-0}" = 1 ]; then
    log "check: apptainer skipped (CI_EXEC_SKIP_APPTAINER=1)"
  else
    die "apptainer $APPTAINER_VERSION not working"
  fi
}

###############################################################################
step_packages
step_system
step_ca
step_secrets
ensure_registry auth
ensure_registry anon
ensure_registry http
step_images
step_munge
step_slurm
step_apptainer
step_podman
write_env_file
step_verify
log "ready in $(elapsed "$T0") s (facts for the tests: $ENV_FILE)"
