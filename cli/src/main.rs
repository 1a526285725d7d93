//! `moat`: run picoprocess images in a sandbox.
//!
//! Every problem with the input (image, manifest, argument) ends with one
//! line `moat: <problem>` on standard error and exit code 2; moat never
//! panics on bad input.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod abi;
mod checkpoint;
mod control;
mod images;
mod inspect;
mod mediate;
mod resolve;
mod run;
mod serve_net;
mod serve_pty;
mod trace;

#[derive(Parser, Debug)]
#[command(
    name = "moat",
    version,
    about = "Run untrusted extensions and drivers in picoprocesses"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a picoprocess image in a sandbox.
    Run(run::RunArgs),
    /// Show the picoprocess ABI.
    Abi(abi::AbiArgs),
    /// Check an image and report on it.
    Inspect(inspect::InspectArgs),
    /// List the built images `moat run` finds by name.
    Images(images::ImagesArgs),
    /// A disk served by a driver picoprocess through the safe mediator,
    /// crashes and lies injected, every byte checked, counters printed.
    Demo(mediate::DemoArgs),
    /// A seeded fault campaign through the mediator.
    Campaign(mediate::CampaignArgs),
    /// Serve a disk through a driver picoprocess and the mediator, as a
    /// file in a FUSE mount (attach it with `losetup`); or a NIC as a TAP
    /// interface (`--nic`), or a serial line as a PTY (`--pty`).
    Serve(mediate::ServeArgs),
    /// Decode a binary trace saved by `moat run --trace=FILE`.
    Trace(trace::TraceArgs),
    /// Freeze a `moat run --checkpointable` picoprocess and write it to a
    /// file (it ends, unless --leave-running).
    Checkpoint(checkpoint::CheckpointArgs),
    /// Resume a checkpointed picoprocess, on either host.
    Restore(checkpoint::RestoreArgs),
}

/// Print `moat: <msg>` and return the bad-input exit code.
pub fn bad_input(msg: impl std::fmt::Display) -> i32 {
    eprintln!("moat: {msg}");
    moat_monitor::EXIT_BAD_INPUT
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Run(a) => run::main(a),
        Cmd::Trace(a) => trace::main(a),
        Cmd::Checkpoint(a) => checkpoint::checkpoint(a),
        Cmd::Restore(a) => checkpoint::restore(a),
        Cmd::Abi(a) => abi::main(a),
        Cmd::Inspect(a) => inspect::main(a),
        Cmd::Images(a) => images::main(a),
        Cmd::Demo(a) => mediate::demo(a),
        Cmd::Campaign(a) => mediate::campaign(a),
        // A NIC (`--nic`), a serial line (`--pty`) or a disk.
        Cmd::Serve(a) if a.nic.is_some() => serve_net::serve(a),
        Cmd::Serve(a) if a.pty => serve_pty::serve(a),
        Cmd::Serve(a) => mediate::serve(a),
    };
    ExitCode::from((code & 0xff) as u8)
}
