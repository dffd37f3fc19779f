//! The checker itself: it flags a stale block, a stale read, and keeps a
//! sector to what the guest saw once an uncertain write was read.

use blkshim::sim::checker::{Checker, Violation};
use blkshim::sim::payload::{encode, Content};

fn medium(contents: &[Option<u64>]) -> Vec<u8> {
    let mut m = vec![0u8; contents.len() * 512];
    for (i, c) in contents.iter().enumerate() {
        if let Some(id) = c {
            encode(&mut m[i * 512..(i + 1) * 512], i as u64, *id);
        }
    }
    m
}

#[test]
fn stale_block_is_a_violation() {
    let mut c = Checker::new(2);
    c.completed(0, Content::Write(1));
    c.completed(0, Content::Write(2)); // A' completed after A
    c.final_check(&medium(&[Some(1), None])); // ...but A landed last
    assert_eq!(
        c.violations,
        vec![Violation::FinalMismatch {
            sector: 0,
            got: Content::Write(1),
            allowed: vec![Content::Write(2)],
        }]
    );
}

#[test]
fn matching_medium_passes() {
    let mut c = Checker::new(3);
    c.completed(1, Content::Write(7));
    c.completed(2, Content::Zero);
    c.final_check(&medium(&[None, Some(7), None]));
    assert!(c.violations.is_empty());
}

#[test]
fn uncertain_write_narrows_to_what_was_read() {
    let mut c = Checker::new(1);
    c.completed(0, Content::Write(1));
    c.maybe(0, Content::Write(2)); // in flight at a crash
    c.read(10, 0, Content::Write(1)); // the guest saw the old data
                                      // The crashed write landing afterwards is a stale write.
    c.final_check(&medium(&[Some(2)]));
    assert_eq!(c.violations.len(), 1);
}

#[test]
fn stale_read_is_a_violation() {
    let mut c = Checker::new(1);
    c.completed(0, Content::Write(3));
    c.read(5, 0, Content::Zero);
    assert!(matches!(
        c.violations[..],
        [Violation::StaleRead {
            sector: 0,
            got: Content::Zero,
            ..
        }]
    ));
}
