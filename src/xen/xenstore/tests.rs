use super::*;
use std::thread;

const NOW: Option<Duration> = Some(Duration::ZERO);

fn drain(xs: &EmulatedXenStore) -> Vec<(String, String)> {
    std::iter::from_fn(|| xs.read_watch(NOW).unwrap())
        .map(|e| (e.path, e.token))
        .collect()
}

fn ev(path: &str, token: &str) -> (String, String) {
    (path.to_string(), token.to_string())
}

#[test]
fn write_creates_parents_and_directory_lists_children() {
    let xs = EmulatedXenStore::new();
    xs.write_str(XBT_NULL, "/local/domain/1/device/vbd/51712/state", "1")
        .unwrap();
    xs.write_str(XBT_NULL, "/local/domain/1/device/vbd/51712/ring-ref", "8")
        .unwrap();
    xs.write_str(XBT_NULL, "/local/domain/1/device/vbd/51728/state", "1")
        .unwrap();
    assert_eq!(xs.read(XBT_NULL, "/local/domain/1/device").unwrap(), b"");
    assert_eq!(
        xs.directory(XBT_NULL, "/local/domain/1/device/vbd")
            .unwrap(),
        vec!["51712", "51728"]
    );
    assert_eq!(
        xs.directory(XBT_NULL, "/local/domain/1/device/vbd/51712")
            .unwrap(),
        vec!["ring-ref", "state"]
    );
    assert_eq!(xs.directory(XBT_NULL, "/").unwrap(), vec!["local"]);
    let n: u32 = xs
        .read_parsed(XBT_NULL, "/local/domain/1/device/vbd/51712/ring-ref")
        .unwrap();
    assert_eq!(n, 8);
    assert!(matches!(
        xs.read(XBT_NULL, "/local/domain/2"),
        Err(XsError::NotFound(_))
    ));
    assert_eq!(xs.read_optional(XBT_NULL, "/nope").unwrap(), None);
}

#[test]
fn rm_removes_subtrees_like_xenstored() {
    let xs = EmulatedXenStore::new();
    xs.write_str(XBT_NULL, "/a/b/c", "1").unwrap();
    xs.write_str(XBT_NULL, "/a/bc", "2").unwrap();
    xs.rm(XBT_NULL, "/a/b").unwrap();
    assert!(xs.read(XBT_NULL, "/a/b/c").is_err());
    assert!(xs.read(XBT_NULL, "/a/b").is_err());
    // A sibling sharing a name prefix survives.
    assert_eq!(xs.read(XBT_NULL, "/a/bc").unwrap(), b"2");
    // Missing node under an existing parent: fine; no parent: ENOENT.
    xs.rm(XBT_NULL, "/a/zz").unwrap();
    assert!(matches!(xs.rm(XBT_NULL, "/x/y"), Err(XsError::NotFound(_))));
}

#[test]
fn malformed_paths_are_refused() {
    let xs = EmulatedXenStore::new();
    for p in [
        "",
        "rel/path",
        "/trailing/",
        "/double//slash",
        "/sp ace",
        "/nul\0",
    ] {
        assert!(
            matches!(xs.write_str(XBT_NULL, p, "x"), Err(XsError::Invalid(_))),
            "{p:?}"
        );
    }
    assert!(xs.write_str(XBT_NULL, "/", "x").is_err());
    assert!(xs.rm(XBT_NULL, "/").is_err());
}

#[test]
fn watches_fire_on_set_on_changes_below_and_on_ancestor_removal() {
    let back = EmulatedXenStore::new();
    let front = back.connect();
    let fe = "/local/domain/1/device/vbd/51712";
    back.watch(fe, "fe").unwrap();
    // Fires once when set.
    assert_eq!(drain(&back), vec![ev(fe, "fe")]);
    // Changes by another connection at and below the path.
    front
        .write_str(XBT_NULL, &format!("{fe}/state"), "3")
        .unwrap();
    front.write_str(XBT_NULL, fe, "").unwrap();
    // Not a sibling whose name merely starts the same.
    front
        .write_str(XBT_NULL, "/local/domain/1/device/vbd/517120", "x")
        .unwrap();
    assert_eq!(
        drain(&back),
        vec![ev(&format!("{fe}/state"), "fe"), ev(fe, "fe")]
    );
    // The writer has no watches: it hears nothing.
    assert!(drain(&front).is_empty());
    // Removing an ancestor fires with the watched path.
    front.rm(XBT_NULL, "/local/domain/1").unwrap();
    assert_eq!(drain(&back), vec![ev(fe, "fe")]);
    // Unwatch: silence.
    back.unwatch(fe, "fe").unwrap();
    front
        .write_str(XBT_NULL, &format!("{fe}/state"), "5")
        .unwrap();
    assert!(drain(&back).is_empty());
    assert!(back.unwatch(fe, "fe").is_err());
}

#[test]
fn tokens_tell_watches_apart() {
    let xs = EmulatedXenStore::new();
    xs.watch("/be", "backend").unwrap();
    xs.watch("/fe", "frontend").unwrap();
    drain(&xs);
    xs.write_str(XBT_NULL, "/fe/state", "4").unwrap();
    xs.write_str(XBT_NULL, "/be/state", "4").unwrap();
    assert_eq!(
        drain(&xs),
        vec![ev("/fe/state", "frontend"), ev("/be/state", "backend")]
    );
}

#[test]
fn read_watch_times_out_and_wakes_across_threads() {
    let back = EmulatedXenStore::new();
    let front = back.connect();
    back.watch("/fe", "t").unwrap();
    drain(&back);
    assert_eq!(
        back.read_watch(Some(Duration::from_millis(5))).unwrap(),
        None
    );
    let waiter = thread::spawn(move || back.read_watch(None).unwrap());
    front.write_str(XBT_NULL, "/fe/state", "1").unwrap();
    assert_eq!(
        waiter.join().unwrap(),
        Some(WatchEvent {
            path: "/fe/state".to_string(),
            token: "t".to_string()
        })
    );
}

#[test]
fn transactions_are_isolated_until_commit() {
    let a = EmulatedXenStore::new();
    let b = a.connect();
    b.watch("/be", "w").unwrap();
    drain(&b);
    a.write_str(XBT_NULL, "/be/state", "1").unwrap();
    drain(&b);
    let tx = a.transaction_start().unwrap();
    a.write_str(tx, "/be/state", "2").unwrap();
    a.write_str(tx, "/be/sectors", "2048").unwrap();
    a.rm(tx, "/be/old").unwrap();
    assert_eq!(a.read(tx, "/be/state").unwrap(), b"2");
    // Not visible, and no watch fired, before commit.
    assert_eq!(b.read(XBT_NULL, "/be/state").unwrap(), b"1");
    assert!(b.read(XBT_NULL, "/be/sectors").is_err());
    assert!(drain(&b).is_empty());
    a.transaction_end(tx, false).unwrap();
    assert_eq!(b.read(XBT_NULL, "/be/state").unwrap(), b"2");
    assert_eq!(b.read(XBT_NULL, "/be/sectors").unwrap(), b"2048");
    let fired = drain(&b);
    assert!(fired.contains(&ev("/be/state", "w")));
    assert!(fired.contains(&ev("/be/sectors", "w")));
    // Ended transactions are gone.
    assert!(matches!(a.read(tx, "/be/state"), Err(XsError::Invalid(_))));
}

#[test]
fn conflicting_commit_fails_with_again_and_applies_nothing() {
    let a = EmulatedXenStore::new();
    let b = a.connect();
    a.write_str(XBT_NULL, "/fe/state", "1").unwrap();
    let tx = a.transaction_start().unwrap();
    let seen = a.read_string(tx, "/fe/state").unwrap();
    assert_eq!(seen, "1");
    a.write_str(tx, "/be/state", "2").unwrap();
    b.write_str(XBT_NULL, "/fe/state", "5").unwrap();
    assert!(matches!(a.transaction_end(tx, false), Err(XsError::Again)));
    assert!(a.read(XBT_NULL, "/be/state").is_err());

    // A change to an unrelated path does not conflict. (Creating a node
    // changes its parent's child list, so /be must exist already, or both
    // writers would be modifying `/`: a conflict, as in xenstored.)
    a.write_str(XBT_NULL, "/be/x", "0").unwrap();
    let tx = a.transaction_start().unwrap();
    a.read(tx, "/fe/state").unwrap();
    a.write_str(tx, "/be/state", "2").unwrap();
    b.write_str(XBT_NULL, "/other/thing", "x").unwrap();
    a.transaction_end(tx, false).unwrap();
    assert_eq!(a.read(XBT_NULL, "/be/state").unwrap(), b"2");

    // Removal of a read node conflicts too; abort discards.
    let tx = a.transaction_start().unwrap();
    a.read(tx, "/other/thing").unwrap();
    b.rm(XBT_NULL, "/other").unwrap();
    assert!(matches!(a.transaction_end(tx, false), Err(XsError::Again)));
    let tx = a.transaction_start().unwrap();
    a.write_str(tx, "/be/state", "9").unwrap();
    a.transaction_end(tx, true).unwrap();
    assert_eq!(a.read(XBT_NULL, "/be/state").unwrap(), b"2");
}

#[test]
fn transact_retries_on_again() {
    let a = EmulatedXenStore::new();
    let b = a.connect();
    a.write_str(XBT_NULL, "/fe/state", "1").unwrap();
    let mut attempts = 0;
    let state = transact(&a, 5, |tx| {
        attempts += 1;
        let s = a.read_string(tx, "/fe/state")?;
        if attempts == 1 {
            // Someone else changes what we read: first commit must fail.
            b.write_str(XBT_NULL, "/fe/state", "3").unwrap();
        }
        a.write_str(tx, "/be/seen", &s)?;
        Ok(s)
    })
    .unwrap();
    assert_eq!(attempts, 2);
    assert_eq!(state, "3");
    assert_eq!(a.read(XBT_NULL, "/be/seen").unwrap(), b"3");

    // Errors in the body abort without retrying.
    let mut calls = 0;
    let r: Result<(), _> = transact(&a, 5, |tx| {
        calls += 1;
        a.read(tx, "/missing").map(|_| ())
    });
    assert!(matches!(r, Err(XsError::NotFound(_))));
    assert_eq!(calls, 1);

    // Endless conflicts give up with Again after max_attempts.
    let mut n = 0;
    let r: Result<(), _> = transact(&a, 3, |tx| {
        n += 1;
        a.read(tx, "/fe/state")?;
        b.write_str(XBT_NULL, "/fe/state", &n.to_string()).unwrap();
        Ok(())
    });
    assert!(matches!(r, Err(XsError::Again)));
    assert_eq!(n, 3);
}

#[test]
fn trait_object_use() {
    let xs: Box<dyn XenStore> = Box::new(EmulatedXenStore::new());
    xs.write_str(XBT_NULL, "/x", "1").unwrap();
    assert_eq!(xs.read_string(XBT_NULL, "/x").unwrap(), "1");
    transact(xs.as_ref(), 2, |tx| xs.write_str(tx, "/y", "2")).unwrap();
    assert_eq!(
        xs.read_optional(XBT_NULL, "/y").unwrap().as_deref(),
        Some("2")
    );
}
