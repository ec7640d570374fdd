//! `tether bench ARGS...` as scripts and operators run it: the `tether` binary runs the
//! `tether-bench` installed next to it with the server settings of its own command line and
//! the arguments after `bench`, and ends with its exit status; without one, it says how to
//! build it. A stand-in `tether-bench` (a shell script) shows what it was given.

#![cfg(unix)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;

const BIN: &str = env!("CARGO_BIN_EXE_tether");

/// Held while a test writes its stand-in and runs it: a file open for writing in this process
/// while another test forks would make its exec fail with "text file busy".
static FILES: Mutex<()> = Mutex::new(());

/// A directory with the `tether` binary in it, and a stand-in `tether-bench` if asked for: it
/// prints its arguments one per line and exits with 7.
fn install(with_bench: bool) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-command-{}", tether::ids::connection_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tether = dir.join("tether");
    if std::fs::hard_link(BIN, &tether).is_err() {
        std::fs::copy(BIN, &tether).unwrap();
    }
    if with_bench {
        use std::os::unix::fs::PermissionsExt as _;
        let bench = dir.join("tether-bench");
        std::fs::write(&bench, "#!/bin/sh\nprintf '%s\\n' \"$@\"\nexit 7\n").unwrap();
        std::fs::set_permissions(&bench, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

fn tether(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(dir.join("tether"))
        .args(args)
        .env_remove("TETHER_DATA_DIR")
        .output()
        .unwrap()
}

fn lines(out: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(out)
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn tether_bench_runs_the_tether_bench_next_to_it_with_the_same_arguments_and_exit_status() {
    let _files = FILES.lock().unwrap_or_else(|p| p.into_inner());
    let dir = install(true);
    // Help and flags pass through untouched.
    let out = tether(&dir, &["bench", "--help"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(lines(&out.stdout), ["--help"]);
    let out = tether(
        &dir,
        &["bench", "chat", "-n", "5", "--json", "--duration", "3s"],
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(
        lines(&out.stdout),
        ["chat", "-n", "5", "--json", "--duration", "3s"]
    );
    // Server settings before the mode, on either side of `bench`, go along.
    let out = tether(
        &dir,
        &[
            "--data-dir",
            "/srv/t",
            "bench",
            "--listen",
            "127.0.0.1:9",
            "idle",
        ],
    );
    assert_eq!(
        lines(&out.stdout),
        ["--listen=127.0.0.1:9", "--data-dir=/srv/t", "idle"]
    );
    let _removed = std::fs::remove_dir_all(dir);
}

#[test]
fn tether_bench_without_a_tether_bench_next_to_it_says_how_to_build_it() {
    let _files = FILES.lock().unwrap_or_else(|p| p.into_inner());
    let dir = install(false);
    let out = tether(&dir, &["bench", "chat"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cargo build --release -p tether-bench"),
        "{err}"
    );
    let _removed = std::fs::remove_dir_all(dir);
}
