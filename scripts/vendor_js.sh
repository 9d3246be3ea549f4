#!/usr/bin/env bash
# Vendors the dashboard's JavaScript from the npm registry into gateway/dashboard/static/vendor/.
# The dashboard never loads anything from a CDN: these files are committed and served by the gateway.
# Usage: scripts/vendor_js.sh   (needs npm; pins below; rerun after changing a version)
set -euo pipefail

HTMX_VERSION="2.0.11"
CHARTJS_VERSION="4.6.1"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo_root/gateway/dashboard/static/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# package@version  file-inside-package  name-under-vendor/
vendor() {
    local spec="$1" src="$2" name="$3"
    (cd "$work" && npm pack --silent "$spec" >/dev/null)
    local tarball
    tarball="$(ls "$work"/*.tgz)"
    tar -xzf "$tarball" -C "$work"
    cp "$work/package/$src" "$dest/$name"
    local licence
    licence="$(ls "$work"/package/LICENSE* | head -n 1)"
    cp "$licence" "$dest/$name.LICENSE"
    echo "$spec -> vendor/$name ($(sha256sum "$dest/$name" | cut -c1-16)...)"
    rm -rf "$work/package" "$tarball"
}

mkdir -p "$dest"
vendor "htmx.org@$HTMX_VERSION" "dist/htmx.min.js" "htmx.min.js"
vendor "chart.js@$CHARTJS_VERSION" "dist/chart.umd.min.js" "chart.umd.min.js"

cat > "$dest/README.md" <<README
# Vendored JavaScript

Written by \`scripts/vendor_js.sh\` from the npm registry (\`npm pack\`); served by the gateway, never a CDN.

| file | npm package | version | licence |
|---|---|---|---|
| htmx.min.js | htmx.org | $HTMX_VERSION | 0BSD (htmx.min.js.LICENSE) |
| chart.umd.min.js | chart.js | $CHARTJS_VERSION | MIT (chart.umd.min.js.LICENSE) |

SHA-256:

\`\`\`
$(cd "$dest" && sha256sum htmx.min.js chart.umd.min.js)
\`\`\`
README
