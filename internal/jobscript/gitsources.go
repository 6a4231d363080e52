package jobscript

// get_sources as gitlab-runner 19.4 writes it for bash (shells/abstract.go
// writeGetSourcesScript and what it calls, shells/bash.go BashWriter;
// revision fc1f1862), transcribed call for call: the runner's shells
// package cannot be built here (its step-runner, moa and labkit/v2
// dependencies are not on the Go module proxy), so the double cannot call
// it. The URLs and insteadOf rules do come from the runner's own code
// (helpers/url GitAuthHelper), with the job token in them unless
// FF_GIT_URLS_WITHOUT_TOKENS is on, exactly as the runner computes them.
// Left out: the pre/post clone hooks, TLS files, GIT_CLONE_PATH, object
// formats other than sha1, FF_USE_GIT_NATIVE_CLONE and
// FF_USE_GIT_PROACTIVE_AUTH (all off or absent in the double's jobs).

import (
	"fmt"
	"path"
	"regexp"
	"strconv"
	"strings"

	url_helpers "gitlab.com/gitlab-org/gitlab-runner/helpers/url"
)

const (
	externalGitConfigFile   = ".gitlab-runner.ext.conf"
	globalGitConfigSeedFile = ".glr.gconf"
	gitTemplateDir          = "git-template"
	buildUIDGIDFile         = ".gitlab-build-uid-gid"
	envVarExternalGitConfig = "GLR_EXT_GIT_CONFIG_PATH"
	// credHelperCommand is shells/abstract.go credHelperCommand.
	credHelperCommand = `!f(){ if [ "$1" = "get" ] ; then echo "password=${CI_JOB_TOKEN}" ; fi ; } ; f`
	// correlationID stands for the X-Request-Id of the job request
	// (Build.JobRequestCorrelationID).
	correlationID = "01JRUNNERDOUBLE0CORRELATION"
)

// doubleQuote is shells' doubleQuote (CommandArgExpand's argument quoting:
// none, the shell expands the argument).
func doubleQuote(s string) string { return `"` + s + `"` }

// commandArgExpand is BashWriter.CommandArgExpand.
func (w *scriptWriter) commandArgExpand(cmd string, args ...string) {
	parts := []string{w.escape(cmd)}
	for _, a := range args {
		parts = append(parts, doubleQuote(a))
	}
	w.line(strings.Join(parts, " "))
	w.checkForErrors()
}

// ifCmdWithOutputArgExpand is BashWriter.IfCmdWithOutputArgExpand.
func (w *scriptWriter) ifCmdWithOutputArgExpand(cmd string, args ...string) {
	parts := []string{w.escape(cmd)}
	for _, a := range args {
		parts = append(parts, doubleQuote(a))
	}
	w.linef("if %s ; then", strings.Join(parts, " "))
	w.indent++
}

// exportRaw is BashWriter.ExportRaw.
func (w *scriptWriter) exportRaw(name, value string) {
	w.linef("export %s=%s", w.escape(name), doubleQuote(value))
}

func (w *scriptWriter) ifTest(test, p string) {
	w.linef("if [ %s %q ]; then", test, p)
	w.indent++
}

// rmDir is BashWriter.RmDir.
func (w *scriptWriter) rmDir(p string) {
	w.ifTest("-d", p)
	w.commandArgExpand("chmod", "-R", "u+rwX", p)
	w.endIf()
	w.commandArgExpand("rm", "-r", "-f", p)
}

// rmFilesRecursive and rmDirsRecursive are BashWriter's.
func (w *scriptWriter) rmFilesRecursive(p, name string) {
	w.ifTest("-d", p)
	w.linef(`et='+' ; find /dev/null -exec true {} + 2>/dev/null || et=';' ; find %q -name %q -type f -exec rm -f {} "${et}"`, p, name)
	w.endIf()
}

func (w *scriptWriter) rmDirsRecursive(p, name string) {
	w.ifTest("-d", p)
	w.linef(`et='+' ; find /dev/null -exec true {} + 2>/dev/null || et=';' ; find %q -name %q -type d -depth -exec rm -rf -- {} "${et}"`, p, name)
	w.endIf()
}

// setupGitCredHelper is BashWriter.SetupGitCredHelper.
func (w *scriptWriter) setupGitCredHelper(confFile, section, user string) {
	helper, userSection := w.escape(section+".helper"), w.escape(section+".username")
	w.linef(`git config -f %[1]s --replace-all %[2]s %[3]s && git config -f %[1]s --add %[2]s %[4]s && git config -f %[1]s %[5]s %[6]s`,
		doubleQuote(confFile), helper, `""`, w.escape(credHelperCommand), userSection, user)
	w.checkForErrors()
}

// commandWithStdin is BashWriter.CommandWithStdin.
func (w *scriptWriter) commandWithStdin(bestEffort bool, stdin, cmd string, args ...string) {
	line := w.buildCommand("echo", stdin) + " | " + w.buildCommand(cmd, args...)
	if bestEffort {
		w.line(line + " || true")
		return
	}
	w.line(line)
	w.checkForErrors()
}

// checkForErrors is BashWriter.CheckForErrors (FF_ENABLE_BASH_EXIT_CODE_CHECK):
// Command, CommandArgExpand and the git credential helper setup end with it.
func (w *scriptWriter) checkForErrors() {
	if w.exitCodeCheck {
		w.line("_runner_exit_code=$?; if [ $_runner_exit_code -ne 0 ]; then exit $_runner_exit_code; fi")
	}
}

// gitAuth is Build.withUrlHelper: the runner's own URL code.
func (s Context) gitAuth() *url_helpers.GitAuthHelper {
	return url_helpers.NewGitAuthHelper(url_helpers.GitAuthConfig{
		CredentialsURL:         s.ServerURL,
		RepoURL:                s.RepoURL,
		GitSubmoduleForceHTTPS: s.boolVar("GIT_SUBMODULE_FORCE_HTTPS"),
		Token:                  s.Token,
		ProjectPath:            s.value("CI_PROJECT_PATH"),
		Server: url_helpers.GitAuthServerConfig{
			Host:    s.value("CI_SERVER_HOST"),
			SSHHost: s.value("CI_SERVER_SHELL_SSH_HOST"),
			SSHPort: s.value("CI_SERVER_SHELL_SSH_PORT"),
		},
	}, !s.flag("FF_GIT_URLS_WITHOUT_TOKENS"))
}

// value is the last value of a job variable.
func (s Context) value(key string) string {
	v := ""
	for _, x := range s.Vars {
		if x.Key == key {
			v = x.Value
		}
	}
	return v
}

func (s Context) boolVar(key string) bool {
	b, _ := strconv.ParseBool(s.value(key))
	return b
}

// remoteHost is AbstractShell.getRemoteHost.
func (s Context) remoteHost() (string, error) {
	u, err := s.gitAuth().GetRemoteURL()
	if err != nil {
		return "", fmt.Errorf("getting remote URL: %w", err)
	}
	return url_helpers.OnlySchemeAndHost(u).String(), nil
}

func (s Context) submoduleStrategy() string {
	switch v := s.value("GIT_SUBMODULE_STRATEGY"); v {
	case "normal", "recursive":
		return v
	}
	return "none"
}

func (s Context) lfsSmudgeDisabled() bool { return s.boolVar("GIT_LFS_SKIP_SMUDGE") }

// flagsVar is a cmdFlags build setting: the variable split on spaces, or def.
func (s Context) flagsVar(key string, def ...string) []string {
	v := s.value(key)
	if v == "" {
		return def
	}
	if v == "none" {
		return nil
	}
	return strings.Fields(v)
}

// getSources is AbstractShell.writeGetSourcesScript.
func (s Context) getSources(w *scriptWriter) error {
	s.exports(w)
	w.export("GIT_TERMINAL_PROMPT", "0")
	w.export("GCM_INTERACTIVE", "Never")
	if err := s.setupTokenlessGitConfig(w); err != nil {
		return err
	}
	if err := s.writeCloneFetchCmds(w); err != nil {
		return err
	}
	if err := s.writeSubmoduleUpdateCmds(w); err != nil {
		return err
	}
	s.changeFilesOwnership(w, s.BuildsDir)
	s.writeClearGitCredentials(w)
	return nil
}

// setupTokenlessGitConfig is the runner's: only with FF_GIT_URLS_WITHOUT_TOKENS.
func (s Context) setupTokenlessGitConfig(w *scriptWriter) error {
	if !s.flag("FF_GIT_URLS_WITHOUT_TOKENS") {
		return nil
	}
	ext := s.tmpFile(externalGitConfigFile)
	seed := s.tmpFile(globalGitConfigSeedFile)
	w.commandArgExpand("rm", "-f", seed)
	for _, userConfig := range []string{"$HOME/.gitconfig", "$HOME/.config/git/config"} {
		w.ifTest("-r", userConfig)
		w.commandArgExpand("git", "config", "--file", seed, "--add", "include.path", userConfig)
		w.endIf()
	}
	w.commandArgExpand("git", "config", "--file", seed, "--add", "include.path", ext)
	if s.GitStrategy == "none" || s.GitStrategy == "empty" {
		w.commandArgExpand("rm", "-f", ext)
		host, err := s.remoteHost()
		if err != nil {
			return err
		}
		w.setupGitCredHelper(ext, "credential."+host, "gitlab-ci-token")
	}
	return nil
}

// writeCloneFetchCmds is the runner's.
func (s Context) writeCloneFetchCmds(w *scriptWriter) error {
	if !s.lfsSmudgeDisabled() {
		w.export("GIT_LFS_SKIP_SMUDGE", "1")
	}
	switch s.GitStrategy {
	case "fetch", "clone":
		s.writeGitCleanup(w)
		templateDir, remoteURL, err := s.setupTemplateDir(w)
		if err != nil {
			return err
		}
		if s.GitStrategy == "clone" {
			// writeCloneCmdIfPossible without FF_USE_GIT_NATIVE_CLONE.
			w.rmDir(s.ProjectDir)
		}
		s.writeRefspecFetchCmd(w, templateDir, remoteURL)
	case "none":
		w.noticef("Skipping Git repository setup")
		w.command("mkdir", "-p", s.ProjectDir)
	case "empty":
		w.noticef("Skipping Git repository setup and creating an empty build directory")
		w.rmDir(s.ProjectDir)
		w.command("mkdir", "-p", s.ProjectDir)
	default:
		return fmt.Errorf("unknown GIT_STRATEGY %q", s.GitStrategy)
	}
	if s.GitStrategy != "none" && s.GitStrategy != "empty" && s.boolVarOr("GIT_CHECKOUT", true) {
		s.writeCheckoutCmd(w)
		if !s.lfsSmudgeDisabled() {
			w.ifCmd("git", "lfs", "version")
			w.command("git", "lfs", "pull")
			w.line("echo")
			w.endIf()
		}
	} else {
		w.noticef("Skipping Git checkout")
	}
	return nil
}

func (s Context) boolVarOr(key string, def bool) bool {
	b, err := strconv.ParseBool(s.value(key))
	if err != nil {
		return def
	}
	return b
}

// writeGitCleanup and writeGitCleanupAllConfigs are the runner's (the
// custom executor cleans the git configs by default).
func (s Context) writeGitCleanup(w *scriptWriter) {
	sub := s.submoduleStrategy()
	forSubmodules := sub == "normal" || sub == "recursive"
	for _, f := range []string{"index.lock", "shallow.lock", "HEAD.lock", "hooks/post-checkout", "config.lock"} {
		w.commandArgExpand("rm", "-f", path.Join(s.ProjectDir, ".git", f))
		if forSubmodules {
			w.rmFilesRecursive(path.Join(s.ProjectDir, ".git", "modules"), path.Base(f))
		}
	}
	w.rmFilesRecursive(path.Join(s.ProjectDir, ".git", "refs"), "*.lock")
	for _, dir := range []string{s.tmpFile(gitTemplateDir), path.Join(s.ProjectDir, ".git")} {
		w.commandArgExpand("rm", "-f", path.Join(dir, "config"))
		w.rmDir(path.Join(dir, "hooks"))
	}
	if forSubmodules {
		modules := path.Join(s.ProjectDir, ".git", "modules")
		w.rmFilesRecursive(modules, "config")
		w.rmDirsRecursive(modules, "hooks")
	}
}

// setupTemplateDir is the runner's.
func (s Context) setupTemplateDir(w *scriptWriter) (templateDir, remoteURL string, err error) {
	templateDir = path.Join(s.tmpProjectDir(), gitTemplateDir)
	w.command("mkdir", "-p", templateDir)
	templateFile := path.Join(templateDir, "config")
	ext := s.tmpFile(externalGitConfigFile)
	for _, kv := range [][2]string{{"init.defaultBranch", "none"}, {"fetch.recurseSubmodules", "false"},
		{"credential.interactive", "never"}, {"gc.autoDetach", "false"}} {
		w.command("git", "config", "-f", templateFile, kv[0], kv[1])
	}
	remoteURL, err = s.setupExternalGitConfig(w, ext)
	if err != nil {
		return "", "", fmt.Errorf("setting up external git config: %w", err)
	}
	// includeExternalGitConfig
	w.commandArgExpand("git", "config", "--file", templateFile, "--replace-all", "include.path", ext,
		regexp.QuoteMeta(path.Base(ext))+"$")
	w.exportRaw(envVarExternalGitConfig, ext)
	return templateDir, remoteURL, nil
}

// setupExternalGitConfig is the runner's: with FF_GIT_URLS_WITHOUT_TOKENS
// off, insteadOf rules that put the job token into the URLs git uses.
func (s Context) setupExternalGitConfig(w *scriptWriter, ext string) (string, error) {
	w.commandArgExpand("rm", "-f", ext)
	if s.flagOr("FF_USE_GITALY_CORRELATION_ID", true) {
		w.commandArgExpand("git", "config", "-f", ext, "http.extraHeader", "X-Gitaly-Correlation-ID: "+correlationID)
		w.noticef("Gitaly correlation ID: %s", correlationID)
	}
	if s.flagOr("FF_USE_GIT_BUNDLE_URIS", true) {
		w.commandArgExpand("git", "config", "-f", ext, "transfer.bundleURI", "true")
	}
	auth := s.gitAuth()
	withCredsURL, err := auth.GetRemoteURL()
	if err != nil {
		return "", err
	}
	withoutCredsURL := *withCredsURL
	withoutCredsURL.User = nil
	withCreds, withoutCreds := withCredsURL.String(), withoutCredsURL.String()
	var insteadOfs [][2]string
	if withoutCreds != withCreds {
		insteadOfs = append(insteadOfs, [2]string{withCreds, withoutCreds})
	}
	ios, err := auth.GetInsteadOfs()
	if err != nil {
		return "", err
	}
	insteadOfs = append(insteadOfs, ios...)
	seen := map[[2]string]bool{}
	for _, io := range insteadOfs {
		if seen[io] {
			continue
		}
		seen[io] = true
		w.commandArgExpand("git", "config", "--file", ext, "--replace-all", "url."+io[0]+".insteadOf", io[1],
			"^"+regexp.QuoteMeta(io[1])+"$")
	}
	if s.flag("FF_GIT_URLS_WITHOUT_TOKENS") {
		host, err := s.remoteHost()
		if err != nil {
			return "", err
		}
		w.setupGitCredHelper(ext, "credential."+host, "gitlab-ci-token")
	}
	return withoutCreds, nil
}

// writeRefspecFetchCmd is the runner's (depth 0, sha1 objects).
func (s Context) writeRefspecFetchCmd(w *scriptWriter, templateDir, remoteURL string) {
	w.noticef("Fetching changes...")
	w.command("git", "init", s.ProjectDir, "--template", templateDir)
	w.cd(s.ProjectDir)
	w.ifCmd("git", "remote", "add", "origin", remoteURL)
	w.noticef("Created fresh repository.")
	w.elseBranch()
	w.command("git", "remote", "set-url", "origin", remoteURL)
	// setupExistingRepoConfig
	w.commandArgExpand("git", "config", "--file", ".git/config", "--replace-all", "include.path",
		"$"+envVarExternalGitConfig, regexp.QuoteMeta(externalGitConfigFile)+"$")
	w.endIf()
	args := []string{"-c", fmt.Sprintf("http.userAgent=gitlab-runner %s linux/amd64", RunnerVersion),
		"fetch", "origin", "--no-recurse-submodules"}
	args = append(args, s.Refspecs...)
	args = append(args, s.flagsVar("GIT_FETCH_EXTRA_FLAGS", "--prune", "--quiet")...)
	w.ifTest("-e", ".git/shallow")
	w.command("git", append(append([]string(nil), args...), "--unshallow")...)
	w.elseBranch()
	w.command("git", args...)
	w.endIf()
}

// writeCheckoutCmd is the runner's.
func (s Context) writeCheckoutCmd(w *scriptWriter) {
	w.noticef("Checking out %s as detached HEAD (ref is %s)...", s.Sha[:8], s.Ref)
	w.command("git", "-c", "submodule.recurse=false", "checkout", "-f", "-q", s.Sha)
	if clean := s.flagsVar("GIT_CLEAN_FLAGS", "-ffdx"); len(clean) > 0 {
		w.command("git", append([]string{"clean"}, clean...)...)
	}
}

// writeSubmoduleUpdateCmds and writeSubmoduleUpdateCmd are the runner's
// (no GIT_SUBMODULE_PATHS, no GIT_SUBMODULE_DEPTH).
func (s Context) writeSubmoduleUpdateCmds(w *scriptWriter) error {
	recursive := false
	switch s.submoduleStrategy() {
	case "none":
		w.noticef("Skipping Git submodules setup")
		return nil
	case "recursive":
		recursive = true
		w.noticef("Updating/initializing submodules recursively...")
	default:
		w.noticef("Updating/initializing submodules...")
	}
	w.command("git", "submodule", "init")
	syncArgs := []string{"submodule", "sync"}
	updateArgs := []string{"submodule", "update", "--init"}
	foreachArgs := []string{"submodule", "foreach"}
	if recursive {
		syncArgs = append(syncArgs, "--recursive")
		updateArgs = append(updateArgs, "--recursive")
		foreachArgs = append(foreachArgs, "--recursive")
	}
	w.command("git", syncArgs...)
	updateArgs = append(updateArgs, s.flagsVar("GIT_SUBMODULE_UPDATE_FLAGS")...)
	cleanCommand := append([]string{"git", "clean"}, s.flagsVar("GIT_CLEAN_FLAGS", "-ffdx")...)
	w.command("git", append(append([]string(nil), foreachArgs...), cleanCommand...)...)
	w.command("git", append(append([]string(nil), foreachArgs...), "git", "reset", "--hard")...)
	withCreds := func(args []string) []string {
		return append([]string{"-c", "include.path=$" + envVarExternalGitConfig}, args...)
	}
	w.ifCmdWithOutputArgExpand("git", withCreds(updateArgs)...)
	w.noticef("Updated submodules")
	w.command("git", syncArgs...)
	w.elseBranch()
	w.noticef("Updating submodules failed. Retrying...")
	w.command("git", syncArgs...)
	w.commandArgExpand("git", withCreds(updateArgs)...)
	w.command("git", append(append([]string(nil), foreachArgs...), "git", "reset", "--hard")...)
	w.endIf()
	w.command("git", append(append([]string(nil), foreachArgs...), cleanCommand...)...)
	w.noticef("Configuring submodules to use parent git credentials...")
	// configureSubmoduleCredentials
	cfg := append([]string(nil), foreachArgs...)
	if !recursive {
		cfg = append(cfg, "--recursive")
	}
	cfg = append(cfg, "git", "config", "--replace-all", "include.path", "$"+envVarExternalGitConfig)
	w.commandArgExpand("git", cfg...)
	if !s.lfsSmudgeDisabled() {
		w.ifCmd("git", "lfs", "version")
		w.noticef("Pulling LFS files...")
		w.commandArgExpand("git", withCreds(append(append([]string(nil), foreachArgs...), "git", "lfs", "pull"))...)
		w.endIf()
	}
	return nil
}

// changeFilesOwnership is the runner's (bash).
func (s Context) changeFilesOwnership(w *scriptWriter, dirs ...string) {
	uidGid := s.BuildsDir + "/" + buildUIDGIDFile
	w.ifTest("-e", uidGid)
	for _, d := range dirs {
		if strings.TrimSpace(d) == "" {
			continue
		}
		w.ifTest("-d", d)
		w.linef(`chown -R "$(stat -c '%%u:%%g' '%s')" '%s'`, uidGid, d)
		w.endIf()
	}
	w.endIf()
}

// writeClearGitCredentials is the runner's: a best-effort `git credential
// reject` for the remote's host.
func (s Context) writeClearGitCredentials(w *scriptWriter) {
	u, err := s.gitAuth().GetRemoteURL()
	if err != nil {
		return
	}
	remote := url_helpers.OnlySchemeAndHost(u)
	if remote.Host == "" || remote.Scheme != "http" && remote.Scheme != "https" && remote.Scheme != "ssh" {
		return
	}
	w.commandWithStdin(true, "url="+remote.String()+"\nusername=gitlab-ci-token", "git", "credential", "reject")
}
