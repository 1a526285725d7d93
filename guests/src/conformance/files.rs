//! file: streams in the scratch directory.
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use moat_libos::moat_pal::{
    access, create, delete, open_option, prot, stream_kind, Error, StreamAttributes,
};
use moat_libos::Pal;

use super::{ensure, err, err_any, ok, open, p, Case, Ctx, H, R};

pub const CASES: &[Case] = &[
    ("file_write_read_offsets", file_write_read_offsets),
    ("file_set_length_attributes", file_set_length_attributes),
    ("file_create_dispositions", file_create_dispositions),
    ("file_append", file_append),
    ("file_rename", file_rename),
    ("file_delete_keeps_handle", file_delete_keeps_handle),
    ("file_read_only_access", file_read_only_access),
    ("dir_create_enumerate_paging", dir_create_enumerate_paging),
    ("dir_errors", dir_errors),
    ("file_map_read_only", file_map_read_only),
    ("file_map_pe_binary", file_map_pe_binary),
];

const RW: u32 = access::READ | access::WRITE;

fn attrs_uri(uri: &str) -> Result<StreamAttributes, super::Fail> {
    let mut a = StreamAttributes::default();
    ok(
        p().dk_stream_attributes_query(uri.as_ptr(), uri.len() as u64, &mut a),
        &format!("DkStreamAttributesQuery({})", uri),
    )?;
    Ok(a)
}

fn attrs_h(h: &H) -> Result<StreamAttributes, super::Fail> {
    let mut a = StreamAttributes::default();
    ok(
        p().dk_stream_attributes_query_by_handle(h.0, &mut a),
        "DkStreamAttributesQueryByHandle",
    )?;
    Ok(a)
}

fn write_at(h: &H, off: u64, data: &[u8]) -> R {
    let n = ok(
        p().dk_stream_write(h.0, off, data.as_ptr(), data.len() as u64),
        "write",
    )?;
    ensure!(
        n == data.len() as u64,
        "wrote {} of {} at {}",
        n,
        data.len(),
        off
    );
    Ok(())
}

fn read_at(h: &H, off: u64, len: usize) -> Result<Vec<u8>, super::Fail> {
    let mut v = alloc::vec![0u8; len];
    let n = ok(
        p().dk_stream_read(h.0, off, v.as_mut_ptr(), len as u64),
        "read",
    )?;
    v.truncate(n as usize);
    Ok(v)
}

fn remove(h: &H) -> R {
    ok(p().dk_stream_delete(h.0, delete::ALL), "DkStreamDelete").map(drop)
}

fn file_write_read_offsets(ctx: &Ctx) -> R {
    let uri = ctx.scratch_path("rw")?;
    let f = open(&uri, RW, create::CREATE_NEW, 0)?;
    write_at(&f, 0, b"hello world")?;
    write_at(&f, 20, b"XY")?;
    let got = read_at(&f, 6, 5)?;
    ensure!(got == b"world", "read at 6: {:?}", got);
    let got = read_at(&f, 20, 10)?;
    ensure!(got == b"XY", "read at 20: {:?}", got);
    let got = read_at(&f, 11, 9)?;
    ensure!(got == [0u8; 9], "hole not zero: {:?}", got);
    let got = read_at(&f, 22, 10)?;
    ensure!(got.is_empty(), "read at end returned {} bytes", got.len());
    let got = read_at(&f, 1 << 40, 10)?;
    ensure!(
        got.is_empty(),
        "read far past the end returned {} bytes",
        got.len()
    );
    ok(p().dk_stream_flush(f.0), "flush")?;
    remove(&f)
}

fn file_set_length_attributes(ctx: &Ctx) -> R {
    let uri = ctx.scratch_path("len")?;
    let f = open(&uri, RW, create::CREATE_ALWAYS, 0)?;
    write_at(&f, 0, b"0123456789")?;
    let a = attrs_h(&f)?;
    ensure!(
        a.kind == stream_kind::FILE,
        "kind {} (expected FILE)",
        a.kind
    );
    ensure!(a.size == 10, "size {} (expected 10)", a.size);
    ensure!(
        a.readable == 1 && a.writable == 1,
        "readable {} writable {}",
        a.readable,
        a.writable
    );
    ok(p().dk_stream_set_length(f.0, 4), "set_length 4")?;
    ensure!(attrs_h(&f)?.size == 4, "size after truncation not 4");
    let got = read_at(&f, 0, 100)?;
    ensure!(got == b"0123", "content after truncation: {:?}", got);
    ok(p().dk_stream_set_length(f.0, 8192), "set_length 8192")?;
    let a = attrs_uri(&uri)?;
    ensure!(
        a.kind == stream_kind::FILE && a.size == 8192,
        "by URI: kind {} size {}",
        a.kind,
        a.size
    );
    let got = read_at(&f, 4, 4)?;
    ensure!(got == [0u8; 4], "extension not zero: {:?}", got);
    err(
        p().dk_stream_set_length(f.0, (1 << 46) + 1),
        Error::InvalidArgument,
        "set_length 2^46 + 1",
    )?;
    // set_length of a non-file stream.
    let null = open("null:", RW, create::OPEN_EXISTING, 0)?;
    err_any(
        p().dk_stream_set_length(null.0, 0),
        &[Error::WrongHandleKind, Error::InvalidArgument],
        "set_length on null:",
    )?;
    remove(&f)
}

fn file_create_dispositions(ctx: &Ctx) -> R {
    let uri = ctx.scratch_path("disp")?;
    let mut h = 0u64;
    let u = uri.as_bytes();
    err(
        p().dk_stream_open(
            u.as_ptr(),
            u.len() as u64,
            RW,
            create::OPEN_EXISTING,
            0,
            &mut h,
        ),
        Error::NotFound,
        "OPEN_EXISTING on a missing file",
    )?;
    let a = Error::NotFound;
    let mut attrs = StreamAttributes::default();
    err(
        p().dk_stream_attributes_query(u.as_ptr(), u.len() as u64, &mut attrs),
        a,
        "attributes of a missing file",
    )?;
    let f = open(&uri, RW, create::CREATE_NEW, 0)?;
    write_at(&f, 0, b"abc")?;
    err(
        p().dk_stream_open(
            u.as_ptr(),
            u.len() as u64,
            RW,
            create::CREATE_NEW,
            0,
            &mut h,
        ),
        Error::AlreadyExists,
        "CREATE_NEW on an existing file",
    )?;
    let g = open(&uri, RW, create::OPEN_ALWAYS, 0)?;
    ensure!(
        read_at(&g, 0, 10)? == b"abc",
        "OPEN_ALWAYS changed the content"
    );
    drop(g);
    let g = open(&uri, RW, create::CREATE_ALWAYS, 0)?;
    ensure!(attrs_h(&g)?.size == 0, "CREATE_ALWAYS did not truncate");
    drop(g);
    remove(&f)?;
    let uri2 = ctx.scratch_path("disp2")?;
    let g = open(&uri2, RW, create::OPEN_ALWAYS, 0)?;
    ensure!(
        attrs_h(&g)?.size == 0,
        "OPEN_ALWAYS on a missing file: not empty"
    );
    remove(&g)
}

fn file_append(ctx: &Ctx) -> R {
    let uri = ctx.scratch_path("app")?;
    let f = open(&uri, RW, create::CREATE_NEW, 0)?;
    write_at(&f, 0, b"abc")?;
    let g = open(
        &uri,
        access::WRITE | access::APPEND,
        create::OPEN_EXISTING,
        0,
    )?;
    write_at(&g, 0, b"def")?;
    write_at(&g, 1, b"gh")?;
    let got = read_at(&f, 0, 100)?;
    ensure!(
        got == b"abcdefgh",
        "content with APPEND: {:?}",
        String::from_utf8_lossy(&got)
    );
    remove(&f)
}

fn file_rename(ctx: &Ctx) -> R {
    let a = ctx.scratch_path("ren-a")?;
    let b = ctx.scratch_path("ren-b")?;
    let f = open(&a, RW, create::CREATE_NEW, 0)?;
    write_at(&f, 0, b"moved")?;
    ok(
        p().dk_stream_rename(f.0, b.as_ptr(), b.len() as u64),
        "rename",
    )?;
    let mut attrs = StreamAttributes::default();
    err(
        p().dk_stream_attributes_query(a.as_ptr(), a.len() as u64, &mut attrs),
        Error::NotFound,
        "old name after rename",
    )?;
    let at = attrs_uri(&b)?;
    ensure!(at.size == 5, "new name size {}", at.size);
    let g = open(&b, access::READ, create::OPEN_EXISTING, 0)?;
    ensure!(
        read_at(&g, 0, 10)? == b"moved",
        "content under the new name"
    );
    // The handle follows the file.
    ensure!(
        read_at(&f, 0, 10)? == b"moved",
        "content through the old handle"
    );
    let bad = "file:/moat-conformance-not-granted/renamed";
    err(
        p().dk_stream_rename(f.0, bad.as_ptr(), bad.len() as u64),
        Error::PermissionDenied,
        "rename outside the grant",
    )?;
    let dots = format!("{}/../x", ctx.scratch()?.trim_end_matches('/'));
    err(
        p().dk_stream_rename(f.0, dots.as_ptr(), dots.len() as u64),
        Error::InvalidUri,
        "rename to a `..` URI",
    )?;
    let other = "null:";
    err_any(
        p().dk_stream_rename(f.0, other.as_ptr(), other.len() as u64),
        &[Error::InvalidUri, Error::PermissionDenied],
        "rename to another scheme",
    )?;
    remove(&f)
}

fn file_delete_keeps_handle(ctx: &Ctx) -> R {
    let uri = ctx.scratch_path("del")?;
    let f = open(&uri, RW, create::CREATE_NEW, 0)?;
    write_at(&f, 0, b"still here")?;
    err(
        p().dk_stream_delete(f.0, delete::READ_SIDE),
        Error::InvalidArgument,
        "delete READ_SIDE of a file",
    )?;
    err(
        p().dk_stream_delete(f.0, 7),
        Error::InvalidArgument,
        "delete which=7",
    )?;
    remove(&f)?;
    let mut attrs = StreamAttributes::default();
    err(
        p().dk_stream_attributes_query(uri.as_ptr(), uri.len() as u64, &mut attrs),
        Error::NotFound,
        "attributes after delete",
    )?;
    ensure!(
        read_at(&f, 0, 20)? == b"still here",
        "handle unusable after delete"
    );
    err(
        p().dk_stream_delete(f.0, delete::ALL),
        Error::NotFound,
        "delete twice",
    )
}

fn file_read_only_access(ctx: &Ctx) -> R {
    let uri = ctx.scratch_path("ro")?;
    let f = open(&uri, RW, create::CREATE_NEW, 0)?;
    write_at(&f, 0, b"ro")?;
    let r = open(&uri, access::READ, create::OPEN_EXISTING, 0)?;
    let w = open(&uri, access::WRITE, create::OPEN_EXISTING, 0)?;
    let pd = Error::PermissionDenied;
    err(
        p().dk_stream_write(r.0, 0, b"x".as_ptr(), 1),
        pd,
        "write on a READ-only handle",
    )?;
    let mut b = [0u8; 4];
    err(
        p().dk_stream_read(w.0, 0, b.as_mut_ptr(), 4),
        pd,
        "read on a WRITE-only handle",
    )?;
    err(
        p().dk_stream_set_length(r.0, 0),
        pd,
        "set_length on a READ-only handle",
    )?;
    remove(&f)
}

fn dir_create_enumerate_paging(ctx: &Ctx) -> R {
    let dir = ctx.scratch_path("dir")?;
    let d = open(&dir, RW, create::CREATE_NEW, open_option::DIRECTORY)?;
    let a = attrs_h(&d)?;
    ensure!(
        a.kind == stream_kind::DIRECTORY,
        "kind {} (expected DIRECTORY)",
        a.kind
    );
    ensure!(
        attrs_uri(&dir)?.kind == stream_kind::DIRECTORY,
        "by URI: not DIRECTORY"
    );
    let mut want: Vec<String> = Vec::new();
    let mut files = Vec::new();
    for i in 0..25 {
        // Long names so that the 256-byte buffer needs several calls.
        let name = format!("entry-{:02}-padding-padding-padding", i);
        files.push(open(
            &format!("{}/{}", dir, name),
            RW,
            create::CREATE_NEW,
            0,
        )?);
        want.push(name);
    }
    let sub = open(
        &format!("{}/sub", dir),
        RW,
        create::CREATE_NEW,
        open_option::DIRECTORY,
    )?;
    want.push(String::from("sub/"));
    let mut got: Vec<String> = Vec::new();
    let mut cursor = 0u64;
    let mut buf = [0u8; 256];
    let mut calls = 0;
    loop {
        let n = ok(
            p().dk_stream_enumerate_children(d.0, buf.as_mut_ptr(), 256, &mut cursor),
            "DkStreamEnumerateChildren",
        )?;
        if n == 0 {
            break;
        }
        calls += 1;
        ensure!(calls < 100, "enumeration does not end (cursor {})", cursor);
        ensure!(n <= 256, "returned {} > 256 bytes", n);
        let chunk = &buf[..n as usize];
        ensure!(chunk.last() == Some(&0), "names not NUL-terminated");
        for name in chunk.split(|&c| c == 0).filter(|s| !s.is_empty()) {
            got.push(String::from_utf8_lossy(name).into_owned());
        }
    }
    ensure!(calls >= 2, "25 long names fit in one 256-byte call?");
    got.sort();
    want.sort();
    ensure!(got == want, "listed {:?}, expected {:?}", got, want);
    err(
        p().dk_stream_enumerate_children(d.0, buf.as_mut_ptr(), 255, &mut cursor),
        Error::InvalidArgument,
        "enumerate with a 255-byte buffer",
    )?;
    err(
        p().dk_stream_enumerate_children(d.0, buf.as_mut_ptr(), 256, core::ptr::null_mut()),
        Error::BadAddress,
        "enumerate with a null cursor",
    )?;
    // A non-empty directory cannot be deleted.
    err(
        p().dk_stream_delete(d.0, delete::ALL),
        Error::DirectoryNotEmpty,
        "delete a non-empty directory",
    )?;
    for f in &files {
        remove(f)?;
    }
    remove(&sub)?;
    remove(&d)
}

fn dir_errors(ctx: &Ctx) -> R {
    let dir = ctx.scratch_path("dirx")?;
    let d = open(&dir, RW, create::CREATE_NEW, open_option::DIRECTORY)?;
    let mut h = 0u64;
    err(
        p().dk_stream_open(
            dir.as_ptr(),
            dir.len() as u64,
            RW,
            create::CREATE_NEW,
            open_option::DIRECTORY,
            &mut h,
        ),
        Error::AlreadyExists,
        "CREATE_NEW directory that exists",
    )?;
    let mut b = [0u8; 16];
    err(
        p().dk_stream_read(d.0, 0, b.as_mut_ptr(), 16),
        Error::IsDirectory,
        "read a directory",
    )?;
    err(
        p().dk_stream_write(d.0, 0, b.as_ptr(), 16),
        Error::IsDirectory,
        "write a directory",
    )?;
    let file = format!("{}/f", dir);
    let f = open(&file, RW, create::CREATE_NEW, 0)?;
    let mut cursor = 0u64;
    let mut buf = [0u8; 256];
    err(
        p().dk_stream_enumerate_children(f.0, buf.as_mut_ptr(), 256, &mut cursor),
        Error::NotDirectory,
        "enumerate a file",
    )?;
    err(
        p().dk_stream_open(
            file.as_ptr(),
            file.len() as u64,
            access::READ,
            create::OPEN_EXISTING,
            open_option::DIRECTORY,
            &mut h,
        ),
        Error::NotDirectory,
        "open a file with DIRECTORY",
    )?;
    let under = format!("{}/f/x", dir);
    err_any(
        p().dk_stream_open(
            under.as_ptr(),
            under.len() as u64,
            RW,
            create::CREATE_NEW,
            0,
            &mut h,
        ),
        &[Error::NotDirectory, Error::NotFound],
        "create under a file",
    )?;
    remove(&f)?;
    remove(&d)
}

fn file_map_read_only(ctx: &Ctx) -> R {
    let uri = ctx.scratch_path("map")?;
    let f = open(&uri, RW, create::CREATE_NEW, 0)?;
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + i / 256) as u8).collect();
    write_at(&f, 0, &data)?;
    drop(f);
    let r = open(&uri, access::READ, create::OPEN_EXISTING, 0)?;
    let a = ok(
        p().dk_stream_map(r.0, 0, prot::READ, 0, 8192),
        "map 2 pages read-only",
    )?;
    ensure!(a % 4096 == 0 && a != 0, "mapping at {:#x}", a);
    // SAFETY: the host mapped 8192 readable bytes at `a`.
    let m = unsafe { core::slice::from_raw_parts(a as *const u8, 8192) };
    ensure!(m == &data[..], "mapped bytes differ from the file");
    ok(p().dk_stream_unmap(a, 8192), "unmap")?;
    let b = ok(
        p().dk_stream_map(r.0, 0, prot::READ, 4096, 4096),
        "map the second page",
    )?;
    // SAFETY: 4096 readable bytes at `b`.
    let m = unsafe { core::slice::from_raw_parts(b as *const u8, 4096) };
    ensure!(m == &data[4096..], "second page differs");
    ok(p().dk_stream_unmap(b, 4096), "unmap")?;
    err(
        p().dk_stream_unmap(b, 4096),
        Error::BadAddress,
        "unmap twice",
    )?;
    let ia = Error::InvalidArgument;
    err(
        p().dk_stream_map(r.0, 0, prot::READ, 100, 4096),
        ia,
        "map at an unaligned offset",
    )?;
    err(
        p().dk_stream_map(r.0, 0, prot::READ, 0, 0),
        ia,
        "map size 0",
    )?;
    err(
        p().dk_stream_map(r.0, 0, prot::READ, 0, 100),
        ia,
        "map unaligned size",
    )?;
    err(
        p().dk_stream_map(r.0, 0, prot::WRITE | prot::EXEC, 0, 4096),
        ia,
        "map W|X",
    )?;
    err(
        p().dk_stream_map(r.0, 0, prot::READ | prot::WRITE, 0, 4096),
        Error::PermissionDenied,
        "map writable from a READ-only stream",
    )?;
    let null = open("null:", RW, create::OPEN_EXISTING, 0)?;
    err_any(
        p().dk_stream_map(null.0, 0, prot::READ, 0, 4096),
        &[Error::WrongHandleKind, Error::InvalidArgument],
        "map null:",
    )?;
    let f = open(&uri, RW, create::OPEN_EXISTING, 0)?;
    remove(&f)
}

fn file_map_pe_binary(ctx: &Ctx) -> R {
    let Some(image) = ctx.exit_image.as_deref() else {
        super::skip!("no exit-code image given");
    };
    // A stream that is no ELF image.
    if let Ok(uri) = ctx.scratch_path("notelf") {
        let g = open(&uri, RW, create::CREATE_NEW, 0)?;
        write_at(&g, 0, &[0x42u8; 4096])?;
        let mut info = moat_libos::ImageInfo::default();
        err(
            p().dk_stream_map_pe_binary(g.0, &mut info),
            Error::InvalidArgument,
            "DkStreamMapPeBinary of a non-ELF file",
        )?;
        remove(&g)?;
    }
    let f = open(image, access::READ, create::OPEN_EXISTING, 0)?;
    let mut info = moat_libos::ImageInfo::default();
    // The exit-code image is linked at 0x10000000, away from this one.
    let r = p().dk_stream_map_pe_binary(f.0, &mut info);
    ok(r, "DkStreamMapPeBinary")?;
    // Mapping it a second time overlaps the first mapping.
    let mut again = moat_libos::ImageInfo::default();
    err(
        p().dk_stream_map_pe_binary(f.0, &mut again),
        Error::AlreadyExists,
        "DkStreamMapPeBinary over a mapped image",
    )?;
    ensure!(
        info.base != 0 && info.size != 0,
        "base {:#x} size {:#x}",
        info.base,
        info.size
    );
    ensure!(
        info.entry >= info.base && info.entry < info.base + info.size,
        "entry {:#x} outside [{:#x}, +{:#x})",
        info.entry,
        info.base,
        info.size
    );
    // The entry point is mapped (readable: code segments are R|X).
    // SAFETY: the host mapped the segment holding the entry point.
    let _ = unsafe { (info.entry as *const u8).read_volatile() };
    let size = (info.size + 4095) & !4095;
    ok(p().dk_stream_unmap(info.base, size), "unmap the image")?;
    Ok(())
}
