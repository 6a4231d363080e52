package runnerdouble

import (
	"fmt"
	"path"
	"strconv"
	"strings"
)

// shellQuote single-quotes s for POSIX sh.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// scriptWriter imitates gitlab-runner's shells/bash.go BashWriter: lines go
// into a body that Finish wraps in the runner's fixed prologue and runs via
// eval in a subshell with stdin from /dev/null. Unlike the runner it uses
// POSIX single quotes (no $'...') and no ANSI colours, so the scripts also
// run under busybox sh and the log stays plain.
type scriptWriter struct {
	body   strings.Builder
	indent int
}

func (w *scriptWriter) line(text string) {
	w.body.WriteString(strings.Repeat("  ", w.indent) + text + "\n")
}

func (w *scriptWriter) linef(format string, args ...any) {
	w.line(fmt.Sprintf(format, args...))
}

// noticef is the runner's Noticef/Printf: an echo of a quoted message.
func (w *scriptWriter) noticef(format string, args ...any) {
	w.line("echo " + shellQuote(fmt.Sprintf(format, args...)))
}

func (w *scriptWriter) export(key, value string) {
	w.linef("export %s=%s", key, shellQuote(value))
}

// command writes one command with its arguments single-quoted.
func (w *scriptWriter) command(cmd string, args ...string) {
	parts := []string{cmd}
	for _, a := range args {
		parts = append(parts, shellQuote(a))
	}
	w.line(strings.Join(parts, " "))
}

// rmFile is the runner's RmFile: rm -f "<path>".
func (w *scriptWriter) rmFile(p string) {
	w.line("rm -f " + strconv.Quote(p))
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
	b.WriteString("(trap 'exit 1' TERM; eval " + shellQuote(w.body.String()) + ") < /dev/null\n")
	b.WriteString("exit 0\n")
	return b.String()
}

// scriptContext is what the stage scripts need from the running job.
type scriptContext struct {
	vars        []Variable
	buildsDir   string
	projectDir  string
	hostname    string
	gitStrategy string
	repoURL     string
	steps       []Step
}

func (s scriptContext) tmpProjectDir() string { return s.projectDir + ".tmp" }

func (s scriptContext) tmpFile(name string) string { return path.Join(s.tmpProjectDir(), name) }

// exports is the runner's exportVariables: every job variable, GITLAB_ENV
// and sourcing of the (empty) GITLAB_ENV file.
func (s scriptContext) exports(w *scriptWriter) {
	for _, v := range s.vars {
		w.export(v.Key, v.Value)
	}
	envFile := s.tmpFile("gitlab_runner_env")
	w.export("GITLAB_ENV", envFile)
	w.linef("mkdir -p %q", s.tmpProjectDir())
	w.linef("touch %q", envFile)
	w.linef(`while read -r line; do export "$line"; done < %q`, envFile)
}

// stageScript returns the script for a run stage, or ok=false when the
// runner would skip the stage (nothing to do).
func (s scriptContext) stageScript(stage, shell string) (script string, ok bool, err error) {
	w := &scriptWriter{}
	switch stage {
	case "prepare_script":
		if s.hostname != "" {
			w.line("echo " + strconv.Quote("Running on $(hostname) via "+s.hostname+"..."))
		} else {
			w.line("echo " + strconv.Quote("Running on $(hostname)..."))
		}
		w.rmFile(s.tmpFile("gitlab_runner_env"))
		w.rmFile(s.tmpFile("masking.db"))
	case "get_sources":
		s.exports(w)
		w.export("GIT_TERMINAL_PROMPT", "0")
		w.export("GCM_INTERACTIVE", "Never")
		switch s.gitStrategy {
		case "none":
			w.noticef("Skipping Git repository setup")
			w.command("mkdir", "-p", s.projectDir)
		case "empty":
			w.noticef("Skipping Git repository setup and creating an empty build directory")
			w.linef("if [ -d %q ]; then", s.projectDir)
			w.line("  chmod -R u+rwX " + strconv.Quote(s.projectDir))
			w.line("fi")
			w.line("rm -r -f " + strconv.Quote(s.projectDir))
			w.command("mkdir", "-p", s.projectDir)
		case "clone", "fetch":
			w.noticef("Fetching changes...")
			w.linef("if [ %q = clone ] || [ ! -d %q ]; then", s.gitStrategy, path.Join(s.projectDir, ".git"))
			w.line("  rm -r -f " + strconv.Quote(s.projectDir))
			w.line("  git clone -q " + shellQuote(s.repoURL) + " " + shellQuote(s.projectDir))
			w.line("else")
			w.line("  git -C " + shellQuote(s.projectDir) + " fetch -q origin")
			w.line("fi")
		default:
			return "", false, fmt.Errorf("unknown GIT_STRATEGY %q", s.gitStrategy)
		}
	case "after_script":
		var step *Step
		for i := range s.steps {
			if s.steps[i].Name == "after_script" {
				step = &s.steps[i]
				break
			}
		}
		if step == nil || len(step.Script) == 0 {
			return "", false, nil
		}
		s.exports(w)
		w.command("cd", s.projectDir)
		w.noticef("Running after script...")
		w.userCommands(step.Script)
	case "cleanup_file_variables":
		s.exports(w)
		w.rmFile(s.tmpFile("gitlab_runner_env"))
		w.rmFile(s.tmpFile("masking.db"))
		w.rmFile(s.tmpFile(".gitlab-runner.ext.conf"))
		w.rmFile(path.Join(s.buildsDir, ".gitlab-build-uid-gid"))
	default:
		var step *Step
		for i := range s.steps {
			if s.steps[i].Name != "after_script" && stepStage(s.steps[i]) == stage {
				step = &s.steps[i]
				break
			}
		}
		if step == nil {
			return "", false, nil
		}
		s.exports(w)
		w.command("cd", s.projectDir)
		w.userCommands(step.Script)
	}
	return w.finish(shell), true, nil
}

// stepStage is the runner's StepToBuildStage: "step_<lowercased name>".
func stepStage(s Step) string {
	return "step_" + strings.ToLower(s.Name)
}

// stageDescription is the runner's GetStageDescription.
func stageDescription(stage string) string {
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
