//! null:, stdout:, stderr:, URI validation, and pipes between two threads.
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicI64, Ordering};

use moat_libos::moat_pal::{access, create, delete, stream_kind, Error, StreamAttributes};
use moat_libos::{thread, Pal};

use super::{ensure, err, ok, open, p, Case, Ctx, Fail, H, R};

pub const CASES: &[Case] = &[
    ("stream_null", stream_null),
    ("stream_stdout_stderr", stream_stdout_stderr),
    ("stream_uri_invalid", stream_uri_invalid),
    ("stream_uri_not_granted", stream_uri_not_granted),
    ("stream_pipe_roundtrip", stream_pipe_roundtrip),
];

const RW: u32 = access::READ | access::WRITE;

fn stream_null(_: &Ctx) -> R {
    let s = open("null:", RW, create::OPEN_EXISTING, 0)?;
    let data = [7u8; 100];
    let n = ok(p().dk_stream_write(s.0, 0, data.as_ptr(), 100), "write 100")?;
    ensure!(n == 100, "write returned {} (expected 100)", n);
    let mut buf = [1u8; 16];
    let n = ok(p().dk_stream_read(s.0, 0, buf.as_mut_ptr(), 16), "read")?;
    ensure!(n == 0, "read returned {} (expected 0: end of stream)", n);
    let mut a = StreamAttributes::default();
    ok(
        p().dk_stream_attributes_query_by_handle(s.0, &mut a),
        "attributes by handle",
    )?;
    ensure!(
        a.kind == stream_kind::NULL,
        "kind {} (expected NULL)",
        a.kind
    );
    ok(p().dk_stream_flush(s.0), "flush")?;
    Ok(())
}

fn stream_stdout_stderr(_: &Ctx) -> R {
    moat_libos::io::try_flush_stdout();
    let o = open("stdout:", access::WRITE, create::OPEN_EXISTING, 0)?;
    let m = b"# stdout: direct DkStreamWrite\n";
    let n = ok(
        p().dk_stream_write(o.0, 0, m.as_ptr(), m.len() as u64),
        "write stdout:",
    )?;
    ensure!(n == m.len() as u64, "stdout: wrote {} of {}", n, m.len());
    ok(p().dk_stream_flush(o.0), "flush stdout:")?;
    let e = open("stderr:", access::WRITE, create::OPEN_EXISTING, 0)?;
    let m = b"# stderr: direct DkStreamWrite\n";
    let n = ok(
        p().dk_stream_write(e.0, 0, m.as_ptr(), m.len() as u64),
        "write stderr:",
    )?;
    ensure!(n == m.len() as u64, "stderr: wrote {} of {}", n, m.len());
    let mut a = StreamAttributes::default();
    ok(
        p().dk_stream_attributes_query_by_handle(o.0, &mut a),
        "attributes of stdout:",
    )?;
    ensure!(a.writable == 1, "stdout: not writable in its attributes");
    Ok(())
}

fn open_err(uri: &str, want: Error) -> R {
    let mut h = 0u64;
    let r = p().dk_stream_open(
        uri.as_ptr(),
        uri.len() as u64,
        access::READ,
        create::OPEN_EXISTING,
        0,
        &mut h,
    );
    if r >= 0 {
        let _ = p().dk_object_close(h);
    }
    err(r, want, &format!("DkStreamOpen({})", uri))?;
    let mut a = StreamAttributes::default();
    let r = p().dk_stream_attributes_query(uri.as_ptr(), uri.len() as u64, &mut a);
    err(r, want, &format!("DkStreamAttributesQuery({})", uri))
}

fn stream_uri_invalid(_: &Ctx) -> R {
    let iu = Error::InvalidUri;
    open_err("file:/tmp/../etc/passwd", iu)?;
    open_err("file:/..", iu)?;
    open_err("file:relative/path", iu)?;
    open_err("file:", iu)?;
    open_err("bogus:thing", iu)?;
    open_err("no-scheme-at-all", iu)?;
    open_err("pipe.client:bad/name", iu)?;
    open_err("tcp.client:not-an-address", iu)?;
    Ok(())
}

fn stream_uri_not_granted(ctx: &Ctx) -> R {
    let pd = Error::PermissionDenied;
    open_err("file:/moat-conformance-not-granted/x", pd)?;
    // Even for creation.
    let uri = "file:/moat-conformance-not-granted-2";
    let mut h = 0u64;
    err(
        p().dk_stream_open(
            uri.as_ptr(),
            uri.len() as u64,
            RW,
            create::CREATE_ALWAYS,
            0,
            &mut h,
        ),
        pd,
        "DkStreamOpen CREATE_ALWAYS outside the grant",
    )?;
    if let Ok(dir) = ctx.scratch() {
        // A sibling of the granted directory whose name starts the same.
        let sib = format!("{}-sibling/x", dir.trim_end_matches('/'));
        open_err(&sib, pd)?;
    }
    Ok(())
}

fn pipe_name() -> String {
    format!("moat-conf-{:08x}", super::rand32())
}

/// Connect to `uri`, retrying while the server is not up yet (up to 5 s).
pub fn connect_retry(uri: &str) -> Result<H, Fail> {
    let t0 = moat_libos::time::now_micros();
    loop {
        let mut h = 0u64;
        let r = p().dk_stream_open(
            uri.as_ptr(),
            uri.len() as u64,
            RW,
            create::OPEN_EXISTING,
            0,
            &mut h,
        );
        if r >= 0 {
            return Ok(H(h));
        }
        let retry = r == Error::ConnectionRefused.code() || r == Error::NotFound.code();
        if !retry || moat_libos::time::now_micros() > t0 + 5_000_000 {
            return Err(Fail::Fail(format!(
                "DkStreamOpen({}): {}",
                uri,
                super::show(r)
            )));
        }
        thread::sleep_micros(5_000);
    }
}

/// Server side: accept one client, read 5 bytes, answer them reversed, then
/// read until the client shuts down its write side. Returns 0 or -error.
pub fn serve_one(uri: String) -> i64 {
    let mut h = 0u64;
    let r = p().dk_stream_open(
        uri.as_ptr(),
        uri.len() as u64,
        RW,
        create::OPEN_EXISTING,
        0,
        &mut h,
    );
    if r < 0 {
        return r;
    }
    let s = H(h);
    let mut buf = [0u8; 5];
    let mut got = 0usize;
    while got < 5 {
        let n = p().dk_stream_read(s.0, 0, buf[got..].as_mut_ptr(), (5 - got) as u64);
        if n <= 0 {
            return if n == 0 { -1000 } else { n };
        }
        got += n as usize;
    }
    buf.reverse();
    let n = p().dk_stream_write(s.0, 0, buf.as_ptr(), 5);
    if n != 5 {
        return if n < 0 { n } else { -1001 };
    }
    // Wait for end of stream from the client.
    let n = p().dk_stream_read(s.0, 0, buf.as_mut_ptr(), 5);
    if n != 0 {
        return if n < 0 { n } else { -1002 };
    }
    0
}

/// The client half of the exchange on a connected stream, with
/// DkStreamGetEvent used to wait for the answer.
pub fn client_exchange(c: &H) -> R {
    let mut ev = 0u64;
    ok(p().dk_stream_get_event(c.0, &mut ev), "DkStreamGetEvent")?;
    let ev = H(ev);
    let msg = b"ping!";
    let n = ok(p().dk_stream_write(c.0, 0, msg.as_ptr(), 5), "client write")?;
    ensure!(n == 5, "client wrote {}", n);
    let hs = [ev.0];
    ok(
        p().dk_objects_wait_any(1, hs.as_ptr(), 5_000_000),
        "wait for the stream's event (5 s)",
    )?;
    let mut buf = [0u8; 5];
    let mut got = 0usize;
    while got < 5 {
        let n = ok(
            p().dk_stream_read(c.0, 0, buf[got..].as_mut_ptr(), (5 - got) as u64),
            "client read",
        )?;
        ensure!(n > 0, "end of stream after {} bytes", got);
        got += n as usize;
    }
    ensure!(&buf == b"!gnip", "answer {:?}", buf);
    ok(
        p().dk_stream_delete(c.0, delete::WRITE_SIDE),
        "shut down the write side",
    )?;
    Ok(())
}

/// Run `serve_one(server_uri)` on a thread and the client on this one.
pub fn server_client(server_uri: String, client_uri: &str) -> R {
    let result = Arc::new(AtomicI64::new(1));
    let theirs = result.clone();
    let th = match thread::try_spawn(move || {
        let r = serve_one(server_uri);
        theirs.store(r, Ordering::SeqCst);
    }) {
        Ok(t) => t,
        Err(e) => super::fail!("spawn server thread: {}", e.name()),
    };
    let c = connect_retry(client_uri)?;
    client_exchange(&c)?;
    let hs = [th.handle()];
    ok(
        p().dk_objects_wait_any(1, hs.as_ptr(), 5_000_000),
        "wait for the server thread (5 s)",
    )?;
    let r = result.load(Ordering::SeqCst);
    ensure!(r == 0, "server side: {}", super::show(r));
    drop(c);
    let _ = th.join();
    Ok(())
}

fn stream_pipe_roundtrip(_: &Ctx) -> R {
    let name = pipe_name();
    server_client(
        format!("pipe.server:{}", name),
        &format!("pipe.client:{}", name),
    )
}
