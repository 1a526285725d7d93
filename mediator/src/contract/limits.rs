//! What a contract allows and what a block device is: the limits chosen
//! when a service is set up ([`ContractLimits`]), the geometry a block
//! driver reports in its INFO handshake ([`Geometry`]) and what can be
//! wrong with that report ([`InfoProblem`]).

use std::fmt;
use std::time::Duration;

use moat_service_proto::MAX_PAYLOAD;

/// Payload bytes of the answer to a block INFO request: the capacity in
/// bytes, then the block size, both `u64` little-endian.
pub const INFO_LEN: u32 = 16;
/// The smallest block size a block driver may report.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// The largest block size a block driver may report.
pub const MAX_BLOCK_SIZE: u32 = 65536;
/// The largest capacity a block driver may report (256 TiB).
pub const MAX_CAPACITY: u64 = 1 << 48;

/// What a contract allows, chosen by whoever sets the service up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContractLimits {
    /// The most bytes one request may move (a block read or write, the
    /// bytes of a char read or write, a generic call's request). At most
    /// [`MAX_PAYLOAD`]; a larger value is lowered to it.
    pub max_io: u32,
    /// How long the driver has to answer a request (the caller of
    /// [`BlockContract::info_request`](super::BlockContract::info_request) gives the INFO answer as long).
    pub deadline: Duration,
    /// The most requests in flight at once; a further request is refused
    /// with [`ClientError::Busy`](super::ClientError::Busy). At least 1; 0 is raised to 1.
    pub max_in_flight: usize,
}

impl ContractLimits {
    /// These limits as a contract applies them: `max_io` at most
    /// [`MAX_PAYLOAD`] and `max_in_flight` at least 1.
    pub fn effective(self) -> ContractLimits {
        ContractLimits {
            max_io: self.max_io.min(MAX_PAYLOAD),
            deadline: self.deadline,
            max_in_flight: self.max_in_flight.max(1),
        }
    }
}

impl Default for ContractLimits {
    /// 128 KiB per request, 5 seconds to answer, 32 requests in flight.
    fn default() -> ContractLimits {
        ContractLimits {
            max_io: 128 << 10,
            deadline: Duration::from_secs(5),
            max_in_flight: 32,
        }
    }
}

/// The size of a block device, as its driver reports it in the INFO
/// handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Bytes: a non-zero multiple of `block_size`, at most [`MAX_CAPACITY`].
    pub capacity: u64,
    /// Bytes per block: a power of two from [`MIN_BLOCK_SIZE`] to
    /// [`MAX_BLOCK_SIZE`].
    pub block_size: u32,
}

impl Geometry {
    /// Checks a capacity and block size against the contract.
    pub fn new(capacity: u64, block_size: u64) -> Result<Geometry, InfoProblem> {
        let bs = match u32::try_from(block_size) {
            Ok(bs) if bs.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) => bs,
            _ => return Err(InfoProblem::BlockSize(block_size)),
        };
        if capacity == 0 || capacity > MAX_CAPACITY || !capacity.is_multiple_of(block_size) {
            return Err(InfoProblem::Capacity {
                capacity,
                block_size,
            });
        }
        Ok(Geometry {
            capacity,
            block_size: bs,
        })
    }

    /// Parses and checks the 16 payload bytes of an INFO answer.
    pub fn parse(payload: &[u8; INFO_LEN as usize]) -> Result<Geometry, InfoProblem> {
        let mut capacity = [0u8; 8];
        let mut block_size = [0u8; 8];
        capacity.copy_from_slice(&payload[..8]);
        block_size.copy_from_slice(&payload[8..]);
        Geometry::new(u64::from_le_bytes(capacity), u64::from_le_bytes(block_size))
    }

    /// The 16 payload bytes of an INFO answer reporting this geometry (what
    /// a driver sends).
    pub fn encode(&self) -> [u8; INFO_LEN as usize] {
        let mut b = [0u8; INFO_LEN as usize];
        b[..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..].copy_from_slice(&u64::from(self.block_size).to_le_bytes());
        b
    }

    /// The number of blocks.
    pub fn blocks(&self) -> u64 {
        // block_size is never 0 in a checked geometry; checked_div keeps
        // a hand-built one from panicking.
        self.capacity
            .checked_div(u64::from(self.block_size))
            .unwrap_or(0)
    }
}

impl fmt::Display for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes in blocks of {} bytes",
            self.capacity, self.block_size
        )
    }
}

/// What is wrong with a block driver's answer to INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InfoProblem {
    /// The driver answered INFO with a failure status (block: instead of
    /// the device's geometry; char: instead of saying it is up).
    #[error("the driver answers INFO with failure (status {0}) instead of describing its device")]
    Failed(u8),
    /// The payload handed over does not have the 16 bytes the header
    /// announced (the driver's stream ended early).
    #[error("the answer carries {got} payload bytes where its header announced 16")]
    Payload {
        /// Bytes handed over.
        got: usize,
    },
    /// The block size is not a power of two from 512 to 65536.
    #[error("block size {0} is not a power of two from 512 to 65536")]
    BlockSize(u64),
    /// The capacity is 0, over 2^48, or not a multiple of the block size.
    #[error(
        "capacity {capacity} is not a non-zero multiple of the block size {block_size} \
         of at most 2^48 bytes"
    )]
    Capacity {
        /// Reported capacity in bytes.
        capacity: u64,
        /// Reported block size in bytes.
        block_size: u64,
    },
}
