//! The disk writer: an MBR partition table, a FAT32 boot partition made in memory with the
//! `fatfs` crate, an empty data partition, written into a sparse file. No root, no loop
//! device, no mount; the only outside program is the syslinux installer for BIOS boot, which
//! works on the image file and whose timestamps are reset afterwards.

use std::collections::BTreeMap;
use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use crate::Error;

pub const SECTOR: u64 = 512;
/// Partitions start at 1 MiB: aligned for SD cards and SSDs.
pub const FIRST_LBA: u64 = 2048;
/// MBR partition types.
pub const TYPE_FAT32_LBA: u8 = 0x0c;
pub const TYPE_LINUX: u8 = 0x83;

/// Where the partitions are, in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub boot_start: u64,
    pub boot_sectors: u64,
    pub data_start: u64,
    pub data_sectors: u64,
    pub total_sectors: u64,
}

impl Layout {
    pub fn new(boot_mib: u32, data_mib: u32) -> Layout {
        let mib = 1024 * 1024 / SECTOR;
        let boot_sectors = u64::from(boot_mib) * mib;
        let data_start = FIRST_LBA + boot_sectors;
        let data_sectors = u64::from(data_mib) * mib;
        Layout {
            boot_start: FIRST_LBA,
            boot_sectors,
            data_start,
            data_sectors,
            total_sectors: data_start + data_sectors,
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_sectors * SECTOR
    }
}

/// One entry of the MBR's partition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MbrPartition {
    pub bootable: bool,
    pub kind: u8,
    pub start_lba: u32,
    pub sectors: u32,
}

/// CHS for an LBA with the usual 255 heads × 63 sectors geometry (capped past 1024 cylinders).
fn chs(lba: u32) -> [u8; 3] {
    let (heads, spt) = (255u32, 63u32);
    let cylinder = lba / (heads * spt);
    if cylinder > 1023 {
        return [0xfe, 0xff, 0xff];
    }
    let head = (lba / spt) % heads;
    let sector = lba % spt + 1;
    [
        head as u8,
        (sector as u8) | (((cylinder >> 8) as u8 & 0x03) << 6),
        cylinder as u8,
    ]
}

/// The first sector: boot code (up to 440 bytes), disk signature, up to four partitions.
pub fn mbr(boot_code: Option<&[u8]>, disk_id: u32, partitions: &[MbrPartition]) -> [u8; 512] {
    let mut s = [0u8; 512];
    if let Some(code) = boot_code {
        let n = code.len().min(440);
        s[..n].copy_from_slice(&code[..n]);
    }
    s[440..444].copy_from_slice(&disk_id.to_le_bytes());
    for (i, p) in partitions.iter().take(4).enumerate() {
        let e = &mut s[446 + 16 * i..446 + 16 * (i + 1)];
        e[0] = if p.bootable { 0x80 } else { 0 };
        e[1..4].copy_from_slice(&chs(p.start_lba));
        e[4] = p.kind;
        e[5..8].copy_from_slice(&chs(p.start_lba + p.sectors - 1));
        e[8..12].copy_from_slice(&p.start_lba.to_le_bytes());
        e[12..16].copy_from_slice(&p.sectors.to_le_bytes());
    }
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// Reads an MBR: the disk signature and the used partition entries.
pub fn parse_mbr(s: &[u8]) -> Option<(u32, Vec<MbrPartition>)> {
    if s.len() < 512 || s[510] != 0x55 || s[511] != 0xaa {
        return None;
    }
    let id = u32::from_le_bytes(s[440..444].try_into().ok()?);
    let parts = (0..4)
        .filter_map(|i| {
            let e = &s[446 + 16 * i..446 + 16 * (i + 1)];
            let p = MbrPartition {
                bootable: e[0] == 0x80,
                kind: e[4],
                start_lba: u32::from_le_bytes(e[8..12].try_into().ok()?),
                sectors: u32::from_le_bytes(e[12..16].try_into().ok()?),
            };
            (p.kind != 0).then_some(p)
        })
        .collect();
    Some((id, parts))
}

/// The cluster size for a FAT32 volume of `bytes`: the largest (up to 4 KiB) that still gives
/// FAT32 its minimum cluster count.
fn cluster_size(bytes: u64) -> u32 {
    let mut size = 4096u32;
    while size > 512 && bytes / u64::from(size) < 66_000 {
        size /= 2;
    }
    size
}

/// A FAT32 volume of `bytes` holding `files` (path → content; directories are made as
/// needed), made in memory. `hidden_sectors` is the partition's first LBA (boot loaders read
/// it from the BPB). Times are all the DOS epoch.
pub fn fat32(
    bytes: u64,
    volume_id: u32,
    label: &str,
    hidden_sectors: u32,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<Vec<u8>, Error> {
    let cluster = u64::from(cluster_size(bytes));
    let needed: u64 = files
        .values()
        .map(|c| (c.len() as u64).div_ceil(cluster) * cluster)
        .sum();
    // FATs, reserved sectors and directories take about 1/128 of the volume and a little more.
    if needed + bytes / 100 + (1 << 20) > bytes {
        return Err(Error::BootPartitionFull {
            size_mib: (bytes >> 20) as u32,
            needed_mib: (needed >> 20) + 1,
        });
    }
    let fat_err = |what: &str, e: std::io::Error| Error::Fat(format!("{what}: {e}"));
    let mut volume = vec![0u8; bytes as usize];
    let mut name = [b' '; 11];
    for (i, b) in label.bytes().take(11).enumerate() {
        name[i] = b.to_ascii_uppercase();
    }
    fatfs::format_volume(
        Cursor::new(volume.as_mut_slice()),
        fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat32)
            .bytes_per_cluster(cluster as u32)
            .total_sectors((bytes / SECTOR) as u32)
            .volume_id(volume_id)
            .volume_label(name),
    )
    .map_err(|e| fat_err("cannot format", e))?;
    {
        let fs = fatfs::FileSystem::new(
            Cursor::new(volume.as_mut_slice()),
            fatfs::FsOptions::new().update_accessed_date(false),
        )
        .map_err(|e| fat_err("cannot open the new volume", e))?;
        {
            let root = fs.root_dir();
            let mut made = std::collections::BTreeSet::new();
            for (path, content) in files {
                let parts: Vec<&str> = path.split('/').collect();
                for i in 1..parts.len() {
                    let dir = parts[..i].join("/");
                    if made.insert(dir.clone()) {
                        root.create_dir(&dir)
                            .map_err(|e| fat_err(&format!("cannot create `{dir}`"), e))?;
                    }
                }
                let mut file = root
                    .create_file(path)
                    .map_err(|e| fat_err(&format!("cannot create `{path}`"), e))?;
                file.truncate()
                    .and_then(|_| file.write_all(content))
                    .and_then(|_| file.flush())
                    .map_err(|e| fat_err(&format!("cannot write `{path}`"), e))?;
            }
        }
        fs.unmount().map_err(|e| fat_err("cannot close", e))?;
    }
    // Hidden sectors in the boot sector and its FAT32 backup (sector 6).
    for sector in [0usize, 6] {
        let at = sector * SECTOR as usize + 28;
        volume[at..at + 4].copy_from_slice(&hidden_sectors.to_le_bytes());
    }
    Ok(volume)
}

/// Reads every file of a FAT volume: path → content (directories implied).
pub fn read_fat(volume: &mut [u8]) -> Result<BTreeMap<String, Vec<u8>>, Error> {
    fn walk<T: fatfs::ReadWriteSeek>(
        dir: fatfs::Dir<T>,
        prefix: &str,
        out: &mut BTreeMap<String, Vec<u8>>,
    ) -> std::io::Result<()> {
        for entry in dir.iter() {
            let entry = entry?;
            let name = entry.file_name();
            if name == "." || name == ".." {
                continue;
            }
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            if entry.is_dir() {
                walk(entry.to_dir(), &path, out)?;
            } else {
                let mut data = Vec::new();
                entry.to_file().read_to_end(&mut data)?;
                out.insert(path, data);
            }
        }
        Ok(())
    }
    let fs = fatfs::FileSystem::new(
        Cursor::new(volume),
        fatfs::FsOptions::new().update_accessed_date(false),
    )
    .map_err(|e| Error::Fat(format!("cannot open: {e}")))?;
    let mut out = BTreeMap::new();
    walk(fs.root_dir(), "", &mut out).map_err(|e| Error::Fat(format!("cannot read: {e}")))?;
    Ok(out)
}

/// Writes `data` at `offset`, skipping all-zero 64 KiB blocks (they stay holes).
pub fn write_sparse(
    file: &std::fs::File,
    path: &Path,
    offset: u64,
    data: &[u8],
) -> Result<(), Error> {
    const BLOCK: usize = 64 * 1024;
    for (i, chunk) in data.chunks(BLOCK).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            file.write_all_at(chunk, offset + (i * BLOCK) as u64)
                .map_err(Error::io("cannot write", path))?;
        }
    }
    Ok(())
}

/// Runs the syslinux installer on the FAT partition at `offset` of the image file, then gives
/// the files it wrote the same fixed times as every other file (so images are reproducible).
pub fn install_syslinux(
    installer: &str,
    package: &str,
    image: &Path,
    offset: u64,
) -> Result<(), Error> {
    let offset_text = offset.to_string();
    let image_text = image.to_string_lossy();
    towalink_system::program::run(
        installer,
        &["--install", "--offset", &offset_text, &image_text],
        Path::new("/"),
        &[("MTOOLS_SKIP_CHECK", "1")],
    )
    .map_err(|e| {
        if e.not_found {
            Error::MissingHostFile {
                path: installer.into(),
                package: package.to_string(),
            }
        } else {
            Error::Command(e)
        }
    })?;
    reset_root_times(image, offset)
}

/// Sets the creation, access and modification times of every entry in the FAT32 root
/// directory at `offset` to zero (the DOS epoch, as `fatfs` writes them).
fn reset_root_times(image: &Path, offset: u64) -> Result<(), Error> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(Error::io("cannot open", image))?;
    let io = Error::io("cannot update", image);
    let mut bpb = [0u8; 512];
    (|| -> std::io::Result<()> {
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(&mut bpb)?;
        let bytes_per_sector = u64::from(u16::from_le_bytes([bpb[11], bpb[12]]));
        let per_cluster = u64::from(bpb[13]) * bytes_per_sector;
        let reserved = u64::from(u16::from_le_bytes([bpb[14], bpb[15]]));
        let fats = u64::from(bpb[16]);
        let fat_sectors = u64::from(u32::from_le_bytes(bpb[36..40].try_into().unwrap()));
        let fat_start = offset + reserved * bytes_per_sector;
        let data_start = fat_start + fats * fat_sectors * bytes_per_sector;
        let mut cluster = u32::from_le_bytes(bpb[44..48].try_into().unwrap());
        let mut buf = vec![0u8; per_cluster as usize];
        for _ in 0..1024 {
            if !(2..0x0fff_fff8).contains(&cluster) {
                break;
            }
            let at = data_start + u64::from(cluster - 2) * per_cluster;
            f.seek(SeekFrom::Start(at))?;
            f.read_exact(&mut buf)?;
            let mut end = false;
            for e in buf.chunks_mut(32) {
                if e[0] == 0 {
                    end = true;
                    break;
                }
                if e[0] == 0xe5 || e[11] & 0x0f == 0x0f {
                    continue;
                }
                e[13..20].fill(0);
                e[22..26].fill(0);
            }
            f.seek(SeekFrom::Start(at))?;
            f.write_all(&buf)?;
            if end {
                break;
            }
            let mut next = [0u8; 4];
            f.seek(SeekFrom::Start(fat_start + u64::from(cluster) * 4))?;
            f.read_exact(&mut next)?;
            cluster = u32::from_le_bytes(next) & 0x0fff_ffff;
        }
        f.sync_all()
    })()
    .map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mbr_round_trips_and_partitions_are_aligned() {
        let layout = Layout::new(128, 64);
        assert_eq!(layout.boot_start * SECTOR, 1 << 20);
        assert_eq!(layout.total_bytes(), (1 + 128 + 64) << 20);
        let parts = [
            MbrPartition {
                bootable: true,
                kind: TYPE_FAT32_LBA,
                start_lba: layout.boot_start as u32,
                sectors: layout.boot_sectors as u32,
            },
            MbrPartition {
                bootable: false,
                kind: TYPE_LINUX,
                start_lba: layout.data_start as u32,
                sectors: layout.data_sectors as u32,
            },
        ];
        let s = mbr(Some(&[0xfa; 440]), 0xdead_beef, &parts);
        let (id, back) = parse_mbr(&s).unwrap();
        assert_eq!(id, 0xdead_beef);
        assert_eq!(back, parts);
        assert_eq!(s[0], 0xfa);
        assert!(parse_mbr(&[0u8; 512]).is_none());
    }

    #[test]
    fn fat32_holds_the_files_and_is_the_same_every_time() {
        let mut files = BTreeMap::new();
        files.insert("boot/vmlinuz-virt".to_string(), vec![7u8; 300_000]);
        files.insert("EFI/BOOT/BOOTX64.EFI".to_string(), b"MZ".to_vec());
        files.insert("r1.apkovl.tar.gz".to_string(), vec![1, 2, 3]);
        let a = fat32(64 << 20, 42, "towalink", 2048, &files).unwrap();
        let b = fat32(64 << 20, 42, "towalink", 2048, &files).unwrap();
        assert!(a == b, "same input, same volume");
        assert_eq!(&a[82..90], b"FAT32   ");
        assert_eq!(u32::from_le_bytes(a[28..32].try_into().unwrap()), 2048);
        let mut a = a;
        let back = read_fat(&mut a).unwrap();
        assert_eq!(back, files);
    }

    #[test]
    fn too_many_files_for_the_partition_is_a_clear_error() {
        let mut files = BTreeMap::new();
        files.insert("big".to_string(), vec![1u8; 70 << 20]);
        match fat32(64 << 20, 1, "x", 2048, &files) {
            Err(Error::BootPartitionFull { size_mib: 64, .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
