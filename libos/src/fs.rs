//! File helpers over [`Stream`].
use alloc::string::String;
use alloc::vec::Vec;

use moat_pal::{access, create, delete, open_option, StreamAttributes};

use crate::io::Read;
use crate::stream::Stream;
use crate::{raw, Result};

/// The whole content of a file.
pub fn read_to_vec(uri: &str) -> Result<Vec<u8>> {
    let mut s = Stream::open_read(uri)?;
    let mut v = Vec::new();
    s.read_to_end(&mut v)?;
    Ok(v)
}

/// Create or truncate a file and write `bytes` to it.
pub fn write(uri: &str, bytes: &[u8]) -> Result<()> {
    let s = Stream::open(uri, access::WRITE, create::CREATE_ALWAYS, 0)?;
    s.write_all_at(0, bytes)
}

/// Create a new directory (`AlreadyExists` if it exists).
pub fn create_dir(uri: &str) -> Result<()> {
    Stream::open(
        uri,
        access::READ | access::WRITE,
        create::CREATE_NEW,
        open_option::DIRECTORY,
    )
    .map(drop)
}

/// The names in a directory (directories end in `/`).
pub fn read_dir(uri: &str) -> Result<Vec<String>> {
    Stream::open_dir(uri)?.children()
}

/// Remove a file.
pub fn remove_file(uri: &str) -> Result<()> {
    Stream::open(uri, access::WRITE, create::OPEN_EXISTING, 0)?.delete(delete::ALL)
}

/// Remove an empty directory.
pub fn remove_dir(uri: &str) -> Result<()> {
    Stream::open(
        uri,
        access::WRITE,
        create::OPEN_EXISTING,
        open_option::DIRECTORY,
    )?
    .delete(delete::ALL)
}

/// Attributes of the stream `uri` names (DkStreamAttributesQuery).
pub fn attributes(uri: &str) -> Result<StreamAttributes> {
    raw::stream_attributes_query(uri)
}
