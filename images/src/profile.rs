//! Board profiles: the data in `board/<name>/` (embedded at build time) as types.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::Error;

/// A board's `profile.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardProfile {
    pub name: String,
    pub description: String,
    /// Alpine's name for the architecture (`x86_64`, `aarch64`).
    pub alpine_arch: String,
    /// The Rust target the node binary is built for.
    pub rust_target: String,
    /// ELF `e_machine` the node binary must have.
    pub elf_machine: u16,
    /// Alpine kernel flavour (`virt`, `rpi`, `lts`): names kernel, initramfs and modloop.
    pub kernel_flavor: String,
    /// Kernel consoles, the last one becomes /dev/console.
    pub console: Vec<String>,
    /// The uplink interface when the node's attributes name none.
    pub uplink: String,
    pub release: Release,
    pub partitions: Partitions,
    pub boot_files: Vec<BootFile>,
    #[serde(default)]
    pub host_files: Vec<HostFile>,
    pub templates: Vec<TemplateFile>,
    pub bios: Option<Bios>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// The official release file name, with `{version}` and `{arch}`.
    pub file: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partitions {
    pub boot_mib: u32,
    pub data_mib: u32,
}

/// A file or directory of the release copied to the same path on the boot partition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootFile {
    pub path: String,
    #[serde(default)]
    pub optional: bool,
}

/// A file of the build host (a boot loader) copied onto the boot partition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFile {
    pub from: String,
    pub to: String,
    /// The Debian package that provides it (named in the error when it is missing).
    pub package: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateFile {
    pub template: String,
    pub to: String,
}

/// BIOS boot: MBR boot code and the syslinux installer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bios {
    pub mbr_code: String,
    pub mbr_package: String,
    pub installer: String,
    pub installer_package: String,
}

/// A board: its profile and its boot templates.
#[derive(Debug, Clone)]
pub struct Board {
    pub profile: BoardProfile,
    pub templates: BTreeMap<String, &'static str>,
}

type Embedded = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// Alpine's package-signing keys for each board's architecture (`board/<name>/apk-keys/`):
/// the builder verifies the mirror's index with them; the node's initramfs has its own copy.
const APK_KEYS: &[(&str, &str, &str)] = &[
    (
        "x86_64",
        "alpine-devel@lists.alpinelinux.org-4a6a0840.rsa.pub",
        include_str!(
            "../../board/x86_64/apk-keys/alpine-devel@lists.alpinelinux.org-4a6a0840.rsa.pub"
        ),
    ),
    (
        "x86_64",
        "alpine-devel@lists.alpinelinux.org-5261cecb.rsa.pub",
        include_str!(
            "../../board/x86_64/apk-keys/alpine-devel@lists.alpinelinux.org-5261cecb.rsa.pub"
        ),
    ),
    (
        "x86_64",
        "alpine-devel@lists.alpinelinux.org-6165ee59.rsa.pub",
        include_str!(
            "../../board/x86_64/apk-keys/alpine-devel@lists.alpinelinux.org-6165ee59.rsa.pub"
        ),
    ),
    (
        "rpi4",
        "alpine-devel@lists.alpinelinux.org-58199dcc.rsa.pub",
        include_str!(
            "../../board/rpi4/apk-keys/alpine-devel@lists.alpinelinux.org-58199dcc.rsa.pub"
        ),
    ),
    (
        "rpi4",
        "alpine-devel@lists.alpinelinux.org-616ae350.rsa.pub",
        include_str!(
            "../../board/rpi4/apk-keys/alpine-devel@lists.alpinelinux.org-616ae350.rsa.pub"
        ),
    ),
];

impl Board {
    /// Alpine's keys for this board's packages.
    pub fn apk_keys(&self) -> Result<Vec<crate::packages::TrustedKey>, Error> {
        APK_KEYS
            .iter()
            .filter(|(board, _, _)| *board == self.profile.name)
            .map(|(board, name, pem)| {
                crate::packages::TrustedKey::new(
                    name,
                    pem,
                    &format!("board/{board}/apk-keys/{name}"),
                )
            })
            .collect()
    }
}

const BOARDS: &[Embedded] = &[
    (
        "x86_64",
        include_str!("../../board/x86_64/profile.toml"),
        &[
            (
                "syslinux.cfg.jinja",
                include_str!("../../board/x86_64/syslinux.cfg.jinja"),
            ),
            (
                "loader.conf.jinja",
                include_str!("../../board/x86_64/loader.conf.jinja"),
            ),
            (
                "towalink.conf.jinja",
                include_str!("../../board/x86_64/towalink.conf.jinja"),
            ),
        ],
    ),
    (
        "rpi4",
        include_str!("../../board/rpi4/profile.toml"),
        &[
            (
                "config.txt.jinja",
                include_str!("../../board/rpi4/config.txt.jinja"),
            ),
            (
                "cmdline.txt.jinja",
                include_str!("../../board/rpi4/cmdline.txt.jinja"),
            ),
        ],
    ),
];

/// The names of the boards there are profiles for.
pub fn board_names() -> Vec<&'static str> {
    BOARDS.iter().map(|(name, _, _)| *name).collect()
}

/// The board called `name`.
pub fn board(name: &str) -> Result<Board, Error> {
    let (_, text, templates) = BOARDS
        .iter()
        .find(|(n, _, _)| *n == name)
        .ok_or_else(|| Error::UnknownBoard(name.to_string()))?;
    let file = format!("board/{name}/profile.toml");
    let profile: BoardProfile = toml::from_str(text).map_err(|e| Error::Profile {
        file: file.clone(),
        message: e.message().to_string(),
    })?;
    let templates: BTreeMap<String, &'static str> =
        templates.iter().map(|(n, t)| (n.to_string(), *t)).collect();
    for t in &profile.templates {
        if !templates.contains_key(&t.template) {
            return Err(Error::Profile {
                file,
                message: format!("template `{}` is not in board/{name}/", t.template),
            });
        }
    }
    Ok(Board { profile, templates })
}

/// The files of `overlays/`, placed on every image: (path in the root, content, mode).
pub const OVERLAY_FILES: &[(&str, &str, u32)] = &[
    (
        "etc/init.d/towalink-data",
        include_str!("../../overlays/etc/init.d/towalink-data"),
        0o755,
    ),
    (
        "etc/init.d/towalink-node",
        include_str!("../../overlays/etc/init.d/towalink-node"),
        0o755,
    ),
    (
        "etc/init.d/towalink-bird",
        include_str!("../../overlays/etc/init.d/towalink-bird"),
        0o755,
    ),
    (
        "etc/conf.d/towalink-node",
        include_str!("../../overlays/etc/conf.d/towalink-node"),
        0o644,
    ),
    (
        "etc/sysctl.d/towalink.conf",
        include_str!("../../overlays/etc/sysctl.d/towalink.conf"),
        0o644,
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_board_profile_parses_and_names_its_templates() {
        for name in board_names() {
            let b = board(name).unwrap();
            assert_eq!(b.profile.name, name);
            assert!(!b.profile.boot_files.is_empty());
            assert!(b.profile.partitions.boot_mib >= 64);
        }
        assert!(matches!(board("pi5"), Err(Error::UnknownBoard(_))));
    }

    #[test]
    fn x86_64_boots_under_bios_and_uefi_and_rpi4_is_64_bit() {
        let x86 = board("x86_64").unwrap().profile;
        assert!(x86.bios.is_some());
        assert!(x86
            .host_files
            .iter()
            .any(|h| h.to == "EFI/BOOT/BOOTX64.EFI"));
        let pi = board("rpi4").unwrap();
        assert!(pi.templates["config.txt.jinja"].contains("arm_64bit=1"));
        assert_eq!(pi.profile.alpine_arch, "aarch64");
        assert!(pi.profile.boot_files.iter().any(|f| f.path == "start4.elf"));
    }

    #[test]
    fn every_file_under_overlays_is_placed_on_images() {
        fn walk(dir: &std::path::Path, base: &std::path::Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else if p.file_name().unwrap() != "README.md" {
                    out.push(p.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../overlays");
        let mut found = Vec::new();
        walk(&base, &base, &mut found);
        found.sort();
        let mut listed: Vec<String> = OVERLAY_FILES
            .iter()
            .map(|(p, _, _)| p.to_string())
            .collect();
        listed.sort();
        assert_eq!(found, listed);
    }
}
