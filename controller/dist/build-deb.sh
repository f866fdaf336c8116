#!/usr/bin/env bash
# Builds the Debian package of the Towalink controller (`towalink-controller`), the one-command
# controller install on Debian and Ubuntu:
#
#   controller/dist/build-deb.sh                    # cargo build --release, then the package
#   apt install ./target/deb/towalink-controller_<version>_<arch>.deb
#
# The package holds /usr/bin/tlm, the systemd unit tlm-serve.service (not enabled: configure
# first, then `systemctl enable --now tlm-serve`), man pages for every command, and bash, zsh
# and fish completions, all generated from the binary's own grammar. Its postinst creates the
# configuration directory /etc/towalink (mode 0700, root) when missing; removing or purging
# the package never deletes it: it holds the installation's keys and its git history.
#
# Options: --binary FILE (package this tlm instead of building one; tests pass the debug
# build), --out DIR (default target/deb). Needs dpkg-deb and gzip; runs as any user (file
# ownership in the package is root's either way).
set -euo pipefail

binary=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$(realpath -m -- "$2"); shift 2 ;;
    --out) out=$(realpath -m -- "$2"); shift 2 ;;
    *) echo "build-deb.sh: unknown argument \`$1\` (expected --binary FILE, --out DIR)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/../.."
[ -n "$out" ] || out=$PWD/target/deb
if [ -z "$binary" ]; then
  cargo build --release --locked -p towalink-controller --bin tlm
  binary=target/release/tlm
fi
[ -x "$binary" ] || { echo "build-deb.sh: --binary \`$binary\` is not an executable file" >&2; exit 2; }

version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)
[ -n "$version" ] || { echo "build-deb.sh: Cargo.toml: no workspace version" >&2; exit 1; }
arch=$(dpkg --print-architecture)
name=towalink-controller
mkdir -p "$out"
stage=$(mktemp -d "$out/.stage-XXXXXX")
trap 'rm -rf "$stage"' EXIT
root="$stage/root"

install -D -m 0755 "$binary" "$root/usr/bin/tlm"
strip --strip-unneeded "$root/usr/bin/tlm" 2>/dev/null || true
# The unit of controller/dist, pointed at the packaged binary.
install -d -m 0755 "$root/lib/systemd/system"
sed -e 's|/usr/local/bin/tlm|/usr/bin/tlm|' -e '/^# Install: /d' controller/dist/tlm-serve.service \
  > "$root/lib/systemd/system/tlm-serve.service"
chmod 0644 "$root/lib/systemd/system/tlm-serve.service"
install -d -m 0755 "$root/usr/share/man/man1"
"$root/usr/bin/tlm" man --dir "$root/usr/share/man/man1" > /dev/null
gzip -9n "$root"/usr/share/man/man1/*.1
install -d -m 0755 "$root/usr/share/bash-completion/completions" \
  "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
"$root/usr/bin/tlm" completions bash > "$root/usr/share/bash-completion/completions/tlm"
"$root/usr/bin/tlm" completions zsh > "$root/usr/share/zsh/vendor-completions/_tlm"
"$root/usr/bin/tlm" completions fish > "$root/usr/share/fish/vendor_completions.d/tlm.fish"
install -d -m 0755 "$root/usr/share/doc/$name"
install -m 0644 README.md "$root/usr/share/doc/$name/README.md"
install -m 0644 docs/controller-service.md "$root/usr/share/doc/$name/controller-service.md"
find "$root/usr/share" -type f -exec chmod 0644 {} +

install -d -m 0755 "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<EOF
Package: $name
Version: $version
Architecture: $arch
Maintainer: Towalink <dev@towalink.net>
Installed-Size: $size
Depends: git, ca-certificates
Recommends: bird2, ansible-core | ansible
Section: net
Priority: optional
Homepage: https://github.com/towalink
Description: Towalink controller (tlm): multi-site WireGuard + BGP router fleet
 tlm holds the configuration of all sites and nodes, commits signed per-node
 versions, builds bootable node images, and with "tlm serve" carries versions
 to the nodes over their management WireGuard links.
EOF
cat > "$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
	# The configuration directory: keys, versions, git history. Only root reads it.
	if [ ! -e /etc/towalink ]; then
		install -d -m 0700 -o root -g root /etc/towalink
	fi
	if [ -d /run/systemd/system ]; then
		systemctl daemon-reload || true
	fi
fi
exit 0
EOF
cat > "$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
	systemctl stop tlm-serve.service 2>/dev/null || true
fi
exit 0
EOF
cat > "$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
# /etc/towalink is kept, on purge too: it holds the installation's keys and history.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || true
fi
exit 0
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

deb="$out/${name}_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb.tmp" > /dev/null
mv "$deb.tmp" "$deb"
echo "$deb"
