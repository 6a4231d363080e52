package policy

import (
	"reflect"
	"strings"
	"testing"

	"github.com/ci-exec/ci-exec/internal/failure"
)

// testFlags is a ch-run-like table; the real ones are tested in their
// runtime packages.
var testFlags = FlagTable{
	{Long: "--bind", Short: "-b", Arg: RequiredArg},
	{Long: "--cd", Short: "-c", Arg: RequiredArg},
	{Long: "--set-env", Arg: OptionalArg},
	{Long: "--env-no-expand", Arg: NoArg},
	{Long: "--private-tmp", Short: "-t", Arg: NoArg},
	{Long: "--verbose", Short: "-v", Arg: NoArg},
	{Long: "--write", Short: "-w", Arg: NoArg},
	{Long: "--uid", Short: "-u", Arg: RequiredArg},
	{Long: "--unset-env", Arg: RequiredArg},
}

func policy() UserArgsPolicy {
	return UserArgsPolicy{
		Variable: "JACAMAR_CI_CHARLIECLOUD_ARGS",
		Default:  []string{"--set-env", "--env-no-expand", "-t", "-v", "--cd"},
		Flags:    testFlags,
	}
}

func TestUserArgsAllowed(t *testing.T) {
	tests := map[string][]string{
		"":                                  nil,
		"   ":                               nil,
		"--set-env=FILE":                    {"--set-env=FILE"},
		"--set-env":                         {"--set-env"},
		"-t --private-tmp":                  {"-t", "--private-tmp"},
		"-tv":                               {"-tv"},
		`--set-env='A=b c' --env-no-expand`: {"--set-env=A=b c", "--env-no-expand"},
		`--cd "/dir with space"`:            {"--cd", "/dir with space"},
		"-c /x -t":                          {"-c", "/x", "-t"},
		"-c/x":                              {"-c/x"},
		"-tc /x":                            {"-tc", "/x"},
		`--set-env="X=$(id); rm -rf /"`:     {"--set-env=X=$(id); rm -rf /"},
		"--cd -b":/* -b is cd's value */ {"--cd", "-b"},
	}
	for in, want := range tests {
		got, notice, err := policy().UserArgs(map[string]string{"JACAMAR_CI_CHARLIECLOUD_ARGS": in})
		if err != nil || notice != "" || !reflect.DeepEqual(got, want) {
			t.Errorf("%q: got %q, %q, %v; want %q", in, got, notice, err, want)
		}
	}
}

func TestUserArgsRefused(t *testing.T) {
	tests := map[string]string{
		"-b /etc":                  "-b is not allowed",
		"--bind=/etc:/mnt/0":       "--bind is not allowed",
		"--bind /etc":              "--bind is not allowed",
		"-w":                       "-w is not allowed",
		"--write":                  "--write is not allowed",
		"-tw":                      "-w is not allowed",
		"-tb/etc":                  "-b is not allowed",
		"--uid=0":                  "--uid is not allowed",
		"-u 0":                     "-u is not allowed",
		"-s /tmp/store":            "-s is not a known flag",
		"--storage=/tmp/store":     "--storage is not a known flag",
		"--unset-env=*":            "--unset-env is not allowed",
		"--bin=/etc":               "--bin is not a known flag",
		"--priv":                   "--priv is not a known flag",
		"image-name":               `"image-name" is not a flag`,
		"-t /other/image":          `"/other/image" is not a flag`,
		"--set-env FILE":           `--set-env takes its value attached (--set-env=FILE)`,
		"-- sh":                    `"--" is not a flag`,
		"--private-tmp=yes":        "--private-tmp takes no value",
		"--cd":                     "--cd needs a value",
		"-c":                       "-c needs a value",
		`--set-env="unterminated`:  "cannot split",
		"-t; rm -rf /":             "-; is not a known flag",
		"-t $(id)":                 `"$(id)" is not a flag`,
		"--set-env=X -b /etc:/mnt": "-b is not allowed",
	}
	for in, want := range tests {
		_, _, err := policy().UserArgs(map[string]string{"JACAMAR_CI_CHARLIECLOUD_ARGS": in})
		if err == nil {
			t.Errorf("%q accepted", in)
			continue
		}
		if failure.ClassOf(err) != failure.User || !strings.Contains(err.Error(), want) ||
			!strings.HasPrefix(err.Error(), "JACAMAR_CI_CHARLIECLOUD_ARGS: ") {
			t.Errorf("%q: got %v, want a user error with %q", in, err, want)
		}
	}
	_, _, err := policy().UserArgs(map[string]string{"JACAMAR_CI_CHARLIECLOUD_ARGS": "-w"})
	if !strings.Contains(err.Error(), "allowed flags are --cd/-c") && !strings.Contains(err.Error(), "-c/--cd") {
		t.Errorf("message does not list the allowed flags: %v", err)
	}
	// Jacamar passes any flag: the message names where the admin allows more.
	p := policy()
	p.Key = "general.charliecloud.allowed_user_args"
	_, _, err = p.UserArgs(map[string]string{"JACAMAR_CI_CHARLIECLOUD_ARGS": "-w"})
	if err == nil || !strings.HasSuffix(err.Error(), " (the admin's general.charliecloud.allowed_user_args)") {
		t.Errorf("message does not name allowed_user_args: %v", err)
	}
}

func TestUserArgsAdminList(t *testing.T) {
	p := policy()
	p.Allowed = []string{"--write", "-b"}
	got, _, err := p.UserArgs(map[string]string{"JACAMAR_CI_CHARLIECLOUD_ARGS": "-w --bind=/x"})
	if err != nil || !reflect.DeepEqual(got, []string{"-w", "--bind=/x"}) {
		t.Fatalf("admin-allowed flags refused: %v %v", got, err)
	}
	// The admin's list replaces the default one.
	if _, _, err := p.UserArgs(map[string]string{"JACAMAR_CI_CHARLIECLOUD_ARGS": "-t"}); err == nil {
		t.Fatal("-t allowed although the admin's list omits it")
	}
}

func TestUserArgsDisabled(t *testing.T) {
	p := policy()
	p.Disabled = true
	got, notice, err := p.UserArgs(map[string]string{"JACAMAR_CI_CHARLIECLOUD_ARGS": "-b /etc"})
	if err != nil || got != nil || !strings.Contains(notice, "disable_user_args") {
		t.Fatalf("got %v %q %v", got, notice, err)
	}
}
