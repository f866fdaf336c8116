//! One node's image: overlay → apkovl → boot partition → disk → output file (raw or zstd).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::apkovl::Overlay;
use crate::assets::ReleaseFiles;
use crate::disk::{self, Layout, MbrPartition};
use crate::packages::CardPackages;
use crate::profile::{Board, OVERLAY_FILES};
use crate::Error;

/// Where the node's persistent state is seeded from on first boot (inside the apkovl).
pub const SEED_DIR: &str = "usr/share/towalink/initial-state";
/// The image's own description, at the top of the boot partition.
pub const MANIFEST_FILE: &str = "towalink-image.toml";
/// Label of the data partition once the node formatted it.
pub const DATA_LABEL: &str = "towalink-data";
/// Paths of a `rootfs/` layer that are not copied: the image brings its own kernel, modules
/// (modloop), runlevels and per-node files.
const LAYER_SKIP: &[&str] = &[
    "boot",
    "lib/modules",
    "etc/runlevels",
    "etc/rc.conf",
    "lost+found",
    ".dockerenv",
    "etc/hostname",
    "etc/hosts",
    "etc/network/interfaces",
    "var/lib/towalink",
];

/// How the uplink gets its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UplinkAddress {
    Dhcp,
    Static {
        /// `address/prefix`.
        cidr: String,
        gateway: Option<String>,
    },
}

/// The node's network at boot.
#[derive(Debug, Clone)]
pub struct Network {
    pub interface: String,
    pub address: UplinkAddress,
    pub dns: Vec<String>,
    /// More ports (LANs), configured at boot like the uplink (without a gateway).
    pub interfaces: Vec<(String, UplinkAddress)>,
}

/// Everything that goes into one node's image.
#[derive(Debug, Clone)]
pub struct NodeImage<'a> {
    pub board: &'a Board,
    pub release: &'a ReleaseFiles,
    pub node_binary: &'a Path,
    /// `<node>.<site>`.
    pub node: String,
    pub node_id: u32,
    pub version: u32,
    pub hostname: String,
    /// A provisioned node state directory (`identity/`, `incoming/<bundle>`).
    pub state_dir: &'a Path,
    pub network: Network,
    /// Alpine packages the node installs at boot besides [`NODE_PACKAGES`] (`image_packages`).
    pub packages: Vec<String>,
    /// The packages on the card (resolved and fetched by [`crate::packages`]).
    pub card: &'a CardPackages,
}

/// What every node installs: Alpine's base (its diskless init adds it anyway), BIRD (the
/// routing daemon the versions configure) and e2fsprogs (`towalink-data` formats the data
/// partition with it).
pub const NODE_PACKAGES: &[&str] = &["alpine-base", "bird", "e2fsprogs"];

/// The image's manifest (`towalink-image.toml` on the boot partition).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    pub board: String,
    pub node: String,
    pub node_id: u32,
    pub version: u32,
    pub hostname: String,
    pub alpine_version: String,
    pub alpine_arch: String,
    pub apkovl: String,
    pub apkovl_sha256: String,
    pub builder: String,
    /// The packages on the card (`name-version`), installed from it at every boot.
    #[serde(default)]
    pub packages: Vec<String>,
}

/// Output compression, from the file name: `.zst` means zstd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
}

impl Compression {
    pub fn for_path(path: &Path) -> Compression {
        if path.extension().is_some_and(|e| e == "zst") {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// What a build did.
#[derive(Debug, Clone)]
pub struct BuildReport {
    pub output: PathBuf,
    pub image_bytes: u64,
    pub output_bytes: u64,
    pub apkovl_bytes: u64,
    pub manifest: ImageManifest,
    pub millis: BTreeMap<&'static str, f64>,
}

/// Checks that `bytes` is a static ELF executable for `machine`.
pub fn check_node_binary(path: &Path, bytes: &[u8], machine: u16) -> Result<(), Error> {
    let bad = |message: String| Error::NodeBinary {
        path: path.to_path_buf(),
        message,
    };
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err(bad("not an ELF executable".into()));
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err(bad("not a 64-bit little-endian ELF".into()));
    }
    let found = u16::from_le_bytes([bytes[18], bytes[19]]);
    if found != machine {
        return Err(bad(format!(
            "built for {} but the board needs {} (build it with `--target` for the board)",
            machine_name(found),
            machine_name(machine)
        )));
    }
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().expect("8 bytes")) as usize;
    let phentsize = usize::from(u16::from_le_bytes([bytes[54], bytes[55]]));
    let phnum = usize::from(u16::from_le_bytes([bytes[56], bytes[57]]));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        if at + 4 > bytes.len() {
            return Err(bad("truncated program headers".into()));
        }
        if u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) == 3 {
            return Err(bad(
                "dynamically linked (has an interpreter): nodes need a static musl build".into(),
            ));
        }
    }
    Ok(())
}

/// `x86_64`, `aarch64` or the number.
pub fn machine_name(machine: u16) -> String {
    match machine {
        62 => "x86_64".into(),
        183 => "aarch64".into(),
        40 => "arm".into(),
        other => format!("machine {other}"),
    }
}

/// The kernel command line: diskless Alpine with the modloop, the board's consoles, and a
/// network package repository when the card carries none (the release's own `apks/` is not
/// copied: the card's repository replaces it).
pub fn kernel_cmdline(board: &Board, release: &ReleaseFiles, card_has_repo: bool) -> String {
    let p = &board.profile;
    let mut args = vec![
        "modules=loop,squashfs,sd-mod,usb-storage".to_string(),
        format!("modloop=/boot/modloop-{}", p.kernel_flavor),
    ];
    let has_layer = release.root.join("rootfs").is_dir();
    if !card_has_repo && !has_layer {
        if let Some(repo) = &release.package_repo {
            args.push("ip=dhcp".into());
            args.push(format!("alpine_repo={repo}"));
        }
    }
    for c in &p.console {
        args.push(format!("console={c}"));
    }
    args.join(" ")
}

/// `/etc/network/interfaces` for the uplink and the other ports.
pub fn interfaces_file(network: &Network) -> String {
    let mut s = String::from("auto lo\niface lo inet loopback\n");
    let ports = std::iter::once((&network.interface, &network.address))
        .chain(network.interfaces.iter().map(|(i, a)| (i, a)));
    for (interface, address) in ports {
        s.push_str(&format!("\nauto {interface}\n"));
        match address {
            UplinkAddress::Dhcp => s.push_str(&format!("iface {interface} inet dhcp\n")),
            UplinkAddress::Static { cidr, gateway } => {
                let family = if cidr.contains(':') { "inet6" } else { "inet" };
                s.push_str(&format!(
                    "iface {interface} {family} static\n\taddress {cidr}\n"
                ));
                if let Some(g) = gateway {
                    s.push_str(&format!("\tgateway {g}\n"));
                }
            }
        }
    }
    s
}

fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(Error::io("cannot read", path))
}

/// The node's overlay: layer (if any), Towalink's files, node binary, identity and version.
pub fn overlay(spec: &NodeImage, node_binary: Vec<u8>) -> Result<Overlay, Error> {
    let mut o = Overlay::new();
    let layer = spec.release.root.join("rootfs");
    if layer.is_dir() {
        o.add_tree(&layer, "", LAYER_SKIP, None)?;
    }
    for (path, content, mode) in OVERLAY_FILES {
        o.file(path, *content, *mode);
    }
    o.file("usr/sbin/towalink-node", node_binary, 0o755);
    o.file("etc/hostname", format!("{}\n", spec.hostname), 0o644);
    o.file(
        "etc/hosts",
        format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{}\n",
            spec.hostname
        ),
        0o644,
    );
    o.file(
        "etc/network/interfaces",
        interfaces_file(&spec.network),
        0o644,
    );
    if !spec.network.dns.is_empty() {
        let text: String = spec
            .network
            .dns
            .iter()
            .map(|d| format!("nameserver {d}\n"))
            .collect();
        o.file("etc/resolv.conf", text, 0o644);
    }
    o.file(
        "etc/apk/world",
        world(spec.release, &spec.packages).join("\n") + "\n",
        0o644,
    );
    // Keys for packages signed by others than Alpine (Alpine's come with the initramfs).
    for k in &spec.card.extra_keys {
        o.file(&format!("etc/apk/keys/{}", k.name), k.pem.clone(), 0o644);
    }
    let runlevels: &[(&str, &[&str])] = &[
        (
            "sysinit",
            &["devfs", "dmesg", "mdev", "hwdrivers", "modloop"],
        ),
        (
            "boot",
            &[
                "modules",
                "sysctl",
                "hostname",
                "bootmisc",
                "syslog",
                "networking",
                "towalink-data",
            ],
        ),
        ("default", &["towalink-bird", "towalink-node"]),
        ("shutdown", &["mount-ro", "killprocs", "savecache"]),
    ];
    for (level, services) in runlevels {
        for s in *services {
            o.symlink(
                &format!("etc/runlevels/{level}/{s}"),
                &format!("/etc/init.d/{s}"),
            );
        }
    }
    o.dir(SEED_DIR, 0o755);
    o.add_tree(spec.state_dir, SEED_DIR, &[], Some((0, 0)))?;
    Ok(o)
}

/// The packages the node installs at boot (`/etc/apk/world`): [`NODE_PACKAGES`], `extra`, and
/// what an offline system layer has installed (they stay in the world, or apk would purge
/// them from the new root). Sorted.
pub fn world(release: &ReleaseFiles, extra: &[String]) -> Vec<String> {
    let layer_world =
        std::fs::read_to_string(release.root.join("rootfs/etc/apk/world")).unwrap_or_default();
    let mut world: Vec<String> = NODE_PACKAGES
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().cloned())
        .chain(layer_world.split_whitespace().map(str::to_string))
        .collect();
    world.sort();
    world.dedup();
    world
}

/// What an offline system layer (`rootfs/` of the release files) has installed already:
/// the card need not carry it.
pub fn layer_installed(release: &ReleaseFiles) -> std::collections::BTreeSet<String> {
    std::fs::read_to_string(release.root.join("rootfs/lib/apk/db/installed"))
        .map(|db| crate::packages::installed_names(&db))
        .unwrap_or_default()
}

fn seed_u32(parts: &[&[u8]]) -> u32 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let d = h.finalize();
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// Adds a release file or directory (recursively, sorted) to the boot partition's files.
fn add_release_path(
    files: &mut BTreeMap<String, Vec<u8>>,
    root: &Path,
    rel: &str,
) -> Result<(), Error> {
    let path = root.join(rel);
    let meta = std::fs::metadata(&path).map_err(Error::io("cannot read", &path))?;
    if meta.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(&path)
            .map_err(Error::io("cannot read directory", &path))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            add_release_path(files, root, &format!("{rel}/{n}"))?;
        }
    } else {
        files.insert(rel.to_string(), read_file(&path)?);
    }
    Ok(())
}

/// Builds the image of one node into `output` (written to a temporary file beside it, synced,
/// then renamed: an error leaves nothing behind and an older image stays as it was).
pub fn build(spec: &NodeImage, output: &Path) -> Result<BuildReport, Error> {
    let mut millis = BTreeMap::new();
    let mut t = Instant::now();
    let mut lap = |name: &'static str, t: &mut Instant| {
        millis.insert(name, t.elapsed().as_secs_f64() * 1000.0);
        *t = Instant::now();
    };
    let p = &spec.board.profile;
    let binary = read_file(spec.node_binary)?;
    check_node_binary(spec.node_binary, &binary, p.elf_machine)?;

    // Boot loaders of the build host, checked before any work.
    let mut host = Vec::new();
    for h in &p.host_files {
        let path = PathBuf::from(&h.from);
        if !path.exists() {
            return Err(Error::MissingHostFile {
                path,
                package: h.package.clone(),
            });
        }
        host.push((h.to.clone(), read_file(&path)?));
    }
    let mbr_code = match &p.bios {
        Some(b) => {
            let path = PathBuf::from(&b.mbr_code);
            if !path.exists() {
                return Err(Error::MissingHostFile {
                    path,
                    package: b.mbr_package.clone(),
                });
            }
            Some(read_file(&path)?)
        }
        None => None,
    };

    let apkovl = overlay(spec, binary)?.tar_gz()?;
    let apkovl_sha256 = hex::encode(Sha256::digest(&apkovl));
    lap("apkovl", &mut t);

    let apkovl_name = format!("{}.apkovl.tar.gz", spec.hostname);
    let manifest = ImageManifest {
        board: p.name.clone(),
        node: spec.node.clone(),
        node_id: spec.node_id,
        version: spec.version,
        hostname: spec.hostname.clone(),
        alpine_version: spec.release.version.clone(),
        alpine_arch: p.alpine_arch.clone(),
        apkovl: apkovl_name.clone(),
        apkovl_sha256: apkovl_sha256.clone(),
        builder: concat!("towalink-images ", env!("CARGO_PKG_VERSION")).to_string(),
        packages: spec.card.packages.clone(),
    };
    let mut files = BTreeMap::new();
    for f in &p.boot_files {
        if f.optional && !spec.release.root.join(&f.path).exists() {
            continue;
        }
        add_release_path(&mut files, &spec.release.root, &f.path)?;
    }
    for (to, content) in host {
        files.insert(to, content);
    }
    files.extend(crate::packages::card_files(spec.card, &p.alpine_arch));
    let cmdline = kernel_cmdline(spec.board, spec.release, !spec.card.repositories.is_empty());
    let env = minijinja::Environment::new();
    let ctx = minijinja::context! {
        node => spec.node,
        hostname => spec.hostname,
        alpine_version => spec.release.version,
        board => p.name,
        cmdline => cmdline,
    };
    for t in &p.templates {
        let source = spec.board.templates[&t.template];
        let text = env.render_str(source, &ctx).map_err(|e| Error::Template {
            template: format!("board/{}/{}", p.name, t.template),
            message: e.to_string(),
        })?;
        files.insert(t.to.clone(), text.into_bytes());
    }
    files.insert(
        MANIFEST_FILE.to_string(),
        toml::to_string(&manifest)
            .expect("manifest serializes")
            .into_bytes(),
    );
    files.insert(apkovl_name, apkovl.clone());
    lap("collect", &mut t);

    let layout = Layout::new(p.partitions.boot_mib, p.partitions.data_mib);
    let id = seed_u32(&[
        p.name.as_bytes(),
        &spec.node_id.to_le_bytes(),
        &spec.version.to_le_bytes(),
        apkovl_sha256.as_bytes(),
    ]);
    let boot = disk::fat32(
        layout.boot_sectors * disk::SECTOR,
        id,
        "TOWALINK",
        layout.boot_start as u32,
        &files,
    )?;
    lap("fat32", &mut t);
    let table = disk::mbr(
        mbr_code.as_deref(),
        id,
        &[
            MbrPartition {
                bootable: true,
                kind: disk::TYPE_FAT32_LBA,
                start_lba: layout.boot_start as u32,
                sectors: layout.boot_sectors as u32,
            },
            MbrPartition {
                bootable: false,
                kind: disk::TYPE_LINUX,
                start_lba: layout.data_start as u32,
                sectors: layout.data_sectors as u32,
            },
        ],
    );

    let dir = match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let raw = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".raw")
        .tempfile_in(&dir)
        .map_err(Error::io("cannot create a temporary file in", &dir))?;
    raw.as_file()
        .set_len(layout.total_bytes())
        .map_err(Error::io("cannot size", raw.path()))?;
    disk::write_sparse(raw.as_file(), raw.path(), 0, &table)?;
    disk::write_sparse(
        raw.as_file(),
        raw.path(),
        layout.boot_start * disk::SECTOR,
        &boot,
    )?;
    drop(boot);
    lap("write", &mut t);
    if let Some(b) = &p.bios {
        disk::install_syslinux(
            &b.installer,
            &b.installer_package,
            raw.path(),
            layout.boot_start * disk::SECTOR,
        )?;
        lap("syslinux", &mut t);
    }

    let output_bytes = match Compression::for_path(output) {
        Compression::None => {
            raw.as_file()
                .sync_all()
                .map_err(Error::io("cannot sync", raw.path()))?;
            raw.persist(output)
                .map_err(|e| Error::io("cannot rename into", output)(e.error))?;
            layout.total_bytes()
        }
        Compression::Zstd => {
            let mut zst = tempfile::Builder::new()
                .prefix(&format!(".{name}."))
                .tempfile_in(&dir)
                .map_err(Error::io("cannot create a temporary file in", &dir))?;
            let input =
                std::fs::File::open(raw.path()).map_err(Error::io("cannot open", raw.path()))?;
            {
                let writer = std::io::BufWriter::with_capacity(1 << 20, zst.as_file_mut());
                let mut encoder = zstd::stream::Encoder::new(writer, 3)
                    .map_err(Error::io("cannot compress into", output))?;
                encoder
                    .set_pledged_src_size(Some(layout.total_bytes()))
                    .map_err(Error::io("cannot compress into", output))?;
                std::io::copy(
                    &mut std::io::BufReader::with_capacity(1 << 20, input),
                    &mut encoder,
                )
                .map_err(Error::io("cannot compress into", output))?;
                let mut writer = encoder
                    .finish()
                    .map_err(Error::io("cannot compress into", output))?;
                writer.flush().map_err(Error::io("cannot write", output))?;
            }
            zst.as_file()
                .sync_all()
                .map_err(Error::io("cannot sync", zst.path()))?;
            let len = zst
                .as_file()
                .metadata()
                .map_err(Error::io("cannot stat", zst.path()))?
                .len();
            zst.persist(output)
                .map_err(|e| Error::io("cannot rename into", output)(e.error))?;
            len
        }
    };
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    lap("output", &mut t);
    Ok(BuildReport {
        output: output.to_path_buf(),
        image_bytes: layout.total_bytes(),
        output_bytes,
        apkovl_bytes: apkovl.len() as u64,
        manifest,
        millis,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(machine: u16, interp: bool) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56 * 2];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&2u16.to_le_bytes());
        b[64..68].copy_from_slice(&1u32.to_le_bytes());
        if interp {
            b[120..124].copy_from_slice(&3u32.to_le_bytes());
        }
        b
    }

    #[test]
    fn node_binary_must_be_static_and_for_the_board() {
        let p = Path::new("towalink-node");
        assert!(check_node_binary(p, &elf(62, false), 62).is_ok());
        let wrong = check_node_binary(p, &elf(62, false), 183)
            .unwrap_err()
            .to_string();
        assert!(
            wrong.contains("built for x86_64 but the board needs aarch64"),
            "{wrong}"
        );
        let dynamic = check_node_binary(p, &elf(183, true), 183)
            .unwrap_err()
            .to_string();
        assert!(dynamic.contains("static musl"), "{dynamic}");
        assert!(check_node_binary(p, b"#!/bin/sh\n", 62).is_err());
    }

    #[test]
    fn uplink_is_dhcp_or_static() {
        let mut n = Network {
            interface: "eth0".into(),
            address: UplinkAddress::Dhcp,
            dns: vec![],
            interfaces: vec![],
        };
        assert!(interfaces_file(&n).contains("iface eth0 inet dhcp"));
        n.address = UplinkAddress::Static {
            cidr: "192.0.2.10/24".into(),
            gateway: Some("192.0.2.1".into()),
        };
        n.interfaces = vec![(
            "eth1".into(),
            UplinkAddress::Static {
                cidr: "192.168.1.1/24".into(),
                gateway: None,
            },
        )];
        let s = interfaces_file(&n);
        assert!(
            s.contains("iface eth0 inet static\n\taddress 192.0.2.10/24\n\tgateway 192.0.2.1\n")
        );
        assert!(
            s.ends_with("\nauto eth1\niface eth1 inet static\n\taddress 192.168.1.1/24\n"),
            "{s}"
        );
    }
}
