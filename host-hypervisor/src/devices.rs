//! The devices granted to a picoprocess, as the VMM sees them: `dev:`
//! streams, their I/O ports and MMIO windows, their interrupts as events.
//!
//! Only declared devices exist. The VMM places them: UARTs on the PC's
//! COM ports (0x3f8, 0x2f8, 0x3e8, 0x2e8), virtio-mmio devices in 4 KiB
//! windows from [`MMIO_BASE`]. A device raises its interrupt by setting a
//! synchronization event that DkStreamGetEvent hands the driver. A virtio
//! device reaches guest memory only inside the picoprocess's own
//! read-write regions, checked under the region lock for each request.
//!
//! A virtio-blk device's queue is served by an I/O thread of its own
//! (`moat_devices::IoThread`, confined to [`crate::confine::io_rules`]),
//! which polls while the driver keeps it busy and sleeps when it does not;
//! the device offers `VIRTIO_RING_F_EVENT_IDX`, so a busy driver neither
//! notifies it nor waits for interrupts. The `QueueNotify` register is an
//! ioeventfd where KVM offers them (`register_notify`): a notification
//! then wakes the thread from inside KVM, and the VMM counts it from the
//! eventfd. Each pass of the thread holds the region map's read lock, and
//! the device's DMA window is derived again whenever the map changed.
use crate::layout::{MMIO_BASE, MMIO_WINDOW, RAM_START};
use moat_devices::vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use moat_devices::{
    Device, Gate, IoConfig, IoEvent, IoThread, Irq, NetThread, Uart, VirtioBlk, VirtioNet,
    QUEUE_NOTIFY_OFFSET, UART_IO_PORTS, VIRTIO_BLK_MMIO_SIZE, VIRTIO_NET_MMIO_SIZE,
};
use moat_host_common::objects::{Object, StreamObj, SyncKind, SyncObj};
use moat_host_common::pal::LinuxPal;
use moat_host_common::sys;
use moat_host_common::vmstats::Counter;
use moat_pal::{access, prot, stream_kind, Error, PalResult, StreamAttributes};
use moat_policy::{DeviceKind, DeviceSpec};
use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a virtio-blk I/O thread polls an empty queue before it sleeps:
/// longer than a busy driver takes to come back with more requests (a few
/// microseconds when both run; a preempted one takes far longer, and then
/// a sleep and a notification cost less than the polling).
const IO_SPIN: Duration = Duration::from_micros(300);

const COM_PORTS: [u16; 4] = [0x3f8, 0x2f8, 0x3e8, 0x2e8];

enum Model {
    Uart(Arc<Mutex<Uart>>),
    Blk(Arc<Mutex<VirtioBlk>>),
    Net(Arc<Mutex<VirtioNet>>),
}

pub struct Dev {
    name: String,
    io_base: u16,
    io_count: u16,
    mmio_base: u64,
    mmio_size: u64,
    irq_line: u32,
    model: Model,
    /// The interrupt, as the event a driver waits on.
    event: Arc<Object>,
    mapped: AtomicBool,
    /// A UART's console input, until its pump thread takes it.
    input: Mutex<Option<File>>,
    /// A virtio-blk device's I/O thread, once started.
    io: Mutex<Option<IoThread>>,
    /// A virtio-net device's thread, once started.
    net: Mutex<Option<NetThread>>,
}

/// The devices of one picoprocess.
#[derive(Default)]
pub struct DeviceSet {
    devs: Vec<Dev>,
}

impl DeviceSet {
    /// Build the devices declared in `specs`. `files` is parallel to
    /// `specs`: each device's file if it has one (a backing file; a
    /// descriptor the embedder handed it: a UART's line, a NIC's wire);
    /// `ram_end` bounds guest RAM. A UART without a line is the console's.
    pub fn new(
        specs: &[DeviceSpec],
        files: Vec<Option<File>>,
        ram_end: u64,
        lin: &'static LinuxPal,
    ) -> Result<DeviceSet, String> {
        if files.len() != specs.len() {
            return Err("the device descriptors do not match the devices".into());
        }
        let mut devs = Vec::new();
        let mut coms = COM_PORTS.iter();
        let mut windows = 0u64;
        for (i, (spec, file)) in specs.iter().zip(files).enumerate() {
            let event = Arc::new(Object::Sync(
                SyncObj::new(SyncKind::Synchronization, 0, 1)
                    .map_err(|_| "cannot create an interrupt event".to_string())?,
            ));
            let ev = event.clone();
            let irq = Irq::from_fn(Arc::new(move || {
                if let Object::Sync(s) = &*ev {
                    s.set();
                }
            }));
            let irq_line = 3 + i as u32;
            let dev = match spec.kind {
                DeviceKind::Uart => {
                    let port = *coms.next().ok_or_else(|| {
                        format!(
                            "device `{}`: at most {} UARTs can be granted",
                            spec.name,
                            COM_PORTS.len()
                        )
                    })?;
                    let (out, input) = match file {
                        Some(line) => {
                            // Never block the vCPU on a line whose far end
                            // stops reading: a byte it cannot take is lost
                            // (counted), as on a line without flow control.
                            use std::os::fd::AsRawFd;
                            moat_host_common::sys::set_nonblocking(line.as_raw_fd()).map_err(
                                |e| format!("device `{}`: its line: errno {e}", spec.name),
                            )?;
                            let out = line
                                .try_clone()
                                .map_err(|e| format!("device `{}`: its line: {e}", spec.name))?;
                            (out, Some(line))
                        }
                        None => console(lin)?,
                    };
                    let uart = Uart::new(spec.name.clone(), irq, Box::new(out));
                    Dev {
                        name: spec.name.clone(),
                        io_base: port,
                        io_count: UART_IO_PORTS,
                        mmio_base: 0,
                        mmio_size: 0,
                        irq_line,
                        model: Model::Uart(Arc::new(Mutex::new(uart))),
                        event,
                        mapped: AtomicBool::new(false),
                        input: Mutex::new(input),
                        io: Mutex::new(None),
                        net: Mutex::new(None),
                    }
                }
                DeviceKind::VirtioNet => {
                    let tap = file.ok_or_else(|| {
                        format!(
                            "device `{}`: no wire (TAP descriptor) was passed",
                            spec.name
                        )
                    })?;
                    let mem = guest_memory(ram_end)?;
                    let net = VirtioNet::new(spec.name.clone(), tap, mac_of(&spec.name), mem, irq)
                        .map_err(|e| format!("device `{}`: {e}", spec.name))?;
                    let base = MMIO_BASE + windows * MMIO_WINDOW;
                    windows += 1;
                    Dev {
                        name: spec.name.clone(),
                        io_base: 0,
                        io_count: 0,
                        mmio_base: base,
                        mmio_size: VIRTIO_NET_MMIO_SIZE,
                        irq_line,
                        model: Model::Net(Arc::new(Mutex::new(net))),
                        event,
                        mapped: AtomicBool::new(false),
                        input: Mutex::new(None),
                        io: Mutex::new(None),
                        net: Mutex::new(None),
                    }
                }
                DeviceKind::VirtioBlk => {
                    let file = file.ok_or_else(|| {
                        format!("device `{}`: no backing file was passed", spec.name)
                    })?;
                    let mem = guest_memory(ram_end)?;
                    let mut blk = VirtioBlk::new(spec.name.clone(), file, mem, irq)
                        .map_err(|e| format!("device `{}`: {e}", spec.name))?;
                    blk.set_read_only(spec.read_only);
                    blk.set_event_idx(true);
                    let base = MMIO_BASE + windows * MMIO_WINDOW;
                    windows += 1;
                    Dev {
                        name: spec.name.clone(),
                        io_base: 0,
                        io_count: 0,
                        mmio_base: base,
                        mmio_size: VIRTIO_BLK_MMIO_SIZE,
                        irq_line,
                        model: Model::Blk(Arc::new(Mutex::new(blk))),
                        event,
                        mapped: AtomicBool::new(false),
                        input: Mutex::new(None),
                        io: Mutex::new(None),
                        net: Mutex::new(None),
                    }
                }
            };
            devs.push(dev);
        }
        Ok(DeviceSet { devs })
    }

    pub fn is_empty(&self) -> bool {
        self.devs.is_empty()
    }

    fn by_name(&self, name: &str) -> Option<&Dev> {
        self.devs.iter().find(|d| d.name == name)
    }

    /// The device behind a stream handle, found by the stream's kind and
    /// the index the open recorded (no name lookup); `None`: not a device
    /// stream (or no such handle: the caller's own call reports that).
    pub fn of_stream(&self, lin: &LinuxPal, stream: u64) -> Option<&Dev> {
        if self.devs.is_empty() {
            return None;
        }
        let o = lin.stream(stream).ok()?;
        let Object::Stream(s) = &*o else { return None };
        self.devs.get(s.device? as usize)
    }

    /// DkStreamOpen of `dev:NAME`.
    pub fn open(&self, lin: &LinuxPal, name: &str, acc: u32) -> PalResult<u64> {
        let Some(index) = self.devs.iter().position(|d| d.name == name) else {
            lin.tell(&moat_host_common::protocol::Request::Debug {
                text: format!(
                    "refused dev:{name}: device `{name}` is not declared (declare it with --device {name}=KIND[:ARG] or a [[device]] entry in the manifest)"
                ),
            });
            return Err(Error::NotFound);
        };
        // The stream's descriptor only stands in (reads and writes of a
        // device stream are refused): a non-blocking eventfd.
        let fd = sys::eventfd().map_err(|_| Error::LimitExceeded)?;
        lin.insert(Object::Stream(StreamObj {
            fd,
            kind: stream_kind::DEVICE,
            uri: Mutex::new(format!("dev:{name}")),
            readable: acc & access::READ != 0,
            writable: acc & (access::WRITE | access::APPEND) != 0,
            append: false,
            device: Some(index as u32),
            section: None,
        }))
    }

    fn attrs(d: &Dev) -> StreamAttributes {
        StreamAttributes {
            kind: stream_kind::DEVICE,
            readable: 1,
            writable: 1,
            executable: 0,
            size: d.mmio_size,
            dev_mmio_base: d.mmio_base,
            dev_io_base: d.io_base as u32,
            dev_io_count: d.io_count as u32,
            dev_irq: d.irq_line,
            reserved: 0,
        }
    }

    /// The attributes of a device stream.
    pub fn attributes(d: &Dev) -> StreamAttributes {
        Self::attrs(d)
    }

    /// DkStreamAttributesQuery of `dev:NAME`.
    pub fn attributes_by_name(&self, name: &str) -> PalResult<StreamAttributes> {
        self.by_name(name).map(Self::attrs).ok_or(Error::NotFound)
    }

    /// A handle to a device's interrupt event.
    pub fn event(lin: &LinuxPal, d: &Dev) -> PalResult<u64> {
        lin.insert_arc(d.event.clone())
    }

    /// Map a device's MMIO window (identity: the address is its base).
    pub fn stream_map(d: &Dev, addr: u64, p: u32, offset: u64, size: u64) -> PalResult<u64> {
        let window = d.mmio_size.next_multiple_of(4096);
        if d.mmio_size == 0 {
            Err(Error::NotSupported)
        } else if offset != 0
            || size != window
            || (addr != 0 && addr != d.mmio_base)
            || p & prot::EXEC != 0
            || moat_pal::validate::check_prot(p).is_err()
        {
            Err(Error::InvalidArgument)
        } else if d.mapped.swap(true, Ordering::AcqRel) {
            Err(Error::AlreadyExists)
        } else {
            Ok(d.mmio_base)
        }
    }

    /// DkStreamUnmap of a device window; None: not a device window.
    pub fn unmap(&self, addr: u64, size: u64) -> Option<PalResult<()>> {
        let d = self
            .devs
            .iter()
            .find(|d| d.mmio_size != 0 && d.mmio_base == addr)?;
        if size != d.mmio_size.next_multiple_of(4096) {
            return Some(Err(Error::InvalidArgument));
        }
        Some(if d.mapped.swap(false, Ordering::AcqRel) {
            Ok(())
        } else {
            Err(Error::BadAddress)
        })
    }

    fn port(&self, port: u16) -> Option<(&Dev, u16)> {
        self.devs.iter().find_map(|d| {
            let off = port.checked_sub(d.io_base)?;
            (d.io_count != 0 && off < d.io_count).then_some((d, off))
        })
    }

    fn window(&self, addr: u64) -> Option<(&Dev, u64)> {
        self.devs.iter().find_map(|d| {
            let off = addr.checked_sub(d.mmio_base)?;
            (d.mmio_size != 0 && off < d.mmio_size && d.mapped.load(Ordering::Acquire))
                .then_some((d, off))
        })
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        let Some((d, off)) = self.port(port) else {
            return false;
        };
        if let Model::Uart(u) = &d.model {
            u.lock().unwrap().pio_read(off, data);
        }
        true
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        let Some((d, off)) = self.port(port) else {
            return false;
        };
        if let Model::Uart(u) = &d.model {
            u.lock().unwrap().pio_write(off, data);
        }
        true
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((d, off)) = self.window(addr) else {
            return false;
        };
        match &d.model {
            Model::Blk(b) => b.lock().unwrap().mmio_read(off, data),
            Model::Net(n) => n.lock().unwrap().mmio_read(off, data),
            Model::Uart(_) => {}
        }
        true
    }

    /// An MMIO write; a virtio request runs here, with DMA limited to the
    /// picoprocess's read-write memory (held still by the region lock).
    pub fn mmio_write(&self, lin: &LinuxPal, addr: u64, data: &[u8]) -> bool {
        let Some((d, off)) = self.window(addr) else {
            return false;
        };
        match &d.model {
            Model::Blk(b) => {
                let regions = lin.regions.read().unwrap();
                let mut b = b.lock().unwrap();
                b.set_dma_ranges(&dma_ranges(&regions));
                b.mmio_write(off, data);
            }
            // Registers only: the frames move on the device's thread,
            // which derives the DMA window itself.
            Model::Net(n) => n.lock().unwrap().mmio_write(off, data),
            Model::Uart(_) => {}
        }
        true
    }

    /// Start the I/O thread of each virtio-blk device, confined to its
    /// own allow-list (call before the VMM confines its main thread);
    /// `register` is offered each thread's kick eventfd and the address
    /// of its device's `QueueNotify` register, to make it an ioeventfd.
    /// A device whose thread cannot start is served on the vCPU threads.
    pub fn start_io(
        &self,
        lin: &'static LinuxPal,
        register: &dyn Fn(std::os::fd::BorrowedFd<'_>, u64) -> bool,
    ) {
        for d in &self.devs {
            if let Model::Net(n) = &d.model {
                start_net(d, n, lin);
                continue;
            }
            let Model::Blk(b) = &d.model else { continue };
            let gate = Box::new(VmmGate {
                dev: b.clone(),
                lin,
                seen: None,
            });
            let config = IoConfig {
                spin: IO_SPIN,
                prologue: Some(Arc::new(|| {
                    if let Err(e) = crate::confine::apply(crate::confine::io_rules()) {
                        moat_host_common::signals::die(
                            moat_host_common::protocol::ReportKind::Startup,
                            format_args!("vmm virtio-blk I/O thread: {e}"),
                            moat_host_common::protocol::EXIT_HOST_FAILURE,
                        );
                    }
                })),
                report: Some(Arc::new(|e| match e {
                    IoEvent::Served(n) => crate::stats::add(Counter::IoRequests, n),
                    IoEvent::Slept => crate::stats::count(Counter::IoSleeps),
                    IoEvent::Interrupts(n) => crate::stats::add(Counter::IoInterrupts, n),
                    IoEvent::KernelKicks(n) => crate::stats::add(Counter::ExitNotifyInKernel, n),
                })),
            };
            let Ok(io) = IoThread::spawn(&d.name, gate, config) else {
                continue;
            };
            register(io.kick_fd(), d.mmio_base + QUEUE_NOTIFY_OFFSET);
            b.lock().unwrap().set_kick(Some(io.kick()));
            *d.io.lock().unwrap() = Some(io);
        }
    }
}

/// Where a device may do DMA: the read-write memory the picoprocess
/// allocated, its stacks, its image's data and the shared sections it
/// mapped (sized and sealed: every page exists); never a mapped file (a
/// page past the file's end would fault in the VMM).
fn dma_ranges(regions: &moat_pal::memory::RegionMap) -> Vec<std::ops::Range<u64>> {
    let mut ranges: Vec<std::ops::Range<u64>> = Vec::new();
    for (start, r) in regions.iter() {
        if r.prot & (prot::READ | prot::WRITE) != prot::READ | prot::WRITE
            || r.kind == moat_pal::memory::RegionKind::Mapped
        {
            continue;
        }
        match ranges.last_mut() {
            Some(last) if last.end == start => last.end = r.end,
            _ => ranges.push(start..r.end),
        }
    }
    ranges
}

/// Start a virtio-net device's thread, confined to its own allow-list
/// (before the VMM confines its main thread). Its `QueueNotify` writes
/// reach the VMM (an exit each, counted), which kicks the thread.
fn start_net(d: &Dev, n: &Arc<Mutex<VirtioNet>>, lin: &'static LinuxPal) {
    let gate = Box::new(VmmGate {
        dev: n.clone(),
        lin,
        seen: None,
    });
    let tap = n.lock().unwrap().tap_fd();
    let prologue: moat_devices::NetPrologue = Arc::new(|| {
        if let Err(e) = crate::confine::apply(crate::confine::net_rules()) {
            moat_host_common::signals::die(
                moat_host_common::protocol::ReportKind::Startup,
                format_args!("vmm virtio-net thread: {e}"),
                moat_host_common::protocol::EXIT_HOST_FAILURE,
            );
        }
    });
    let report: moat_devices::NetReport = Arc::new(|frames| {
        crate::stats::add(Counter::NetFrames, frames);
    });
    let thread = match NetThread::spawn(&d.name, gate, tap, Some(prologue), Some(report)) {
        Ok(t) => t,
        // Unlike virtio-blk's, its queues have no other server.
        Err(e) => moat_host_common::signals::die(
            moat_host_common::protocol::ReportKind::Startup,
            format_args!(
                "vmm: cannot start the thread of virtio-net device `{}`: {e}",
                d.name
            ),
            moat_host_common::protocol::EXIT_HOST_FAILURE,
        ),
    };
    n.lock().unwrap().set_kick(Some(thread.kick()));
    *d.net.lock().unwrap() = Some(thread);
}

/// A device that does DMA only inside the ranges it is given.
trait DmaDevice: Send + 'static {
    fn set_dma_ranges(&mut self, ranges: &[std::ops::Range<u64>]);
}

impl DmaDevice for VirtioBlk {
    fn set_dma_ranges(&mut self, ranges: &[std::ops::Range<u64>]) {
        VirtioBlk::set_dma_ranges(self, ranges)
    }
}

impl DmaDevice for VirtioNet {
    fn set_dma_ranges(&mut self, ranges: &[std::ops::Range<u64>]) {
        VirtioNet::set_dma_ranges(self, ranges)
    }
}

/// How a device's serving thread enters its device: the region map read-
/// locked (memory cannot be freed or re-protected under a pass), then the
/// device; the DMA window derived again only when the map changed since
/// the last pass. (The vCPU thread takes the same locks in the same order.)
struct VmmGate<D> {
    dev: Arc<Mutex<D>>,
    lin: &'static LinuxPal,
    /// The region map's change count when the window was last derived.
    seen: Option<u64>,
}

impl<D: DmaDevice> Gate<D> for VmmGate<D> {
    fn enter(&mut self, f: &mut dyn FnMut(&mut D)) {
        let regions = self.lin.regions.read().unwrap_or_else(|e| e.into_inner());
        let mut dev = self.dev.lock().unwrap_or_else(|e| e.into_inner());
        if self.seen != Some(regions.changes()) {
            dev.set_dma_ranges(&dma_ranges(&regions));
            self.seen = Some(regions.changes());
        }
        f(&mut dev);
    }
}

/// A virtio-net device's MAC address: locally administered, unicast,
/// `02:6d:6f` (`moat`'s first letters) and three bytes of a hash of the
/// device's name, so it is the same for every picoprocess granted it.
fn mac_of(name: &str) -> [u8; 6] {
    // FNV-1a.
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let [a, b, c, _] = h.to_le_bytes();
    [0x02, 0x6d, 0x6f, a, b, c]
}

/// Guest RAM as vm-memory sees it: the identity range at its own address.
/// Only ranges the DMA window allows are ever touched.
fn guest_memory(ram_end: u64) -> Result<GuestMemoryMmap<()>, String> {
    let size = (ram_end - RAM_START) as usize;
    // SAFETY: [RAM_START, ram_end) is the guest RAM range of this VMM,
    // which lives as long as the process; the device only touches the
    // parts the region map holds read-write, under its lock.
    let region = unsafe {
        MmapRegion::<()>::build_raw(
            RAM_START as *mut u8,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        )
    }
    .map_err(|e| format!("guest memory for a device: {e}"))?;
    let region = GuestRegionMmap::new(region, GuestAddress(RAM_START))
        .map_err(|e| format!("guest memory for a device: {e}"))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| format!("guest memory: {e}"))
}

/// The console, for a UART: its output, and its input if any.
fn console(lin: &LinuxPal) -> Result<(File, Option<File>), String> {
    let open = |uri: &str, acc: u32| {
        lin.ask_fd(&moat_host_common::protocol::Request::Open {
            uri: uri.into(),
            access: acc,
            create: 0,
            options: 0,
        })
        .map(|(fd, _)| File::from(fd))
    };
    let out = open("stdout:", access::WRITE).map_err(|e| format!("the UART's console: {e:?}"))?;
    Ok((out, open("stdin:", access::READ).ok()))
}

/// Start feeding each UART from the console's input, on a thread of its
/// own (confined to its own allow-list): bytes go into the receive FIFO as
/// it takes them. Call before the VMM confines its main thread.
pub fn start_inputs(set: &DeviceSet) {
    for d in &set.devs {
        let Some(input) = d.input.lock().unwrap().take() else {
            continue;
        };
        let Model::Uart(u) = &d.model else { continue };
        let u = u.clone();
        let _ = std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || {
                if let Err(e) = crate::confine::apply(crate::confine::input_rules()) {
                    moat_host_common::signals::die(
                        moat_host_common::protocol::ReportKind::Startup,
                        format_args!("vmm uart input: {e}"),
                        moat_host_common::protocol::EXIT_HOST_FAILURE,
                    );
                }
                pump(&u, input);
            });
    }
}

/// Feed a UART from its input. Only as many bytes are read as the
/// receive FIFO has room for (only the guest changes the room, and only
/// up), so nothing is held here that a VMM's end would lose beyond what
/// the UART itself holds: a line's far end keeps the rest.
fn pump(u: &Mutex<Uart>, mut input: File) {
    let mut buf = [0u8; 64];
    loop {
        let room = u.lock().unwrap().fifo_capacity().min(buf.len());
        if room == 0 {
            // The FIFO is full: the driver has not read it yet.
            std::thread::sleep(std::time::Duration::from_micros(200));
            continue;
        }
        let n = match input.read(&mut buf[..room]) {
            Ok(0) => return,
            Ok(n) => n,
            // A handed line is non-blocking: wait until it has bytes.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                use std::os::fd::AsRawFd;
                let _ = moat_host_common::sys::poll(&[(input.as_raw_fd(), libc::POLLIN)], 1000);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut at = 0;
        while at < n {
            let took = u.lock().unwrap().enqueue_input(&buf[at..n]).unwrap_or(0);
            at += took;
            if took == 0 {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
    }
}
