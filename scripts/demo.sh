#!/usr/bin/env bash
# Builds ci-exec and runs one demo job through all four stages (config,
# prepare, run for each stage, cleanup) with the runner test double, printing
# the job log as gitlab-runner would show it. No runtime or registry needed:
# the job runs on the host. If scripts/test-env.sh has set up the local test
# registry and Charliecloud, a second job runs in a container image.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH

work=$(mktemp -d /tmp/ci-exec-demo.XXXXXX)
chmod 0755 "$work"
echo "== building ci-exec and the runner test double into $work"
CGO_ENABLED=0 go build -o "$work/ci-exec" ./cmd/ci-exec
go build -o "$work/runjob" ./cmd/runjob

cat > "$work/config.toml" <<TOML
[general]
data_dir = "$work/data/\$USER"
job_message = "Hello from the ci-exec demo (config: $work/config.toml)"
TOML

echo "== job 1: on the host"
"$work/runjob" --driver "$work/ci-exec" --config "$work/config.toml" \
	--var DEMO_GREETING="hello, world" \
	--after 'echo "after_script ran with CI_JOB_STATUS=$CI_JOB_STATUS"' \
	-- 'echo "$DEMO_GREETING from $(hostname) as $(id -un)"' 'pwd' 'grep PRETTY_NAME /etc/os-release'

facts=/var/lib/ci-exec-test/env
if [ -r "$facts" ] && command -v ch-run >/dev/null; then
	image=$(sed -n 's/^CI_EXEC_TEST_IMAGE_ANON=//p' "$facts")
	if [ -n "$image" ]; then
		cat > "$work/config-ch.toml" <<TOML
[general]
data_dir = "$work/data/\$USER"
run_mechanism = "charliecloud"
TOML
		echo
		echo "== job 2: in the Charliecloud image $image"
		"$work/runjob" --driver "$work/ci-exec" --config "$work/config-ch.toml" --image "$image" \
			-- 'grep PRETTY_NAME /etc/os-release' 'pwd' 'echo "built in a container" > artifact.txt' 'ls -l artifact.txt'
	fi
fi
rm -rf "$work"
