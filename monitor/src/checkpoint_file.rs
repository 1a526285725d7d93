//! A checkpoint file checked before a restore starts a confined process
//! for it (`moat restore`): the header, the meta and every relation in it
//! (`moat_checkpoint`), the data's checksum over the whole file, and the
//! limits of this run against those it ran with. The confined process
//! checks the meta again itself and maps the data; nothing here maps it.
use moat_checkpoint::Checkpoint;
use moat_policy::Policy;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

/// The checked description, or what is wrong (one line, to follow the
/// file's name).
pub(crate) fn check(f: &File, policy: &Policy) -> Result<Checkpoint, String> {
    let len = f
        .metadata()
        .map_err(|e| format!("cannot be read: {e}"))?
        .len();
    let mut head = [0u8; moat_checkpoint::HEADER];
    f.read_exact_at(&mut head, 0)
        .map_err(|_| "is not a moat checkpoint (shorter than its header)".to_string())?;
    let h = moat_checkpoint::parse_header(&head, len)?;
    let mut meta = vec![0u8; h.meta_len as usize];
    f.read_exact_at(&mut meta, h.meta_off)
        .map_err(|_| "is truncated inside its meta section".to_string())?;
    let c = moat_checkpoint::decode_meta(&h, &meta)?;
    // The data's checksum: one pass over the file, once per version of
    // it in this process (a template restored again and again is read
    // once). The data is the guest's memory, checked for damage: nothing
    // of it is interpreted by the host, unlike the meta, checked above
    // each time.
    let version = {
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata().map_err(|e| format!("cannot be read: {e}"))?;
        (
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        )
    };
    let known = VERIFIED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&version);
    if !known {
        check_data(f, &h)?;
        let mut v = VERIFIED.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() >= 64 {
            v.clear();
        }
        v.push(version);
    }
    limits_fit(&c, policy)?;
    grants_fit(&c, policy)?;
    Ok(c)
}

/// (device, inode, size, mtime, ctime) of files whose data checked out.
type Version = (u64, u64, u64, i64, i64, i64, i64);
static VERIFIED: std::sync::Mutex<Vec<Version>> = std::sync::Mutex::new(Vec::new());

fn check_data(f: &File, h: &moat_checkpoint::Header) -> Result<(), String> {
    let mut crc = moat_checkpoint::DataCrc::default();
    let mut r = f.try_clone().map_err(|e| format!("cannot be read: {e}"))?;
    std::io::Seek::seek(&mut r, std::io::SeekFrom::Start(h.data_off))
        .map_err(|e| format!("cannot be read: {e}"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = h.data_len;
    while left > 0 {
        let n = r
            .read(&mut buf[..left.min(1 << 20) as usize])
            .map_err(|e| format!("cannot be read: {e}"))?;
        if n == 0 {
            return Err("is truncated inside its data".into());
        }
        crc.update(&buf[..n]);
        left -= n as u64;
    }
    if crc.finish() != h.data_crc {
        return Err("is damaged (the data's checksum does not match)".into());
    }
    Ok(())
}

fn limits_fit(c: &Checkpoint, policy: &Policy) -> Result<(), String> {
    let limits = &policy.limits;
    for (what, had, have) in [
        ("memory_mib", c.memory_mib, limits.memory_mib),
        ("threads", c.threads_limit, limits.threads),
        ("handles", c.handles_limit, limits.handles),
    ] {
        if have < had {
            return Err(format!(
                "ran with {what} = {had}; restore it with at least that (this run gives {have})"
            ));
        }
    }
    if limits.memory_mib != c.memory_mib || limits.threads != c.threads_limit {
        // Another window: every region must still fit in it.
        let (lo, hi) = moat_pal::layout::window(limits.memory_mib, limits.threads);
        if let Some(r) = c
            .regions
            .iter()
            .find(|r| r.start < lo || r.start + r.len > hi)
        {
            return Err(format!(
                "has memory at {:#x} that this run's limits do not reach; restore it with the limits it ran with (memory_mib = {}, threads = {})",
                r.start, c.memory_mib, c.threads_limit
            ));
        }
    }
    Ok(())
}

fn grants_fit(c: &Checkpoint, policy: &Policy) -> Result<(), String> {
    // Every file it held, granted to this run as it was opened (the
    // loader opens each again through the broker, which decides; this is
    // the same question asked early, for a clear answer).
    for h in &c.handles {
        if let moat_checkpoint::Held::File { uri, access, .. } = &h.held {
            let u = moat_pal::uri::Uri::parse_bytes(uri.as_bytes())
                .map_err(|_| format!("names a file `{uri}` that is not a URI"))?;
            let write = access & (moat_pal::access::WRITE | moat_pal::access::APPEND) != 0;
            policy
                .check(&u, write)
                .map_err(|r| format!("held {uri}, which this run does not grant: {r}"))?;
        }
    }
    Ok(())
}
