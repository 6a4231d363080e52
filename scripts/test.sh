#!/usr/bin/env bash
# The test command: installs and starts everything the tests need (idempotent;
# see scripts/test-env.sh), then runs every test with missing runtimes
# counted as failures, never as skips.
#
#   sudo scripts/test.sh            # everything
#   sudo scripts/test.sh -run Foo   # extra arguments go to `go test`
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
	echo "scripts/test.sh must run as root: it installs packages and runs the container tests as root and as the unprivileged test user" >&2
	exit 1
fi
export PATH=/usr/local/go/bin:$PATH
if ! command -v go >/dev/null; then
	echo "Go >= 1.26 is needed (expected in /usr/local/go)" >&2
	exit 1
fi

bash scripts/test-env.sh

# Under the test command a missing runtime, registry or user fails the test.
export CI_EXEC_REQUIRE_RUNTIMES=1

echo "== go vet"
go vet ./...
echo "== gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
	echo "gofmt would change: $unformatted" >&2
	exit 1
fi
echo "== go test"
go test -count=1 -timeout 75m "$@" ./...
