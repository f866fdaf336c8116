#!/usr/bin/env bash
# Makes the image tier's Alpine package repository (called by tests/assets.sh once the Alpine
# release directories are prepared), in ${TOWALINK_TEST_ASSETS:-target/test-assets}:
#   apk-keys/    the test signing key, made once: towalink-test@example.invalid-<8 hex>.rsa
#                (private, 0600) and .rsa.pub (its file name is the key name signatures carry)
#   apk-mirror/v3.23/main/<arch>/   (x86_64, aarch64) laid out as an Alpine mirror:
#                bird-<ver>-r0.apk  BIRD 2 (bird, birdcl) built from Debian's bird2 source
#                                   (pinned in tests/assets.toml), static with musl
#                openssh-server-<ver>-r0.apk  sshd and ssh-keygen built from Debian's openssh
#                                   source, static with musl, without OpenSSL
#                alpine-base-<release>-r0.apk  a meta package depending on the release
#                                   rootfs's world: it stands in for Alpine's alpine-base,
#                                   which the diskless init always installs
#                APKINDEX.tar.gz    signed with the test key (tests/apk_repo.py: formats)
#   apk-build/<arch>/   the BIRD build, kept while the source, flags and compiler are the same
# Packages and index are deterministic (same binaries and key, same bytes). Then a self-test
# with the release's own apk (3.x) proves the repository: installs `bird` into a new root
# offline and runs it, refuses a tampered index, an absent key and a tampered package, and
# replays the diskless init's install (installed db of the rootfs layer, world + alpine-base).
# Needs root (apt for build tools and deb-src on a fresh machine; apk writes roots owned by
# root).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${TOWALINK_TEST_ASSETS:-$PWD/target/test-assets}
manifest=tests/assets.toml
py=$PWD/tests/apk_repo.py
dl="$out/dl"
mkdir -p "$dl"
export SOURCE_DATE_EPOCH=0

field() { # field <section> <key>
  python3 -c 'import sys,tomllib; print(tomllib.load(open(sys.argv[1],"rb"))[sys.argv[2]][sys.argv[3]])' "$manifest" "$1" "$2"
}
check() { # check <file> <sha256>
  echo "$2  $1" | sha256sum -c --quiet - || { echo "apk-repo: $1: sha256 mismatch (expected $2)" >&2; rm -f "$1"; exit 1; }
}
fail() { echo "apk-repo: $*" >&2; exit 1; }
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

# ---- tools ----------------------------------------------------------------------------------
have() { command -v "$1" >/dev/null 2>&1; }
need=()
have flex || need+=(flex)
have bison || need+=(bison)
have m4 || need+=(m4)
have make || need+=(make)
have autoconf || need+=(autoconf)
have musl-gcc || need+=(musl-tools)
have dpkg-source || need+=(dpkg-dev)
have file || need+=(file)
have openssl || need+=(openssl)
have strip || need+=(binutils)
have aarch64-linux-gnu-gcc || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
if [ ! -e /usr/lib/aarch64-linux-musl/musl-gcc.specs ]; then
  # musl's aarch64 libc and headers through multiarch (Debian's musl-dev:arm64).
  dpkg --print-foreign-architectures | grep -qx arm64 || $sudo dpkg --add-architecture arm64
  need+=(musl-dev:arm64)
fi
if ((${#need[@]})); then
  echo "apk-repo: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# ---- BIRD 2 source (Debian) -----------------------------------------------------------------
srcpkg=$(field bird2-source package)
debver=$(field bird2-source version)
dsc="$dl/bird2/$(field bird2-source dsc)"
dsc_sha=$(field bird2-source sha256)
upver=${debver%-*}
upver=${upver#*:}
if [ ! -e "$dsc" ] || ! echo "$dsc_sha  $dsc" | sha256sum -c --quiet - 2>/dev/null; then
  mkdir -p "$dl/bird2"
  get() { (cd "$dl/bird2" && apt-get source -qq --download-only -o APT::Sandbox::User=root "$srcpkg=$debver" >/dev/null); }
  if ! get 2>/dev/null; then
    # No deb-src for this machine's Debian release yet: the same mirrors, suites, components.
    src=/etc/apt/sources.list.d/towalink-deb-src.sources
    stanzas=$(python3 "$py" deb-src)
    [ -n "$stanzas" ] || fail "no Debian deb source of this release to derive a deb-src from"
    echo "apk-repo: adding $src" >&2
    printf '%s\n' "$stanzas" | $sudo tee "$src" >/dev/null
    $sudo apt-get update -qq
    get
  fi
fi
check "$dsc" "$dsc_sha"

# ---- BIRD 2 builds --------------------------------------------------------------------------
conf_flags=(--prefix=/usr --sysconfdir=/etc/bird --localstatedir=/var --runstatedir=/run/bird
  --with-protocols=all --disable-client --disable-libssh)
toolchain() { # toolchain <arch>: sets cc, host, strip_, kinc for a static musl build
  local asmdir
  case $1 in
    x86_64)
      cc="musl-gcc"; host=""; strip_="strip"
      kinc=(/usr/include/linux /usr/include/asm-generic /usr/include/x86_64-linux-gnu/asm) ;;
    aarch64)
      cc="aarch64-linux-gnu-gcc -specs /usr/lib/aarch64-linux-musl/musl-gcc.specs"
      host=aarch64-linux-musl; strip_=aarch64-linux-gnu-strip
      asmdir=/usr/aarch64-linux-gnu/include
      kinc=("$asmdir/linux" "$asmdir/asm-generic" "$asmdir/asm") ;;
  esac
}
build_bird() { # build_bird <arch>: static musl bird and birdcl into apk-build/<arch>/root/usr/sbin
  local arch=$1 cc host strip_ kinc
  toolchain "$arch"
  local dir="$out/apk-build/$arch"
  local key
  key=$(printf '%s\n' "$dsc_sha" "$cc" "${conf_flags[*]}" "${kinc[*]}" "$($cc --version | head -1)" \
    "$(dpkg-query -W -f '${Version}' musl-dev 2>/dev/null)" | sha256sum | cut -c1-16)
  if [ -e "$dir/key" ] && [ "$(cat "$dir/key")" = "$key" ] && [ -x "$dir/root/usr/sbin/bird" ]; then
    return
  fi
  echo "apk-repo: building BIRD $debver for $arch" >&2
  local t0=$SECONDS
  rm -rf "$dir"
  mkdir -p "$dir/kinc" "$dir/build" "$dir/root/usr/sbin" "$dir/root/etc/bird"
  # musl's compiler sees only musl's headers: add the kernel's (linux, asm, asm-generic).
  local k
  for k in "${kinc[@]}"; do ln -s "$k" "$dir/kinc/$(basename "$k")"; done
  # dpkg-source checks the tarballs against the .dsc (whose sha256 is pinned).
  dpkg-source -x "$dsc" "$dir/src" >"$dir/dpkg-source.log" 2>&1 || { cat "$dir/dpkg-source.log" >&2; exit 1; }
  (
    cd "$dir/build"
    CC="$cc" CFLAGS="-O2 -isystem $dir/kinc" LDFLAGS=-static \
      ../src/configure ${host:+--host="$host" --build="$(gcc -dumpmachine)"} "${conf_flags[@]}" >configure.log 2>&1 ||
      { tail -30 configure.log >&2; exit 1; }
    # BIRD's Makefile races when parallel (a generated source before its directory exists,
    # seen once in CI): a serial make finishes what the parallel one left.
    make -j"$(nproc)" >make.log 2>&1 || make >>make.log 2>&1 || { tail -30 make.log >&2; exit 1; }
  )
  local b
  for b in bird birdcl; do
    file "$dir/build/$b" | grep -q 'statically linked' || fail "$arch $b is not static: $(file "$dir/build/$b")"
    $strip_ --strip-all -o "$dir/root/usr/sbin/$b" "$dir/build/$b"
    chmod 0755 "$dir/root/usr/sbin/$b"
  done
  chmod 0755 "$dir/root/etc/bird"
  rm -rf "$dir/src" "$dir/build" "$dir/kinc" "$dir/dpkg-source.log" "$dir"/*.tar.*
  echo "$key" > "$dir/key"
  echo "apk-repo: BIRD for $arch built in $((SECONDS - t0)) s" >&2
}
build_bird x86_64
build_bird aarch64
v=$("$out/apk-build/x86_64/root/usr/sbin/bird" --version 2>&1)
[ "$v" = "BIRD version $upver" ] || fail "bird --version says: $v"

# ---- OpenSSH's server (the nodes' management sshd) ------------------------------------------
# Debian's openssh source, the newest the signed Sources index offers (a security fix replaces
# the version, so it is not pinned: apt checks it against the signed index), fetched once into
# dl/openssh. Built static with musl without OpenSSL and zlib (Ed25519 and ChaCha20-Poly1305
# from OpenSSH's own code), packaged as Alpine's `openssh-server` (sshd, ssh-keygen).
sshdir="$dl/openssh"
mkdir -p "$sshdir"
sshdsc=$(find "$sshdir" -maxdepth 1 -name 'openssh_*.dsc' | LC_ALL=C sort | tail -1)
if [ -z "$sshdsc" ]; then
  (cd "$sshdir" && apt-get source -qq --download-only -o APT::Sandbox::User=root openssh >/dev/null) ||
    fail "apt-get source openssh failed (deb-src: see above)"
  sshdsc=$(find "$sshdir" -maxdepth 1 -name 'openssh_*.dsc' | LC_ALL=C sort | tail -1)
fi
sshver=$(sed -n 's/^Version: //p' "$sshdsc")
sshup=${sshver#*:}
sshup=${sshup%%-*}
ssh_flags=(--prefix=/usr --sysconfdir=/etc/ssh --without-openssl --without-zlib --without-pam
  --without-pie --with-privsep-user=nobody --with-privsep-path=/var/empty
  --disable-security-key --without-libedit --disable-strip --disable-lastlog --disable-utmp
  --disable-utmpx --disable-wtmp --disable-wtmpx)
build_openssh() { # build_openssh <arch>: static sshd and ssh-keygen into apk-build/openssh-<arch>/root
  local arch=$1 cc host strip_ kinc
  toolchain "$arch"
  local dir="$out/apk-build/openssh-$arch" key
  key=$(printf '%s\n' "$(sha256sum < "$sshdsc")" "$cc" "${ssh_flags[*]}" "${kinc[*]}" "$($cc --version | head -1)" |
    sha256sum | cut -c1-16)
  if [ -e "$dir/key" ] && [ "$(cat "$dir/key")" = "$key" ] && [ -x "$dir/root/usr/sbin/sshd" ]; then
    return
  fi
  echo "apk-repo: building OpenSSH $sshver for $arch" >&2
  local t0=$SECONDS k b
  rm -rf "$dir"
  mkdir -p "$dir/kinc" "$dir/root/usr/sbin" "$dir/root/usr/bin" "$dir/root/var/empty"
  for k in "${kinc[@]}"; do ln -s "$k" "$dir/kinc/$(basename "$k")"; done
  dpkg-source -x "$sshdsc" "$dir/src" >"$dir/dpkg-source.log" 2>&1 || { cat "$dir/dpkg-source.log" >&2; exit 1; }
  # Debian's crypt(3) is in glibc's libcrypt, absent from musl here; sshd takes no passwords
  # (PasswordAuthentication no), so a crypt that never matches stands in for it.
  printf '%s\n' '#include <stddef.h>' \
    'char *crypt(const char *key, const char *salt) { (void)key; (void)salt; return NULL; }' >"$dir/crypt-stub.c"
  $cc -O2 -c "$dir/crypt-stub.c" -o "$dir/crypt-stub.o"
  (
    cd "$dir/src"
    # Debian's patches change configure.ac (Debian's build regenerates configure too).
    autoconf >autoconf.log 2>&1 && autoheader >>autoconf.log 2>&1 || { tail -30 autoconf.log >&2; exit 1; }
    CC="$cc" CFLAGS="-O2 -isystem $dir/kinc" LDFLAGS=-static LIBS="$dir/crypt-stub.o" \
      ./configure ${host:+--host="$host" --build="$(gcc -dumpmachine)"} "${ssh_flags[@]}" >configure.log 2>&1 ||
      { tail -30 configure.log >&2; exit 1; }
    make -j"$(nproc)" sshd ssh-keygen >make.log 2>&1 || { tail -30 make.log >&2; exit 1; }
  )
  for b in sbin/sshd bin/ssh-keygen; do
    file "$dir/src/$(basename "$b")" | grep -q 'statically linked' ||
      fail "$arch $b is not static: $(file "$dir/src/$(basename "$b")")"
    $strip_ --strip-all -o "$dir/root/usr/$b" "$dir/src/$(basename "$b")"
    chmod 0755 "$dir/root/usr/$b"
  done
  chmod 0755 "$dir/root/var/empty"
  rm -rf "$dir/src" "$dir/kinc" "$dir/dpkg-source.log" "$dir"/crypt-stub.*
  echo "$key" > "$dir/key"
  echo "apk-repo: OpenSSH for $arch built in $((SECONDS - t0)) s" >&2
}
build_openssh x86_64
build_openssh aarch64

# ---- signing key (made once) ----------------------------------------------------------------
keys="$out/apk-keys"
mkdir -p "$keys"
key=$(find "$keys" -maxdepth 1 -name 'towalink-test@example.invalid-*.rsa' | LC_ALL=C sort | head -1)
if [ -z "$key" ]; then
  tmp=$(mktemp -d "$keys/.new-XXXXXX")
  (umask 077 && openssl genrsa -out "$tmp/k.rsa" 2048 2>/dev/null)
  openssl rsa -in "$tmp/k.rsa" -pubout -out "$tmp/k.rsa.pub" 2>/dev/null
  id=$(openssl rsa -pubin -in "$tmp/k.rsa.pub" -outform DER 2>/dev/null | sha256sum | cut -c1-8)
  key="$keys/towalink-test@example.invalid-$id.rsa"
  chmod 0600 "$tmp/k.rsa"
  chmod 0644 "$tmp/k.rsa.pub"
  mv "$tmp/k.rsa.pub" "$key.pub"
  mv "$tmp/k.rsa" "$key"
  rmdir "$tmp"
fi
chmod 0600 "$key"

# ---- packages and index ---------------------------------------------------------------------
# package_info <json> <root dir, or "" for none> <arch> <version> <commit> <name> <origin> <url>
#   <license> <description> [provides=... | depend=...]...: a package's description for
#   `apk_repo.py pkg`.
package_info() {
  python3 - "$@" <<'PY'
import json, sys
path, root, arch, ver, commit, name, origin, url, license, desc, *relations = sys.argv[1:]
info = [
    ["pkgname", name], ["pkgver", ver],
    ["pkgdesc", desc],
    ["url", url], ["builddate", "0"],
    ["packager", "Towalink test assets <towalink-test@example.invalid>"],
    ["arch", arch], ["origin", origin], ["commit", commit], ["license", license],
] + [relation.split("=", 1) for relation in relations]
json.dump({"root": root or None, "info": info}, open(path, "w"))
PY
}
release=$(cat "$out/alpine-x86_64/rootfs/etc/alpine-release")
branch="v${release%.*}"
mirror="$out/apk-mirror"
for arch in x86_64 aarch64; do
  case $arch in x86_64) rel="$out/alpine-x86_64" ;; aarch64) rel="$out/alpine-rpi4" ;; esac
  new=$(mktemp -d "$out/.apkrepo-XXXXXX")
  commit=$(printf '%s\n' "$dsc_sha" "$(cat "$out/apk-build/$arch/key")" | sha1sum | cut -c1-40)
  package_info "$new/bird.json" "$out/apk-build/$arch/root" "$arch" "$upver-r0" "$commit" \
    bird bird https://bird.network.cz/ GPL-2.0-or-later \
    "BIRD Internet Routing Daemon (Debian bird2 $debver, static musl build; Towalink test asset)" \
    "provides=cmd:bird=$upver-r0" "provides=cmd:birdcl=$upver-r0"
  sshapk=${sshup/p/_p}-r0
  commit=$(printf '%s\n' "$sshver" "$(cat "$out/apk-build/openssh-$arch/key")" | sha1sum | cut -c1-40)
  package_info "$new/openssh.json" "$out/apk-build/openssh-$arch/root" "$arch" "$sshapk" "$commit" \
    openssh-server openssh https://www.openssh.com/ SSH-OpenSSH \
    "OpenSSH server and ssh-keygen (Debian openssh $sshver, static musl build without OpenSSL; Towalink test asset)" \
    "provides=cmd:sshd=$sshapk" "provides=cmd:ssh-keygen=$sshapk"
  mapfile -t world < <(LC_ALL=C sort -u "$rel/rootfs/etc/apk/world" | grep -vx alpine-base)
  commit=$(printf '%s ' "${world[@]}" | sha1sum | cut -c1-40)
  package_info "$new/base.json" "" noarch "$release-r0" "$commit" \
    alpine-base alpine-base https://alpinelinux.org MIT \
    "Meta package for minimal alpine base (the release rootfs's world; Towalink test asset)" \
    "${world[@]/#/depend=}"
  mkdir -p "$new/repo"
  python3 "$py" pkg "$new/repo/bird-$upver-r0.apk" "$new/bird.json"
  python3 "$py" pkg "$new/repo/alpine-base-$release-r0.apk" "$new/base.json"
  python3 "$py" pkg "$new/repo/openssh-server-$sshapk.apk" "$new/openssh.json"
  python3 "$py" index "$new/repo" "$key" "$branch/main towalink-test (bird $upver, openssh-server $sshapk, alpine-base $release)"
  dest="$mirror/$branch/main/$arch"
  mkdir -p "$(dirname "$dest")"
  rm -rf "$dest"
  mv "$new/repo" "$dest"
  rm -rf "$new"
done

# ---- self-test with the release's apk -------------------------------------------------------
rootfs="$out/alpine-x86_64/rootfs"
apk() { # the rootfs's apk 3, through its own musl loader
  "$rootfs/lib/ld-musl-x86_64.so.1" --library-path "$rootfs/lib:$rootfs/usr/lib" "$rootfs/sbin/apk" "$@"
}
t=$(mktemp -d "$out/.apktest-XXXXXX")
trap 'rm -rf "$t"' EXIT
repo="$mirror/$branch/main"
mkdir -p "$t/keys" "$t/alpine-keys"
cp "$rootfs"/etc/apk/keys/*.rsa.pub "$t/alpine-keys/"
cp "$t"/alpine-keys/* "$key.pub" "$t/keys/"
for arch in x86_64 aarch64; do
  # 1. A new root gets bird from the repository, offline, trusting the test key.
  apk add -q --root "$t/$arch" --arch "$arch" --initdb --no-network --no-scripts --keys-dir "$t/keys" \
    --repository "$repo" bird >"$t/log" 2>&1 || { cat "$t/log" >&2; fail "$arch: apk add bird failed"; }
  file "$t/$arch/usr/sbin/bird" | grep -q "statically linked" || fail "$arch: no static bird installed"
  case $arch in
    x86_64) [ "$("$t/$arch/usr/sbin/bird" --version 2>&1)" = "BIRD version $upver" ] || fail "installed bird does not run" ;;
    aarch64) file "$t/$arch/usr/sbin/bird" | grep -q aarch64 || fail "aarch64: bird is not an aarch64 ELF" ;;
  esac
  apk add -q --root "$t/$arch" --arch "$arch" --no-network --no-scripts --keys-dir "$t/keys" \
    --repository "$repo" openssh-server >"$t/log" 2>&1 || { cat "$t/log" >&2; fail "$arch: apk add openssh-server failed"; }
  if [ "$arch" = x86_64 ]; then
    "$t/$arch/usr/sbin/sshd" -V 2>&1 | grep -q "^OpenSSH_${sshup%%p*}" || fail "installed sshd does not run: $("$t/$arch/usr/sbin/sshd" -V 2>&1)"
  fi
done
# 2. Refusals: a tampered index (signature kept, content changed), an absent key, a tampered
#    package (its data no longer matches the datahash its indexed control section names).
refused() { # refused <name> <repo> <keys-dir> <reason regex>: apk must not install bird
  if apk add -q --root "$t/$1" --initdb --no-network --no-scripts --keys-dir "$3" \
    --repository "$2" bird >"$t/log" 2>&1 || [ -e "$t/$1/usr/sbin/bird" ]; then
    cat "$t/log" >&2; fail "apk installed bird from $1"
  fi
  grep -Eqi "$4" "$t/log" || { cat "$t/log" >&2; fail "$1: refused, but not for: $4"; }
}
mkdir -p "$t/bad-index/main/x86_64" "$t/bad-pkg/main/x86_64"
cp "$repo"/x86_64/*.apk "$t/bad-index/main/x86_64/"
python3 "$py" tamper "$repo/x86_64/APKINDEX.tar.gz" "$t/bad-index/main/x86_64/APKINDEX.tar.gz"
refused tampered-index "$t/bad-index/main" "$t/keys" "BAD signature"
refused no-key "$repo" "$t/alpine-keys" "UNTRUSTED signature"
cp "$repo"/x86_64/* "$t/bad-pkg/main/x86_64/"
python3 "$py" tamper-pkg "$t/bad-pkg/main/x86_64/bird-$upver-r0.apk"
refused tampered-package "$t/bad-pkg/main" "$t/keys" "bird-$upver-r0: .*(integrity|BAD|checksum)"
# 3. The diskless init's install: the apkovl's world (the rootfs layer's, alpine-base, bird,
#    e2fsprogs) and keys over the layer's installed db, then its `apk add`.
for arch in x86_64 aarch64; do
  case $arch in x86_64) rel="$out/alpine-x86_64" ;; aarch64) rel="$out/alpine-rpi4" ;; esac
  r="$t/diskless-$arch"
  mkdir -p "$r/lib/apk/db" "$r/etc/apk/keys"
  cp "$rel/rootfs/lib/apk/db/installed" "$r/lib/apk/db/"
  cp "$rel"/rootfs/etc/apk/keys/*.rsa.pub "$key.pub" "$r/etc/apk/keys/"
  cp "$rel/rootfs/etc/apk/arch" "$r/etc/apk/arch"
  { cat "$rel/rootfs/etc/apk/world"; printf '%s\n' alpine-base bird e2fsprogs; } | LC_ALL=C sort -u > "$r/etc/apk/world"
  # shellcheck disable=SC2046
  apk add --root "$r" --repository "$repo" --no-network --initramfs-diskless-boot \
    alpine-base bird $(cat "$r/etc/apk/world") >"$t/log" 2>&1 || { cat "$t/log" >&2; fail "$arch: diskless install failed"; }
  [ -e "$r/usr/sbin/bird" ] || { cat "$t/log" >&2; fail "$arch: diskless install has no bird"; }
done
echo "apk-repo: $mirror/$branch/main/{x86_64,aarch64} ready (bird $upver-r0, openssh-server $sshapk, key $(basename "$key.pub")); self-test passed" >&2
