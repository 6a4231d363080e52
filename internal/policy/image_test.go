package policy

import (
	"strings"
	"testing"

	"github.com/ci-exec/ci-exec/internal/failure"
)

func TestParseImage(t *testing.T) {
	tests := []struct {
		in                       string
		full, familiar, registry string
		digest                   string
	}{
		{"alpine", "docker.io/library/alpine:latest", "alpine:latest", "docker.io", ""},
		{"alpine:3.20", "docker.io/library/alpine:3.20", "alpine:3.20", "docker.io", ""},
		{"user/repo:v1.0-RC1", "docker.io/user/repo:v1.0-RC1", "user/repo:v1.0-RC1", "docker.io", ""},
		{"127.0.0.1:5443/ci/tiny:latest", "127.0.0.1:5443/ci/tiny:latest", "127.0.0.1:5443/ci/tiny:latest", "127.0.0.1:5443", ""},
		{"127.0.0.1:5443/ci/tiny", "127.0.0.1:5443/ci/tiny:latest", "127.0.0.1:5443/ci/tiny:latest", "127.0.0.1:5443", ""},
		{"localhost:5443/a/b/c:t", "localhost:5443/a/b/c:t", "localhost:5443/a/b/c:t", "localhost:5443", ""},
		{
			"127.0.0.1:5443/ci/tiny@sha256:ad9dd2cc75ec300f358ff4e166799c12c273171adb889839593a6e5fd3edfa59",
			"127.0.0.1:5443/ci/tiny@sha256:ad9dd2cc75ec300f358ff4e166799c12c273171adb889839593a6e5fd3edfa59",
			"127.0.0.1:5443/ci/tiny@sha256:ad9dd2cc75ec300f358ff4e166799c12c273171adb889839593a6e5fd3edfa59",
			"127.0.0.1:5443", "sha256:ad9dd2cc75ec300f358ff4e166799c12c273171adb889839593a6e5fd3edfa59",
		},
	}
	for _, tc := range tests {
		r, err := ParseImage(tc.in)
		if err != nil {
			t.Errorf("ParseImage(%q): %v", tc.in, err)
			continue
		}
		if r.Full != tc.full || r.Familiar != tc.familiar || r.Registry != tc.registry || r.Digest != tc.digest || r.Given != tc.in {
			t.Errorf("ParseImage(%q) = %+v, want full %q familiar %q registry %q digest %q", tc.in, r, tc.full, tc.familiar, tc.registry, tc.digest)
		}
	}
}

func TestParseImageRefuses(t *testing.T) {
	for _, in := range []string{
		"",
		"alpine; rm -rf /",
		"alpine;id",
		"$(id)",
		"alpine$(id)",
		"`id`",
		"alpine'x",
		`alpine"x`,
		"alpine latest",
		"alpine\tlatest",
		"alpine\nlatest",
		"Alpine",
		"127.0.0.1:5443/CI/tiny",
		"REGISTRY.example.com/x",
		"127.0.0.1:5443/ci/../tiny",
		"127.0.0.1:5443/ci/..",
		"https://127.0.0.1:5443/ci/tiny",
		"-v",
		"--help",
		"alpine|cat",
		"alpine&",
		"alpine>x",
		"a*",
		"tiny:",
		"tiny@sha256:nothex",
		"127.0.0.1:5443/ci/tiny@sha256:abc",
		"ci/tiny\x00",
		"ci/tïny",
		"/abs/path",
		"ci//tiny",
		strings.Repeat("a", 600),
	} {
		_, err := ParseImage(in)
		if err == nil {
			t.Errorf("ParseImage(%q) accepted it", in)
			continue
		}
		if failure.ClassOf(err) != failure.User {
			t.Errorf("ParseImage(%q): %v is not a user error", in, err)
		}
		if strings.Contains(err.Error(), "\n") {
			t.Errorf("ParseImage(%q): message is not one line: %q", in, err)
		}
		if len(in) < 100 && !strings.Contains(err.Error(), "use a plain name") && !strings.Contains(err.Error(), "shorter") {
			t.Errorf("ParseImage(%q): message does not say what to do: %v", in, err)
		}
	}
}

func TestAllowlist(t *testing.T) {
	allow, err := NewAllowlist([]string{
		`127\.0\.0\.1:5443/ci/.*`,
		`alpine:3\.[0-9]+`,
	})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		image string
		ok    bool
	}{
		{"127.0.0.1:5443/ci/tiny:latest", true},
		{"127.0.0.1:5443/ci/tiny", true}, // normalised to :latest, still in /ci/
		{"127.0.0.1:5443/ci/a/b/c:v1", true},
		{"alpine:3.20", true},                      // matches the form as written
		{"docker.io/library/alpine:3.20", true},    // the same image written in full
		{"127.0.0.1:54430/ci/tiny:latest", false},  // other port
		{"127.0.0.1:5444/ci/tiny:latest", false},   // other port
		{"localhost:5443/ci/tiny:latest", false},   // other host spelling
		{"127.0.0.1:5443.evil.com/ci/tiny", false}, // suffix trick on the host
		{"evil.com/127.0.0.1:5443/ci/tiny", false}, // invalid anyway, never a prefix match
		{"evil.com/ci/127.0.0.1/ci/tiny", false},   // contains no full match
		{"127.0.0.1:5443/cix/tiny", false},         // prefix trick on the path
		{"127.0.0.1:5443/other/tiny:latest", false},
		{"alpine:3.20-evil", false}, // suffix trick on the tag
		{"alpine:latest", false},
		{"alpine", false},
		{"127.0.0.1:5443/ci/tiny@sha256:ad9dd2cc75ec300f358ff4e166799c12c273171adb889839593a6e5fd3edfa59", true},
		{"alpine@sha256:ad9dd2cc75ec300f358ff4e166799c12c273171adb889839593a6e5fd3edfa59", false}, // digest, not a 3.x tag
	}
	for _, tc := range tests {
		ref, err := ParseImage(tc.image)
		if err != nil {
			if tc.ok {
				t.Errorf("%s: %v", tc.image, err)
			}
			continue
		}
		err = allow.Check(ref)
		if (err == nil) != tc.ok {
			t.Errorf("Check(%s) = %v, want allowed=%v", tc.image, err, tc.ok)
		}
		if err != nil && (failure.ClassOf(err) != failure.User || !strings.Contains(err.Error(), "image_allowlist")) {
			t.Errorf("Check(%s): %v is not a user error naming image_allowlist", tc.image, err)
		}
	}
}

func TestAllowlistAnchoring(t *testing.T) {
	// An entry with its own alternation must not escape the anchors:
	// ^a|b$ would allow anything starting with "a".
	allow, err := NewAllowlist([]string{`127\.0\.0\.1:5443/ci/tiny:latest|alpine:3\.20`})
	if err != nil {
		t.Fatal(err)
	}
	for image, ok := range map[string]bool{
		"127.0.0.1:5443/ci/tiny:latest":      true,
		"127.0.0.1:5443/ci/tiny:latest-evil": false,
		"evil/alpine:3.20":                   false,
	} {
		ref, err := ParseImage(image)
		if err != nil {
			t.Fatal(err)
		}
		if got := allow.Check(ref) == nil; got != ok {
			t.Errorf("%s: allowed=%v, want %v", image, got, ok)
		}
	}
	if a, _ := NewAllowlist(nil); a.Check(Ref{Full: "anything"}) != nil {
		t.Error("an empty allowlist must allow every image")
	}
	if _, err := NewAllowlist([]string{"("}); err == nil {
		t.Error("an invalid entry must be an error")
	}
}

// TestAllowlistPrefixEntryHint: an entry written for Jacamar's matching,
// which may accept a part of the reference, is refused as ci-exec refuses
// every partial match, and the error says which entry and how to widen it.
func TestAllowlistPrefixEntryHint(t *testing.T) {
	allow, err := NewAllowlist([]string{`^other\.io/.*`, `^registry\.example\.com/ubi9`})
	if err != nil {
		t.Fatal(err)
	}
	allow.Key = "general.charliecloud.image_allowlist"
	ref, err := ParseImage("registry.example.com/ubi9/ubi-minimal:latest")
	if err != nil {
		t.Fatal(err)
	}
	err = allow.Check(ref)
	if err == nil || failure.ClassOf(err) != failure.User {
		t.Fatalf("got %v, want a user error", err)
	}
	for _, w := range []string{"registry.example.com/ubi9/ubi-minimal:latest is not allowed",
		`general.charliecloud.image_allowlist entry '^registry\.example\.com/ubi9' matches only its beginning`,
		"end the entry with \".*\""} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("%v does not say %q", err, w)
		}
	}
	// A reference that merely contains an entry gets the plain refusal: an
	// entry matching inside a reference is exactly what anchoring stops.
	ref, _ = ParseImage("evil.io/registry.example.com/ubi9:latest")
	if err := allow.Check(ref); err == nil || strings.Contains(err.Error(), "beginning") ||
		!strings.Contains(err.Error(), "matches no entry of the admin's general.charliecloud.image_allowlist") {
		t.Errorf("got %v", err)
	}
}
