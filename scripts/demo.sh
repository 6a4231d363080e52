#!/usr/bin/env bash
# Builds ci-exec and runs the jobs of a sample project's .gitlab-ci.yml with
# `ci-exec exec`: through all four stages (config, prepare, run for each
# stage, cleanup) as gitlab-runner would, printing each job's log.
#
#   1. a job on the host (nothing needed but Go and git);
#   2. the same pipeline's job in a container image with Charliecloud. On a
#      fresh Debian 12 machine, as root, this installs what it needs from
#      Debian's packages (charliecloud-runtime, charliecloud-builders,
#      docker-registry, busybox-static, openssl), builds a small busybox
#      image offline, and serves it from a private registry on 127.0.0.1
#      (self-signed certificate, listed in insecure_registries) for the
#      length of the demo. Without root and without those packages the
#      container job is skipped with a note.
#
# Everything it makes lives in one temp dir, removed at the end; the
# registry it starts is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:/usr/sbin:/usr/bin:/sbin:/bin
export CH_IMAGE_CACHE=disabled
export USER=${USER:-$(id -un)} LOGNAME=${LOGNAME:-$(id -un)}
unset CH_IMAGE_STORAGE CH_IMAGE_USERNAME CH_IMAGE_PASSWORD CH_IMAGE_AUTH

work=$(mktemp -d /tmp/ci-exec-demo.XXXXXX)
chmod 0755 "$work"
reg_pid=
finish() {
	if [ -n "$reg_pid" ]; then
		kill "$reg_pid" 2>/dev/null || true
		wait "$reg_pid" 2>/dev/null || true
	fi
	rm -rf "$work"
}
trap finish EXIT

echo "== building ci-exec into $work"
CGO_ENABLED=0 go build -o "$work/ci-exec" ./cmd/ci-exec
cx=$work/ci-exec

# The sample project: default:, extends:, variables:, before_script,
# !reference, and a job in an image (IMAGE is filled in below).
project=$work/project
mkdir -p "$project"
cat >"$project/.gitlab-ci.yml" <<'YAML'
variables:
  GREETING: "hello, world"

default:
  before_script:
    - echo "before_script from default:"

.report:
  script:
    - echo "$GREETING from $CI_JOB_NAME at commit $CI_COMMIT_SHORT_SHA"
    - grep PRETTY_NAME /etc/os-release
    - pwd
    - ls

hello-host:
  extends: .report
  after_script:
    - echo "after_script ran with CI_JOB_STATUS=$CI_JOB_STATUS"

hello-container:
  extends: .report
  image: "$DEMO_IMAGE"
  script:
    - !reference [.report, script]
    - echo "built in a container" > artifact.txt
  artifacts:
    paths: [artifact.txt]
YAML
echo "A file of the sample project" >"$project/README"
git -C "$project" init -q -b main
git -C "$project" add .
git -C "$project" -c user.email=demo@example.com -c user.name=demo commit -q -m "sample project"

cat >"$work/config.toml" <<TOML
[general]
data_dir = "$work/data/\$USER"
job_message = "Hello from the ci-exec demo (config: $work/config.toml)"
TOML

echo
echo "== ci-exec exec --list (in $project)"
(cd "$project" && "$cx" --config "$work/config.toml" exec --list)

echo
echo "== job 1: ci-exec exec hello-host"
(cd "$project" && "$cx" --config "$work/config.toml" exec hello-host)

###############################################################################
# Job 2: in a Charliecloud image, on its own.
###############################################################################
need=()
for p in ch-run ch-image docker-registry busybox openssl; do
	command -v "$p" >/dev/null || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
		echo
		echo "== installing Charliecloud, docker-registry, busybox-static and openssl from Debian (log: $work/apt.log)"
		export DEBIAN_FRONTEND=noninteractive
		{
			apt-get -o DPkg::Lock::Timeout=600 update &&
				apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends \
					charliecloud-runtime charliecloud-builders docker-registry busybox-static openssl \
					python3-requests python3-lark ca-certificates
		} >"$work/apt.log" 2>&1 </dev/null || {
			tail -n 20 "$work/apt.log" >&2
			echo "demo: apt-get failed; the container job is skipped" >&2
			exit 1
		}
	else
		echo
		echo "== job 2 skipped: it needs ${need[*]} (run this script as root on Debian 12 to install them)"
		exit 0
	fi
fi

echo
echo "== building a busybox image offline and serving it from a private registry on 127.0.0.1"
rootfs=$work/image/rootfs
install -d -m 0755 "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,root,home,dev,proc,sys,mnt,var}
install -d -m 1777 "$rootfs/tmp" "$rootfs/var/tmp"
install -m 0755 "$(command -v busybox)" "$rootfs/bin/busybox"
for e in $("$rootfs/bin/busybox" --list-full); do
	case $e in */*) ;; *) continue ;; esac
	case ${e##*/} in busybox) continue ;; esac
	dir=${e%/*}
	if [ "$dir" = bin ]; then target=busybox; else target=$(printf '%s\n' "$dir" | sed 's|[^/][^/]*|..|g')/bin/busybox; fi
	[ -e "$rootfs/$e" ] || ln -s "$target" "$rootfs/$e"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
printf 'NAME="ci-exec demo"\nID=cidemo\nPRETTY_NAME="ci-exec demo image (busybox)"\n' >"$rootfs/etc/os-release"
printf 'FROM scratch\nCOPY rootfs/ /\n' >"$work/image/Dockerfile"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
reg=127.0.0.1:$port
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 \
	-addext subjectAltName=IP:127.0.0.1 -addext basicConstraints=critical,CA:TRUE -keyout "$work/reg.key" -out "$work/reg.crt" >"$work/openssl.log" 2>&1
cat >"$work/registry.yml" <<YAML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: $reg
  secret: ci-exec-demo
  tls:
    certificate: $work/reg.crt
    key: $work/reg.key
YAML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 </dev/null &
reg_pid=$!
for _ in $(seq 100); do
	if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; then break; fi
	kill -0 "$reg_pid" 2>/dev/null || { cat "$work/registry.log" >&2; exit 1; }
	sleep 0.1
done
image=$reg/demo/busybox:latest
ch-image -s "$work/ch" build -t demo -f "$work/image/Dockerfile" "$work/image" >"$work/build.log" 2>&1 </dev/null ||
	{ tail -n 20 "$work/build.log" >&2; exit 1; }
# ch-image 0.31's push checks the certificate even with --tls-no-verify:
# it trusts the demo's own certificate for this one command.
REQUESTS_CA_BUNDLE=$work/reg.crt ch-image -s "$work/ch" push demo "$image" >>"$work/build.log" 2>&1 </dev/null ||
	{ tail -n 20 "$work/build.log" >&2; exit 1; }
echo "$image pushed"

install -d -m 1777 "$work/images"
cat >"$work/config-ch.toml" <<TOML
[general]
data_dir = "$work/data/\$USER"
run_mechanism = "charliecloud"

[general.charliecloud]
image_storage_dir = "$work/images"
image_allowlist = ['127\\.0\\.0\\.1:$port/demo/.*']
# The demo registry's certificate is self-signed.
insecure_registries = ["$reg"]
TOML

echo
echo "== ci-exec check of the Charliecloud configuration"
"$cx" --config "$work/config-ch.toml" check || true

echo
echo "== job 2: ci-exec exec hello-container (image $image)"
(cd "$project" && "$cx" --config "$work/config-ch.toml" exec --var DEMO_IMAGE="$image" \
	--artifacts-dir "$work/artifacts" hello-container)
echo "== the artifact copied back: $(cat "$work/artifacts/artifact.txt")"
