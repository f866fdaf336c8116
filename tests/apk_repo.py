#!/usr/bin/env python3
"""Helpers of tests/apk-repo.sh (python3 stdlib; signing through the `openssl` CLI).

  apk_repo.py deb-src                 prints a deb822 deb-src stanza for each enabled Debian
                                      `deb` source of this machine's own release (same URIs,
                                      suites, components, Signed-By), nothing if none
  apk_repo.py pkg OUT.apk SPEC.json   writes an apk v2 package (unsigned: a repository's index
                                      signature covers it through its C: identity)
  apk_repo.py index DIR KEY.rsa DESC  writes DIR/APKINDEX.tar.gz for DIR/*.apk, signed by KEY
                                      (the signature member names KEY's .rsa.pub file)
  apk_repo.py tamper IN OUT           OUT: IN's signature over changed content (self-test)
  apk_repo.py tamper-pkg APK          changes a byte of APK's data, keeps its control (self-test)

The apk v2 format (apk-tools src/extract_v2.c, src/tar.c): a package is concatenated gzip
streams: [signature tar] + control tar (.PKGINFO; no end-of-archive blocks, the streams form
one tar) + data tar (the files, with end-of-archive). .PKGINFO's `datahash` is the sha256 of
the data gzip stream; the package's identity (index C: `Q1` + base64) is the sha1 of the
control gzip stream. An index is a signature tar stream (.SIGN.RSA256.<key name>: RSA
PKCS#1 v1.5 over the sha256 of the rest of the file) + one tar stream of DESCRIPTION and
APKINDEX. Everything is deterministic: fixed mtimes, uid/gid 0, sorted entries, gzip streams
without name or time.
"""
import base64
import glob
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zlib

MTIME = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


# ---- deb-src ----------------------------------------------------------------------------

def deb_src():
    codename = ""
    for line in open("/etc/os-release"):
        if line.startswith("VERSION_CODENAME="):
            codename = line.split("=", 1)[1].strip().strip('"')
    suites_ok = {codename, codename + "-updates", codename + "-security"}
    entries = []  # (uris, suites, components, signed_by)
    files = []
    if os.path.exists("/etc/apt/sources.list"):
        files.append("/etc/apt/sources.list")
    files += sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
    for f in files:
        for line in open(f):
            line = line.split("#", 1)[0].strip()
            m = re.match(r"^deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line)
            if not m:
                continue
            opts = m.group(1) or ""
            sb = re.search(r"signed-by=(\S+?)[\s\]]", opts + " ")
            entries.append(([m.group(2)], [m.group(3)], m.group(4).split(), sb.group(1) if sb else None))
    for f in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", open(f).read()):
            fields, key = {}, None
            for line in stanza.splitlines():
                if line.startswith("#") or not line.strip():
                    continue
                if line[0] in " \t" and key:
                    fields[key] += "\n" + line.strip()
                    continue
                if ":" in line:
                    key, val = line.split(":", 1)
                    key = key.strip().lower()
                    fields[key] = val.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            sb = fields.get("signed-by")
            if sb and "\n" in sb:  # an inline key: not reproduced, fall back to the keyrings
                sb = None
            entries.append((fields.get("uris", "").split(), fields.get("suites", "").split(),
                            fields.get("components", "").split(), sb))
    out = []
    for uris, suites, comps, sb in entries:
        suites = [s for s in suites if s in suites_ok]
        if not suites or not uris or not comps:
            continue
        s = f"Types: deb-src\nURIs: {' '.join(uris)}\nSuites: {' '.join(suites)}\nComponents: {' '.join(comps)}\n"
        if sb:
            s += f"Signed-By: {sb}\n"
        out.append(s)
    sys.stdout.write("\n".join(out))


# ---- tar and gzip -----------------------------------------------------------------------

def gz(data):
    """One gzip stream, no file name, mtime 0, fixed level: the same bytes for the same input."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    body = c.compress(data) + c.flush()
    hdr = b"\x1f\x8b\x08\x00" + b"\x00\x00\x00\x00" + b"\x02\xff"
    return hdr + body + zlib.crc32(data).to_bytes(4, "little") + (len(data) & 0xFFFFFFFF).to_bytes(4, "little")


def tar_member(name, data=b"", mode=0o644, kind=tarfile.REGTYPE, link="", pax=None):
    """The ustar header(s) and padded data of one member; a pax 'x' header first when asked."""
    out = b""
    if pax:
        rec = b""
        for k, v in pax.items():
            item = f" {k}={v}\n".encode()
            n = len(item) + len(str(len(item)))
            while n != len(item) + len(str(n)):
                n = len(item) + len(str(n))
            rec += str(n).encode() + item
        out += tar_member(f"PaxHeaders/{os.path.basename(name)}"[:99], rec, 0o644, tarfile.XHDTYPE)
    ti = tarfile.TarInfo(name)
    ti.size = len(data) if kind in (tarfile.REGTYPE, tarfile.XHDTYPE) else 0
    ti.mode, ti.type, ti.linkname = mode, kind, link
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = MTIME, 0, 0, "root", "root"
    out += ti.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    if ti.size:
        out += data + b"\0" * (-len(data) % 512)
    return out


# ---- packages ---------------------------------------------------------------------------

def build_pkg(out_path, spec_path):
    """SPEC: {"info": [[key, value], ...] (.PKGINFO lines but size/datahash), "root": dir or
    null}. Every file under root goes in, sorted, owned by root, mode kept, mtime fixed."""
    spec = json.load(open(spec_path))
    root = spec.get("root")
    data, installed = b"", 0
    if root:
        paths = []
        for d, dirs, files in os.walk(root):
            for n in dirs + files:
                paths.append(os.path.relpath(os.path.join(d, n), root))
        for rel in sorted(paths):
            p = os.path.join(root, rel)
            st = os.lstat(p)
            mode = st.st_mode & 0o7777
            if os.path.islink(p):
                target = os.readlink(p)
                data += tar_member(rel, mode=0o777, kind=tarfile.SYMTYPE, link=target,
                                   pax={"APK-TOOLS.checksum.SHA1": hashlib.sha1(target.encode()).hexdigest()})
            elif os.path.isdir(p):
                data += tar_member(rel + "/", mode=mode, kind=tarfile.DIRTYPE)
            else:
                content = open(p, "rb").read()
                installed += len(content)
                data += tar_member(rel, content, mode,
                                   pax={"APK-TOOLS.checksum.SHA1": hashlib.sha1(content).hexdigest()})
    data += b"\0" * 1024  # end of archive: the data stream ends the tar
    data_gz = gz(data)
    info = "# Generated by tests/apk_repo.py\n"
    for k, v in spec["info"]:
        info += f"{k} = {v}\n"
    info += f"size = {installed}\n"
    info += f"datahash = {hashlib.sha256(data_gz).hexdigest()}\n"
    control_gz = gz(tar_member(".PKGINFO", info.encode()))  # no end-of-archive blocks
    with open(out_path + ".tmp", "wb") as f:
        f.write(control_gz + data_gz)
    os.replace(out_path + ".tmp", out_path)


def gzip_streams(blob):
    """Splits concatenated gzip streams; returns [(raw stream bytes, decompressed bytes)]."""
    out, pos = [], 0
    while pos < len(blob):
        d = zlib.decompressobj(31)
        plain = d.decompress(blob[pos:]) + d.flush()
        end = len(blob) - len(d.unused_data)
        out.append((blob[pos:end], plain))
        pos = end
    return out


def read_pkginfo(path):
    blob = open(path, "rb").read()
    streams = gzip_streams(blob)
    control = None
    for raw, plain in streams:
        if plain[:512].split(b"\0", 1)[0].startswith(b".SIGN."):
            continue
        control = (raw, plain)
        break
    raw, plain = control
    tf = tarfile.open(fileobj=io.BytesIO(plain + b"\0" * 1024))
    text = tf.extractfile(".PKGINFO").read().decode()
    info = []
    for line in text.splitlines():
        if line.startswith("#") or " = " not in line:
            continue
        info.append(tuple(line.split(" = ", 1)))
    return info, hashlib.sha1(raw).digest(), len(blob)


# ---- index ------------------------------------------------------------------------------

FIELDS = [("pkgname", "P"), ("pkgver", "V"), ("arch", "A"), ("size", "I"), ("pkgdesc", "T"),
          ("url", "U"), ("license", "L"), ("origin", "o"), ("maintainer", "m"),
          ("builddate", "t"), ("commit", "c"), ("provider_priority", "k")]
MULTI = [("depend", "D"), ("provides", "p"), ("install_if", "i")]


def build_index(repo_dir, key_path, description):
    entries = []
    for apk in sorted(glob.glob(os.path.join(repo_dir, "*.apk"))):
        info, ident, size = read_pkginfo(apk)
        d = {}
        for k, v in info:
            d.setdefault(k, []).append(v)
        e = f"C:Q1{base64.b64encode(ident).decode()}\n"
        e += f"P:{d['pkgname'][0]}\nV:{d['pkgver'][0]}\nA:{d['arch'][0]}\nS:{size}\n"
        for k, f in FIELDS[3:]:
            if k in d:
                e += f"{f}:{d[k][0]}\n"
        for k, f in MULTI:
            if k in d:
                e += f"{f}:{' '.join(d[k])}\n"
        entries.append((d["pkgname"][0], e))
    index = "".join(e + "\n" for _, e in sorted(entries)).encode()
    body = gz(tar_member("DESCRIPTION", description.encode()) + tar_member("APKINDEX", index)
              + b"\0" * 1024)
    pub = os.path.basename(key_path) + ".pub"
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key_path],
                         input=body, stdout=subprocess.PIPE, check=True).stdout
    sign_gz = gz(tar_member(f".SIGN.RSA256.{pub}", sig))  # no end-of-archive blocks
    out = os.path.join(repo_dir, "APKINDEX.tar.gz")
    with open(out + ".tmp", "wb") as f:
        f.write(sign_gz + body)
    os.replace(out + ".tmp", out)


def tamper(src, dst):
    """The same signature over changed index content (the self-test's bad index)."""
    (sig, _), (_, body) = gzip_streams(open(src, "rb").read())
    assert b"towalink-test" in body
    with open(dst, "wb") as f:
        f.write(sig + gz(body.replace(b"towalink-test", b"towalink-evil", 1)))


def tamper_pkg(path):
    """The same control section, one changed byte in bird's data (the self-test's bad package)."""
    streams = gzip_streams(open(path, "rb").read())
    control, (_, data) = streams[0][0], streams[-1]
    i = data.index(b"\x7fELF") + 64
    data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]
    with open(path, "wb") as f:
        f.write(control + gz(data))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "deb-src":
        deb_src()
    elif cmd == "pkg":
        build_pkg(sys.argv[2], sys.argv[3])
    elif cmd == "index":
        build_index(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "tamper":
        tamper(sys.argv[2], sys.argv[3])
    elif cmd == "tamper-pkg":
        tamper_pkg(sys.argv[2])
    else:
        sys.exit(f"apk_repo.py: unknown command {cmd}")
