//! Hostile inputs for tests (this crate's and the integration tiers'): not used by the
//! product.

/// A zstd frame declaring `total` bytes of content: `prefix` in raw blocks, then zeros as RLE
/// blocks of 128 KiB (4 bytes each), so a 2 GiB bomb is 64 KiB on disk; `window_log` is the
/// frame's window (10..=31).
pub fn zstd_bomb(prefix: &[u8], total: u64, window_log: u32) -> Vec<u8> {
    let mut out = vec![0x28, 0xB5, 0x2F, 0xFD];
    out.push(0xC0); // 8-byte content size, not single-segment, no checksum
    out.push(((window_log - 10) << 3) as u8);
    out.extend_from_slice(&total.to_le_bytes());
    let block = |out: &mut Vec<u8>, kind: u32, size: u32, last: bool| {
        let h = u32::from(last) | (kind << 1) | (size << 3);
        out.extend_from_slice(&h.to_le_bytes()[..3]);
    };
    for chunk in prefix.chunks(128 * 1024) {
        block(&mut out, 0, chunk.len() as u32, false);
        out.extend_from_slice(chunk);
    }
    let mut left = total - prefix.len() as u64;
    while left > 0 {
        let n = left.min(128 * 1024);
        left -= n;
        block(&mut out, 1, n as u32, left == 0);
        out.push(0);
    }
    out
}

/// A GNU tar header for a regular file of `size` bytes (the content need not follow).
pub fn tar_header(name: &str, size: u64) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_path(name).unwrap();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    header.as_bytes().to_vec()
}

/// Management settings for tests: one controller endpoint, fixed key and addresses.
pub fn management(endpoint: &str) -> crate::messages::Management {
    crate::messages::Management {
        controller_endpoints: vec![endpoint.to_string()],
        controller_wg_public_key: "k".into(),
        address: "fd54::1:3".parse().expect("an address"),
        controller_address: "fd54::1".parse().expect("an address"),
        api_port: 8001,
        listen_port: 0,
        keepalive_s: 25,
    }
}
