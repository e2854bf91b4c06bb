#!/usr/bin/env bash
# Builds the browser package into clients/web/dist/: fieldsync.js (the Device API, an ES
# module) over fieldsync_wasm.js and fieldsync_wasm_bg.wasm (the Rust core and sync engine
# compiled to WebAssembly), with TypeScript declarations.
#
# rustup here has only the host target, so the WebAssembly build uses Debian's Rust (which
# ships std's source) with -Z build-std; the bindings come from wasm-bindgen-cli at the
# exact version of the wasm-bindgen crate in Cargo.lock, built once with rustup's cargo
# and kept in a cache a rerun finds. Installs what is missing (Debian packages, npm).
set -euo pipefail
web="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$web/../.." && pwd)"
cache="${FIELDSYNC_TOOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fieldsync-tools}"

step() { printf '== %s\n' "$*" >&2; }

# 1. Debian's Rust with std's source, and an LLVM linker for wasm32.
if [ ! -x /usr/bin/wasm-ld-22 ] || [ ! -d /usr/lib/rustlib/src/rust/library ]; then
    step "installing Debian's rustc-web, cargo-web, rust-web-src, lld-22"
    apt-get update -qq >/dev/null || true
    apt-get install -y --no-install-recommends rustc-web cargo-web rust-web-src lld-22 >/dev/null
fi

# 2. wasm-bindgen-cli, the version Cargo.lock pins for the wasm-bindgen crate.
version="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' "$root/Cargo.lock")"
if [ -z "$version" ]; then
    echo "build.sh: no wasm-bindgen package in Cargo.lock" >&2
    exit 1
fi
bindgen="$cache/wasm-bindgen-$version/bin/wasm-bindgen"
if [ ! -x "$bindgen" ]; then
    step "building wasm-bindgen-cli $version once (cached in $cache)"
    cargo install wasm-bindgen-cli --version "=$version" --locked --quiet \
        --root "$cache/wasm-bindgen-$version"
fi

# 3. The crate for wasm32, with Debian's toolchain (its own target dir, so the two
#    compilers never share build products).
step "cargo build fieldsync-wasm for wasm32-unknown-unknown (release)"
(
    cd "$root"
    unset RUSTUP_TOOLCHAIN RUSTFLAGS CARGO_BUILD_TARGET
    export PATH="/usr/bin:$PATH" RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1
    export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=/usr/bin/wasm-ld-22
    # getrandom 0.3 (under rand) takes the browser's crypto.getRandomValues only when told.
    export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS='--cfg getrandom_backend="wasm_js"'
    export CARGO_TARGET_DIR="$root/target/wasm"
    # Small over fast-to-build: one codegen unit, LTO, size-optimised, no debug info.
    export CARGO_PROFILE_RELEASE_LTO=true CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1
    export CARGO_PROFILE_RELEASE_OPT_LEVEL=s CARGO_PROFILE_RELEASE_DEBUG=0
    /usr/bin/cargo build --locked --release --quiet --target wasm32-unknown-unknown \
        -Z build-std=std,panic_abort -p fieldsync-wasm
)
wasm="$root/target/wasm/wasm32-unknown-unknown/release/fieldsync_wasm.wasm"

# 4. Bindings (an ES module for browsers and Node), then size optimisation with binaryen's
#    wasm-opt from npm (Debian's produced modules that failed to load).
step "wasm-bindgen --target web"
rm -rf "$web/dist"
"$bindgen" --target web --out-dir "$web/dist" --out-name fieldsync_wasm "$wasm"
cp "$web/src/fieldsync.js" "$web/src/fieldsync.d.ts" "$web/src/react.js" "$web/src/react.d.ts" "$web/dist/"
(cd "$web" && npm ci --no-audit --no-fund --loglevel=error)
raw="$web/dist/fieldsync_wasm_bg.wasm"
before=$(stat -c %s "$raw")
step "wasm-opt -Oz"
"$web/node_modules/.bin/wasm-opt" -Oz --enable-bulk-memory --enable-nontrapping-float-to-int \
    --enable-sign-ext --enable-mutable-globals "$raw" -o "$raw.opt"
mv "$raw.opt" "$raw"
after=$(stat -c %s "$raw")
gz=$(gzip -9 -c "$raw" | wc -c)
printf 'fieldsync_wasm_bg.wasm: %d bytes from wasm-bindgen, %d after wasm-opt -Oz (%d gzipped)\n' \
    "$before" "$after" "$gz"
