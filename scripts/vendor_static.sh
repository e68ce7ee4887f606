#!/usr/bin/env bash
# Refresh the vendored front-end files in static/vendor/ from pinned npm packages.
#
# The portal must work offline (no CDN), so the files are committed. This script is only run to
# add or upgrade a package: bump the version and its integrity below (`npm view NAME@VERSION
# dist.integrity`), run it, and commit static/vendor/ together with VERSIONS.txt.
# It needs npm but leaves no node_modules behind: `npm pack` fetches the tarballs into a temp dir.
set -euo pipefail

cd "$(dirname "$0")/.."
dest=static/vendor

# name version integrity(sha512 of the tarball, as the npm registry publishes it)
packages=(
    "chart.js 4.6.1 sha512-hJyniucsFmq//EvXYvJ6c6mahPoI3kaxdjVH8awTaJ/fDNWeSqqqArixMJWkWNN6fcYvPU3HneSANFNYtRi61g=="
    "@picocss/pico 2.1.1 sha512-kIDugA7Ps4U+2BHxiNHmvgPIQDWPDU4IeU6TNRdvXQM1uZX+FibqDQT2xUOnnO2yq/LUHcwnGlu1hvf4KfXnMg=="
)

# package, file inside the package, path under static/vendor/.
# Chart.js: the map must sit beside the minified file, which ends with a sourceMappingURL to it;
# WhiteNoise's manifest storage fails collectstatic on a missing map.
files=(
    "chart.js dist/chart.umd.min.js chartjs/chart.umd.min.js"
    "chart.js dist/chart.umd.min.js.map chartjs/chart.umd.min.js.map"
    "chart.js LICENSE.md chartjs/LICENSE.md"
    "@picocss/pico css/pico.min.css pico/pico.min.css"
    "@picocss/pico LICENSE.md pico/LICENSE.md"
)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

declare -A version_of dir_of
for entry in "${packages[@]}"; do
    read -r name version integrity <<<"$entry"
    tarball="$(cd "$work" && npm pack --silent "$name@$version" | tail -n 1)"
    actual="sha512-$(openssl dgst -sha512 -binary "$work/$tarball" | openssl base64 -A)"
    if [[ "$actual" != "$integrity" ]]; then
        echo "integrity mismatch for $name@$version: got $actual" >&2
        exit 1
    fi
    dir="$work/unpacked/$name"
    mkdir -p "$dir"
    tar -xzf "$work/$tarball" -C "$dir" --strip-components=1
    version_of[$name]="$version"
    dir_of[$name]="$dir"
done

rm -rf "$dest/chartjs" "$dest/pico"
for entry in "${files[@]}"; do
    read -r name src target <<<"$entry"
    mkdir -p "$(dirname "$dest/$target")"
    cp "${dir_of[$name]}/$src" "$dest/$target"
done

# Every sourceMappingURL in a copied script or stylesheet must resolve, or collectstatic fails.
while IFS= read -r -d '' asset; do
    map="$(sed -n 's|.*[#@] sourceMappingURL=\([^ *]*\).*|\1|p' "$asset" | tail -n 1)"
    if [[ -n "$map" && ! -f "$(dirname "$asset")/$map" ]]; then
        echo "$asset references $map, which was not copied" >&2
        exit 1
    fi
done < <(find "$dest" \( -name '*.js' -o -name '*.css' \) -print0)

{
    echo "# Vendored front-end files: written by scripts/vendor_static.sh, do not edit."
    echo "# package version file sha256"
    for entry in "${files[@]}"; do
        read -r name _ target <<<"$entry"
        sum="$(sha256sum "$dest/$target" | cut -d ' ' -f 1)"
        echo "$name ${version_of[$name]} $target $sum"
    done
} >"$dest/VERSIONS.txt"

cat "$dest/VERSIONS.txt"
