//! A client that never reads, below the WebSocket library: a raw socket with a small receive
//! buffer that upgrades and reads `connection_established` and nothing after it, and the probe
//! that tells, without reading, when the server has closed it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The stalled client's receive buffer (the kernel doubles it): small, so the server's writes
/// block after a few frames and its outbound queue takes the rest.
const STALL_RCVBUF: u32 = 4096;

/// How often a stalled client checks, after the overflow, whether the server closed it.
const STALL_PROBE: Duration = Duration::from_millis(5);

/// Trickle the bytes of a frame that never completes until a write fails, for at most
/// `timeout`: when the write failed (the server has closed the socket). The server, stuck in a
/// write to this socket, does not read them, so when it drops the connection the kernel resets
/// it, and the next write here fails.
pub(super) async fn probe_until_closed(
    mut sock: TcpStream,
    est: &Value,
    timeout: Duration,
) -> Option<Instant> {
    let max_len = est["data"]["limits"]["max_message_bytes"]
        .as_u64()
        .unwrap_or(65_536)
        .clamp(126, 65_535) as u16;
    // A masked text frame of max_len bytes (16-bit length), its mask, and its first byte.
    let mut probe = vec![0x81, 0x80 | 126];
    probe.extend_from_slice(&max_len.to_be_bytes());
    probe.extend_from_slice(&[0x5a, 0x5a, 0x5a, 0x5a, b'x']);
    let mut payload_sent = 1u64;
    let close_deadline = Instant::now() + timeout;
    let mut tick = tokio::time::interval(STALL_PROBE);
    loop {
        tick.tick().await;
        if payload_sent + 1 < u64::from(max_len) {
            // Written, or not yet (the send buffer is full): still open.
            let write = tokio::time::timeout(STALL_PROBE, sock.write_all(&probe)).await;
            if let Ok(Err(_)) = write {
                return Some(Instant::now());
            }
            if probe.len() > 1 {
                probe = vec![b'x'];
            } else {
                payload_sent += 1;
            }
        }
        if Instant::now() >= close_deadline {
            return None;
        }
    }
}

/// Upgrade a raw TCP socket with a small receive buffer and read `connection_established` (and
/// nothing else): a client that then never reads again.
pub(super) async fn raw_upgrade(
    addr: SocketAddr,
    token: &str,
) -> anyhow::Result<(TcpStream, Value)> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_recv_buffer_size(STALL_RCVBUF)?;
    let mut s = socket.connect(addr).await?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(4096);
    let mut head_end = None;
    loop {
        if head_end.is_none() {
            head_end = upgrade_head_end(&buf)?;
        }
        if let Some(h) = head_end {
            if let Some(v) = first_server_frame(&buf[h..])? {
                if v["type"] != "connection_established" {
                    bail!(
                        "first frame is {} instead of connection_established",
                        v["type"]
                    );
                }
                return Ok((s, v));
            }
        }
        if buf.len() > 256 * 1024 {
            bail!("no connection_established in the first 256 KiB");
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before connection_established");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Where the answer's head ends in `buf`, once it is there; an error unless it is a 101.
fn upgrade_head_end(buf: &[u8]) -> anyhow::Result<Option<usize>> {
    let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let status = String::from_utf8_lossy(&buf[..i]);
    let status = status.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("101") {
        bail!("upgrade refused: {status}");
    }
    Ok(Some(i + 4))
}

/// The first WebSocket frame in `b` (a server's: unmasked), as JSON, once it is complete.
fn first_server_frame(b: &[u8]) -> anyhow::Result<Option<Value>> {
    let (len, at) = match b {
        [_, l, ..] if l & 0x80 != 0 => bail!("masked frame from the server"),
        [_, 126, x, y, ..] => (usize::from(u16::from_be_bytes([*x, *y])), 4),
        [_, 127, rest @ ..] if rest.len() >= 8 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&rest[..8]);
            (
                usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX),
                10,
            )
        }
        [_, l, ..] if *l < 126 => (usize::from(*l), 2),
        _ => return Ok(None),
    };
    if b[0] & 0x0f != 1 {
        bail!("first frame has opcode {}, not text", b[0] & 0x0f);
    }
    if len > 1024 * 1024 {
        bail!("first frame of {len} bytes");
    }
    match b.get(at..at + len) {
        Some(payload) => Ok(Some(
            serde_json::from_slice(payload).context("first frame is not JSON")?,
        )),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_server_frame_parses_once_complete() {
        let json = br#"{"type":"connection_established","data":{}}"#;
        let mut f = vec![0x81, json.len() as u8];
        f.extend_from_slice(json);
        assert_eq!(
            first_server_frame(&f).unwrap().unwrap()["type"],
            "connection_established"
        );
        // Incomplete: not yet.
        assert!(first_server_frame(&f[..1]).unwrap().is_none());
        assert!(first_server_frame(&f[..f.len() - 1]).unwrap().is_none());
        // The 16-bit length form, and what may follow the frame.
        let big = format!(r#"{{"type":"x","pad":"{}"}}"#, "y".repeat(300));
        let mut g = vec![0x81, 126];
        g.extend_from_slice(&(big.len() as u16).to_be_bytes());
        g.extend_from_slice(big.as_bytes());
        g.extend_from_slice(&[0x81, 0x01]);
        assert_eq!(first_server_frame(&g).unwrap().unwrap()["type"], "x");
        // Masked (a server must not), binary, or not JSON: errors.
        assert!(first_server_frame(&[0x81, 0x85, 0, 0, 0, 0]).is_err());
        assert!(first_server_frame(&[0x82, 0x01, b'{']).is_err());
        assert!(first_server_frame(&[0x81, 0x01, b'{']).is_err());
    }

    #[test]
    fn an_upgrade_answer_other_than_101_is_refused() {
        assert_eq!(upgrade_head_end(b"HTTP/1.1 101 Switching").unwrap(), None);
        assert_eq!(
            upgrade_head_end(b"HTTP/1.1 101 Switching\r\n\r\n\x81").unwrap(),
            Some(26)
        );
        let err = upgrade_head_end(b"HTTP/1.1 429 Too Many\r\n\r\n").unwrap_err();
        assert!(err.to_string().contains("429"), "{err}");
    }
}
