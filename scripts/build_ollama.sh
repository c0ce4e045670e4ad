#!/usr/bin/env bash
# Build the real Ollama server from its Go module, for the test suite only (never used for training).
#
#   bash scripts/build_ollama.sh            # or: make ollama
#
# Result: ${OLLAMA_FT_CACHE:-$HOME/.cache/ollama-ft}/ollama/<version>/bin/ollama, printed as the last
# line of stdout. A second run with a working cached binary returns at once.
#
# v0.24.0 is the last Ollama release that builds CPU inference with the Go toolchain and a C/C++
# compiler alone (cgo over its in-tree llama.cpp/ggml; later ones fetch llama.cpp from GitHub). Go
# module zips leave out nested vendor/ directories, so the llama.cpp vendor headers are supplied from
# offline sources: Debian nlohmann-json3-dev and libstb-dev, and the PyPI sdist of `miniaudio`.
# No -march flags are used, so the binary runs on any x86-64 (and dodges ggml's AMX crash in VMs).
#
# Environment: OLLAMA_VERSION (default v0.24.0), OLLAMA_FT_CACHE, PYTHON (for pip, default python3),
# OLLAMA_FT_KEEP_BUILD=1 keeps the temporary build tree.
set -euo pipefail

OLLAMA_VERSION="${OLLAMA_VERSION:-v0.24.0}"
case "$OLLAMA_VERSION" in v*) ;; *) OLLAMA_VERSION="v$OLLAMA_VERSION" ;; esac
VERSION_NUM="${OLLAMA_VERSION#v}"
MODULE="github.com/ollama/ollama"
CACHE_ROOT="${OLLAMA_FT_CACHE:-$HOME/.cache/ollama-ft}"
DEST_DIR="$CACHE_ROOT/ollama/$OLLAMA_VERSION"
BIN="$DEST_DIR/bin/ollama"
LOG="$DEST_DIR/build.log"
PYTHON="${PYTHON:-python3}"
# Pinned offline source of miniaudio.h (miniaudio 0.11.25 inside the pyminiaudio 1.71 sdist).
MINIAUDIO_REQ="miniaudio==1.71 --hash=sha256:ff51e2887bb673e2e757752b586b3dc924d59aa5fbcae9bbc45f4a111bd3262b"

log() { echo "build_ollama: $*" >&2; }
die() { echo "build_ollama: error: $*" >&2; exit 1; }

# A cached binary counts only if it runs and reports the expected version. OLLAMA_HOST points at a
# closed port so `-v` never talks to (or reports the version of) some other running server.
binary_ok() {
    [ -x "$1" ] || return 1
    local out
    out="$(OLLAMA_HOST=127.0.0.1:9 HOME="${TMPDIR:-/tmp}" timeout 20 "$1" -v 2>&1)" || return 1
    grep -q "version is $VERSION_NUM\$" <<<"$out"
}

if binary_ok "$BIN"; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$DEST_DIR/bin"

# One builder at a time per version (parallel test runs); whoever waits re-checks the cache.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$DEST_DIR/.lock"
    flock 9
    if binary_ok "$BIN"; then
        echo "$BIN"
        exit 0
    fi
fi

# ---- prerequisites -------------------------------------------------------------------------------
command -v go >/dev/null 2>&1 || die "Go is not on PATH (Ollama $OLLAMA_VERSION needs Go >= 1.26)"
CC_BIN="${CC:-gcc}"
CXX_BIN="${CXX:-g++}"
command -v "${CC_BIN%% *}" >/dev/null 2>&1 || die "no C compiler ($CC_BIN) on PATH"
command -v "${CXX_BIN%% *}" >/dev/null 2>&1 || die "no C++ compiler ($CXX_BIN) on PATH"

NLOHMANN_DIR=/usr/include/nlohmann
STB_IMAGE=/usr/include/stb/stb_image.h
if [ ! -f "$NLOHMANN_DIR/json.hpp" ] || [ ! -f "$STB_IMAGE" ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        die "missing headers: install the Debian packages nlohmann-json3-dev and libstb-dev (apt-get)"
    fi
    log "installing Debian nlohmann-json3-dev libstb-dev"
    { DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
          nlohmann-json3-dev libstb-dev; } >&2 ||
        die "apt-get install nlohmann-json3-dev libstb-dev failed"
    [ -f "$NLOHMANN_DIR/json.hpp" ] && [ -f "$STB_IMAGE" ] ||
        die "nlohmann/json.hpp or stb/stb_image.h still missing after apt-get install"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ollama-build.XXXXXX")"
cleanup() {
    if [ "${OLLAMA_FT_KEEP_BUILD:-0}" = 1 ]; then log "build tree kept at $WORK"; else
        chmod -R u+w "$WORK" 2>/dev/null || true
        rm -rf "$WORK"
    fi
    rm -f "$DEST_DIR/bin/.ollama.tmp.$$"
}
trap cleanup EXIT

# ---- module source -------------------------------------------------------------------------------
log "go mod download $MODULE@$OLLAMA_VERSION"
MOD_JSON="$(cd "$WORK" && GOFLAGS= go mod download -json "$MODULE@$OLLAMA_VERSION" 2>&1)" || {
    REASON="$(sed -n 's/^[[:space:]]*"Error": "\(.*\)",\{0,1\}$/\1/p' <<<"$MOD_JSON" | head -n1)"
    [ -n "$REASON" ] || REASON="$(tr '\n' ' ' <<<"$MOD_JSON")"
    die "go mod download $MODULE@$OLLAMA_VERSION failed: $(sed 's/\\[nt]/ /g' <<<"$REASON" | cut -c1-300)"
}
MOD_DIR="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$MOD_JSON" | head -n1)"
[ -n "$MOD_DIR" ] && [ -f "$MOD_DIR/go.mod" ] || die "go mod download gave no module directory"

# __DATE__/__TIME__ in the C sources (GCC reads SOURCE_DATE_EPOCH): the release's own time, so two
# builds of one version are byte-identical.
INFO_FILE="$(sed -n 's/^[[:space:]]*"Info": "\(.*\)",\{0,1\}$/\1/p' <<<"$MOD_JSON" | head -n1)"
MOD_TIME="$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$INFO_FILE" 2>/dev/null | head -n1)"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(date -u -d "${MOD_TIME:-1970-01-01T00:00:00Z}" +%s 2>/dev/null || echo 0)}"

SRC="$WORK/ollama"
cp -R "$MOD_DIR" "$SRC"
chmod -R u+w "$SRC"

# ---- headers left out of the module zip (llama/llama.cpp/vendor) ----------------------------------
VENDOR="$SRC/llama/llama.cpp/vendor"
mkdir -p "$VENDOR/stb" "$VENDOR/miniaudio"
if [ ! -f "$VENDOR/nlohmann/json.hpp" ]; then
    rm -rf "$VENDOR/nlohmann"
    cp -R "$NLOHMANN_DIR" "$VENDOR/nlohmann"   # Debian's is the multi-header layout; copy it whole
fi
[ -f "$VENDOR/stb/stb_image.h" ] || cp "$STB_IMAGE" "$VENDOR/stb/stb_image.h"
if [ ! -f "$VENDOR/miniaudio/miniaudio.h" ]; then
    log "fetching miniaudio.h from the PyPI sdist ($MINIAUDIO_REQ)"
    "$PYTHON" -m pip --version >/dev/null 2>&1 || die "pip is needed for the miniaudio sdist ($PYTHON -m pip)"
    echo "$MINIAUDIO_REQ" >"$WORK/miniaudio-req.txt"
    "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
        --require-hashes -r "$WORK/miniaudio-req.txt" -d "$WORK/sdist" >&2 ||
        die "pip download of the miniaudio sdist failed"
    tar -xzf "$WORK"/sdist/miniaudio-*.tar.gz -C "$WORK/sdist" --wildcards '*/miniaudio/miniaudio.h' ||
        die "miniaudio sdist has no miniaudio/miniaudio.h"
    cp "$WORK"/sdist/miniaudio-*/miniaudio/miniaudio.h "$VENDOR/miniaudio/miniaudio.h"
fi

# ---- build ---------------------------------------------------------------------------------------
# Portable flags only: explicit CGO_*FLAGS replace any -march=native from the caller's environment.
export CGO_ENABLED=1 CC="$CC_BIN" CXX="$CXX_BIN"
export CGO_CFLAGS="-O2" CGO_CPPFLAGS="" CGO_CXXFLAGS="-O2" CGO_LDFLAGS="-O2"
export GOFLAGS="-mod=mod"
unset GOARCH GOOS || true
# Release-mode flags as in Ollama's scripts/env.sh; an empty -buildid keeps the bytes independent of
# the temporary build directory (with -trimpath).
LDFLAGS="-w -s -buildid= -X=$MODULE/version.Version=$VERSION_NUM -X=$MODULE/server.mode=release"
TMP_BIN="$DEST_DIR/bin/.ollama.tmp.$$"

log "building ollama $OLLAMA_VERSION (cgo CPU build; about 4-5 minutes on 2 cores), log: $LOG"
START=$(date +%s)
if ! (cd "$SRC" && go mod download && go build -trimpath -ldflags "$LDFLAGS" -o "$TMP_BIN" .) >"$LOG" 2>&1; then
    tail -n 30 "$LOG" >&2 || true
    REASON="$(grep -m1 -E 'fatal error|error:|cannot find|undefined' "$LOG" | cut -c1-240 || true)"
    die "go build of ollama $OLLAMA_VERSION failed${REASON:+: $REASON} (full log: $LOG)"
fi
ELAPSED=$(( $(date +%s) - START ))
binary_ok "$TMP_BIN" || die "built binary does not report version $VERSION_NUM (see $LOG)"
mv -f "$TMP_BIN" "$BIN"
echo "built ollama $OLLAMA_VERSION in ${ELAPSED} s"
echo "$BIN"
