//! Reading an image back: partitions, boot files, the node it is for, its version, the key
//! fingerprints (never a private key), the apkovl's files with modes and owners.

use std::path::Path;

use base64::Engine as _;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::apkovl::{self, Kind};
use crate::build::{check_node_binary, machine_name, ImageManifest, MANIFEST_FILE, SEED_DIR};
use crate::disk::{self, SECTOR};
use crate::Error;

#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    pub file: String,
    pub compressed: bool,
    pub image_bytes: u64,
    pub disk_id: String,
    pub mbr_boot_code: bool,
    pub partitions: Vec<PartitionReport>,
    pub boot_files: Vec<FileReport>,
    pub bios_boot: bool,
    pub uefi_boot: bool,
    pub manifest: Option<ImageManifest>,
    pub node: Option<NodeReport>,
    pub apkovl: Option<ApkovlReport>,
    /// The packages on the card's boot repositories, read from the `.apk` files themselves.
    pub packages: Vec<PackageReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PackageReport {
    pub name: String,
    pub version: String,
    /// The card directory (`apks`, `apks-community`).
    pub repository: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionReport {
    pub number: usize,
    pub kind: String,
    pub bootable: bool,
    pub start_bytes: u64,
    pub size_bytes: u64,
    pub filesystem: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub path: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    pub node: String,
    pub node_id: u32,
    pub versions: Vec<u32>,
    pub wg_public_key: String,
    pub wg_key_fingerprint: String,
    pub controller_key_fingerprint: String,
    pub controller_endpoints: Vec<String>,
    pub management_wg_key_fingerprint: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApkovlReport {
    pub file: String,
    pub sha256: String,
    pub node_binary: Option<String>,
    pub entries: Vec<ApkovlEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApkovlEntry {
    pub path: String,
    pub kind: &'static str,
    pub mode: String,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    /// Where a symlink points.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// `SHA256:<base64>` of a base64 key's bytes (as ssh prints fingerprints).
pub fn fingerprint(key_b64: &str) -> String {
    let engine = base64::engine::general_purpose::STANDARD;
    let bytes = engine.decode(key_b64.trim()).unwrap_or_default();
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(bytes))
    )
}

/// Reads a raw `.img` or an `.img.zst`.
pub fn inspect(path: &Path) -> Result<ImageReport, Error> {
    let not_image = |message: String| Error::NotAnImage {
        path: path.to_path_buf(),
        message,
    };
    let raw = std::fs::read(path).map_err(Error::io("cannot read", path))?;
    let compressed = raw.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
    let mut image = if compressed {
        zstd::stream::decode_all(raw.as_slice())
            .map_err(|e| not_image(format!("cannot decompress: {e}")))?
    } else {
        raw
    };
    let (id, parts) = disk::parse_mbr(&image).ok_or_else(|| not_image("no MBR".into()))?;
    let mbr_boot_code = image[..440].iter().any(|&b| b != 0);
    let mut partitions = Vec::new();
    let mut fat = None;
    for (i, p) in parts.iter().enumerate() {
        let start = u64::from(p.start_lba) * SECTOR;
        let size = u64::from(p.sectors) * SECTOR;
        if start + size > image.len() as u64 {
            return Err(not_image(format!(
                "partition {} ends past the image",
                i + 1
            )));
        }
        let region = &image[start as usize..(start + size) as usize];
        let filesystem = if region.len() > 90 && &region[82..90] == b"FAT32   " {
            "fat32".to_string()
        } else if region.len() > 1082 && region[1080..1082] == [0x53, 0xef] {
            "ext4".to_string()
        } else if region.iter().take(1 << 20).all(|&b| b == 0) {
            "empty (formatted by the node on first boot)".to_string()
        } else {
            "unknown".to_string()
        };
        if filesystem == "fat32" && fat.is_none() {
            fat = Some((start as usize, size as usize));
        }
        partitions.push(PartitionReport {
            number: i + 1,
            kind: match p.kind {
                disk::TYPE_FAT32_LBA => "FAT32 (LBA), 0x0c".into(),
                disk::TYPE_LINUX => "Linux, 0x83".into(),
                other => format!("0x{other:02x}"),
            },
            bootable: p.bootable,
            start_bytes: start,
            size_bytes: size,
            filesystem,
        });
    }
    let (start, size) = fat.ok_or_else(|| not_image("no FAT32 boot partition".into()))?;
    let files = disk::read_fat(&mut image[start..start + size])?;
    let manifest: Option<ImageManifest> = files
        .get(MANIFEST_FILE)
        .and_then(|b| toml::from_str(&String::from_utf8_lossy(b)).ok());
    let ovl_name = manifest.as_ref().map(|m| m.apkovl.clone()).or_else(|| {
        files
            .keys()
            .find(|k| !k.contains('/') && k.ends_with(".apkovl.tar.gz"))
            .cloned()
    });
    let mut node = None;
    let mut apkovl_report = None;
    if let Some(name) = ovl_name {
        let bytes = files
            .get(&name)
            .ok_or_else(|| not_image(format!("the manifest names `{name}`, which is missing")))?;
        let overlay =
            apkovl::read_tar_gz(bytes).map_err(|e| not_image(format!("apkovl `{name}`: {e}")))?;
        let node_binary = match overlay.get("usr/sbin/towalink-node").map(|e| &e.kind) {
            Some(Kind::File(b)) => Some(
                [62u16, 183]
                    .iter()
                    .find(|m| check_node_binary(Path::new("towalink-node"), b, **m).is_ok())
                    .map(|m| format!("static ELF, {}", machine_name(*m)))
                    .unwrap_or_else(|| "not a static x86_64/aarch64 ELF".into()),
            ),
            _ => None,
        };
        let identity_path = format!("{SEED_DIR}/identity/node.toml");
        if let Some(Kind::File(b)) = overlay.get(&identity_path).map(|e| &e.kind) {
            if let Ok(id) = toml::from_str::<towalink_bundle::messages::NodeIdentity>(
                &String::from_utf8_lossy(b),
            ) {
                let prefix = format!("{SEED_DIR}/incoming/");
                let mut versions: Vec<u32> = overlay
                    .entries()
                    .filter_map(|(p, _)| p.strip_prefix(&prefix))
                    .filter_map(|f| f.strip_suffix(".tar.zst"))
                    .filter_map(|f| f.rsplit("-v").next())
                    .filter_map(|v| v.parse().ok())
                    .collect();
                versions.sort_unstable();
                node = Some(NodeReport {
                    node: format!("{}.{}", id.node, id.site),
                    node_id: id.node_id,
                    versions,
                    wg_key_fingerprint: fingerprint(&id.wg_public_key),
                    wg_public_key: id.wg_public_key.clone(),
                    controller_key_fingerprint: fingerprint(&id.controller_key),
                    controller_endpoints: id
                        .management
                        .as_ref()
                        .map(|m| m.controller_endpoints.clone())
                        .unwrap_or_default(),
                    management_wg_key_fingerprint: id
                        .management
                        .as_ref()
                        .map(|m| fingerprint(&m.controller_wg_public_key)),
                });
            }
        }
        let entries = overlay
            .entries()
            .map(|(path, e)| {
                let (kind, size, target) = match &e.kind {
                    Kind::Dir => ("dir", 0, None),
                    Kind::File(b) => ("file", b.len() as u64, None),
                    Kind::Symlink(t) => ("symlink", 0, Some(t.clone())),
                };
                ApkovlEntry {
                    path: path.clone(),
                    kind,
                    mode: format!("{:04o}", e.mode),
                    uid: e.uid,
                    gid: e.gid,
                    size,
                    target,
                }
            })
            .collect();
        apkovl_report = Some(ApkovlReport {
            sha256: hex::encode(Sha256::digest(bytes)),
            file: name,
            node_binary,
            entries,
        });
    }
    let boot_files: Vec<FileReport> = files
        .iter()
        .map(|(p, c)| FileReport {
            path: p.clone(),
            size: c.len() as u64,
        })
        .collect();
    let mut packages = Vec::new();
    for (p, c) in &files {
        let Some((dir, _)) = p.split_once('/') else {
            continue;
        };
        if dir.starts_with(crate::packages::CARD_DIR) && p.ends_with(".apk") {
            let (name, version) = crate::packages::package_info(c)
                .ok_or_else(|| not_image(format!("`{p}` is not an Alpine package")))?;
            packages.push(PackageReport {
                name,
                version,
                repository: dir.to_string(),
                size: c.len() as u64,
            });
        }
    }
    let has = |p: &str| files.keys().any(|k| k.eq_ignore_ascii_case(p));
    Ok(ImageReport {
        file: path.display().to_string(),
        compressed,
        image_bytes: image.len() as u64,
        disk_id: format!("{id:08x}"),
        mbr_boot_code,
        bios_boot: mbr_boot_code && has("ldlinux.sys") && has("syslinux.cfg"),
        uefi_boot: has("EFI/BOOT/BOOTX64.EFI") || has("EFI/BOOT/BOOTAA64.EFI"),
        partitions,
        boot_files,
        manifest,
        node,
        apkovl: apkovl_report,
        packages,
    })
}
