// Package failure classifies errors by who must act on them, so that the
// stage handlers can map every error to the runner's exit-code contract
// without knowing where it came from.
//
// Three classes exist:
//   - a user error (bad image name, refused volume, disallowed flag, wrong
//     registry password): the job fails as a build failure, the runner does
//     not retry, and the message tells the user what to change;
//   - a script failure: the user's script exited non-zero; its code is
//     reported to the runner through BUILD_EXIT_CODE_FILE;
//   - a system error (ci-exec, a runtime or the scheduler broke): the runner
//     reports runner_system_failure and retries prepare where it can.
//
// An error that carries no class is treated as a system error: when in doubt
// the infrastructure is blamed, so the runner retries instead of telling a
// user their job was wrong.
package failure

import (
	"errors"
	"fmt"
)

// Class is who must act on an error.
type Class int

const (
	// System is an infrastructure fault; the runner may retry.
	System Class = iota
	// User is a mistake in the job's own input; retrying cannot help.
	User
	// Script is the user's script exiting non-zero.
	Script
)

func (c Class) String() string {
	switch c {
	case User:
		return "user error"
	case Script:
		return "script failure"
	default:
		return "system failure"
	}
}

// Error is an error with a class and, for script failures, an exit code.
type Error struct {
	Class Class
	// Code is the script's exit code (Script) or the code a user error should
	// report (0 means "no code", and the runner shows exit status 1).
	Code int
	Err  error
}

func (e *Error) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("%s (exit code %d)", e.Class, e.Code)
	}
	return e.Err.Error()
}

func (e *Error) Unwrap() error { return e.Err }

// Userf returns a user-class error; the message should say what to change.
func Userf(format string, args ...any) error {
	return &Error{Class: User, Err: fmt.Errorf(format, args...)}
}

// Systemf returns a system-class error.
func Systemf(format string, args ...any) error {
	return &Error{Class: System, Err: fmt.Errorf(format, args...)}
}

// AsUser marks err as the user's mistake (nil stays nil).
func AsUser(err error) error {
	if err == nil {
		return nil
	}
	return &Error{Class: User, Err: err}
}

// AsSystem marks err as an infrastructure fault (nil stays nil).
func AsSystem(err error) error {
	if err == nil {
		return nil
	}
	return &Error{Class: System, Err: err}
}

// ScriptExit reports that the user's script exited with code.
func ScriptExit(code int) error {
	return &Error{Class: Script, Code: code, Err: fmt.Errorf("script exited with code %d", code)}
}

// ClassOf returns the class of err: the outermost classified error wins, and
// an unclassified error is a system error.
func ClassOf(err error) Class {
	var fe *Error
	if errors.As(err, &fe) {
		return fe.Class
	}
	return System
}

// CodeOf returns the exit code carried by err, or 0.
func CodeOf(err error) int {
	var fe *Error
	if errors.As(err, &fe) {
		return fe.Code
	}
	return 0
}
