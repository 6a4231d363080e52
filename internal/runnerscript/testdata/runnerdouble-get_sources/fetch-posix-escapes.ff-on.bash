#!/usr/bin/env bash

trap 'exit 1' TERM

case "$(set -o)" in *"pipefail"*) set -o pipefail;; esac; set -o errexit
set +o noclobber
(trap 'exit 1' TERM; eval "export FF_USE_GIT_BUNDLE_URIS=true
export FF_USE_GITALY_CORRELATION_ID=true
export FF_NETWORK_PER_BUILD=false
export FF_USE_LEGACY_BASH_EVAL=false
export FF_ENABLE_BASH_EXIT_CODE_CHECK=false
export FF_SCRIPT_SECTIONS=false
export FF_ENABLE_JOB_CLEANUP=false
export FF_POSIXLY_CORRECT_ESCAPES=true
export FF_GIT_URLS_WITHOUT_TOKENS=true
export FF_USE_JOB_ROUTER=false
export CI_RUNNER_SHORT_TOKEN=t3stt0k3n
export CI_BUILDS_DIR=/srv/ci/builds
export CI_PROJECT_DIR=/srv/ci/builds/demo-group/demo
export CI_CONCURRENT_ID=0
export CI_CONCURRENT_PROJECT_ID=0
export CI_SERVER=yes
export CI_JOB_STATUS=running
export CI_JOB_TIMEOUT=3600
export CI_PIPELINE_ID=1
export CI_PIPELINE_SOURCE=push
export CI_JOB_ID=4246
export CI_JOB_NAME=test
export CI_JOB_STAGE=test
export CI_JOB_URL=http://127.0.0.1:1/demo-group/demo/-/jobs/4246
export CI_JOB_TOKEN=glcbt-fake-job-token-4246
export CI_SERVER_URL=http://127.0.0.1:1
export CI_SERVER_HOST=127.0.0.1
export CI_API_V4_URL=http://127.0.0.1:1/api/v4
export CI_PROJECT_ID=1
export CI_PROJECT_NAME=demo
export CI_PROJECT_PATH=demo-group/demo
export CI_PROJECT_NAMESPACE=demo-group
export CI_PROJECT_URL=http://127.0.0.1:1/demo-group/demo
export CI_COMMIT_SHA=1111111111111111111111111111111111111111
export CI_COMMIT_REF_NAME=main
export CI_COMMIT_BRANCH=main
export GITLAB_USER_LOGIN=root
export CI_REPOSITORY_URL=http://gitlab-ci-token:glcbt-fake-job-token-4246@127.0.0.1:1/demo-group/demo.git
export GIT_STRATEGY=fetch
export CI_SHARED_ENVIRONMENT=true
export CI_RUNNER_VERSION=19.4.0
export CI_RUNNER_REVISION=fc1f1862
export CI_RUNNER_EXECUTABLE_ARCH=linux/amd64
export RUNNER_TEMP_PROJECT_DIR=/srv/ci/builds/demo-group/demo.tmp
export GITLAB_ENV=/srv/ci/builds/demo-group/demo.tmp/gitlab_runner_env
mkdir -p \"/srv/ci/builds/demo-group/demo.tmp\"
touch \"/srv/ci/builds/demo-group/demo.tmp/gitlab_runner_env\"
while read -r line; do export \"\$line\"; done < \"/srv/ci/builds/demo-group/demo.tmp/gitlab_runner_env\"
export GIT_CONFIG_GLOBAL=\"/srv/ci/builds/demo-group/demo.tmp/.glr.gconf\"
export GIT_TERMINAL_PROMPT=0
export GCM_INTERACTIVE=Never
rm \"-f\" \"/srv/ci/builds/demo-group/demo.tmp/.glr.gconf\"
if [ -r \"\$HOME/.gitconfig\" ]; then
  git \"config\" \"--file\" \"/srv/ci/builds/demo-group/demo.tmp/.glr.gconf\" \"--add\" \"include.path\" \"\$HOME/.gitconfig\"
fi
if [ -r \"\$HOME/.config/git/config\" ]; then
  git \"config\" \"--file\" \"/srv/ci/builds/demo-group/demo.tmp/.glr.gconf\" \"--add\" \"include.path\" \"\$HOME/.config/git/config\"
fi
git \"config\" \"--file\" \"/srv/ci/builds/demo-group/demo.tmp/.glr.gconf\" \"--add\" \"include.path\" \"/srv/ci/builds/demo-group/demo.tmp/.gitlab-runner.ext.conf\"
export GIT_LFS_SKIP_SMUDGE=1
rm \"-f\" \"/srv/ci/builds/demo-group/demo/.git/index.lock\"
rm \"-f\" \"/srv/ci/builds/demo-group/demo/.git/shallow.lock\"
rm \"-f\" \"/srv/ci/builds/demo-group/demo/.git/HEAD.lock\"
rm \"-f\" \"/srv/ci/builds/demo-group/demo/.git/hooks/post-checkout\"
rm \"-f\" \"/srv/ci/builds/demo-group/demo/.git/config.lock\"
if [ -d \"/srv/ci/builds/demo-group/demo/.git/refs\" ]; then
  et='+' ; find /dev/null -exec true {} + 2>/dev/null || et=';' ; find \"/srv/ci/builds/demo-group/demo/.git/refs\" -name \"*.lock\" -type f -exec rm -f {} \"\${et}\"
fi
rm \"-f\" \"/srv/ci/builds/demo-group/demo.tmp/git-template/config\"
if [ -d \"/srv/ci/builds/demo-group/demo.tmp/git-template/hooks\" ]; then
  chmod \"-R\" \"u+rwX\" \"/srv/ci/builds/demo-group/demo.tmp/git-template/hooks\"
fi
rm \"-r\" \"-f\" \"/srv/ci/builds/demo-group/demo.tmp/git-template/hooks\"
rm \"-f\" \"/srv/ci/builds/demo-group/demo/.git/config\"
if [ -d \"/srv/ci/builds/demo-group/demo/.git/hooks\" ]; then
  chmod \"-R\" \"u+rwX\" \"/srv/ci/builds/demo-group/demo/.git/hooks\"
fi
rm \"-r\" \"-f\" \"/srv/ci/builds/demo-group/demo/.git/hooks\"
mkdir -p /srv/ci/builds/demo-group/demo.tmp/git-template
git config -f /srv/ci/builds/demo-group/demo.tmp/git-template/config init.defaultBranch none
git config -f /srv/ci/builds/demo-group/demo.tmp/git-template/config fetch.recurseSubmodules false
git config -f /srv/ci/builds/demo-group/demo.tmp/git-template/config credential.interactive never
git config -f /srv/ci/builds/demo-group/demo.tmp/git-template/config gc.autoDetach false
rm \"-f\" \"/srv/ci/builds/demo-group/demo.tmp/.gitlab-runner.ext.conf\"
git \"config\" \"-f\" \"/srv/ci/builds/demo-group/demo.tmp/.gitlab-runner.ext.conf\" \"http.extraHeader\" \"X-Gitaly-Correlation-ID: 01JRUNNERDOUBLE0CORRELATION\"
echo \"Gitaly correlation ID: 01JRUNNERDOUBLE0CORRELATION\"
git \"config\" \"-f\" \"/srv/ci/builds/demo-group/demo.tmp/.gitlab-runner.ext.conf\" \"transfer.bundleURI\" \"true\"
git config -f \"/srv/ci/builds/demo-group/demo.tmp/.gitlab-runner.ext.conf\" --replace-all credential.http://127.0.0.1:1.helper \"\" && git config -f \"/srv/ci/builds/demo-group/demo.tmp/.gitlab-runner.ext.conf\" --add credential.http://127.0.0.1:1.helper \"!f(){ if [ \\\"\\\$1\\\" = \\\"get\\\" ] ; then echo \\\"password=\\\${CI_JOB_TOKEN}\\\" ; fi ; } ; f\" && git config -f \"/srv/ci/builds/demo-group/demo.tmp/.gitlab-runner.ext.conf\" credential.http://127.0.0.1:1.username gitlab-ci-token
git \"config\" \"--file\" \"/srv/ci/builds/demo-group/demo.tmp/git-template/config\" \"--replace-all\" \"include.path\" \"/srv/ci/builds/demo-group/demo.tmp/.gitlab-runner.ext.conf\" \"\\.gitlab-runner\\.ext\\.conf\$\"
export GLR_EXT_GIT_CONFIG_PATH=\"/srv/ci/builds/demo-group/demo.tmp/.gitlab-runner.ext.conf\"
echo \"Fetching changes...\"
git init /srv/ci/builds/demo-group/demo --template /srv/ci/builds/demo-group/demo.tmp/git-template
cd /srv/ci/builds/demo-group/demo
if git remote add origin http://127.0.0.1:1/demo-group/demo.git >/dev/null 2>&1 ; then
  echo \"Created fresh repository.\"
else
  git remote set-url origin http://127.0.0.1:1/demo-group/demo.git
  git \"config\" \"--file\" \".git/config\" \"--replace-all\" \"include.path\" \"\$GLR_EXT_GIT_CONFIG_PATH\" \"\\.gitlab-runner\\.ext\\.conf\$\"
fi
if [ -e \".git/shallow\" ]; then
  git -c \"http.userAgent=gitlab-runner 19.4.0 linux/amd64\" fetch origin --no-recurse-submodules +refs/heads/main:refs/remotes/origin/main --prune --quiet --unshallow
else
  git -c \"http.userAgent=gitlab-runner 19.4.0 linux/amd64\" fetch origin --no-recurse-submodules +refs/heads/main:refs/remotes/origin/main --prune --quiet
fi
echo \"Checking out 11111111 as detached HEAD (ref is main)...\"
git -c \"submodule.recurse=false\" checkout -f -q 1111111111111111111111111111111111111111
git clean -ffdx
if git lfs version >/dev/null 2>&1 ; then
  git lfs pull
  echo
fi
echo \"Skipping Git submodules setup\"
if [ -e \"/srv/ci/builds/.gitlab-build-uid-gid\" ]; then
  if [ -d \"/srv/ci/builds\" ]; then
    chown -R \"\$(stat -c '%u:%g' '/srv/ci/builds/.gitlab-build-uid-gid')\" '/srv/ci/builds'
  fi
fi
echo \"url=http://127.0.0.1:1
username=gitlab-ci-token\" | git credential reject || true
") < /dev/null
exit 0
