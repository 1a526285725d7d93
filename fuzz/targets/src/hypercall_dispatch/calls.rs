//! The fake host's ABI calls (memory, threads, sync, processes, streams,
//! the rest): each records what the adapter handed it as an [`Event`] and
//! changes the region map and page model as the real hosts do.
use super::*;

impl MemoryCalls for Guest {
    // As LinuxPal's, with KvmPal's placement inside guest RAM.
    fn virtual_memory_alloc(&self, addr: u64, size: u64, p: u32) -> PalResult<u64> {
        let r = (|| {
            validate::check_prot(p)?;
            if size == 0 || !size.is_multiple_of(PAGE) || !addr.is_multiple_of(PAGE) {
                return Err(Error::InvalidArgument);
            }
            let mut map = self.regions.write().unwrap();
            let at = if addr == 0 {
                map.find_free(size, LO, HI).ok_or(Error::NoMemory)?
            } else {
                validate::check_page_range(addr, size)?;
                addr
            };
            map.insert(at, size, p, RegionKind::Alloc)?;
            self.model_set(at, size, |_| Some((p, RegionKind::Alloc)));
            Ok(at)
        })();
        self.record_memory(nr::DK_VIRTUAL_MEMORY_ALLOC, vec![addr, size, p.into()], r)
    }

    fn virtual_memory_free(&self, addr: u64, size: u64) -> PalResult<()> {
        let r = (|| {
            validate::check_page_range(addr, size)?;
            let mut map = self.regions.write().unwrap();
            let covered = map.covered_by(addr, size, RegionKind::Alloc);
            assert_eq!(
                covered,
                self.model_covered(addr, size, RegionKind::Alloc),
                "RegionMap::covered_by disagrees with the page model"
            );
            if !covered {
                return Err(Error::BadAddress);
            }
            map.remove(addr, size);
            self.model_set(addr, size, |_| None);
            Ok(0)
        })();
        self.record_memory(nr::DK_VIRTUAL_MEMORY_FREE, vec![addr, size], r)
            .map(|_| ())
    }

    fn virtual_memory_protect(&self, addr: u64, size: u64, p: u32) -> PalResult<()> {
        let r = (|| {
            validate::check_prot(p)?;
            validate::check_page_range(addr, size)?;
            let mut map = self.regions.write().unwrap();
            if !map.covered_by(addr, size, RegionKind::Alloc) {
                return Err(Error::BadAddress);
            }
            map.protect(addr, size, p);
            self.model_set(addr, size, |pg| pg.map(|(_, k)| (p, k)));
            Ok(0)
        })();
        self.record_memory(nr::DK_VIRTUAL_MEMORY_PROTECT, vec![addr, size, p.into()], r)
            .map(|_| ())
    }
}

impl Guest {
    fn record_memory(&self, nr: u32, scalars: Vec<u64>, r: PalResult<u64>) -> PalResult<u64> {
        let ret = r.map(|v| {
            if nr == nr::DK_VIRTUAL_MEMORY_ALLOC {
                moat_pal::encode(Ok(v))
            } else {
                0
            }
        });
        self.record(Event::Call(HostCall {
            nr,
            scalars,
            ret,
            ..HostCall::default()
        }));
        r
    }
}

impl ThreadCalls for Guest {
    fn thread_create(&self, entry: u64, param: u64) -> PalResult<u64> {
        self.call_out(nr::DK_THREAD_CREATE, vec![entry, param], Vec::new())
    }
    fn thread_delay_execution(&self, micros: u64) -> PalResult<()> {
        self.call_unit(nr::DK_THREAD_DELAY_EXECUTION, vec![micros])
    }
    fn thread_yield_execution(&self) -> PalResult<()> {
        self.call_unit(nr::DK_THREAD_YIELD_EXECUTION, Vec::new())
    }
    fn thread_exit(&self, _code: i32) -> ! {
        panic!("DkThreadExit was dispatched: the vCPU loop ends threads itself")
    }
    fn thread_get_parameter(&self) -> PalResult<u64> {
        self.call_value(nr::DK_THREAD_GET_PARAMETER, Vec::new())
    }
    fn thread_raise_exception(&self, code: u32, arg: u64) -> PalResult<u64> {
        self.call_value(nr::DK_THREAD_RAISE_EXCEPTION, vec![code.into(), arg])
    }
}

impl SyncCalls for Guest {
    fn notification_event_create(&self, initial: u32) -> PalResult<u64> {
        self.call_out(
            nr::DK_NOTIFICATION_EVENT_CREATE,
            vec![initial.into()],
            Vec::new(),
        )
    }
    fn synchronization_event_create(&self, initial: u32) -> PalResult<u64> {
        self.call_out(
            nr::DK_SYNCHRONIZATION_EVENT_CREATE,
            vec![initial.into()],
            Vec::new(),
        )
    }
    fn semaphore_create(&self, initial: u32, max: u32) -> PalResult<u64> {
        self.call_out(
            nr::DK_SEMAPHORE_CREATE,
            vec![initial.into(), max.into()],
            Vec::new(),
        )
    }
    fn semaphore_release(&self, semaphore: u64, count: u32) -> PalResult<u64> {
        self.call_value(nr::DK_SEMAPHORE_RELEASE, vec![semaphore, count.into()])
    }
    fn semaphore_peek(&self, semaphore: u64) -> PalResult<u64> {
        self.call_value(nr::DK_SEMAPHORE_PEEK, vec![semaphore])
    }
    fn event_set(&self, event: u64) -> PalResult<()> {
        self.call_unit(nr::DK_EVENT_SET, vec![event])
    }
    fn event_clear(&self, event: u64) -> PalResult<()> {
        self.call_unit(nr::DK_EVENT_CLEAR, vec![event])
    }
    fn event_peek(&self, event: u64) -> PalResult<u64> {
        self.call_value(nr::DK_EVENT_PEEK, vec![event])
    }
    fn objects_wait_any(&self, handles: &[u64], timeout_micros: i64) -> PalResult<u64> {
        let c = HostCall {
            nr: nr::DK_OBJECTS_WAIT_ANY,
            scalars: vec![timeout_micros as u64],
            handles: handles.to_vec(),
            ..HostCall::default()
        };
        self.call(c, |v| moat_pal::encode(Ok(v)), |_| Vec::new())
    }
    fn abort_event_register(&self, event: u64) -> PalResult<()> {
        self.call_unit(nr::DK_ABORT_EVENT_REGISTER, vec![event])
    }
}

impl ProcessCalls for Guest {
    fn process_create(&self, uri: GuestIn, args: GuestIn) -> PalResult<u64> {
        let ins = vec![self.guest_in(uri), self.guest_in(args)];
        self.call_out(nr::DK_PROCESS_CREATE, Vec::new(), ins)
    }
    fn process_get_exit_code(&self, process: u64) -> PalResult<i32> {
        let c = HostCall {
            nr: nr::DK_PROCESS_GET_EXIT_CODE,
            scalars: vec![process],
            ..HostCall::default()
        };
        self.call(c, |_| 0, |v| vec![u64::from(v as i32 as u32)])
            .map(|v| v as i32)
    }
    fn process_exit(&self, _code: i32) -> ! {
        panic!("DkProcessExit was dispatched: the vCPU loop ends the picoprocess itself")
    }
}

impl StreamCalls for Guest {
    fn stream_open(&self, uri: GuestIn, access: u32, create: u32, options: u32) -> PalResult<u64> {
        let ins = vec![self.guest_in(uri)];
        let s = vec![access.into(), create.into(), options.into()];
        self.call_out(nr::DK_STREAM_OPEN, s, ins)
    }
    fn stream_read(&self, stream: u64, offset: u64, buf: GuestOut) -> PalResult<u64> {
        let c = HostCall {
            nr: nr::DK_STREAM_READ,
            scalars: vec![stream, offset],
            outs: vec![self.guest_out(buf)],
            ..HostCall::default()
        };
        self.call(c, |v| moat_pal::encode(Ok(v)), |_| Vec::new())
    }
    fn stream_write(&self, stream: u64, offset: u64, buf: GuestIn) -> PalResult<u64> {
        let c = HostCall {
            nr: nr::DK_STREAM_WRITE,
            scalars: vec![stream, offset],
            ins: vec![self.guest_in(buf)],
            ..HostCall::default()
        };
        self.call(c, |v| moat_pal::encode(Ok(v)), |_| Vec::new())
    }
    fn stream_map(&self, stream: u64, addr: u64, p: u32, offset: u64, size: u64) -> PalResult<u64> {
        self.call_value(
            nr::DK_STREAM_MAP,
            vec![stream, addr, p.into(), offset, size],
        )
    }
    fn stream_map_pe_binary(&self, stream: u64) -> PalResult<ImageInfo> {
        let c = HostCall {
            nr: nr::DK_STREAM_MAP_PE_BINARY,
            scalars: vec![stream],
            ..HostCall::default()
        };
        self.call(c, |_| 0, |_| Vec::new()).map(|v| ImageInfo {
            base: v,
            size: v,
            entry: v,
        })
    }
    fn stream_unmap(&self, addr: u64, size: u64) -> PalResult<()> {
        self.call_unit(nr::DK_STREAM_UNMAP, vec![addr, size])
    }
    fn stream_set_length(&self, stream: u64, length: u64) -> PalResult<()> {
        self.call_unit(nr::DK_STREAM_SET_LENGTH, vec![stream, length])
    }
    fn stream_flush(&self, stream: u64) -> PalResult<()> {
        self.call_unit(nr::DK_STREAM_FLUSH, vec![stream])
    }
    fn stream_delete(&self, stream: u64, which: u32) -> PalResult<()> {
        self.call_unit(nr::DK_STREAM_DELETE, vec![stream, which.into()])
    }
    fn stream_get_event(&self, stream: u64) -> PalResult<u64> {
        self.call_out(nr::DK_STREAM_GET_EVENT, vec![stream], Vec::new())
    }
    fn stream_rename(&self, stream: u64, new_uri: GuestIn) -> PalResult<()> {
        let c = HostCall {
            nr: nr::DK_STREAM_RENAME,
            scalars: vec![stream],
            ins: vec![self.guest_in(new_uri)],
            ..HostCall::default()
        };
        self.call(c, |_| 0, |_| Vec::new()).map(|_| ())
    }
    fn stream_enumerate_children(
        &self,
        stream: u64,
        buf: GuestOut,
        cursor: u64,
    ) -> PalResult<(u64, u64)> {
        let c = HostCall {
            nr: nr::DK_STREAM_ENUMERATE_CHILDREN,
            scalars: vec![stream],
            outs: vec![self.guest_out(buf)],
            inout: Some(cursor),
            ..HostCall::default()
        };
        self.call(c, |v| moat_pal::encode(Ok(v)), |v| vec![v ^ 0x5555])
            .map(|v| (v, v ^ 0x5555))
    }
    fn stream_attributes_query(&self, uri: GuestIn) -> PalResult<StreamAttributes> {
        let c = HostCall {
            nr: nr::DK_STREAM_ATTRIBUTES_QUERY,
            ins: vec![self.guest_in(uri)],
            ..HostCall::default()
        };
        self.call(c, |_| 0, |_| Vec::new())
            .map(|v| StreamAttributes {
                size: v,
                ..StreamAttributes::default()
            })
    }
    fn stream_attributes_query_by_handle(&self, stream: u64) -> PalResult<StreamAttributes> {
        let c = HostCall {
            nr: nr::DK_STREAM_ATTRIBUTES_QUERY_BY_HANDLE,
            scalars: vec![stream],
            ..HostCall::default()
        };
        self.call(c, |_| 0, |_| Vec::new())
            .map(|v| StreamAttributes {
                size: v,
                ..StreamAttributes::default()
            })
    }
}

impl OtherCalls for Guest {
    fn system_time_query(&self) -> PalResult<u64> {
        self.call_value(nr::DK_SYSTEM_TIME_QUERY, Vec::new())
    }
    fn random_bits_read(&self, buf: GuestOut) -> PalResult<u64> {
        let c = HostCall {
            nr: nr::DK_RANDOM_BITS_READ,
            outs: vec![self.guest_out(buf)],
            ..HostCall::default()
        };
        self.call(c, |v| moat_pal::encode(Ok(v)), |_| Vec::new())
    }
    fn instruction_cache_flush(&self, addr: u64, size: u64) -> PalResult<()> {
        self.call_unit(nr::DK_INSTRUCTION_CACHE_FLUSH, vec![addr, size])
    }
    fn object_reference(&self, object: u64) -> PalResult<()> {
        self.call_unit(nr::DK_OBJECT_REFERENCE, vec![object])
    }
    fn object_close(&self, object: u64) -> PalResult<()> {
        self.call_unit(nr::DK_OBJECT_CLOSE, vec![object])
    }
    fn input_event_read(&self, buf: GuestOut) -> PalResult<u64> {
        let c = HostCall {
            nr: nr::DK_INPUT_EVENT_READ,
            outs: vec![self.guest_out(buf)],
            ..HostCall::default()
        };
        self.call(c, |v| moat_pal::encode(Ok(v)), |_| Vec::new())
    }
    fn frame_buffer_export(&self, addr: u64, width: u32, height: u32) -> PalResult<()> {
        self.call_unit(
            nr::DK_FRAME_BUFFER_EXPORT,
            vec![addr, width.into(), height.into()],
        )
    }
    fn frame_buffer_notify_update(&self, x: u32, y: u32, width: u32, height: u32) -> PalResult<()> {
        self.call_unit(
            nr::DK_FRAME_BUFFER_NOTIFY_UPDATE,
            vec![x.into(), y.into(), width.into(), height.into()],
        )
    }
    fn debug_string_print(&self, msg: GuestIn) -> PalResult<()> {
        let c = HostCall {
            nr: nr::DK_DEBUG_STRING_PRINT,
            ins: vec![self.guest_in(msg)],
            ..HostCall::default()
        };
        self.call(c, |_| 0, |_| Vec::new()).map(|_| ())
    }
}
