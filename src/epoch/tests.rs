use super::*;
use std::sync::Arc;

#[test]
fn mem_store_compare_and_advance() {
    let s = MemEpochStore::default();
    assert_eq!(s.current("a").unwrap(), 0);
    assert_eq!(s.compare_and_advance("a", 0).unwrap(), 1);
    assert_eq!(s.compare_and_advance("a", 1).unwrap(), 2);
    match s.compare_and_advance("a", 1) {
        Err(EpochError::Conflict {
            current: 2,
            expected: 1,
            ..
        }) => {}
        other => panic!("expected conflict, got {other:?}"),
    }
    assert_eq!(s.current("b").unwrap(), 0, "disks are independent");
}

#[test]
fn bad_names_refused() {
    let s = MemEpochStore::default();
    for n in ["", "../x", "a/b", ".hidden", &"x".repeat(200)] {
        assert!(matches!(s.current(n), Err(EpochError::BadName(_))), "{n:?}");
    }
}

#[test]
fn file_store_persists_across_handles() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = FileEpochStore::open(dir.path()).unwrap();
        assert_eq!(s.compare_and_advance("vm1", 0).unwrap(), 1);
        assert_eq!(s.compare_and_advance("vm1", 1).unwrap(), 2);
        assert_eq!(s.compare_and_advance("vm2", 0).unwrap(), 1);
    }
    let s = FileEpochStore::open(dir.path()).unwrap();
    assert_eq!(s.current("vm1").unwrap(), 2);
    assert_eq!(s.current("vm2").unwrap(), 1);
    assert!(s.compare_and_advance("vm1", 1).is_err());
    // No temporary files left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp.")), "{names:?}");
}

#[test]
fn file_store_refuses_corrupt_state() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("epochs.json"), b"{not json").unwrap();
    let s = FileEpochStore::open(dir.path()).unwrap();
    assert!(matches!(s.current("vm1"), Err(EpochError::Io(_))));
    assert!(s.compare_and_advance("vm1", 0).is_err());
}

/// Many threads race to advance: every epoch is won exactly once, so the
/// number of successes equals the final epoch.
#[test]
fn file_store_concurrent_advances_win_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileEpochStore::open(dir.path()).unwrap());
    let wins = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            let wins = wins.clone();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    let cur = store.current("vm1").unwrap();
                    if store.compare_and_advance("vm1", cur).is_ok() {
                        wins.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let w = wins.load(std::sync::atomic::Ordering::SeqCst);
    assert!(w > 0);
    assert_eq!(store.current("vm1").unwrap(), w);
}

/// Separate processes share the store through the OFD lock: fork children
/// that each advance 20 times with retries; the final epoch counts them all.
#[test]
fn file_store_shared_between_processes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let mut pids = Vec::new();
    for _ in 0..3 {
        // SAFETY: the child only uses the store and exits without unwinding.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match FileEpochStore::open(&path) {
                Ok(s) => {
                    let mut done = 0;
                    let mut tries = 0;
                    while done < 20 && tries < 10_000 {
                        tries += 1;
                        if let Ok(cur) = s.current("vm1") {
                            if s.compare_and_advance("vm1", cur).is_ok() {
                                done += 1;
                            }
                        }
                    }
                    if done == 20 {
                        0
                    } else {
                        1
                    }
                }
                Err(_) => 2,
            };
            // SAFETY: leave the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        pids.push(pid);
    }
    for pid in pids {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }
    let s = FileEpochStore::open(dir.path()).unwrap();
    assert_eq!(s.current("vm1").unwrap(), 60);
}
