#!/usr/bin/env bash
# Fake custom-executor driver for the runnerdouble tests.
#
# Usage: fakedriver.sh [--config PATH] config|prepare|run <script> <stage>|cleanup
# It records every call in $FAKE_REC (env dump, script copy, script mode)
# and is steered by job variables (CUSTOM_ENV_FAKE_*):
#   FAKE_CONFIG_MODE   badjson | nobuilds | empty | shared
#   FAKE_PREPARE_EXIT  exit code of prepare
#   FAKE_PREPARE_SLEEP seconds prepare sleeps first
#   FAKE_RAW_EXIT      stage whose script exit code is returned as is
#   FAKE_BADFILE       stage that writes a non-integer exit code file
#   FAKE_IGNORE_TERM   stage during which the driver ignores SIGTERM
#   FAKE_SHELL         shell that runs the script (default bash)
#   FAKE_CLEANUP_EXIT  exit code of cleanup
#   FAKE_HOLD_STAGE    stage during which the driver itself holds 40 MiB
set -u
rec="${FAKE_REC:?}"
root="${FAKE_ROOT:?}"
seq=$(( $(cat "$rec/.seq" 2>/dev/null || echo 0) + 1 ))
echo "$seq" > "$rec/.seq"
if [ "${1:-}" = "--config" ]; then
	echo "$2" > "$rec/$seq-config-path"
	shift 2
fi
kind="$1"

save() {
	env > "$rec/$seq-$1.env"
	pwd > "$rec/$seq-$1.pwd"
	id -u > "$rec/$seq-$1.uid"
}

case "$kind" in
config)
	save config
	cp "$JOB_RESPONSE_FILE" "$rec/response.json"
	stat -c %a "$JOB_RESPONSE_FILE" > "$rec/response.mode"
	echo "config says hello on stderr" >&2
	case "${CUSTOM_ENV_FAKE_CONFIG_MODE:-}" in
	badjson) echo "this is not json"; exit 0 ;;
	nobuilds) printf '{"cache_dir":"%s/cache"}\n' "$root"; exit 0 ;;
	empty) exit 0 ;;
	shared) shared=true ;;
	*) shared=false ;;
	esac
	cat <<JSON
{"builds_dir":"$root/builds","cache_dir":"$root/cache","builds_dir_is_shared":$shared,
 "hostname":"drv-host","driver":{"name":"fakedrv","version":"0.0.1"},"runner_hostname":"ignored",
 "job_env":{"FAKE_JOB_ENV":"from-config","CUSTOM_ENV_FAKE_OVERRIDE":"from-job-env"}}
JSON
	;;
prepare)
	save prepare
	echo "preparing fake environment"
	sleep "${CUSTOM_ENV_FAKE_PREPARE_SLEEP:-0}"
	exit "${CUSTOM_ENV_FAKE_PREPARE_EXIT:-0}"
	;;
run)
	script="${*: -2:1}"
	stage="${*: -1}"
	save "run-$stage"
	cp "$script" "$rec/$seq-run-$stage.script"
	stat -c %a "$script" > "$rec/$seq-run-$stage.mode"
	if [ "${CUSTOM_ENV_FAKE_HOLD_STAGE:-}" = "$stage" ]; then
		held=$(head -c 41943040 /dev/zero | tr '\0' x)
		echo "fakedriver holds ${#held} bytes" >&2
	fi
	if [ "${CUSTOM_ENV_FAKE_IGNORE_TERM:-}" = "$stage" ]; then
		trap '' TERM
		${CUSTOM_ENV_FAKE_SHELL:-bash} "$script"
		rc=$?
	else
		${CUSTOM_ENV_FAKE_SHELL:-bash} "$script" &
		child=$!
		got_term=
		trap 'got_term=1; kill -TERM "$child" 2>/dev/null' TERM
		wait "$child"
		rc=$?
		if [ -n "$got_term" ]; then
			# wait was interrupted by the trap: collect the real status
			echo "fakedriver: got SIGTERM during $stage" >&2
			wait "$child"
			rc=$?
		fi
	fi
	if [ "${CUSTOM_ENV_FAKE_RAW_EXIT:-}" = "$stage" ]; then
		exit "$rc"
	fi
	if [ "$rc" -ne 0 ]; then
		if [ "${CUSTOM_ENV_FAKE_BADFILE:-}" = "$stage" ]; then
			echo "not-a-number" > "$BUILD_EXIT_CODE_FILE"
		else
			echo "$rc" > "$BUILD_EXIT_CODE_FILE"
		fi
		exit "$BUILD_FAILURE_EXIT_CODE"
	fi
	exit 0
	;;
cleanup)
	save cleanup
	echo "cleanup on stdout"
	echo "cleanup on stderr" >&2
	exit "${CUSTOM_ENV_FAKE_CLEANUP_EXIT:-0}"
	;;
*)
	echo "fakedriver: unknown command $kind" >&2
	exit 2
	;;
esac
