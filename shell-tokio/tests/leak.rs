//! Starting and stopping embedded daemons leaks no descriptors (the socket set's epoll
//! instance and its registration with tokio go with the daemon). Alone in its test
//! binary so the count is not disturbed by other tests.

mod common;

use std::time::Duration;

use common::{open_fds, start_use_stop, temp_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_an_embedded_daemon_leaks_no_descriptors() {
    let dir = temp_dir("leak");
    start_use_stop(dir.path()).await;
    // Starting again reuses the directory; nothing leaks from one daemon to the next.
    let before = open_fds();
    for _ in 0..3 {
        start_use_stop(dir.path()).await;
    }
    // Aborted tasks are dropped by the runtime shortly after the daemon returns.
    for _ in 0..100 {
        if open_fds() <= before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(open_fds() <= before, "descriptors leaked: {before} before, {} after", open_fds());
}
