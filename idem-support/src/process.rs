//! Worker processes a test drives (Unix): their reports read from a channel, waiting for their
//! exit by a deadline, signals, and waiting for a stop (SIGSTOP) without reaping them.

use std::process::{Child, ExitStatus};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A worker's report: its kind and payload.
pub type Report = (String, String);

/// Reads reports from `lines` into `seen` until one of `kind`, whose payload it returns; else
/// why none came (the deadline passed, or the worker ended).
pub fn next_report(
    lines: &Receiver<Report>,
    seen: &mut Vec<Report>,
    kind: &str,
    deadline: Instant,
) -> Result<String, String> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok((k, payload)) => {
                seen.push((k.clone(), payload.clone()));
                if k == kind {
                    return Ok(payload);
                }
            }
            Err(RecvTimeoutError::Timeout) => return Err(format!("no `{kind}` report in time")),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(format!("ended without a `{kind}` report"))
            }
        }
    }
}

/// Waits for `child` to exit by `deadline`, then for the rest of its reports from `lines` (the
/// pipes close with the process, so the reader threads end) into `seen`: its exit status, or
/// `None` if it still runs at the deadline.
pub fn exit_by(
    child: &mut Child,
    lines: &Receiver<Report>,
    seen: &mut Vec<Report>,
    deadline: Instant,
) -> Option<ExitStatus> {
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(status) => break status,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            None => return None,
        }
    };
    while let Ok(report) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        seen.push(report);
    }
    Some(status)
}

/// Sends `signal` to `pid`, a child of this process not reaped yet.
pub fn signal(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill(2) with the pid of our own unreaped child and a valid signal number.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
}

/// Waits until the child `pid` is stopped (after SIGSTOP), without reaping it; else why not
/// (it ended instead, or is not stopped by `deadline`).
pub fn wait_stopped(pid: libc::pid_t, deadline: Instant) -> Result<(), String> {
    loop {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid(2); WNOWAIT leaves
        // the child's state to be collected later by `Child::wait`.
        let (rc, code, reported) = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc = libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WSTOPPED | libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            (rc, info.si_code, info.si_pid())
        };
        assert_eq!(rc, 0, "waitid: {}", std::io::Error::last_os_error());
        if reported == pid {
            return if code == libc::CLD_STOPPED {
                Ok(())
            } else {
                Err(format!("ended (si_code {code}) instead of stopping"))
            };
        }
        if Instant::now() >= deadline {
            return Err("not stopped in time".to_string());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
