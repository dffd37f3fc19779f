//! The blkif fuzz entry over a large deterministic pseudo-random corpus, so
//! stable-Rust CI exercises it without cargo-fuzz: random bytes, well-formed
//! rings of random requests, those with a few bytes flipped, and hostile
//! producer indexes. Nothing may panic, and the corpus must reach every
//! outcome (accepted direct and indirect requests, refusals, broken rings),
//! or it proves little.

use blkshim::sim::rng::SimRng;
use blkshim::xen::abi::BlkifAbi;
use blkshim::xen::blkif::{encode, Segment, OP_INDIRECT};
use blkshim::xen::fuzz::{run, FuzzOutcome, FUZZ_HEADER_LEN};
use blkshim::xen::ring::{ring_size, RING_HEADER_SIZE};
use blkshim::xen::{fuzz_blkif_request, PAGE_SIZE};

/// A segment that is invalid about once in `one_bad_in` draws (never for 0).
fn segment(rng: &mut SimRng, one_bad_in: u64) -> Segment {
    let first = rng.below(8) as u8;
    let last = if one_bad_in != 0 && rng.below(one_bad_in) == 0 {
        rng.next_u64() as u8
    } else {
        first + rng.below(u64::from(8 - first)) as u8
    };
    Segment {
        gref: rng.next_u64() as u32,
        first_sect: first,
        last_sect: last,
    }
}

/// A header plus a ring of random, mostly well-formed requests and the
/// indirect pages they may need.
fn structured(rng: &mut SimRng, hostile_prod: bool) -> Vec<u8> {
    let abi_byte = rng.below(3) as u8;
    let abi = [BlkifAbi::Native, BlkifAbi::X86_32, BlkifAbi::X86_64][abi_byte as usize];
    let flags = rng.next_u64() as u8;
    let pages = if flags & 0x40 != 0 { 2 } else { 1 };
    let size = ring_size(abi, pages);
    let max_indirect: u16 = rng.pick(&[0, 11, 32, 256, 1024, 4096, u16::MAX]);
    let disk_sectors: u64 = rng.pick(&[0, 8, 1 << 11, 1 << 21, 1 << 40, u64::MAX]);
    let count = rng.below(u64::from(size) + 1) as u32;
    let prod_offset = if hostile_prod {
        {
            let r = rng.next_u64() as u32;
            rng.pick(&[size + 1, size + 2, u32::MAX, 0x8000_0000, r])
        }
    } else {
        count
    };
    let r = rng.next_u64() as u32;
    let start: u32 = rng.pick(&[0, 1, u32::MAX - 3, r]);

    let mut data = vec![abi_byte, flags];
    data.extend_from_slice(&max_indirect.to_le_bytes());
    data.extend_from_slice(&disk_sectors.to_le_bytes());
    data.extend_from_slice(&prod_offset.to_le_bytes());
    data.extend_from_slice(&start.to_le_bytes());
    assert_eq!(data.len(), FUZZ_HEADER_LEN);

    let entry = abi.layout().entry_size;
    let mut ring = vec![0u8; pages * PAGE_SIZE - RING_HEADER_SIZE];
    let nr_indirect = rng.pick(&[1, 11, 12, 100, 512, 513, 600]) + rng.below(3) as usize;
    for j in 0..count {
        let slot = (start.wrapping_add(j) & (size - 1)) as usize;
        let sector = rng.below(disk_sectors.clamp(1, 1 << 22)) & !7;
        let op = rng.pick(&[0u8, 1, 2, 3, 4, 5, 6, 6, 6, 9]);
        let req = match op {
            5 => encode::discard(
                abi,
                u64::from(j),
                0,
                sector,
                rng.below(1 << 12),
                rng.below(2) == 0,
            ),
            OP_INDIRECT => encode::indirect(
                abi,
                rng.pick(&[0u8, 1, 1, 2, 3]),
                u64::from(j),
                0,
                sector,
                nr_indirect as u16,
                &[1, 2],
            ),
            _ => {
                let n = rng.below(13) as usize;
                let segs: Vec<Segment> = (0..n).map(|_| segment(rng, 20)).collect();
                encode::rw(abi, op, u64::from(j), 0, sector, &segs)
            }
        };
        ring[slot * entry..slot * entry + req.len()].copy_from_slice(&req);
    }
    data.extend_from_slice(&ring);
    // Indirect pages: as many as the indirect requests need, or fewer.
    let one_bad_in = rng.pick(&[0, 0, 0, 100]);
    let segs: Vec<Segment> = (0..nr_indirect).map(|_| segment(rng, one_bad_in)).collect();
    let mut pages_bytes: Vec<u8> = encode::indirect_pages(&segs).concat();
    if rng.below(8) == 0 {
        pages_bytes.truncate(rng.below(pages_bytes.len() as u64) as usize);
    }
    data.extend_from_slice(&pages_bytes);
    data
}

fn corpus(n: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut rng = SimRng::new(0x9e37_79b9_7f4a_7c15);
    (0..n).map(move |i| match i % 4 {
        0 => {
            let len = rng.below((FUZZ_HEADER_LEN + 4 * PAGE_SIZE) as u64) as usize;
            (0..len).map(|_| rng.next_u64() as u8).collect()
        }
        1 => structured(&mut rng, false),
        2 => {
            let mut d = structured(&mut rng, false);
            for _ in 0..=rng.below(16) {
                let at = rng.below(d.len() as u64) as usize;
                d[at] = rng.next_u64() as u8;
            }
            d
        }
        _ => structured(&mut rng, true),
    })
}

#[test]
fn fuzz_entry_survives_a_deterministic_corpus() {
    let mut total = FuzzOutcome::default();
    let mut broken_rings = 0;
    for input in corpus(20_000) {
        // `run` is what `fuzz_blkif_request` runs, returning the outcome.
        let o = run(&input);
        total.consumed += o.consumed;
        total.accepted += o.accepted;
        total.accepted_indirect += o.accepted_indirect;
        total.refused += o.refused;
        broken_rings += u32::from(o.bogus_producer);
    }
    eprintln!("corpus outcome: {total:?}, broken rings {broken_rings}");
    assert_eq!(total.consumed, total.accepted + total.refused);
    assert!(total.accepted > 5000, "{total:?}");
    assert!(total.accepted_indirect > 1000, "{total:?}");
    assert!(total.refused > 1000, "{total:?}");
    assert!(broken_rings > 2000, "{broken_rings}");
}

/// `BLKSHIM_FUZZ_SEED_DIR=fuzz/corpus/blkif_request cargo test --test
/// xen_fuzz` writes 200 corpus inputs there as cargo-fuzz seeds.
#[test]
fn write_fuzz_seeds_when_asked() {
    let Some(dir) = std::env::var_os("BLKSHIM_FUZZ_SEED_DIR") else {
        return;
    };
    std::fs::create_dir_all(&dir).unwrap();
    for (i, input) in corpus(200).enumerate() {
        std::fs::write(
            std::path::Path::new(&dir).join(format!("seed-{i:03}")),
            input,
        )
        .unwrap();
    }
}

#[test]
fn fuzz_entry_handles_degenerate_inputs() {
    for input in [
        &[][..],
        &[0u8; 1][..],
        &[0xffu8; FUZZ_HEADER_LEN][..],
        &[0xffu8; FUZZ_HEADER_LEN + 3 * PAGE_SIZE][..],
    ] {
        fuzz_blkif_request(input);
    }
    // All-0xff header: req_prod offset u32::MAX is bogus.
    assert!(run(&[0xffu8; FUZZ_HEADER_LEN + 100]).bogus_producer);
}
