//! Random bytes from the kernel (`getrandom(2)`), for keys, nonces and pairing codes.

/// Fills `buffer` from the kernel's random source.
pub fn fill(buffer: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buffer.len() {
        let n =
            rustix::rand::getrandom(&mut buffer[filled..], rustix::rand::GetRandomFlags::empty())?;
        filled += n;
    }
    Ok(())
}

/// `n` random bytes.
pub fn bytes(n: usize) -> std::io::Result<Vec<u8>> {
    let mut buffer = vec![0u8; n];
    fill(&mut buffer)?;
    Ok(buffer)
}

#[cfg(test)]
mod tests {
    #[test]
    fn two_draws_differ() {
        assert_ne!(super::bytes(16).unwrap(), super::bytes(16).unwrap());
    }
}
