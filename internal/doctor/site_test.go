package doctor

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/mechanism"
)

// TestSiteChecks: ci-exec check says when GPU jobs or limits cannot work
// with the runtime on this host (these machines have no GPU).
func TestSiteChecks(t *testing.T) {
	cfg, err := config.Parse("[general]\ndata_dir = \"/srv/ci\"\n[gpu]\nenabled = true\n[limits]\nmax_memory = \"4G\"\n", config.UserInfo{Name: "u", Home: "/home/u"})
	require.NoError(t, err)
	var r Report
	siteChecks(&r, cfg, "charliecloud", mechanism.Info{Features: map[string]bool{}})
	require.Len(t, r.Checks, 2)
	assert.Equal(t, Warn, r.Checks[0].Status)
	assert.Equal(t, "gpu.enabled", r.Checks[0].Key)
	assert.Contains(t, r.Checks[0].Message, "ch-fromhost and nvidia-container-cli")
	assert.Equal(t, Warn, r.Checks[1].Status)
	assert.Equal(t, "limits", r.Checks[1].Key)

	r = Report{}
	siteChecks(&r, cfg, "apptainer", mechanism.Info{Features: map[string]bool{mechanism.FeatureGPU: true, mechanism.FeatureLimits: true}})
	require.Len(t, r.Checks, 2)
	assert.Equal(t, OK, r.Checks[1].Status, "limits enforced")
	assert.NotContains(t, r.Checks[0].Message, "GPU support (", "apptainer has --nv")
}
