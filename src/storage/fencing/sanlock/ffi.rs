//! Hand-written bindings to `libsanlock_client` (sanlock 3.8, the
//! `sanlock.h`, `sanlock_resource.h` and `sanlock_admin.h` of
//! `libsanlock-dev`): only the calls blkshim makes. The client library is a
//! thin UNIX-socket client of the sanlock daemon, which does all lease I/O;
//! it finds the daemon at `$SANLOCK_RUN_DIR/sanlock.sock` (default
//! `/run/sanlock`). The layouts are asserted at compile time below and
//! against the installed headers by `layout_matches_headers` (a C probe).

use std::os::raw::{c_char, c_int};

pub const SANLK_NAME_LEN: usize = 48;
pub const SANLK_PATH_LEN: usize = 1024;

/// `SANLK_RES_LVER`: the `lver` field is set: acquire only if the lease is
/// at exactly that version.
pub const SANLK_RES_LVER: u32 = 0x1;
/// `SANLK_RESTRICT_SIGTERM`: the daemon kills this client with SIGKILL
/// only, never a SIGTERM a handler could catch and delay.
pub const SANLK_RESTRICT_SIGTERM: u32 = 0x4;
pub const SANLK_RES_ALIGN1M: u32 = 0x10;
pub const SANLK_RES_SECTOR512: u32 = 0x100;
pub const SANLK_LSF_ALIGN1M: u32 = 0x10;
pub const SANLK_LSF_SECTOR512: u32 = 0x100;

/// `struct sanlk_disk`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SanlkDisk {
    pub path: [u8; SANLK_PATH_LEN],
    pub offset: u64,
    pub pad1: u32,
    pub pad2: u32,
}

/// `struct sanlk_resource` followed by exactly one `struct sanlk_disk`
/// (its `disks[0]` flexible array with `num_disks = 1`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SanlkResource1 {
    pub lockspace_name: [u8; SANLK_NAME_LEN],
    pub name: [u8; SANLK_NAME_LEN],
    pub lver: u64,
    pub data64: u64,
    pub data32: u32,
    pub unused: u32,
    pub flags: u32,
    pub num_disks: u32,
    pub disks: [SanlkDisk; 1],
}

/// `struct sanlk_lockspace`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SanlkLockspace {
    pub name: [u8; SANLK_NAME_LEN],
    pub host_id: u64,
    pub flags: u32,
    pub host_id_disk: SanlkDisk,
}

impl SanlkDisk {
    pub fn zeroed() -> SanlkDisk {
        SanlkDisk {
            path: [0; SANLK_PATH_LEN],
            offset: 0,
            pad1: 0,
            pad2: 0,
        }
    }
}

// Offsets and sizes as the C compiler lays the structures out on x86_64
// and aarch64 (LP64): checked here so that a wrong field breaks the build,
// and against the real headers by the test below.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<SanlkDisk>() == 1040);
    assert!(offset_of!(SanlkDisk, offset) == 1024);
    assert!(offset_of!(SanlkResource1, lver) == 96);
    assert!(offset_of!(SanlkResource1, flags) == 120);
    assert!(offset_of!(SanlkResource1, num_disks) == 124);
    assert!(offset_of!(SanlkResource1, disks) == 128);
    assert!(size_of::<SanlkResource1>() == 128 + 1040);
    assert!(offset_of!(SanlkLockspace, host_id) == 48);
    assert!(offset_of!(SanlkLockspace, flags) == 56);
    assert!(offset_of!(SanlkLockspace, host_id_disk) == 64);
    assert!(size_of::<SanlkLockspace>() == 64 + 1040);
};

// Linked by build.rs (`cargo:rustc-link-lib=sanlock_client` with feature
// `sanlock`), like the Xen libraries.
extern "C" {
    pub fn sanlock_register() -> c_int;
    pub fn sanlock_restrict(sock: c_int, flags: u32) -> c_int;
    pub fn sanlock_acquire(
        sock: c_int,
        pid: c_int,
        flags: u32,
        res_count: c_int,
        res_args: *mut *mut SanlkResource1,
        opt_in: *mut std::ffi::c_void,
    ) -> c_int;
    pub fn sanlock_release(
        sock: c_int,
        pid: c_int,
        flags: u32,
        res_count: c_int,
        res_args: *mut *mut SanlkResource1,
    ) -> c_int;
    pub fn sanlock_inquire(
        sock: c_int,
        pid: c_int,
        flags: u32,
        res_count: *mut c_int,
        res_state: *mut *mut c_char,
    ) -> c_int;
    pub fn sanlock_add_lockspace_timeout(
        ls: *mut SanlkLockspace,
        flags: u32,
        io_timeout: u32,
    ) -> c_int;
    pub fn sanlock_write_lockspace(
        ls: *mut SanlkLockspace,
        max_hosts: c_int,
        flags: u32,
        io_timeout: u32,
    ) -> c_int;
    pub fn sanlock_write_resource(
        res: *mut SanlkResource1,
        max_hosts: c_int,
        num_hosts: c_int,
        flags: u32,
    ) -> c_int;
    pub fn sanlock_read_resource(res: *mut SanlkResource1, flags: u32) -> c_int;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// Compile a C probe against the installed sanlock headers and compare
    /// its offsetof/sizeof with the Rust layout. Skips (saying so) when the
    /// headers or a C compiler are missing: the compile-time assertions
    /// above still hold the layout the headers had when this was written.
    #[test]
    fn layout_matches_headers() {
        if !std::path::Path::new("/usr/include/sanlock_resource.h").exists() {
            eprintln!(
                "skipped: no /usr/include/sanlock_resource.h (apt-get install libsanlock-dev)"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("probe.c");
        std::fs::write(
            &src,
            r#"#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <sanlock.h>
#include <sanlock_resource.h>
#include <sanlock_admin.h>
int main(void) {
    printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %d %d %d %d %d %d\n",
        sizeof(struct sanlk_disk), offsetof(struct sanlk_disk, offset),
        offsetof(struct sanlk_resource, lver), offsetof(struct sanlk_resource, flags),
        offsetof(struct sanlk_resource, num_disks), offsetof(struct sanlk_resource, disks),
        sizeof(struct sanlk_resource), offsetof(struct sanlk_lockspace, host_id),
        offsetof(struct sanlk_lockspace, flags), offsetof(struct sanlk_lockspace, host_id_disk),
        sizeof(struct sanlk_lockspace), SANLK_NAME_LEN, SANLK_PATH_LEN, SANLK_RES_LVER,
        SANLK_RES_ALIGN1M | SANLK_RES_SECTOR512, SANLK_LSF_ALIGN1M | SANLK_LSF_SECTOR512, SANLK_RESTRICT_SIGTERM);
    return 0;
}
"#,
        )
        .unwrap();
        let exe = dir.path().join("probe");
        let cc = std::process::Command::new("cc")
            .arg("-o")
            .arg(&exe)
            .arg(&src)
            .status();
        match cc {
            Ok(s) if s.success() => {}
            other => {
                eprintln!("skipped: cannot compile the C probe: {other:?}");
                return;
            }
        }
        let out = std::process::Command::new(&exe).output().unwrap();
        let got: Vec<usize> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        let want = vec![
            size_of::<SanlkDisk>(),
            offset_of!(SanlkDisk, offset),
            offset_of!(SanlkResource1, lver),
            offset_of!(SanlkResource1, flags),
            offset_of!(SanlkResource1, num_disks),
            offset_of!(SanlkResource1, disks),
            // The C struct ends at its flexible array; ours carries one disk.
            size_of::<SanlkResource1>() - size_of::<SanlkDisk>(),
            offset_of!(SanlkLockspace, host_id),
            offset_of!(SanlkLockspace, flags),
            offset_of!(SanlkLockspace, host_id_disk),
            size_of::<SanlkLockspace>(),
            SANLK_NAME_LEN,
            SANLK_PATH_LEN,
            SANLK_RES_LVER as usize,
            (SANLK_RES_ALIGN1M | SANLK_RES_SECTOR512) as usize,
            (SANLK_LSF_ALIGN1M | SANLK_LSF_SECTOR512) as usize,
            SANLK_RESTRICT_SIGTERM as usize,
        ];
        assert_eq!(got, want, "Rust layout differs from the installed headers");
    }
}
