package runnerscript

import (
	"context"
	"os"
	"os/exec"
	"testing"
)

func BenchmarkRewriteBuildScript(b *testing.B) {
	in, err := os.ReadFile("testdata/runner-19.4/build_script.bash")
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := Rewrite(in, []string{capturedToken}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRewriteAndCheckUpload(b *testing.B) {
	in, err := os.ReadFile("testdata/runner-19.4/upload_artifacts_on_success.bash")
	if err != nil {
		b.Fatal(err)
	}
	bash, err := exec.LookPath("bash")
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		res, err := Rewrite(in, []string{capturedToken})
		if err != nil {
			b.Fatal(err)
		}
		if err := Check(context.Background(), bash, res.Script, res.Bodies, nil); err != nil {
			b.Fatal(err)
		}
	}
}
