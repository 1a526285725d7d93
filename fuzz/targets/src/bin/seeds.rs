//! Writes every target's seed inputs (see `moat_fuzz_targets::seeds`) into
//! `OUT/<target>/<name>`: `seeds OUT REPO IMAGES`, where `REPO` is the
//! repository (for the README's manifests) and `IMAGES` a folder of built
//! guest images (a target folder's `debug`; those of at most
//! `seeds::MAX_IMAGE_SEED` bytes are taken).
use moat_fuzz_targets::seeds;
use std::path::PathBuf;

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [out, repo, images] = &args[..] else {
        eprintln!("usage: seeds OUT REPO IMAGES");
        std::process::exit(2);
    };
    let all = [
        ("hypercall_dispatch", seeds::hypercall_dispatch()),
        ("monitor_protocol", seeds::monitor_protocol()),
        ("service_wire", seeds::service_wire()),
        ("manifest", seeds::manifest(repo)),
        ("elf_image", seeds::elf_image(images, seeds::MAX_IMAGE_SEED)),
        ("checkpoint_file", seeds::checkpoint_file()),
    ];
    for (target, seeds) in all {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
        println!("{target}: {} seeds", seeds.len());
    }
}
