#!/usr/bin/env bash
# Mirrors deploy/Dockerfile's build without Docker, for CI and machines without a Docker engine.
#
# It reads the steps from the Dockerfile itself (the first instruction after each
# `# check-dockerfile: …` marker), so the two cannot drift apart:
#
#   deploy/check-dockerfile.sh --print   show what it read (the builder's Rust version, apt
#                                        packages, cargo command; the runtime's apt packages)
#   deploy/check-dockerfile.sh --quick   seconds: the apt packages are installed, rustc is at
#                                        least the image's, the files the Dockerfile COPYs exist,
#                                        Cargo.lock is current (what --locked needs), and a built
#                                        tollgate binary links only libraries the runtime stage has
#   deploy/check-dockerfile.sh           the build itself (≈ 8 min from scratch): installs the
#                                        builder's apt packages when missing (as root), runs the
#                                        same `cargo build --release --locked --bin tollgate`,
#                                        strips the binary like the image does (into
#                                        target/docker/tollgate), checks its libraries, and runs
#                                        its `check-config` on deploy/tollgate.toml
#
# The host should be Debian 12 (bookworm), like both stages' base images; on another system
# the checks still run, with a warning.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKERFILE="$ROOT/deploy/Dockerfile"
cd "$ROOT"

die() { printf 'check-dockerfile: error: %s\n' "$*" >&2; exit 1; }
note() { printf 'check-dockerfile: %s\n' "$*" >&2; }

mode="full"
case "${1:-}" in
    "") ;;
    --print) mode="print" ;;
    --quick) mode="quick" ;;
    -h | --help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument ${1} (try --help)" ;;
esac

[[ -f "$DOCKERFILE" ]] || die "no $DOCKERFILE"

# The first instruction (non-comment line) after `# check-dockerfile: NAME`.
marked_line() {
    awk -v tag="# check-dockerfile: $1" '
        found && !/^#/ { print; exit }
        $0 == tag { found = 1 }
    ' "$DOCKERFILE"
}

# Packages of an `apt-get install -y --no-install-recommends A B C && …` line.
apt_packages() {
    local line="$1"
    line="${line#*--no-install-recommends }"
    line="${line%%&&*}"
    # shellcheck disable=SC2086 # word splitting wanted
    echo $line
}

rust_version="$(sed -n 's/^ARG RUST_VERSION=\(.*\)$/\1/p' "$DOCKERFILE" | head -n 1)"
apt_line="$(marked_line apt)"
cargo_line="$(marked_line cargo)"
runtime_line="$(marked_line runtime-apt)"
[[ -n "$rust_version" ]] || die "no ARG RUST_VERSION=… in the Dockerfile"
[[ "$apt_line" == RUN\ apt-get\ update* ]] || die "the instruction after '# check-dockerfile: apt' is not an apt-get RUN line"
[[ "$runtime_line" == RUN\ apt-get\ update* ]] || die "the instruction after '# check-dockerfile: runtime-apt' is not an apt-get RUN line"
[[ "$cargo_line" == *"cargo build "* ]] || die "the instruction after '# check-dockerfile: cargo' has no cargo build"
builder_packages="$(apt_packages "$apt_line")"
runtime_packages="$(apt_packages "$runtime_line")"
cargo_cmd="cargo build ${cargo_line#*cargo build }"
cargo_cmd="${cargo_cmd%%&&*}"
cargo_cmd="${cargo_cmd%"${cargo_cmd##*[![:space:]]}"}" # trailing blanks
# The COPY sources of the builder stage (not --from=…).
copy_sources="$(awk '$1 == "COPY" && $2 !~ /^--from=/ { for (i = 2; i < NF; i++) print $i }' "$DOCKERFILE")"

if [[ "$mode" == "print" ]]; then
    printf 'rust_version: %s\n' "$rust_version"
    printf 'builder_apt: %s\n' "$builder_packages"
    printf 'cargo: %s\n' "$cargo_cmd"
    printf 'runtime_apt: %s\n' "$runtime_packages"
    printf 'copy: %s\n' "$(tr '\n' ' ' <<<"$copy_sources" | sed 's/ $//')"
    exit 0
fi

# --- checks shared by --quick and the full build ------------------------------------------
if [[ -r /etc/os-release ]] && ! grep -q '^VERSION_CODENAME=bookworm' /etc/os-release; then
    note "warning: this host is not Debian bookworm; the image's base is"
fi

for src in $copy_sources; do
    [[ -e "$ROOT/$src" ]] || die "the Dockerfile copies $src, which does not exist"
done

missing=()
for pkg in $builder_packages; do
    [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" == "install ok installed" ]] || missing+=("$pkg")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    if [[ "$mode" == "full" && $EUID -eq 0 ]]; then
        note "installing the builder's packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    else
        die "apt packages the builder installs are missing here: ${missing[*]} (apt-get install -y --no-install-recommends ${missing[*]})"
    fi
fi

version_ge() { # a >= b, dotted numbers
    [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" == "$2" ]]
}
rustc_version="$(rustc --version | awk '{print $2}')"
version_ge "$rustc_version" "$rust_version" \
    || die "rustc $rustc_version is older than the image's Rust $rust_version"

# --locked fails when Cargo.lock would have to change.
cargo metadata --locked --format-version 1 >/dev/null \
    || die "Cargo.lock is not up to date with Cargo.toml: 'cargo build --locked' would fail"

# Libraries a debian:bookworm-slim image has, plus what the runtime stage installs.
check_libraries() {
    local bin="$1" lib ok bad=()
    while read -r lib; do
        ok=0
        case "$lib" in
            linux-vdso.so.* | ld-linux*.so.* | libc.so.* | libm.so.* | libdl.so.* | libpthread.so.* | librt.so.* | libgcc_s.so.* | libstdc++.so.* | libz.so.*) ok=1 ;;
            libssl.so.3 | libcrypto.so.3) [[ " $runtime_packages " == *" libssl3 "* ]] && ok=1 ;;
        esac
        [[ $ok -eq 1 ]] || bad+=("$lib")
    done < <(ldd "$bin" | awk '{print $1}' | sed 's#.*/##')
    [[ ${#bad[@]} -eq 0 ]] \
        || die "$bin links ${bad[*]}, which the runtime stage (debian:bookworm-slim + $runtime_packages) lacks"
    note "$bin links only libraries the runtime stage has"
}

if [[ "$mode" == "quick" ]]; then
    for bin in target/release/tollgate target/debug/tollgate; do
        if [[ -x "$bin" ]]; then
            check_libraries "$bin"
            break
        fi
    done
    note "ok: Rust $rust_version ≤ rustc $rustc_version; apt: $builder_packages; Cargo.lock current"
    exit 0
fi

# --- the build ----------------------------------------------------------------------------
note "running: $cargo_cmd"
# shellcheck disable=SC2086 # the command's words
$cargo_cmd
mkdir -p target/docker
install -m 0755 target/release/tollgate target/docker/tollgate
strip --strip-debug target/docker/tollgate
check_libraries target/docker/tollgate
TOLLGATE_ADMIN_TOKEN=check-dockerfile-0123456789 \
TOLLGATE_DATABASE_URL=postgres://tollgate:x@postgres:5432/tollgate \
TOLLGATE_REDIS_URL=redis://:x@redis:6379/0 \
TOLLGATE_UPSTREAM_URL=http://demo-upstream:7001 \
TOLLGATE_UPSTREAM_URL_2=http://demo-upstream-2:7001 \
UPSTREAM_API_KEY=x \
    target/docker/tollgate check-config --config deploy/tollgate.toml
note "ok: the image's build steps pass here ($(du -h target/docker/tollgate | cut -f1) binary)"
