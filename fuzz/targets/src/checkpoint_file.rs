//! The checkpoint file's reader (`moat_checkpoint`) on arbitrary input:
//! never a panic, and whatever it accepts passes its own checks, encodes
//! back to the same description, and reads back equal.
//!
//! The first byte picks how the rest is read: even, as a whole file
//! (header, meta, data); odd, as a meta section (after 8 bytes of data
//! length) framed by a header with the right checksum, so that the fuzzer
//! reaches the decoder and the checks past the CRC.

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (file, data_len) = if mode % 2 == 0 {
        (rest.to_vec(), None)
    } else {
        if rest.len() < 8 {
            return;
        }
        let mut w = [0u8; 8];
        w.copy_from_slice(&rest[..8]);
        let meta = &rest[8..];
        // The data's length is its regions' (else the reader refuses the
        // file at once); from the input when the meta does not decode.
        let data_len = match postcard::from_bytes::<moat_checkpoint::Checkpoint>(meta) {
            Ok(c) => c
                .regions
                .iter()
                .fold(0u64, |a, r| a.saturating_add(r.len))
                .min(1 << 40),
            Err(_) => (u64::from_le_bytes(w) % (1 << 24)).next_multiple_of(4096),
        };
        let h = moat_checkpoint::Header {
            meta_off: moat_checkpoint::HEADER as u64,
            meta_len: meta.len() as u64,
            data_off: (moat_checkpoint::HEADER as u64 + meta.len() as u64).next_multiple_of(4096),
            data_len,
            meta_crc: crc(meta),
            data_crc: 0,
        };
        let mut f = h.encode().to_vec();
        f.extend_from_slice(meta);
        (f, Some((h, data_len)))
    };
    let header = match data_len {
        Some((h, data_len)) => {
            // The data is not materialised: the header is checked against
            // the length the file would have.
            match moat_checkpoint::parse_header(&file, h.data_off + data_len) {
                Ok(p) => p,
                Err(_) => return,
            }
        }
        None => match moat_checkpoint::parse_header(&file, file.len() as u64) {
            Ok(h) => h,
            Err(_) => return,
        },
    };
    let end = (header.meta_off + header.meta_len) as usize;
    let Some(meta) = file.get(header.meta_off as usize..end) else {
        return;
    };
    let Ok(c) = moat_checkpoint::decode_meta(&header, meta) else {
        return;
    };
    c.check(header.data_len)
        .expect("an accepted checkpoint passes its checks");
    let front = moat_checkpoint::encode_front(&c, header.data_len, header.data_crc)
        .expect("an accepted checkpoint encodes");
    let h2 = moat_checkpoint::parse_header(&front, front.len() as u64 + header.data_len)
        .expect("its header reads back");
    let back = moat_checkpoint::decode_meta(
        &h2,
        &front[h2.meta_off as usize..(h2.meta_off + h2.meta_len) as usize],
    )
    .expect("its meta reads back");
    assert_eq!(back, c, "a checkpoint reads back as it was written");
}

/// The CRC-32 the file uses (IEEE), bit by bit: independent of the
/// reader's implementation (the checkpoint tests forge files with it).
pub fn crc(b: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in b {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}
