//! The mediated block device as an export backend. Its synchronous calls
//! are the device's own; its asynchronous side, [`MediatedQueue`], is what
//! lets the export keep many requests in flight without a thread each.
//!
//! A request is submitted to the mediator by the FUSE thread that received
//! it (the submission goes into the ring at once, as for any client), and
//! its [`Ticket`] is handed, with the request's completion, to the queue's
//! one completion thread. That thread waits for whichever of its tickets
//! completes first ([`MediatedBlock::wait_any`]: it polls the completion
//! ring, then sleeps until the answer's taker wakes it, as a waiting client
//! does; in a busy export it is the one poller), collects it (a read's
//! bytes are copied once, from the section into a buffer the thread reuses
//! from read to read) and calls the completion, which answers the kernel.
//! The FUSE threads go back to reading requests at once, so nothing parks
//! per request, and the completion thread, busy, is woken by nobody: it
//! only sleeps (and a FUSE thread handing it a ticket then unparks it)
//! when nothing has completed for [`Config::spin`](crate::block::Config::spin).
//!
//! Dropping the queue (when the FUSE session has ended, so no answer can
//! reach the kernel any more) stops the thread, which first fails every
//! completion still pending; their requests are abandoned to the mediator,
//! which still completes them. A completion is never left uncalled: one
//! that panics is caught, and should the thread itself fail, it fails
//! what it holds and every request handed to it after.
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{JoinHandle, Thread};

use super::{BlockBackend, BlockQueue, Done, ReadDone, MAX_WRITE};
use crate::block::{MediatedBlock, Ticket};

/// A read buffer larger than this is not kept for the next read.
const KEEP_BUFFER: usize = 2 * MAX_WRITE as usize;

/// A mediated block device is exported as it is: every access of the
/// kernel goes through the mediator to the driver picoprocess.
impl BlockBackend for MediatedBlock {
    fn capacity(&self) -> u64 {
        MediatedBlock::capacity(self)
    }

    fn block_size(&self) -> u32 {
        MediatedBlock::block_size(self)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        MediatedBlock::read_at(self, offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        MediatedBlock::write_at(self, offset, data)
    }

    fn flush(&self) -> io::Result<()> {
        MediatedBlock::flush(self)
    }

    fn read_only(&self) -> bool {
        MediatedBlock::is_read_only(self)
    }

    fn queue(&self) -> io::Result<Option<Box<dyn BlockQueue>>> {
        Ok(Some(Box::new(MediatedQueue::start(self.clone())?)))
    }
}

/// What a collected ticket is answered with.
enum Finish {
    /// A read of this many bytes.
    Read(usize, ReadDone),
    /// A write or a flush.
    Other(Done),
}

/// Tickets submitted, not yet taken by the completion thread.
#[derive(Default)]
struct Inbox {
    tickets: Vec<(Ticket, Finish)>,
    /// The completion thread has stopped: nothing is taken any more.
    closed: bool,
}

/// What the FUSE threads and the completion thread share.
struct Handoff {
    new: Mutex<Inbox>,
    /// `new` may hold tickets.
    has_new: AtomicBool,
    /// The completion thread is about to sleep or sleeps: whoever gives it
    /// work unparks it.
    sleeping: AtomicBool,
    /// The queue is being dropped.
    closing: AtomicBool,
}

impl Handoff {
    /// Whether the completion thread has something to do besides waiting.
    fn called(&self) -> bool {
        self.has_new.load(SeqCst) || self.closing.load(SeqCst)
    }

    /// Before sleeping: says so, then looks again (whoever changes
    /// `has_new` or `closing` after this sees `sleeping` and unparks).
    fn may_sleep(&self) -> bool {
        self.sleeping.store(true, SeqCst);
        !self.called()
    }
}

/// The asynchronous side of a [`MediatedBlock`]: see the module
/// documentation.
pub(super) struct MediatedQueue {
    block: MediatedBlock,
    handoff: Arc<Handoff>,
    completer: Thread,
    thread: Option<JoinHandle<()>>,
}

impl MediatedQueue {
    fn start(block: MediatedBlock) -> io::Result<Self> {
        let handoff = Arc::new(Handoff {
            new: Mutex::default(),
            has_new: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        });
        let (b, h) = (block.clone(), handoff.clone());
        let thread = std::thread::Builder::new()
            .name("moat-export-done".to_owned())
            .spawn(move || complete_all(&b, &h))?;
        Ok(Self {
            block,
            handoff,
            completer: thread.thread().clone(),
            thread: Some(thread),
        })
    }

    /// Gives a submitted ticket to the completion thread.
    fn hand(&self, ticket: Ticket, finish: Finish) {
        let h = &*self.handoff;
        let mut inbox = h.new.lock().unwrap_or_else(PoisonError::into_inner);
        if inbox.closed {
            drop(inbox);
            drop(ticket);
            return call(finish, Err(stopped()), &[]);
        }
        inbox.tickets.push((ticket, finish));
        drop(inbox);
        h.has_new.store(true, SeqCst);
        if h.sleeping.load(SeqCst) {
            self.completer.unpark();
        }
    }
}

impl BlockQueue for MediatedQueue {
    fn depth(&self) -> usize {
        self.block.max_in_flight()
    }

    fn start_read(&self, offset: u64, len: usize, done: ReadDone) {
        match self.block.submit_read(offset, len) {
            Ok(t) => self.hand(t, Finish::Read(len, done)),
            Err(e) => call(Finish::Read(len, done), Err(e), &[]),
        }
    }

    fn start_write(&self, offset: u64, data: &[u8], done: Done) {
        match self.block.submit_write(offset, data) {
            Ok(t) => self.hand(t, Finish::Other(done)),
            Err(e) => call(Finish::Other(done), Err(e), &[]),
        }
    }

    fn start_flush(&self, done: Done) {
        match self.block.submit_flush() {
            Ok(t) => self.hand(t, Finish::Other(done)),
            Err(e) => call(Finish::Other(done), Err(e), &[]),
        }
    }
}

impl Drop for MediatedQueue {
    fn drop(&mut self) {
        self.handoff.closing.store(true, SeqCst);
        self.completer.unpark();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Calls a completion with a result (a read's with `bytes`); a completion
/// that panics is not this thread's end.
fn call(finish: Finish, result: io::Result<()>, bytes: &[u8]) {
    let _ = catch_unwind(AssertUnwindSafe(move || match finish {
        Finish::Read(_, done) => done(result.map(|()| bytes)),
        Finish::Other(done) => done(result),
    }));
}

fn stopped() -> io::Error {
    io::Error::other("the export stopped before the request completed")
}

/// The completion thread: collects tickets as they complete and calls
/// their completions, until the queue is dropped. Then, or should it
/// panic, it fails every completion still pending (and any handed to it
/// later, at once); their requests are abandoned to the mediator, which
/// still completes them.
fn complete_all(block: &MediatedBlock, h: &Handoff) {
    let mut tickets: Vec<Ticket> = Vec::new();
    let mut finishes: Vec<Finish> = Vec::new();
    let _ = catch_unwind(AssertUnwindSafe(|| {
        serve(block, h, &mut tickets, &mut finishes)
    }));
    let mut inbox = h.new.lock().unwrap_or_else(PoisonError::into_inner);
    inbox.closed = true;
    let new = std::mem::take(&mut inbox.tickets);
    drop(inbox);
    for (t, f) in new {
        tickets.push(t);
        finishes.push(f);
    }
    drop(tickets);
    for f in finishes {
        call(f, Err(stopped()), &[]);
    }
}

/// Serves until the queue is being dropped. `tickets[i]` is answered with
/// `finishes[i]`.
fn serve(
    block: &MediatedBlock,
    h: &Handoff,
    tickets: &mut Vec<Ticket>,
    finishes: &mut Vec<Finish>,
) {
    let mut ready: Vec<usize> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if h.has_new.swap(false, SeqCst) {
            let mut inbox = h.new.lock().unwrap_or_else(PoisonError::into_inner);
            for (t, f) in inbox.tickets.drain(..) {
                tickets.push(t);
                finishes.push(f);
            }
        }
        if h.closing.load(SeqCst) {
            return;
        }
        if tickets.is_empty() {
            if h.may_sleep() {
                std::thread::park();
            }
            h.sleeping.store(false, SeqCst);
            continue;
        }
        ready.clear();
        block.wait_any(
            tickets,
            &|sleep| if sleep { !h.may_sleep() } else { h.called() },
            &mut ready,
        );
        h.sleeping.store(false, SeqCst);
        // Highest index first, so that each swap_remove moves a ticket that
        // is not ready (or already gone) into the freed place.
        ready.sort_unstable();
        for &i in ready.iter().rev() {
            if i >= tickets.len() || i >= finishes.len() {
                continue;
            }
            let ticket = tickets.swap_remove(i);
            let finish = finishes.swap_remove(i);
            collect(block, ticket, finish, &mut buf);
        }
    }
}

/// Collects a done ticket and calls its completion.
fn collect(block: &MediatedBlock, ticket: Ticket, finish: Finish, buf: &mut Vec<u8>) {
    match finish {
        Finish::Read(len, done) => {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let result = block.wait_read(ticket, &mut buf[..len]);
            call(Finish::Read(len, done), result, &buf[..len]);
            if buf.capacity() > KEEP_BUFFER {
                *buf = Vec::new();
            }
        }
        Finish::Other(done) => call(Finish::Other(done), block.wait(ticket), &[]),
    }
}
