//! The mediated block device from Rust: a file-backed driver picoprocess
//! serves a disk; the program reads and writes it through the mediator,
//! kills the driver in the middle, and finds its data intact.
//!
//! `cargo run -p moat-mediator --example blockdev` (after `cargo build
//! --workspace`, which builds the `blk-file` driver image).
use moat_mediator::block::{Config, DriverSpec, MediatedBlock, SECTION};
use moat_policy::{Access, Policy};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The driver image, next to this example's directory (target/*/).
    let exe = std::env::current_exe()?;
    let image = exe.parent().unwrap().parent().unwrap().join("blk-file");

    let dir = std::env::temp_dir().join(format!("moat-blockdev-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)?.set_len(4 << 20)?;

    // The driver may reach its disk file and nothing else.
    let uri = format!("file:{}", disk.display());
    let mut policy = Policy::default();
    policy.allow(&uri, Access::Rw)?;
    let dev = MediatedBlock::start(
        DriverSpec {
            files: Vec::new(),
            image,
            args: vec![SECTION.into(), uri],
            host: moat_monitor::Host::Linux, // or Host::Kvm
            policy,
            faults: None,
            console: false,
        },
        Config::default(),
    )?;
    println!(
        "{} bytes in {}-byte blocks",
        dev.capacity(),
        dev.block_size()
    );

    let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    dev.write_at(8192, &data)?;
    dev.kill_driver(); // a crash: the next call waits for a new driver
    dev.flush()?;
    let mut back = vec![0u8; data.len()];
    dev.read_at(8192, &mut back)?;
    assert_eq!(back, data);

    let c = dev.counters();
    println!(
        "read back {} bytes intact after {} driver restart(s); {} requests, {} re-issued",
        back.len(),
        c.restarts,
        c.requests,
        c.reissued
    );
    dev.shutdown();
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
