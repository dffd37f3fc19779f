//! The blkif ring ABIs. A frontend names its ABI in the `protocol` xenstore
//! node ("x86_32-abi", "x86_64-abi"; absent means the backend's native one,
//! as in qemu's xen-block). The ABIs differ only in where `uint64_t` fields
//! are aligned (4 bytes on i386, 8 elsewhere), so each is a table of byte
//! offsets into a ring entry; nothing here depends on the host's struct
//! layout, and all fields are little-endian.

use std::fmt;

/// One of the three ring ABIs a frontend may speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlkifAbi {
    /// The backend's own ABI (no `protocol` node).
    Native,
    /// `x86_32-abi`: a 32-bit x86 guest on a 64-bit backend.
    X86_32,
    /// `x86_64-abi`.
    X86_64,
}

/// The frontend wrote a `protocol` this backend does not know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownProtocol(pub String);

impl fmt::Display for UnknownProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown blkif protocol {:?}", self.0)
    }
}

impl std::error::Error for UnknownProtocol {}

/// The `protocol` value of the x86_32 ABI.
pub const PROTOCOL_X86_32: &str = "x86_32-abi";
/// The `protocol` value of the x86_64 ABI.
pub const PROTOCOL_X86_64: &str = "x86_64-abi";

impl BlkifAbi {
    /// The ABI named by the frontend's `protocol` node (`None` if absent).
    pub fn from_protocol(protocol: Option<&str>) -> Result<Self, UnknownProtocol> {
        match protocol.map(|p| p.trim_end_matches('\0')) {
            None | Some("") => Ok(BlkifAbi::Native),
            Some(PROTOCOL_X86_32) => Ok(BlkifAbi::X86_32),
            Some(PROTOCOL_X86_64) => Ok(BlkifAbi::X86_64),
            Some(other) => Err(UnknownProtocol(other.to_string())),
        }
    }

    /// Byte offsets and sizes of the ring structures in this ABI.
    pub fn layout(self) -> &'static AbiLayout {
        match self {
            BlkifAbi::Native => &NATIVE_LAYOUT,
            BlkifAbi::X86_32 => &X86_32_LAYOUT,
            BlkifAbi::X86_64 => &X86_64_LAYOUT,
        }
    }
}

/// Where each field lives in one ABI. Offsets common to all ABIs are
/// constants below (`OPERATION`, `NR_SEGMENTS`, ...).
#[derive(Debug, PartialEq, Eq)]
pub struct AbiLayout {
    /// `sizeof(union blkif_sring_entry)`: the ring slot stride.
    pub entry_size: usize,
    /// `sizeof(struct blkif_request)`.
    pub request_size: usize,
    /// Offset of `id` (the same in every request kind).
    pub id: usize,
    /// Offset of `sector_number` in read/write/barrier/flush/discard requests.
    pub sector_number: usize,
    /// Offset of `seg[]` in `blkif_request`.
    pub seg: usize,
    /// Offset of `nr_sectors` in `blkif_request_discard`.
    pub discard_nr_sectors: usize,
    /// `sizeof(struct blkif_request_discard)`.
    pub discard_size: usize,
    /// Offset of `sector_number` in `blkif_request_indirect`.
    pub indirect_sector_number: usize,
    /// Offset of `handle` in `blkif_request_indirect`.
    pub indirect_handle: usize,
    /// Offset of `indirect_grefs[]` in `blkif_request_indirect`.
    pub indirect_grefs: usize,
    /// `sizeof(struct blkif_request_indirect)`.
    pub indirect_size: usize,
    /// `sizeof(struct blkif_response)`.
    pub response_size: usize,
    /// Offset of `operation` in `blkif_response`.
    pub rsp_operation: usize,
    /// Offset of `status` in `blkif_response`.
    pub rsp_status: usize,
}

/// Offset of `operation` in every request.
pub const OPERATION: usize = 0;
/// Offset of `nr_segments` (u8) in `blkif_request`.
pub const NR_SEGMENTS: usize = 1;
/// Offset of `handle` (u16) in `blkif_request` and `blkif_request_discard`.
pub const HANDLE: usize = 2;
/// Offset of `flag` in `blkif_request_discard`.
pub const DISCARD_FLAG: usize = 1;
/// Offset of `indirect_op` in `blkif_request_indirect`.
pub const INDIRECT_OP: usize = 1;
/// Offset of `nr_segments` (u16) in `blkif_request_indirect`.
pub const INDIRECT_NR_SEGMENTS: usize = 2;
/// Offset of `id` in `blkif_response` (all ABIs).
pub const RSP_ID: usize = 0;
/// `sizeof(struct blkif_request_segment)` and its field offsets.
pub const SEGMENT_SIZE: usize = 8;
/// Offset of `gref` in `blkif_request_segment`.
pub const SEGMENT_GREF: usize = 0;
/// Offset of `first_sect` in `blkif_request_segment`.
pub const SEGMENT_FIRST_SECT: usize = 4;
/// Offset of `last_sect` in `blkif_request_segment`.
pub const SEGMENT_LAST_SECT: usize = 5;
/// The largest `request_size` of any ABI: the size of a copied-out request.
pub const MAX_REQUEST_SIZE: usize = 112;

/// i386: `uint64_t` is 4-byte aligned.
pub const X86_32_LAYOUT: AbiLayout = AbiLayout {
    entry_size: 108,
    request_size: 108,
    id: 4,
    sector_number: 12,
    seg: 20,
    discard_nr_sectors: 20,
    discard_size: 28,
    indirect_sector_number: 12,
    indirect_handle: 20,
    indirect_grefs: 24,
    indirect_size: 64,
    response_size: 12,
    rsp_operation: 8,
    rsp_status: 10,
};

/// x86_64 (and every ABI with 8-byte aligned `uint64_t`, such as Arm's).
pub const X86_64_LAYOUT: AbiLayout = AbiLayout {
    entry_size: 112,
    request_size: 112,
    id: 8,
    sector_number: 16,
    seg: 24,
    discard_nr_sectors: 24,
    discard_size: 32,
    indirect_sector_number: 16,
    indirect_handle: 24,
    indirect_grefs: 28,
    indirect_size: 64,
    response_size: 16,
    rsp_operation: 8,
    rsp_status: 10,
};

/// The layout this backend's own C compiler would use.
#[cfg(target_arch = "x86")]
pub const NATIVE_LAYOUT: AbiLayout = X86_32_LAYOUT;
/// The layout this backend's own C compiler would use.
#[cfg(not(target_arch = "x86"))]
pub const NATIVE_LAYOUT: AbiLayout = X86_64_LAYOUT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_node_selects_the_abi_like_qemu_xen_block() {
        assert_eq!(BlkifAbi::from_protocol(None), Ok(BlkifAbi::Native));
        assert_eq!(
            BlkifAbi::from_protocol(Some("x86_32-abi")),
            Ok(BlkifAbi::X86_32)
        );
        assert_eq!(
            BlkifAbi::from_protocol(Some("x86_64-abi\0")),
            Ok(BlkifAbi::X86_64)
        );
        assert!(BlkifAbi::from_protocol(Some("sparc-abi")).is_err());
    }

    #[test]
    fn largest_request_fits_max_request_size() {
        for abi in [BlkifAbi::Native, BlkifAbi::X86_32, BlkifAbi::X86_64] {
            let l = abi.layout();
            assert!(l.request_size <= MAX_REQUEST_SIZE);
            assert!(l.entry_size >= l.request_size.max(l.response_size));
            assert!(l.indirect_size <= l.entry_size && l.discard_size <= l.entry_size);
            assert_eq!(l.seg + 11 * SEGMENT_SIZE, l.request_size);
        }
    }
}
