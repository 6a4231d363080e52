package jobscript

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path"
	"path/filepath"
	"strconv"
	"strings"
)

// The runner's word quoting, ported from gitlab-runner helpers/shell_escape.go
// (19.4): ShellEscape (bash ANSI-C $'...', the default) and, under
// FF_POSIXLY_CORRECT_ESCAPES, PosixShellEscape (double quotes). This package
// keeps its own copy, independent of ci-exec's internal/runnerscript (which
// reads such scripts), so that a mistake in one cannot hide one in the other.
const (
	ansiCLiteral = ",-./0123456789@ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
	ansiCQuote   = " !\"#$%&()*+:;<=>?[]^`{|}~"
	posixQuote   = " !#%&()*<=>?[|"
)

var ansiCEscapes = map[byte]string{'\a': `\a`, '\b': `\b`, '\t': `\t`, '\n': `\n`, '\v': `\v`, '\f': `\f`,
	'\r': `\r`, '\'': `\'`, '\\': `\\`}

var posixEscapes = map[byte]string{'`': "\\`", '"': `\"`, '\\': `\\`, '$': `\$`}

// shellEscape is helpers.ShellEscape.
func shellEscape(s string) string {
	if s == "" {
		return "''"
	}
	var b strings.Builder
	quoted := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case strings.IndexByte(ansiCLiteral, c) >= 0:
			b.WriteByte(c)
		case strings.IndexByte(ansiCQuote, c) >= 0:
			b.WriteByte(c)
			quoted = true
		case ansiCEscapes[c] != "":
			b.WriteString(ansiCEscapes[c])
			quoted = true
		default:
			fmt.Fprintf(&b, `\x%02x`, c)
			quoted = true
		}
	}
	if quoted {
		return "$'" + b.String() + "'"
	}
	return b.String()
}

// posixShellEscape is helpers.PosixShellEscape.
func posixShellEscape(s string) string {
	if s == "" {
		return "''"
	}
	var b strings.Builder
	quoted := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case posixEscapes[c] != "":
			b.WriteString(posixEscapes[c])
			quoted = true
		case strings.IndexByte(posixQuote, c) >= 0:
			b.WriteByte(c)
			quoted = true
		default:
			b.WriteByte(c)
		}
	}
	if quoted {
		return `"` + b.String() + `"`
	}
	return b.String()
}

// scriptWriter imitates gitlab-runner's shells/bash.go BashWriter: lines go
// into a body that finish wraps in the runner's fixed preamble and evals in
// a subshell with stdin from /dev/null, every word quoted the runner's way
// (see testdata of internal/runnerscript for the scripts a real 19.4
// wrote). Unlike the runner its notices carry no ANSI colours, so the log
// stays plain text for assertions. busybox sh runs these scripts too.
type scriptWriter struct {
	body   strings.Builder
	indent int
	// posix is FF_POSIXLY_CORRECT_ESCAPES; legacyEval FF_USE_LEGACY_BASH_EVAL;
	// exitCodeCheck FF_ENABLE_BASH_EXIT_CODE_CHECK.
	posix, legacyEval, exitCodeCheck bool
}

func (w *scriptWriter) escape(s string) string {
	if w.posix {
		return posixShellEscape(s)
	}
	return shellEscape(s)
}

func (w *scriptWriter) line(text string) {
	w.body.WriteString(strings.Repeat("  ", w.indent) + text + "\n")
}

func (w *scriptWriter) linef(format string, args ...any) {
	w.line(fmt.Sprintf(format, args...))
}

// noticef is the runner's Noticef/Warningf/Printf: an echo of a quoted message.
func (w *scriptWriter) noticef(format string, args ...any) {
	w.line("echo " + w.escape(fmt.Sprintf(format, args...)))
}

// export is the runner's Variable for a plain variable.
func (w *scriptWriter) export(key, value string) {
	w.linef("export %s=%s", w.escape(key), w.escape(value))
}

// buildCommand is BashWriter.buildCommand: every word quoted.
func (w *scriptWriter) buildCommand(cmd string, args ...string) string {
	parts := []string{w.escape(cmd)}
	for _, a := range args {
		parts = append(parts, w.escape(a))
	}
	return strings.Join(parts, " ")
}

// command is BashWriter.Command.
func (w *scriptWriter) command(cmd string, args ...string) {
	w.line(w.buildCommand(cmd, args...))
	w.checkForErrors()
}

// ifCmd is BashWriter.IfCmd (output hidden); ifCmdWithOutput IfCmdWithOutput.
func (w *scriptWriter) ifCmd(cmd string, args ...string) {
	w.linef("if %s >/dev/null 2>&1 ; then", w.buildCommand(cmd, args...))
	w.indent++
}

func (w *scriptWriter) ifCmdWithOutput(cmd string, args ...string) {
	w.linef("if %s ; then", w.buildCommand(cmd, args...))
	w.indent++
}

func (w *scriptWriter) elseBranch() {
	w.indent--
	w.line("else")
	w.indent++
}

func (w *scriptWriter) endIf() {
	w.indent--
	w.line("fi")
}

// cd is BashWriter.Cd.
func (w *scriptWriter) cd(p string) { w.command("cd", p) }

// rmFile is the runner's RmFile: rm "-f" "<path>".
func (w *scriptWriter) rmFile(p string) {
	w.commandArgExpand("rm", "-f", p)
}

// userCommands is the runner's writeCommands: every command echoed with a
// "$ " prefix before it runs, empty lines as an empty echo, multi-line
// commands echoed as their first line with "# collapsed multi-line command".
func (w *scriptWriter) userCommands(commands []string) {
	for _, c := range commands {
		c = strings.TrimSpace(c)
		switch first, _, multi := strings.Cut(c, "\n"); {
		case c == "":
			w.line("echo")
		case multi:
			w.noticef("$ %s # collapsed multi-line command", first)
		default:
			w.noticef("$ %s", c)
		}
		w.line(c)
	}
}

// finish returns the complete script as BashWriter.Finish builds it.
func (w *scriptWriter) finish(shell string) string {
	var b strings.Builder
	b.WriteString("#!/usr/bin/env " + shell + "\n\n")
	b.WriteString("trap 'exit 1' TERM\n\n")
	b.WriteString(`case "$(set -o)" in *"pipefail"*) set -o pipefail;; esac; set -o errexit` + "\n")
	b.WriteString("set +o noclobber\n")
	if w.legacyEval {
		b.WriteString(": | eval " + w.escape(w.body.String()) + "\n")
	} else {
		b.WriteString("(trap 'exit 1' TERM; eval " + w.escape(w.body.String()) + ") < /dev/null\n")
	}
	b.WriteString("exit 0\n")
	return b.String()
}

func (s Context) tmpProjectDir() string { return s.ProjectDir + ".tmp" }

func (s Context) tmpFile(name string) string { return path.Join(s.tmpProjectDir(), name) }

// flag returns the last value of a feature flag among the job's variables.
func (s Context) flag(name string) bool { return s.flagOr(name, false) }

// flagOr is flag for a flag whose default is def.
func (s Context) flagOr(name string, def bool) bool {
	on := def
	for _, v := range s.Vars {
		if v.Key == name {
			on, _ = strconv.ParseBool(v.Value)
		}
	}
	return on
}

// exports is the runner's exportVariables: every job variable, GITLAB_ENV
// and sourcing of the (empty) GITLAB_ENV file.
func (s Context) exports(w *scriptWriter) {
	for _, v := range s.Vars {
		w.export(v.Key, v.Value)
	}
	envFile := s.tmpFile("gitlab_runner_env")
	w.export("GITLAB_ENV", envFile)
	w.linef("mkdir -p %q", s.tmpProjectDir())
	w.linef("touch %q", envFile)
	w.linef(`while read -r line; do export "$line"; done < %q`, envFile)
	if s.flag("FF_GIT_URLS_WITHOUT_TOKENS") {
		w.exportRaw("GIT_CONFIG_GLOBAL", s.tmpFile(globalGitConfigSeedFile))
	}
}

// cacheFile is where the runner's local cache (no cache server) keeps a
// key's archive: <cache_dir>/<project path>/<key>/cache.zip, given to the
// helpers relative to the project dir; with hashed, the key's SHA-256
// instead of the key (the runner's --alternate-file).
func (s Context) cacheFile(hashed bool) string {
	key := s.Cache.KeyOrDefault()
	if hashed {
		sum := sha256.Sum256([]byte(key))
		key = hex.EncodeToString(sum[:])
	}
	abs := filepath.Join(s.CacheDir, s.ProjectPath, key, "cache.zip")
	if rel, err := filepath.Rel(s.ProjectDir, abs); err == nil {
		return rel
	}
	return abs
}

// runnerGuard is the runner's guardRunnerCommand: the helper call only if
// gitlab-runner is on PATH, a warning otherwise.
func runnerGuard(w *scriptWriter, action string, f func()) {
	w.ifCmd("gitlab-runner", "--version")
	f()
	w.elseBranch()
	w.noticef("Missing gitlab-runner. %s is disabled.", action)
	w.endIf()
}

// StageScript returns the script for a run stage, or ok=false when the
// runner would skip the stage (nothing to do).
func (s Context) StageScript(stage, shell string) (script string, ok bool, err error) {
	w := &scriptWriter{posix: s.flag("FF_POSIXLY_CORRECT_ESCAPES"), legacyEval: s.flag("FF_USE_LEGACY_BASH_EVAL"),
		exitCodeCheck: s.flag("FF_ENABLE_BASH_EXIT_CODE_CHECK")}
	switch stage {
	case "prepare_script":
		if s.Hostname != "" {
			w.line("echo " + strconv.Quote("Running on $(hostname) via "+s.Hostname+"..."))
		} else {
			w.line("echo " + strconv.Quote("Running on $(hostname)..."))
		}
		w.rmFile(s.tmpFile("gitlab_runner_env"))
		w.rmFile(s.tmpFile("masking.db"))
	case "get_sources":
		if err := s.getSources(w); err != nil {
			return "", false, err
		}
	case "restore_cache":
		if s.Cache == nil {
			return "", false, nil
		}
		s.exports(w)
		w.cd(s.ProjectDir)
		runnerGuard(w, "Extracting cache", func() {
			w.noticef("Checking cache for %s...", s.Cache.KeyOrDefault())
			w.ifCmdWithOutput("gitlab-runner", "cache-extractor", "--file", s.cacheFile(false), "--timeout", "10")
			w.noticef("Successfully extracted cache")
			w.elseBranch()
			w.noticef("Failed to extract cache")
			w.endIf()
		})
	case "download_artifacts":
		if len(s.Dependencies) == 0 {
			return "", false, nil
		}
		s.exports(w)
		w.cd(s.ProjectDir)
		runnerGuard(w, "Artifacts downloading", func() {
			for _, d := range s.Dependencies {
				w.noticef("Downloading artifacts for %s (%d)...", d.Name, d.ID)
				w.command("gitlab-runner", "artifacts-downloader", "--url", s.ServerURL, "--token", d.TokenFor(s.Token),
					"--id", strconv.FormatInt(d.ID, 10))
			}
		})
	case "archive_cache", "archive_cache_on_failure":
		if s.Cache == nil || !s.Cache.RunsOn(stage == "archive_cache_on_failure") || len(s.Cache.Paths) == 0 {
			return "", false, nil
		}
		s.exports(w)
		w.cd(s.ProjectDir)
		runnerGuard(w, "Creating cache", func() {
			w.noticef("Creating cache %s...", s.Cache.KeyOrDefault())
			envFile := s.tmpFile("gitlab_runner_cache_env")
			w.line(fmt.Sprintf("cat << EOF > %s\nCACHE_METADATA=\"{\\\"cachekey\\\":\\\"%s\\\"}\"\nEOF\n", envFile, s.Cache.KeyOrDefault()))
			args := []string{"cache-archiver", "--file", s.cacheFile(false), "--alternate-file", s.cacheFile(true), "--timeout", "10"}
			for _, p := range s.Cache.Paths {
				args = append(args, "--path", p)
			}
			args = append(args, "--env-file", envFile)
			w.ifCmdWithOutput("gitlab-runner", args...)
			w.noticef("Created cache")
			w.elseBranch()
			w.noticef("Failed to create cache")
			w.endIf()
			w.rmFile(envFile)
		})
	case "upload_artifacts_on_success", "upload_artifacts_on_failure":
		a := s.Artifacts
		if a == nil || !a.RunsOn(stage == "upload_artifacts_on_failure") || len(a.Paths) == 0 {
			return "", false, nil
		}
		s.exports(w)
		w.cd(s.ProjectDir)
		runnerGuard(w, "Uploading artifacts", func() {
			w.noticef("Uploading artifacts...")
			args := []string{"artifacts-uploader", "--url", s.ServerURL, "--token", s.Token,
				"--id", strconv.FormatInt(s.JobID, 10), "--timeout", "1h0m0s", "--response-header-timeout", "10m0s"}
			for _, p := range a.Paths {
				args = append(args, "--path", p)
			}
			if a.Name != "" {
				args = append(args, "--name", a.Name)
			}
			if a.ExpireIn != "" {
				args = append(args, "--expire-in", a.ExpireIn)
			}
			args = append(args, "--artifact-format", "zip", "--artifact-type", "archive")
			w.command("gitlab-runner", args...)
		})
	case "after_script":
		var step *Step
		for i := range s.Steps {
			if s.Steps[i].Name == "after_script" {
				step = &s.Steps[i]
				break
			}
		}
		if step == nil || len(step.Script) == 0 {
			return "", false, nil
		}
		s.exports(w)
		w.cd(s.ProjectDir)
		w.noticef("Running after script...")
		w.userCommands(step.Script)
	case "cleanup_file_variables":
		s.exports(w)
		w.rmFile(s.tmpFile("gitlab_runner_env"))
		w.rmFile(s.tmpFile("masking.db"))
		w.rmFile(s.tmpFile(".gitlab-runner.ext.conf"))
		w.rmFile(path.Join(s.BuildsDir, ".gitlab-build-uid-gid"))
	default:
		var step *Step
		for i := range s.Steps {
			if s.Steps[i].Name != "after_script" && StepStage(s.Steps[i]) == stage {
				step = &s.Steps[i]
				break
			}
		}
		if step == nil {
			return "", false, nil
		}
		s.exports(w)
		w.cd(s.ProjectDir)
		w.userCommands(step.Script)
	}
	return w.finish(shell), true, nil
}

// StepStage is the runner's StepToBuildStage: "step_<lowercased name>".
func StepStage(s Step) string {
	return "step_" + strings.ToLower(s.Name)
}

// StageDescription is the runner's GetStageDescription.
func StageDescription(stage string) string {
	switch stage {
	case "prepare_script":
		return "Preparing environment"
	case "get_sources":
		return "Getting source from Git repository"
	case "clear_worktree":
		return "Deleting all tracked and untracked files due to source fetch failure"
	case "restore_cache":
		return "Restoring cache"
	case "download_artifacts":
		return "Downloading artifacts"
	case "after_script":
		return "Running after_script"
	case "archive_cache":
		return "Saving cache for successful job"
	case "archive_cache_on_failure":
		return "Saving cache for failed job"
	case "upload_artifacts_on_failure":
		return "Uploading artifacts for failed job"
	case "upload_artifacts_on_success":
		return "Uploading artifacts for successful job"
	case "cleanup_file_variables":
		return "Cleaning up project directory and file based variables"
	}
	return fmt.Sprintf("Executing %q stage of the job script", stage)
}
