// Package audit writes the downscoping runner's audit trail: one structured
// record per stage of every job (who asked, who it ran as, what decided it,
// which image and Slurm job), to the local syslog or a JSON-lines file,
// through log/slog.
package audit

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"log/syslog"
	"os"

	"github.com/ci-exec/ci-exec/internal/config"
)

// Record is one stage of one job.
type Record struct {
	Stage      string
	Server     string
	Project    string
	PipelineID string
	JobID      int64
	// Login is the GitLab user from the verified ID token ("" when the
	// token was refused).
	Login string
	// User and UID are the local account the stage ran as (UID -1: none).
	User string
	UID  int
	// Decision is "allow" or "deny"; Reason says why.
	Decision string
	Reason   string
	Image    string
	Digest   string
	Slurm    string
	// Exit is the stage's exit code (-1 before it ran).
	Exit int
}

// Log is an open audit destination.
type Log struct {
	// info and warn write allowed and refused stages (syslog severities
	// info and warning; one stream for a file).
	info, warn *slog.Logger
	close      func() error
}

// syslogDial is the syslog connection (a variable so that tests can use a
// socket of their own: this machine has no /dev/log).
var syslogDial = func() (*syslog.Writer, error) {
	return syslog.New(syslog.LOG_AUTHPRIV|syslog.LOG_INFO, "ci-exec")
}

// severity writes each record with one syslog severity.
type severity func(string) error

func (s severity) Write(p []byte) (int, error) { return len(p), s(string(p)) }

func jsonLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// Open opens the destination `auth.audit_log` names. An audit trail that
// cannot be written stops the job: a site that asked for one must not run
// jobs without it.
func Open(dest string) (*Log, error) {
	if dest == config.AuditSyslog {
		w, err := syslogDial()
		if err != nil {
			return nil, fmt.Errorf("auth.audit_log: cannot reach the local syslog (%v): start it, or write the trail to a file (audit_log = \"/var/log/ci-exec/audit.jsonl\")", err)
		}
		return &Log{info: jsonLogger(severity(w.Info)), warn: jsonLogger(severity(w.Warning)), close: w.Close}, nil
	}
	// O_APPEND: the records of concurrent jobs interleave whole (slog
	// writes each record with one write).
	f, err := os.OpenFile(dest, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("auth.audit_log: %v (the directory must exist and belong to the runner's account)", err)
	}
	l := jsonLogger(f)
	return &Log{info: l, warn: l, close: f.Close}, nil
}

// Write records r.
func (l *Log) Write(ctx context.Context, r Record) {
	log, level := l.info, slog.LevelInfo
	if r.Decision != "allow" && r.Decision != "none" {
		log, level = l.warn, slog.LevelWarn
	}
	log.LogAttrs(ctx, level, "ci-exec stage",
		slog.String("stage", r.Stage),
		slog.String("gitlab_server", r.Server),
		slog.String("project", r.Project),
		slog.String("pipeline_id", r.PipelineID),
		slog.Int64("job_id", r.JobID),
		slog.String("gitlab_user", r.Login),
		slog.String("local_user", r.User),
		slog.Int("uid", r.UID),
		slog.String("decision", r.Decision),
		slog.String("reason", r.Reason),
		slog.String("image", r.Image),
		slog.String("digest", r.Digest),
		slog.String("slurm_job", r.Slurm),
		slog.Int("exit", r.Exit),
	)
}

// Close closes the destination.
func (l *Log) Close() error { return l.close() }
