//! The kernel's process-events connector (NETLINK_CONNECTOR, CN_IDX_PROC):
//! exact fork/exec/exit notifications, so a process that lives a few
//! milliseconds is still seen. Needs CAP_NET_ADMIN in the initial network
//! and PID namespaces (hostNetwork and hostPID in a pod).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const NETLINK_CONNECTOR: libc::c_int = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const NLMSG_HDRLEN: usize = 16;
const CN_MSG_LEN: usize = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const PROC_EVENT_FORK: u32 = 0x0000_0001;
const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;

/// The kernel's process events this collector reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    /// A process or thread was created.
    Fork {
        /// The parent's process id.
        parent_tgid: u32,
        /// The new task's id.
        child_pid: u32,
        /// The new task's process id (equal to `child_pid` for a process).
        child_tgid: u32,
    },
    /// A process ran a new program.
    Exec {
        /// The task's id.
        pid: u32,
        /// Its process id.
        tgid: u32,
    },
    /// A task ended.
    Exit {
        /// The task's id.
        pid: u32,
        /// Its process id.
        tgid: u32,
        /// The raw wait status (see [`exit_status`]).
        exit_code: u32,
    },
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

/// Parses one datagram (one or more netlink messages). Anything short or
/// unknown is skipped, never a panic.
pub fn parse(buf: &[u8]) -> Vec<ProcEvent> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let Some(len) = u32_at(buf, off).map(|l| l as usize) else {
            break;
        };
        let Some(ty) = u16_at(buf, off + 4) else {
            break;
        };
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        let msg = &buf[off..off + len];
        if ty != NLMSG_ERROR {
            // cn_msg, then proc_event: what, cpu, timestamp, then the union.
            let ev = NLMSG_HDRLEN + CN_MSG_LEN;
            let data = ev + 16;
            let event = match u32_at(msg, ev) {
                Some(PROC_EVENT_FORK) => match (
                    u32_at(msg, data + 4),
                    u32_at(msg, data + 8),
                    u32_at(msg, data + 12),
                ) {
                    (Some(parent_tgid), Some(child_pid), Some(child_tgid)) => {
                        Some(ProcEvent::Fork {
                            parent_tgid,
                            child_pid,
                            child_tgid,
                        })
                    }
                    _ => None,
                },
                Some(PROC_EVENT_EXEC) => match (u32_at(msg, data), u32_at(msg, data + 4)) {
                    (Some(pid), Some(tgid)) => Some(ProcEvent::Exec { pid, tgid }),
                    _ => None,
                },
                Some(PROC_EVENT_EXIT) => match (
                    u32_at(msg, data),
                    u32_at(msg, data + 4),
                    u32_at(msg, data + 8),
                ) {
                    (Some(pid), Some(tgid), Some(exit_code)) => Some(ProcEvent::Exit {
                        pid,
                        tgid,
                        exit_code,
                    }),
                    _ => None,
                },
                _ => None,
            };
            out.extend(event);
        }
        // Messages are 4-byte aligned.
        off += (len + 3) & !3;
        let _ = NLMSG_DONE;
    }
    out
}

/// The exit status as a shell shows it: the code, or -signal.
pub fn exit_status(raw: u32) -> i32 {
    let sig = raw & 0x7f;
    if sig == 0 {
        ((raw >> 8) & 0xff) as i32
    } else {
        -(sig as i32)
    }
}

/// A socket on the kernel's process-events connector.
pub struct Connector {
    fd: OwnedFd,
}

impl Connector {
    /// Opens the socket, joins the proc group and asks for events. Fails
    /// with EPERM (or similar) without the privilege.
    pub fn open(recv_timeout: Duration) -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_CONNECTOR,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh, valid fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed sockaddr_nl is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = CN_IDX_PROC;
        addr.nl_pid = 0;
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: recv_timeout.as_secs() as libc::time_t,
            tv_usec: recv_timeout.subsec_micros() as libc::suseconds_t,
        };
        let rcvbuf: libc::c_int = 4 * 1024 * 1024;
        // SAFETY: valid option values and sizes.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &rcvbuf as *const _ as *const libc::c_void,
                4,
            );
        }
        let mut msg = Vec::with_capacity(NLMSG_HDRLEN + CN_MSG_LEN + 4);
        let total = (NLMSG_HDRLEN + CN_MSG_LEN + 4) as u32;
        msg.extend_from_slice(&total.to_ne_bytes());
        msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&std::process::id().to_ne_bytes());
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // len
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
        // SAFETY: msg is a valid buffer of msg.len() bytes.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// One datagram; Ok(None) on the receive timeout.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(what: u32, data: &[u32]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + CN_MSG_LEN + 16 + data.len() * 4;
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.extend_from_slice(&[0u8; CN_MSG_LEN]);
        m.extend_from_slice(&what.to_ne_bytes());
        m.extend_from_slice(&[0u8; 12]);
        for d in data {
            m.extend_from_slice(&d.to_ne_bytes());
        }
        m
    }

    #[test]
    fn parses_fork_exec_exit_and_skips_junk() {
        let mut buf = message(PROC_EVENT_FORK, &[10, 10, 11, 11]);
        buf.extend(message(PROC_EVENT_EXEC, &[11, 11]));
        buf.extend(message(PROC_EVENT_EXIT, &[11, 11, 256 * 3, 17, 10, 10]));
        let evs = parse(&buf);
        assert_eq!(
            evs,
            vec![
                ProcEvent::Fork {
                    parent_tgid: 10,
                    child_pid: 11,
                    child_tgid: 11
                },
                ProcEvent::Exec { pid: 11, tgid: 11 },
                ProcEvent::Exit {
                    pid: 11,
                    tgid: 11,
                    exit_code: 768
                },
            ]
        );
        assert_eq!(exit_status(768), 3);
        assert_eq!(exit_status(9), -9);
        // Truncated and garbage input: no panic, nothing invented.
        for cut in 0..buf.len() {
            let _ = parse(&buf[..cut]);
        }
        assert!(parse(&[0xff; 7]).is_empty());
        let mut bad = message(PROC_EVENT_EXEC, &[1]);
        bad[0] = 200;
        assert!(parse(&bad).is_empty());
    }
}
