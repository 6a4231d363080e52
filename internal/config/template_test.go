package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// podmanTemplate is the shipped Podman template (configs/templates).
func podmanTemplate(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "configs", "templates", "podman.toml"))
	require.NoError(t, err)
	return string(b)
}

func templateDoc(general, table string) string {
	return "[general]\ndata_dir = \"/d/$USER\"\nrun_mechanism = \"template:t\"\n" + general + "\n[runtimes.t]\n" + table
}

// minimalTemplate has what every placement needs and nothing more.
const minimalTemplate = `disable_user_args = true
pull = ["rt", "pull", "{auth}", "{ref}"]
run = ["rt", "run", "{binds}", "{env}", "--cd={workdir}", "{image}", "{command}"]
bind = ["--bind={src}:{dst}"]
env_name = ["--env={name}"]
auth = ["--auth={authfile}"]
`

func TestTemplateShippedPodmanLoads(t *testing.T) {
	doc := "[general]\ndata_dir = \"/d/$USER\"\nrun_mechanism = \"template:podman\"\n" + podmanTemplate(t)
	cfg, err := Parse(doc, bob)
	require.NoError(t, err)
	tpl := cfg.Template()
	require.NotNil(t, tpl)
	assert.Same(t, &tpl.Mechanism, cfg.Mechanism())
	assert.Equal(t, "", cfg.Mechanism().ImageStorageDir, "the default, /var/tmp")
	assert.Equal(t, PullAlways, cfg.Mechanism().PullPolicy)
	assert.Equal(t, "JACAMAR_CI_PODMAN_ARGS", tpl.UserArgsVariable)
	assert.Equal(t, "podman", cfg.General.TemplateName())
}

func TestTemplateAnonymousPullLoads(t *testing.T) {
	_, err := Parse(templateDoc("", strings.Replace(strings.Replace(minimalTemplate, `"{auth}", `, "", 1), `auth = ["--auth={authfile}"]`, "", 1)), bob)
	require.NoError(t, err)
}

func TestTemplateMinimalLoads(t *testing.T) {
	cfg, err := Parse(templateDoc("", minimalTemplate), bob)
	require.NoError(t, err)
	assert.Equal(t, []string{"rt", "pull", "{auth}", "{ref}"}, cfg.Template().Pull)
}

func TestTemplatePolicyKeysExpand(t *testing.T) {
	cfg, err := Parse(templateDoc("", minimalTemplate+"image_storage_dir = \"$HOME/img\"\nvolume_prefixes = [\"$HOME/data\"]\n"), bob)
	require.NoError(t, err)
	assert.Equal(t, "/home/bob/img", cfg.Mechanism().ImageStorageDir)
	assert.Equal(t, []string{"/home/bob/data"}, cfg.Mechanism().VolumePrefixes)
}

// TestTemplateRefused: every way a template can be half wired is refused
// at load with a line that names the key and what is missing.
func TestTemplateRefused(t *testing.T) {
	replace := func(old, new string) string { return strings.Replace(minimalTemplate, old, new, 1) }
	for _, tc := range []struct {
		name, general, table, want string
	}{
		{"no template table", "", "", `general.run_mechanism "template:t" names no template; define it in a [runtimes.t] table`},
		{"no run", "", replace(`run = ["rt", "run", "{binds}", "{env}", "--cd={workdir}", "{image}", "{command}"]`, ""), "runtimes.t.run is required"},
		{"no pull or check", "", replace(`pull = ["rt", "pull", "{auth}", "{ref}"]`, ""), "runtimes.t needs pull or check"},
		{"setup without teardown", "", minimalTemplate + `setup = ["rt", "create", "{job_key}", "{image}"]`, "runtimes.t.setup needs a teardown"},
		{"setup under slurm", "executor = \"slurm\"", minimalTemplate + "setup = [\"rt\", \"create\", \"{image}\"]\nteardown = [\"rt\", \"rm\", \"{job_key}\"]",
			`runtimes.t.setup makes per-job state on the host where prepare runs, but executor = "slurm"`},
		{"run without binds", "", replace(`"{binds}", `, ""), "runtimes.t.run must use {binds}: the job's builds, cache and scripts dirs"},
		{"run without command", "", replace(`, "{command}"]`, "]"), "runtimes.t.run must use {command}"},
		{"run without env", "", replace(`"{env}", `, ""), "runtimes.t.run must use {env}"},
		{"custom options dropped", "", minimalTemplate + `custom_options = ["--x"]`, "runtimes.t.run must use {admin_options}: custom_options or runner_options are set"},
		{"user args dropped", "", replace("disable_user_args = true", `user_args_variable = "X_ARGS"
user_flags = ["-e/--env="]`), "runtimes.t.run must use {user_args}"},
		{"user args without variable", "", replace("disable_user_args = true", ""), "runtimes.t.user_args_variable must name the job variable"},
		{"allowed flag not described", "", replace("disable_user_args = true", `user_args_variable = "X_ARGS"
user_flags = ["-e/--env="]
allowed_user_args = ["-e", "--volume"]`) + "", `runtimes.t.allowed_user_args: "--volume" is not in user_flags`},
		{"bad flag spec", "", minimalTemplate + `user_flags = ["env"]`, `runtimes.t.user_flags: "env" is not a flag spec`},
		{"list without fragment", "", replace(`bind = ["--bind={src}:{dst}"]`, ""), "runtimes.t.run uses {binds} but runtimes.t.bind is not defined"},
		{"unused fragment", "", minimalTemplate + `rootless = ["--userns=keep-id"]`, "runtimes.t.rootless is defined but no action uses the list placeholder that expands it"},
		{"list inside a word", "", replace(`"{binds}", `, `"--b={binds}", `), "{binds} is a list (it expands to several words) and must be a word of its own"},
		{"unknown placeholder", "", replace(`"{ref}"`, `"{reff}"`), "runtimes.t.pull: unknown placeholder {reff} here (known: {storage}"},
		{"command outside run", "", replace(`"{ref}"`, `"{ref}", "{command}"`), "runtimes.t.pull: unknown placeholder {command} here"},
		{"unbalanced brace", "", replace(`"{ref}"`, `"{ref}", "{x"`), `'{' that starts no placeholder`},
		{"placeholder in program", "", replace(`["rt", "pull"`, `["{image}", "pull"`), "runtimes.t.pull[0] must be a program name or absolute path"},
		{"relative program path", "", replace(`["rt", "pull"`, `["bin/rt", "pull"`), `runtimes.t.pull[0] must be a program name or an absolute path, got "bin/rt"`},
		{"pull not by digest", "", replace(`"{ref}"`, `"{image_file}"`), "runtimes.t.pull must use {ref} or {digest}"},
		{"env fragment with value", "", replace(`env_name = ["--env={name}"]`, `env_name = ["--env={name}={value}"]`), "runtimes.t.env_name: unknown placeholder {value}"},
		{"bind without dst", "", replace(`bind = ["--bind={src}:{dst}"]`, `bind = ["--bind={src}"]`), "runtimes.t.bind must use {dst}"},
		{"cache limit without remove", "", minimalTemplate + `cache_max_size = "1G"`, "cache_max_size and cache_max_age need a remove action"},
		{"insecure registries without fragment", "", minimalTemplate + `insecure_registries = ["r:5000"]`, "runtimes.t.insecure_registries needs {insecure} in pull"},
		{"volumes without bind", "", replace(`bind = ["--bind={src}:{dst}"]`, "") + `user_volume_variable = "VOLS"`, "runtimes.t.user_volume_variable needs a bind fragment"},
		{"shell", "", minimalTemplate + `shell = "/bin/zsh"`, "runtimes.t.shell must be /bin/sh"},
		{"error codes without prefix", "", minimalTemplate + `error_exit_codes = [125]`, "runtimes.t.error_exit_codes needs error_prefix"},
		{"half credentials", "", minimalTemplate + `username_env = "U"`, "set both username_env and password_env"},
		{"command_env placeholder", "", minimalTemplate + `command_env = ["X={image}"]`, "runtimes.t.command_env[0]: unknown placeholder {image}"},
		{"entry point key", "", minimalTemplate + `user_entry_point = ["/bin/sh"]`, "runtimes.t.user_entry_point is a Podman setting"},
		{"bad name", "", "", `runtimes.T_1: a template name must be lower-case`},
		{"policy keys checked", "", minimalTemplate + `pull_policy = "sometimes"`, `runtimes.t.pull_policy must be "always"`},
		{"unknown key", "", minimalTemplate + `pul = ["x"]`, "runtimes.t.pul"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			doc := templateDoc(tc.general, tc.table)
			if tc.name == "no template table" {
				doc = "[general]\ndata_dir = \"/d\"\nrun_mechanism = \"template:t\"\n"
			}
			if tc.name == "bad name" {
				doc = "[general]\ndata_dir = \"/d\"\n[runtimes.T_1]\n" + minimalTemplate
			}
			_, err := Parse(doc, bob)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
			assert.NotContains(t, err.Error(), "\n")
		})
	}
}

// TestTemplateDiagnoseLines: ci-exec check points at the template key's
// line.
func TestTemplateDiagnoseLines(t *testing.T) {
	doc := templateDoc("", strings.Replace(minimalTemplate, `"{ref}"`, `"{reff}"`, 1))
	_, probs := Diagnose(doc, bob)
	require.Len(t, probs, 2, "%v", probs)
	for _, p := range probs {
		assert.Equal(t, "runtimes.t.pull", p.Key, p.Message)
		assert.Equal(t, 7, p.Line, p.Message)
	}
}

// TestTemplateDocExamplesLoad: every template in docs/templates.md (the
// worked example and the untested sketches) passes validation, so an
// admin who copies one starts from a configuration ci-exec accepts.
func TestTemplateDocExamplesLoad(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "docs", "templates.md"))
	require.NoError(t, err)
	blocks := strings.Split(string(b), "```toml\n")[1:]
	shipped, err := Parse("[general]\ndata_dir = \"/d/$USER\"\nrun_mechanism = \"template:podman\"\n"+podmanTemplate(t), bob)
	require.NoError(t, err)
	n := 0
	for _, blk := range blocks {
		body, _, _ := strings.Cut(blk, "```")
		header, _, ok := strings.Cut(body, "\n")
		name, isTpl := strings.CutPrefix(header, "[runtimes.")
		if !ok || !isTpl || !strings.Contains(body, "run =") {
			continue
		}
		name = strings.TrimSuffix(name, "]")
		t.Run(name, func(t *testing.T) {
			cfg, err := Parse("[general]\ndata_dir = \"/d/$USER\"\nrun_mechanism = \"template:"+name+"\"\n"+body, bob)
			require.NoError(t, err)
			if name == "podman" {
				assert.Equal(t, shipped.Template(), cfg.Template(), "the worked example is configs/templates/podman.toml")
			}
		})
		n++
	}
	assert.Equal(t, 3, n, "the Podman example and the Enroot and Sarus sketches")
}
