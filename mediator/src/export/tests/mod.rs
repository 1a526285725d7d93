//! Tests of the exporter against in-memory backends.
use super::fs::ExportFs;
use super::*;
use fuser::Errno;
use std::sync::Mutex;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

mod queue;

/// An in-memory backend that fails any misaligned call.
struct MemBackend {
    block_size: u32,
    data: Mutex<Vec<u8>>,
    flushes: AtomicU64,
    fail: AtomicBool,
    /// Widens race windows: reads sleep after copying.
    slow: AtomicBool,
}

impl MemBackend {
    fn new(capacity: usize, block_size: u32) -> Arc<Self> {
        Arc::new(Self {
            block_size,
            data: Mutex::new(vec![0; capacity]),
            flushes: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            slow: AtomicBool::new(false),
        })
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        let bs = u64::from(self.block_size);
        assert!(
            offset.is_multiple_of(bs) && (len as u64).is_multiple_of(bs) && len > 0,
            "misaligned backend call: offset {offset}, len {len}"
        );
        assert!(offset + len as u64 <= self.capacity(), "past the end");
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected failure"));
        }
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
}

impl BlockBackend for MemBackend {
    fn capacity(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let o = offset as usize;
        buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
        if self.slow.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len())?;
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected failure"));
        }
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Geom(u64, u32);
impl BlockBackend for Geom {
    fn capacity(&self) -> u64 {
        self.0
    }
    fn block_size(&self) -> u32 {
        self.1
    }
    fn read_at(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
        unreachable!()
    }
    fn write_at(&self, _: u64, _: &[u8]) -> io::Result<()> {
        unreachable!()
    }
    fn flush(&self) -> io::Result<()> {
        unreachable!()
    }
}

/// splitmix64: a small deterministic generator for the tests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

fn fs_for(backend: Arc<MemBackend>) -> ExportFs {
    let geometry = FileLayout::of(&*backend).unwrap();
    ExportFs::new(backend, geometry, "disk".into(), None)
}

#[test]
fn geometry_and_name_are_checked() {
    for (cap, bs) in [(4096, 256), (4096, 1000), (1 << 20, 1 << 17), (1000, 512)] {
        let err = FileLayout::of(&Geom(cap, bs)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{cap} {bs}");
    }
    assert!(FileLayout::of(&Geom(0, 512)).is_ok());
    assert!(FileLayout::of(&Geom(1 << 30, 65536)).is_ok());
    for name in ["", ".", "..", "a/b", "a\0b", &"x".repeat(256)] {
        assert!(check_name(name).is_err(), "{name:?}");
    }
    check_name("disk.img").unwrap();
    // Checked before anything is mounted, so this needs no privilege.
    let err = mount(Arc::new(Geom(1000, 512)), Path::new("/nonexistent"), "d").unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    let err = mount(MemBackend::new(4096, 512), Path::new("/"), "d").unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::DirectoryNotEmpty);
}

/// Random reads and writes at any offset and length against a model.
#[test]
fn unaligned_io_matches_a_model() {
    for bs in [512u32, 4096, 65536] {
        let cap = 64 * bs as usize;
        let backend = MemBackend::new(cap, bs);
        let fs = fs_for(backend.clone());
        let mut model = vec![0u8; cap];
        let mut rng = Rng(u64::from(bs));
        for _ in 0..2000 {
            let offset = rng.below(cap as u64 + 2 * u64::from(bs));
            let len = match rng.below(4) {
                0 => rng.below(16) as usize,
                1 => bs as usize,
                _ => rng.below(4 * u64::from(bs)) as usize,
            };
            if rng.below(2) == 0 {
                let mut data = vec![0; len];
                rng.fill(&mut data);
                let res = fs.write_range(offset, &data);
                if len == 0 {
                    assert_eq!(res, Ok(0));
                } else if offset >= cap as u64 {
                    assert_eq!(res, Err(Errno::ENOSPC));
                } else {
                    let n = len.min(cap - offset as usize);
                    assert_eq!(res, Ok(n));
                    model[offset as usize..offset as usize + n].copy_from_slice(&data[..n]);
                }
            } else {
                let got = fs.read_range(offset, len as u32).unwrap();
                let from = (offset as usize).min(cap);
                let to = (offset as usize + len).min(cap);
                assert_eq!(got, &model[from..to], "read {offset}+{len}");
            }
        }
        assert_eq!(backend.snapshot(), model);
    }
}

#[test]
fn huge_reads_are_refused() {
    let fs = fs_for(MemBackend::new(4096, 512));
    assert_eq!(fs.read_range(0, MAX_READ_REQUEST + 1), Err(Errno::EINVAL));
    assert_eq!(fs.read_range(0, MAX_READ_REQUEST).unwrap().len(), 4096);
}

/// Concurrent writes to different bytes of the same blocks all land.
#[test]
fn concurrent_sub_block_writes_do_not_lose_updates() {
    const THREADS: usize = 8;
    let bs = 4096u32;
    let backend = MemBackend::new(16 * bs as usize, bs);
    backend.slow.store(true, Ordering::Relaxed);
    let fs = Arc::new(fs_for(backend.clone()));
    for round in 0..10u8 {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let fs = fs.clone();
                std::thread::spawn(move || {
                    // Thread t owns bytes [t*64, t*64+64) of every 512-byte
                    // slot; a slot's write straddles no block boundary.
                    for slot in 0..(16 * 4096 / 512) {
                        let at = slot * 512 + t as u64 * 64;
                        fs.write_range(at, &[round ^ t as u8; 64]).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let data = backend.snapshot();
        for slot in 0..(16 * 4096 / 512) {
            for t in 0..THREADS {
                let at = slot * 512 + t * 64;
                assert!(
                    data[at..at + 64].iter().all(|&b| b == round ^ t as u8),
                    "round {round}: lost write of thread {t} at {at}"
                );
            }
        }
    }
}

#[test]
fn backend_errors_become_eio() {
    let backend = MemBackend::new(8192, 512);
    let fs = fs_for(backend.clone());
    backend.fail.store(true, Ordering::SeqCst);
    assert_eq!(fs.read_range(0, 10), Err(Errno::EIO));
    assert_eq!(fs.write_range(0, &[1; 512]), Err(Errno::EIO));
    assert_eq!(fs.write_range(3, &[1; 5]), Err(Errno::EIO));
    assert_eq!(fs.flush_backend(), Err(Errno::EIO));
}

// ---- Through a real FUSE mount: needs root and /dev/fuse. ----

fn fuse_usable() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root && Path::new("/dev/fuse").exists();
    if !ok {
        let msg = "needs root and /dev/fuse";
        assert!(
            std::env::var_os("MOAT_REQUIRE_ROOT_TOOLS").is_none(),
            "MOAT_REQUIRE_ROOT_TOOLS is set but this test {msg}"
        );
        eprintln!("skipping: this test {msg}");
    }
    ok
}

/// An empty directory removed (if empty) on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "moat-export-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir(&path).unwrap();
        Self(path)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        // Never recursive: if something is still mounted here, leave it.
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn is_mount_point(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(path))
}

#[test]
fn fuse_file_behaves() {
    if !fuse_usable() {
        return;
    }
    let dir = TempDir::new("unit");
    let cap = 1 << 20;
    let backend = MemBackend::new(cap, 4096);
    let m = mount(backend.clone(), &dir.0, "disk").unwrap();
    let file = m.path();
    assert!(is_mount_point(m.mount_point()));

    let names: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["disk"]);
    let meta = std::fs::metadata(&file).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.len(), cap as u64);
    assert_eq!(meta.mode() & 0o7777, 0o600);

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    let mut rng = Rng(7);
    let mut data = vec![0; 10_000];
    rng.fill(&mut data);
    f.write_all_at(&data, 1234).unwrap();
    let mut back = vec![0; 10_000];
    f.read_exact_at(&mut back, 1234).unwrap();
    assert_eq!(back, data);
    assert_eq!(&backend.snapshot()[1234..11_234], &data[..]);

    // The end of the file.
    let mut buf = [0; 100];
    assert_eq!(f.read_at(&mut buf, cap as u64 - 10).unwrap(), 10);
    assert_eq!(f.read_at(&mut buf, cap as u64).unwrap(), 0);
    assert_eq!(f.write_at(&[1; 100], cap as u64 - 10).unwrap(), 10);
    let err = f.write_at(&[1; 100], cap as u64).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));

    // fsync reaches the backend.
    let before = backend.flushes.load(Ordering::SeqCst);
    f.sync_all().unwrap();
    assert!(backend.flushes.load(Ordering::SeqCst) > before);

    // The namespace and the size are fixed.
    let err = f.set_len(100).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    f.set_len(cap as u64).unwrap();
    let err = std::fs::File::create(dir.0.join("other")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    let err = std::fs::create_dir(dir.0.join("sub")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    let err = std::fs::remove_file(&file).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    let err = std::fs::rename(&file, dir.0.join("x")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES));
    let err = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&file)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));

    // Backend failures surface as EIO.
    backend.fail.store(true, Ordering::SeqCst);
    let err = f.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    backend.fail.store(false, Ordering::SeqCst);

    drop(f);
    m.unmount().unwrap();
    assert!(!is_mount_point(&dir.0));
}

#[test]
fn drop_unmounts_and_busy_unmount_is_lazy() {
    if !fuse_usable() {
        return;
    }
    let dir = TempDir::new("drop");
    let m = mount(MemBackend::new(1 << 16, 512), &dir.0, "disk").unwrap();
    let point = m.mount_point().to_owned();
    drop(m);
    assert!(!is_mount_point(&point));

    let backend = MemBackend::new(1 << 16, 512);
    let m = mount(backend.clone(), &dir.0, "disk").unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path())
        .unwrap();
    let started = Instant::now();
    let err = m.unmount().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ResourceBusy, "{err}");
    assert!(started.elapsed() < LAZY_UNMOUNT_WAIT + Duration::from_secs(2));
    assert!(!is_mount_point(&point));
    // Detached, but still served to its user.
    f.write_all_at(b"still here", 512).unwrap();
    assert_eq!(&backend.snapshot()[512..522], b"still here");
    drop(f);
}
