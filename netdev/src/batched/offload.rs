//! The TUN offloads of [`super::Batched`], pure: what the kernel hands over with a
//! `virtio_net_hdr` (a TCP segment of up to 64 KiB, or a packet whose checksum is left to us)
//! split into the packets WireGuard carries, and received TCP/IPv4 segments of one flow joined
//! into one frame the kernel splits again (so its TCP stack sees one large segment per batch,
//! not one per packet).
//!
//! The header (`struct virtio_net_hdr`, 10 bytes, little-endian): flags (1 = the checksum at
//! `csum_start + csum_offset` is to be completed), gso_type (0 none, 1 TCPv4, 4 TCPv6, 0x80
//! ECN), hdr_len, gso_size, csum_start, csum_offset.

/// Length of the header before every frame on a TUN opened with `IFF_VNET_HDR`.
pub const VNET_HDR_LEN: usize = 10;

const NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

/// A joined frame stays below the 64 KiB an IP packet can be.
const MAX_FRAME: usize = 65_000;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

/// Why a frame from the TUN was not split (it is dropped; the sender's TCP sends it again).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("frame shorter than its headers")]
    Short,
    #[error("segmentation of GSO type {0} is not offered")]
    GsoType(u8),
    #[error("checksum position outside the packet")]
    Checksum,
}

/// The one's-complement sum of `data` as 16-bit big-endian words, added to `sum`.
pub fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let mut words = data.chunks_exact(2);
    for word in &mut words {
        sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    fold(sum)
}

/// Folds a sum into 16 bits (carries added back).
fn fold(mut sum: u32) -> u32 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// The checksum field's value for data whose sum is `sum`.
fn complement(sum: u32) -> [u8; 2] {
    (!(fold(sum) as u16)).to_be_bytes()
}

/// The TCP pseudo-header's sum: addresses, protocol and the TCP length.
fn pseudo_header(packet: &[u8], tcp_length: usize) -> u32 {
    let addresses = if packet[0] >> 4 == 4 {
        &packet[12..20]
    } else {
        &packet[8..40]
    };
    sum16(6 + tcp_length as u32, addresses)
}

/// Splits one frame read from the TUN (header included) into IP packets, appended to `out`.
pub fn split(frame: &[u8], out: &mut Vec<Vec<u8>>) -> Result<(), OffloadError> {
    if frame.len() <= VNET_HDR_LEN {
        return Err(OffloadError::Short);
    }
    let (header, packet) = frame.split_at(VNET_HDR_LEN);
    let flags = header[0];
    let gso_type = header[1] & !GSO_ECN;
    let gso_size = usize::from(u16::from_le_bytes([header[4], header[5]]));
    let csum_start = usize::from(u16::from_le_bytes([header[6], header[7]]));
    let csum_offset = usize::from(u16::from_le_bytes([header[8], header[9]]));
    match gso_type {
        GSO_NONE => {
            let mut packet = packet.to_vec();
            if flags & NEEDS_CSUM != 0 {
                let at = csum_start + csum_offset;
                if csum_start >= packet.len() || at + 2 > packet.len() {
                    return Err(OffloadError::Checksum);
                }
                // The field holds the pseudo-header's sum already: complete over the rest.
                // A result of 0 is written as 0xffff (the same in one's complement), since 0
                // means "no checksum" to UDP.
                let sum = sum16(0, &packet[csum_start..]);
                let value = match complement(sum) {
                    [0, 0] => [0xff, 0xff],
                    value => value,
                };
                packet[at..at + 2].copy_from_slice(&value);
            }
            out.push(packet);
            Ok(())
        }
        GSO_TCPV4 | GSO_TCPV6 => segment(packet, csum_start, gso_size, out),
        other => Err(OffloadError::GsoType(other)),
    }
}

/// One TCP segment of up to 64 KiB cut into `mss`-sized packets with their own headers and
/// checksums. `ip_length` is where the TCP header starts.
fn segment(
    packet: &[u8],
    ip_length: usize,
    mss: usize,
    out: &mut Vec<Vec<u8>>,
) -> Result<(), OffloadError> {
    let v4 = packet.first().is_some_and(|b| b >> 4 == 4);
    if mss == 0
        || packet.len() < ip_length + 20
        || (v4 && ip_length < 20)
        || (!v4 && ip_length < 40)
    {
        return Err(OffloadError::Short);
    }
    let tcp_length = usize::from(packet[ip_length + 12] >> 4) * 4;
    let headers = ip_length + tcp_length;
    if tcp_length < 20 || packet.len() < headers {
        return Err(OffloadError::Short);
    }
    let payload = &packet[headers..];
    let first_seq = u32::from_be_bytes(packet[ip_length + 4..ip_length + 8].try_into().unwrap());
    let first_id = u16::from_be_bytes([packet[4], packet[5]]);
    let count = payload.len().div_ceil(mss).max(1);
    for (index, chunk) in payload
        .chunks(mss)
        .chain(
            // A segment without payload (never offloaded, but harmless): one packet.
            std::iter::once(&[][..]).filter(|_| payload.is_empty()),
        )
        .enumerate()
    {
        let mut p = Vec::with_capacity(headers + chunk.len());
        p.extend_from_slice(&packet[..headers]);
        p.extend_from_slice(chunk);
        let total = p.len();
        if v4 {
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[4..6].copy_from_slice(&first_id.wrapping_add(index as u16).to_be_bytes());
            p[10..12].copy_from_slice(&[0, 0]);
            let sum = sum16(0, &p[..ip_length]);
            p[10..12].copy_from_slice(&complement(sum));
        } else {
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        }
        let seq = first_seq.wrapping_add((index * mss) as u32);
        p[ip_length + 4..ip_length + 8].copy_from_slice(&seq.to_be_bytes());
        if index + 1 != count {
            p[ip_length + 13] &= !(TCP_PSH | TCP_FIN);
        }
        if index != 0 {
            p[ip_length + 13] &= !TCP_CWR;
        }
        p[ip_length + 16..ip_length + 18].copy_from_slice(&[0, 0]);
        let sum = sum16(pseudo_header(&p, total - ip_length), &p[ip_length..]);
        p[ip_length + 16..ip_length + 18].copy_from_slice(&complement(sum));
        out.push(p);
    }
    Ok(())
}

/// An IPv4 TCP packet that may be joined: no IP options, Don't Fragment set (so its IP id
/// carries nothing a receiver uses), not a fragment, its length right and both checksums
/// valid (a segment damaged before the peer's end of the tunnel must reach its receiver
/// damaged, not with a checksum the kernel fills in). The length of its headers.
fn joinable_tcp4(p: &[u8]) -> Option<usize> {
    if p.len() < 40 || p[0] != 0x45 || p[9] != 6 || p[6] != 0x40 || p[7] != 0 {
        return None;
    }
    let tcp_words = usize::from(p[32] >> 4);
    let headers = 20 + tcp_words * 4;
    let valid = tcp_words >= 5
        && p.len() >= headers
        && usize::from(u16::from_be_bytes([p[2], p[3]])) == p.len()
        && fold(sum16(0, &p[..20])) == 0xffff
        && fold(sum16(pseudo_header(p, p.len() - 20), &p[20..])) == 0xffff;
    valid.then_some(headers)
}

/// Whether `q` continues `p`'s flow right where `next_seq` says: the same IP header but for
/// length, id and checksum (TOS with its ECN bits, flags, TTL, addresses), the same ports,
/// ack, data offset and reserved bits, window and options; ACK (PSH allowed) only.
fn continues(p: &[u8], q: &[u8], headers: usize, next_seq: u32) -> bool {
    joinable_tcp4(q) == Some(headers)
        && q[1] == p[1]
        && q[6..9] == p[6..9]
        && q[12..24] == p[12..24]
        && q[28..33] == p[28..33]
        && q[34..36] == p[34..36]
        && q[40..headers] == p[40..headers]
        && u32::from_be_bytes(q[24..28].try_into().unwrap()) == next_seq
        && (q[33] == TCP_ACK || q[33] == TCP_ACK | TCP_PSH)
}

/// Joins runs of in-order TCP/IPv4 segments of one flow from `packets` (decrypted, in the
/// order they came) into single frames for a TUN opened with `IFF_VNET_HDR`; every other
/// packet becomes a frame of its own behind a zero header. Appends to `frames`.
///
/// A run: the first segment carries ACK only and a payload (its length is the run's segment
/// size), the next ones continue it (see [`continues`]) with payloads no larger; a shorter
/// one, or one with PSH, ends it. The joined frame is flagged TCPv4 GSO with that segment
/// size, and its checksum is left partial (the pseudo-header's sum, `csum_start` at the TCP
/// header): the kernel takes the payload as it is, WireGuard having authenticated every byte.
pub fn join(packets: &[&[u8]], frames: &mut Vec<Vec<u8>>) {
    let mut i = 0;
    while i < packets.len() {
        let p = packets[i];
        let run_end = match joinable_tcp4(p) {
            Some(headers) if p[33] == TCP_ACK && p.len() > headers => {
                let mss = p.len() - headers;
                let mut next_seq =
                    u32::from_be_bytes(p[24..28].try_into().unwrap()).wrapping_add(mss as u32);
                let mut total = p.len();
                let mut j = i + 1;
                while j < packets.len() {
                    let q = packets[j];
                    let payload = q.len().saturating_sub(headers);
                    if !continues(p, q, headers, next_seq)
                        || payload == 0
                        || payload > mss
                        || total + payload > MAX_FRAME
                    {
                        break;
                    }
                    total += payload;
                    next_seq = next_seq.wrapping_add(payload as u32);
                    j += 1;
                    if payload < mss || q[33] != TCP_ACK {
                        break;
                    }
                }
                (j > i + 1).then_some((j, headers, mss))
            }
            _ => None,
        };
        let Some((j, headers, mss)) = run_end else {
            let mut frame = vec![0u8; VNET_HDR_LEN];
            frame.extend_from_slice(p);
            frames.push(frame);
            i += 1;
            continue;
        };
        let mut frame = Vec::with_capacity(VNET_HDR_LEN + 65_536);
        frame.extend_from_slice(&[NEEDS_CSUM, GSO_TCPV4]);
        frame.extend_from_slice(&(headers as u16).to_le_bytes());
        frame.extend_from_slice(&(mss as u16).to_le_bytes());
        frame.extend_from_slice(&20u16.to_le_bytes());
        frame.extend_from_slice(&16u16.to_le_bytes());
        frame.extend_from_slice(&p[..headers]);
        for q in &packets[i..j] {
            frame.extend_from_slice(&q[headers..]);
        }
        let ip = &mut frame[VNET_HDR_LEN..];
        let total = ip.len();
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        // The last segment's flags (PSH).
        ip[33] = packets[j - 1][33];
        ip[10..12].copy_from_slice(&[0, 0]);
        let sum = sum16(0, &ip[..20]);
        ip[10..12].copy_from_slice(&complement(sum));
        let partial = pseudo_header(ip, total - 20) as u16;
        ip[36..38].copy_from_slice(&partial.to_be_bytes());
        frames.push(frame);
        i = j;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A valid TCP packet (IPv4 or IPv6) with full checksums.
    fn tcp_packet(v4: bool, seq: u32, flags: u8, payload: &[u8], options: &[u8]) -> Vec<u8> {
        let tcp_length = 20 + options.len();
        let mut p = Vec::new();
        if v4 {
            let total = 20 + tcp_length + payload.len();
            p.extend_from_slice(&[0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
            let sum = sum16(0, &p[..20]);
            p[10..12].copy_from_slice(&complement(sum));
        } else {
            let length = tcp_length + payload.len();
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&(length as u16).to_be_bytes());
            p.extend_from_slice(&[6, 64]);
            p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        }
        let ip_length = p.len();
        p.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&7u32.to_be_bytes());
        p.push(((tcp_length / 4) as u8) << 4);
        p.push(flags);
        p.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        p.extend_from_slice(options);
        p.extend_from_slice(payload);
        let sum = sum16(pseudo_header(&p, p.len() - ip_length), &p[ip_length..]);
        p[ip_length + 16..ip_length + 18].copy_from_slice(&complement(sum));
        p
    }

    fn ip_length(p: &[u8]) -> usize {
        if p[0] >> 4 == 4 {
            20
        } else {
            40
        }
    }

    /// Whether a packet's checksums hold, as a receiver checks them.
    fn checksums_hold(p: &[u8]) -> bool {
        let ip = ip_length(p);
        let ip_ok = ip == 40 || fold(sum16(0, &p[..20])) == 0xffff;
        ip_ok && fold(sum16(pseudo_header(p, p.len() - ip), &p[ip..])) == 0xffff
    }

    /// What the kernel hands over for a large send: the whole segment, its TCP checksum
    /// field seeded with the pseudo-header's sum over the whole length.
    fn gso_frame(v4: bool, mss: usize, payload: &[u8], flags: u8) -> Vec<u8> {
        let mut p = tcp_packet(
            v4,
            1000,
            flags,
            payload,
            &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
        );
        let ip = ip_length(&p);
        let partial = pseudo_header(&p, p.len() - ip) as u16;
        p[ip + 16..ip + 18].copy_from_slice(&partial.to_be_bytes());
        let mut frame = vec![NEEDS_CSUM, if v4 { GSO_TCPV4 } else { GSO_TCPV6 }];
        frame.extend_from_slice(&((ip + 32) as u16).to_le_bytes());
        frame.extend_from_slice(&(mss as u16).to_le_bytes());
        frame.extend_from_slice(&(ip as u16).to_le_bytes());
        frame.extend_from_slice(&16u16.to_le_bytes());
        frame.extend_from_slice(&p);
        frame
    }

    /// What the kernel's GSO makes of a joined frame: the segments, checksums completed.
    fn kernel_segments(frame: &[u8]) -> Vec<Vec<u8>> {
        let header = &frame[..VNET_HDR_LEN];
        if header[1] == GSO_NONE {
            return vec![frame[VNET_HDR_LEN..].to_vec()];
        }
        let mut out = Vec::new();
        split(frame, &mut out).unwrap();
        out
    }

    proptest! {
        #[test]
        fn a_large_send_splits_into_valid_segments_carrying_the_same_bytes(
            v4 in any::<bool>(),
            mss in 500usize..1400,
            payload in proptest::collection::vec(any::<u8>(), 1..20_000),
            push in any::<bool>(),
        ) {
            let flags = TCP_ACK | if push { TCP_PSH } else { 0 };
            let mut out = Vec::new();
            split(&gso_frame(v4, mss, &payload, flags), &mut out).unwrap();
            prop_assert_eq!(out.len(), payload.len().div_ceil(mss));
            let mut carried = Vec::new();
            let mut seq = 1000u32;
            for (index, p) in out.iter().enumerate() {
                prop_assert!(checksums_hold(p), "segment {} has a bad checksum", index);
                let ip = ip_length(p);
                prop_assert_eq!(u32::from_be_bytes(p[ip + 4..ip + 8].try_into().unwrap()), seq);
                let last = index + 1 == out.len();
                prop_assert_eq!(p[ip + 13] & TCP_PSH != 0, push && last);
                prop_assert!(p.len() - ip - 32 <= mss);
                carried.extend_from_slice(&p[ip + 32..]);
                seq = seq.wrapping_add((p.len() - ip - 32) as u32);
            }
            prop_assert_eq!(carried, payload);
        }

        #[test]
        fn joined_segments_split_back_into_what_arrived(
            count in 1usize..60,
            mss in 500usize..1400,
            last_short in 0usize..1400,
            push_last in any::<bool>(),
            v6_at in proptest::option::of(0usize..60),
        ) {
            let options = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
            let mut packets = Vec::new();
            let mut seq = 5000u32;
            for index in 0..count {
                let last = index + 1 == count;
                let size = if last { last_short.clamp(1, mss) } else { mss };
                let payload: Vec<u8> = (0..size).map(|b| (b * 7 + index) as u8).collect();
                let flags = TCP_ACK | if last && push_last { TCP_PSH } else { 0 };
                let v4 = v6_at != Some(index);
                packets.push(tcp_packet(v4, seq, flags, &payload, &options));
                seq = seq.wrapping_add(size as u32);
            }
            let views: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
            let mut frames = Vec::new();
            join(&views, &mut frames);
            prop_assert!(frames.len() <= packets.len());
            let again: Vec<Vec<u8>> = frames.iter().flat_map(|f| kernel_segments(f)).collect();
            prop_assert_eq!(again.len(), packets.len());
            for (got, sent) in again.iter().zip(&packets) {
                // The IP id of a split frame (and so the header checksum) may differ;
                // everything else is the same, and the checksums hold.
                prop_assert!(checksums_hold(got));
                if got[0] >> 4 == 4 {
                    prop_assert_eq!(&got[..4], &sent[..4]);
                    prop_assert_eq!(&got[6..10], &sent[6..10]);
                    prop_assert_eq!(&got[12..], &sent[12..]);
                } else {
                    prop_assert_eq!(got, sent);
                }
            }
            if count > 1 && v6_at.is_none() {
                prop_assert!(frames.len() < packets.len(), "a run of one flow was not joined");
            }
        }
    }

    #[test]
    fn other_flows_and_out_of_order_segments_are_not_joined() {
        let a = tcp_packet(true, 100, TCP_ACK, &[1; 100], &[]);
        let gap = tcp_packet(true, 300, TCP_ACK, &[2; 100], &[]);
        let mut other_port = tcp_packet(true, 200, TCP_ACK, &[3; 100], &[]);
        other_port[20] ^= 1;
        let mut frames = Vec::new();
        join(&[&a, &gap, &other_port], &mut frames);
        assert_eq!(frames.len(), 3);
        assert!(frames
            .iter()
            .all(|f| f[..VNET_HDR_LEN] == [0; VNET_HDR_LEN]));
    }

    #[test]
    fn damaged_or_differently_marked_segments_are_not_joined() {
        let first = tcp_packet(true, 100, TCP_ACK, &[1; 100], &[]);
        let join_two = |second: Vec<u8>| {
            let mut frames = Vec::new();
            join(&[&first, &second], &mut frames);
            frames.len()
        };
        let next = || tcp_packet(true, 200, TCP_ACK, &[2; 100], &[]);
        // The IPv4 header's checksum made right again after a change to it.
        let reseal = |p: &mut Vec<u8>| {
            p[10..12].copy_from_slice(&[0, 0]);
            let sum = sum16(0, &p[..20]);
            p[10..12].copy_from_slice(&complement(sum));
        };
        assert_eq!(join_two(next()), 1);
        let mut damaged = next();
        damaged[70] ^= 0x10;
        assert_eq!(join_two(damaged), 2, "a bad TCP checksum");
        let mut congested = next();
        congested[1] = 0x03;
        reseal(&mut congested);
        assert_eq!(join_two(congested), 2, "another ECN mark");
        let mut fragmentable = next();
        fragmentable[6] = 0;
        reseal(&mut fragmentable);
        assert_eq!(join_two(fragmentable), 2, "no Don't Fragment");
    }

    #[test]
    fn a_udp_checksum_that_comes_out_zero_is_written_as_all_ones() {
        // An IPv4 UDP packet whose checksum is left to us (the field holds the pseudo-header's
        // sum), with a payload word chosen so that the completed sum is 0xffff.
        let mut p = vec![
            0x45, 0, 0, 30, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        p.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 10, 0, 0, 0, 0]);
        let partial = fold(sum16(17 + 10, &p[12..20])) as u16;
        p[26..28].copy_from_slice(&partial.to_be_bytes());
        let rest = fold(sum16(0, &p[20..]));
        let word = 0xffff - rest as u16;
        p[28..30].copy_from_slice(&word.to_be_bytes());
        assert_eq!(fold(sum16(0, &p[20..])), 0xffff);
        let mut frame = vec![NEEDS_CSUM, GSO_NONE, 0, 0, 0, 0, 20, 0, 6, 0];
        frame.extend_from_slice(&p);
        let mut out = Vec::new();
        split(&frame, &mut out).unwrap();
        assert_eq!(out[0][26..28], [0xff, 0xff]);
    }

    #[test]
    fn a_packet_left_for_its_checksum_gets_it() {
        let mut p = tcp_packet(true, 1, TCP_ACK | TCP_PSH, b"hello", &[]);
        let partial = pseudo_header(&p, p.len() - 20) as u16;
        p[36..38].copy_from_slice(&partial.to_be_bytes());
        let mut frame = vec![NEEDS_CSUM, GSO_NONE, 0, 0, 0, 0, 20, 0, 16, 0];
        frame.extend_from_slice(&p);
        let mut out = Vec::new();
        split(&frame, &mut out).unwrap();
        assert!(checksums_hold(&out[0]));
    }

    #[test]
    fn malformed_frames_are_refused() {
        let mut out = Vec::new();
        assert_eq!(split(&[0; 5], &mut out), Err(OffloadError::Short));
        let mut udp_gso = vec![0, 5, 0, 0, 0, 5, 20, 0, 6, 0];
        udp_gso.extend_from_slice(&[0x45; 40]);
        assert_eq!(split(&udp_gso, &mut out), Err(OffloadError::GsoType(5)));
        let mut past = vec![NEEDS_CSUM, 0, 0, 0, 0, 0, 200, 0, 16, 0];
        past.extend_from_slice(&[0x45; 40]);
        assert_eq!(split(&past, &mut out), Err(OffloadError::Checksum));
        assert!(out.is_empty());
    }
}
