/* The blkif ring ABI as a guest of a given architecture lays it out: build.rs
 * runs bindgen over this for the i686 and x86_64 targets, and the ABI tests
 * check the offsets in src/xen/ring.rs against the layout clang computed. */
#include <stdint.h>
#include <xen/io/blkif.h>
