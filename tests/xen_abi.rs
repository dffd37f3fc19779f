//! The byte-offset tables in `blkshim::xen::abi` against the layouts a C
//! compiler gives the Xen headers: the native ABI against the bindgen'd
//! structs (via `offset_of!`), and the x86_32 / x86_64 ABIs against the
//! layout assertions bindgen wrote when it ran clang for i686 and x86_64.

use blkshim::xen::abi::{self, AbiLayout, BlkifAbi};
use blkshim::xen::ring::RING_HEADER_SIZE;
use blkshim::xen::sys;
use std::mem::{offset_of, size_of};

/// A size or offset clang computed, read from bindgen's layout assertion
/// `["<what>"][... - <n>usize]` (whitespace- and trailing-comma-insensitive).
fn clang_says(bindings: &str, what: &str) -> usize {
    let text: String = bindings.chars().filter(|c| !c.is_whitespace()).collect();
    let key = format!("\"{}\"", what.replace(' ', ""));
    let at = text
        .find(&key)
        .unwrap_or_else(|| panic!("no layout assertion for {what:?}"));
    let rest = &text[at + key.len()..];
    let end = rest.find("usize]").expect("assertion ends in usize]");
    let expr = &rest[..end];
    let minus = expr.rfind('-').expect("assertion subtracts the C value");
    expr[minus + 1..].parse().expect("C value is a number")
}

fn check_against_clang(layout: &AbiLayout, bindings: &str) {
    let size = |s: &str| clang_says(bindings, &format!("Size of {s}"));
    let off = |s: &str| clang_says(bindings, &format!("Offset of field: {s}"));
    assert_eq!(layout.entry_size, size("blkif_sring_entry"));
    assert_eq!(layout.request_size, size("blkif_request"));
    assert_eq!(layout.discard_size, size("blkif_request_discard"));
    assert_eq!(layout.indirect_size, size("blkif_request_indirect"));
    assert_eq!(layout.response_size, size("blkif_response"));
    assert_eq!(abi::SEGMENT_SIZE, size("blkif_request_segment"));

    assert_eq!(abi::OPERATION, off("blkif_request::operation"));
    assert_eq!(abi::NR_SEGMENTS, off("blkif_request::nr_segments"));
    assert_eq!(abi::HANDLE, off("blkif_request::handle"));
    assert_eq!(layout.id, off("blkif_request::id"));
    assert_eq!(layout.sector_number, off("blkif_request::sector_number"));
    assert_eq!(layout.seg, off("blkif_request::seg"));

    assert_eq!(abi::OPERATION, off("blkif_request_discard::operation"));
    assert_eq!(abi::DISCARD_FLAG, off("blkif_request_discard::flag"));
    assert_eq!(abi::HANDLE, off("blkif_request_discard::handle"));
    assert_eq!(layout.id, off("blkif_request_discard::id"));
    assert_eq!(
        layout.sector_number,
        off("blkif_request_discard::sector_number")
    );
    assert_eq!(
        layout.discard_nr_sectors,
        off("blkif_request_discard::nr_sectors")
    );

    assert_eq!(abi::OPERATION, off("blkif_request_indirect::operation"));
    assert_eq!(abi::INDIRECT_OP, off("blkif_request_indirect::indirect_op"));
    assert_eq!(
        abi::INDIRECT_NR_SEGMENTS,
        off("blkif_request_indirect::nr_segments")
    );
    assert_eq!(layout.id, off("blkif_request_indirect::id"));
    assert_eq!(
        layout.indirect_sector_number,
        off("blkif_request_indirect::sector_number")
    );
    assert_eq!(
        layout.indirect_handle,
        off("blkif_request_indirect::handle")
    );
    assert_eq!(
        layout.indirect_grefs,
        off("blkif_request_indirect::indirect_grefs")
    );

    assert_eq!(abi::SEGMENT_GREF, off("blkif_request_segment::gref"));
    assert_eq!(
        abi::SEGMENT_FIRST_SECT,
        off("blkif_request_segment::first_sect")
    );
    assert_eq!(
        abi::SEGMENT_LAST_SECT,
        off("blkif_request_segment::last_sect")
    );

    assert_eq!(abi::RSP_ID, off("blkif_response::id"));
    assert_eq!(layout.rsp_operation, off("blkif_response::operation"));
    assert_eq!(layout.rsp_status, off("blkif_response::status"));

    assert_eq!(RING_HEADER_SIZE, off("blkif_sring::ring"));
    assert_eq!(0, off("blkif_sring::req_prod"));
    assert_eq!(4, off("blkif_sring::req_event"));
    assert_eq!(8, off("blkif_sring::rsp_prod"));
    assert_eq!(12, off("blkif_sring::rsp_event"));
}

#[test]
fn x86_32_abi_matches_clang_for_i686() {
    check_against_clang(BlkifAbi::X86_32.layout(), sys::X86_32_BLKIF_BINDINGS);
    // The i386 quirk the whole ABI split exists for: id right after handle.
    assert_eq!(BlkifAbi::X86_32.layout().id, 4);
}

#[test]
fn x86_64_abi_matches_clang_for_x86_64() {
    check_against_clang(BlkifAbi::X86_64.layout(), sys::X86_64_BLKIF_BINDINGS);
}

#[test]
fn native_abi_matches_the_bindgen_structs() {
    let l = BlkifAbi::Native.layout();
    assert_eq!(l.entry_size, size_of::<sys::blkif_sring_entry>());
    assert_eq!(l.request_size, size_of::<sys::blkif_request>());
    assert_eq!(l.id, offset_of!(sys::blkif_request, id));
    assert_eq!(
        l.sector_number,
        offset_of!(sys::blkif_request, sector_number)
    );
    assert_eq!(l.seg, offset_of!(sys::blkif_request, seg));
    assert_eq!(
        abi::NR_SEGMENTS,
        offset_of!(sys::blkif_request, nr_segments)
    );
    assert_eq!(abi::HANDLE, offset_of!(sys::blkif_request, handle));
    assert_eq!(l.discard_size, size_of::<sys::blkif_request_discard>());
    assert_eq!(l.id, offset_of!(sys::blkif_request_discard, id));
    assert_eq!(
        l.discard_nr_sectors,
        offset_of!(sys::blkif_request_discard, nr_sectors)
    );
    assert_eq!(
        abi::DISCARD_FLAG,
        offset_of!(sys::blkif_request_discard, flag)
    );
    assert_eq!(l.indirect_size, size_of::<sys::blkif_request_indirect>());
    assert_eq!(l.id, offset_of!(sys::blkif_request_indirect, id));
    assert_eq!(
        l.indirect_sector_number,
        offset_of!(sys::blkif_request_indirect, sector_number)
    );
    assert_eq!(
        l.indirect_handle,
        offset_of!(sys::blkif_request_indirect, handle)
    );
    assert_eq!(
        l.indirect_grefs,
        offset_of!(sys::blkif_request_indirect, indirect_grefs)
    );
    assert_eq!(
        abi::INDIRECT_NR_SEGMENTS,
        offset_of!(sys::blkif_request_indirect, nr_segments)
    );
    assert_eq!(l.response_size, size_of::<sys::blkif_response>());
    assert_eq!(l.rsp_operation, offset_of!(sys::blkif_response, operation));
    assert_eq!(l.rsp_status, offset_of!(sys::blkif_response, status));
    assert_eq!(abi::SEGMENT_SIZE, size_of::<sys::blkif_request_segment>());
    assert_eq!(
        abi::SEGMENT_LAST_SECT,
        offset_of!(sys::blkif_request_segment, last_sect)
    );
    assert_eq!(RING_HEADER_SIZE, offset_of!(sys::blkif_sring, ring));
    assert_eq!(
        abi::MAX_REQUEST_SIZE,
        size_of::<sys::blkif_request>().max(BlkifAbi::X86_64.layout().request_size)
    );
}

#[test]
fn layout_reader_rejects_what_it_cannot_find() {
    let r = std::panic::catch_unwind(|| clang_says(sys::X86_32_BLKIF_BINDINGS, "Size of nothing"));
    assert!(r.is_err());
}
