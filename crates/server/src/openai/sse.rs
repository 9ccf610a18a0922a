//! What goes on the wire: whole HTTP answers, and server-sent events in a chunked body
//! (`data: {json}\n\n` per event, ending with `data: [DONE]`). Everything is appended to the
//! connection's output buffer; the event loop writes it out without blocking.

use std::io::Write;

use serde::Serialize;

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// A whole answer with a body.
pub fn answer(out: &mut Vec<u8>, code: u16, ctype: &str, body: &[u8], keep_alive: bool) {
    let conn = if keep_alive { "keep-alive" } else { "close" };
    let _ = write!(
        out,
        "HTTP/1.1 {code} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n",
        reason(code),
        body.len()
    );
    out.extend_from_slice(body);
}

/// A JSON answer.
pub fn json<T: Serialize>(out: &mut Vec<u8>, code: u16, v: &T, keep_alive: bool) {
    let body = serde_json::to_vec(v).unwrap_or_default();
    answer(out, code, "application/json", &body, keep_alive);
}

/// The head of an event stream (chunked: the connection can be kept alive after it).
pub fn stream_head(out: &mut Vec<u8>) {
    out.extend_from_slice(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
          Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
    );
}

/// One event `data: {json}\n\n` as one chunk. The JSON is written in place (the chunk's length
/// prefix is patched afterwards), so an event costs no allocation beyond the buffer's growth.
pub fn event<T: Serialize>(out: &mut Vec<u8>, v: &T) {
    // 8 hex digits of length, patched below; leading zeros are valid chunk-size syntax.
    let at = out.len();
    out.extend_from_slice(b"00000000\r\ndata: ");
    let body = out.len() - 6;
    let _ = serde_json::to_writer(&mut *out, v);
    out.extend_from_slice(b"\n\n");
    let n = out.len() - body;
    let hex = format!("{n:08x}");
    out[at..at + 8].copy_from_slice(hex.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `data: [DONE]` and the end of the chunked body.
pub fn done(out: &mut Vec<u8>) {
    let d = b"data: [DONE]\n\n";
    let _ = write!(out, "{:x}\r\n", d.len());
    out.extend_from_slice(d);
    out.extend_from_slice(b"\r\n0\r\n\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_chunks_of_sse() {
        let mut out = Vec::new();
        event(&mut out, &serde_json::json!({"a": 1}));
        done(&mut out);
        let s = String::from_utf8(out).unwrap();
        assert_eq!(s, "0000000f\r\ndata: {\"a\":1}\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n");
    }
}
