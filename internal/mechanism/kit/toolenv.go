package kit

import (
	"strings"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
)

// networkVars are the host variables a pull tool may need from the driver's
// environment: proxies and the TLS trust store.
var networkVars = []string{"https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY",
	"REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"}

// ToolEnv is the complete environment of a runtime's helper program (pull,
// convert): the job user's identity, path, the runtime's own settings, the
// network variables of the driver's environment, and the registry
// credential under the runtime's variable names. Nothing else of the
// runner's environment (and none of the job's CUSTOM_ENV_ secrets) reaches
// the tool; the credential travels only here, never in argv.
//
// insecure drops *_CA_BUNDLE: python-requests lets them override
// verify=False, which would defeat ch-image --tls-no-verify.
func ToolEnv(u config.UserInfo, path string, settings []string, hostEnv map[string]string, insecure bool,
	cred auth.Credential, names auth.VariableNames) []string {
	env := []string{"PATH=" + path, "HOME=" + u.Home, "USER=" + u.Name, "LOGNAME=" + u.Name, "LANG=C.UTF-8"}
	env = append(env, settings...)
	for _, k := range networkVars {
		v, ok := hostEnv[k]
		if !ok || insecure && strings.HasSuffix(k, "CA_BUNDLE") {
			continue
		}
		env = append(env, k+"="+v)
	}
	return append(env, cred.Env(names)...)
}
