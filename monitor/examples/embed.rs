//! Embedding moat: start the `echo` guest image with piped stdin and
//! stdout, send it a line, read the line back, print its exit code.
//!
//! ```sh
//! cargo build                       # builds the guest images and the loader
//! cargo run -p moat-monitor --example embed
//! ```
use moat_monitor::{Sandbox, Stdio};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// The built images live in `target/debug/`, the parent of this example's
/// own directory (`target/debug/examples/`).
fn image(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join(name);
    p.is_file().then_some(p)
}

fn main() -> ExitCode {
    let Some(echo) = image("echo") else {
        eprintln!(
            "embed: image `echo` not found next to target/debug/; build it with `cargo build`"
        );
        return ExitCode::from(2);
    };
    let mut p = match Sandbox::new(&echo)
        .stdin(Stdio::Piped)
        .stdout(Stdio::Piped)
        .spawn()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("embed: {e}");
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    println!("started picoprocess {} from {}", p.id(), echo.display());
    let mut stdin = p.stdin.take().expect("piped stdin");
    let mut stdout = BufReader::new(p.stdout.take().expect("piped stdout"));
    writeln!(stdin, "hello through the sandbox").expect("write to the picoprocess");
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("read from the picoprocess");
    print!("echoed back: {line}");
    drop(stdin); // end of its input: echo exits
    match p.wait() {
        Ok(exit) => {
            println!("exit code {}", exit.code);
            if let Some((kind, text)) = exit.report {
                println!("report ({kind:?}): {text}");
            }
            ExitCode::from(exit.code as u8)
        }
        Err(e) => {
            eprintln!("embed: {e}");
            ExitCode::from(125)
        }
    }
}
