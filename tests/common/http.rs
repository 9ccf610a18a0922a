//! A small blocking HTTP/1.1 client for the tests and the SSE benchmark: keep-alive, Content-Length
//! and chunked bodies, server-sent events handed over as they arrive.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct Response {
    pub code: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: body {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The `data:` payloads of an event stream, in order.
    pub fn events(&self) -> Vec<String> {
        let text = String::from_utf8(self.body.clone()).expect("utf-8 event stream");
        let mut out = Vec::new();
        for ev in text.split("\n\n").filter(|e| !e.is_empty()) {
            let data = ev.strip_prefix("data: ").unwrap_or_else(|| panic!("event without `data: `: {ev:?}"));
            out.push(data.to_owned());
        }
        out
    }
}

/// One keep-alive connection.
pub struct Http {
    r: BufReader<TcpStream>,
    pub addr: String,
}

impl Http {
    pub fn connect(addr: &str) -> Http {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        Http { r: BufReader::new(s), addr: addr.to_owned() }
    }

    pub fn get(&mut self, path: &str, token: Option<&str>) -> Response {
        self.call("GET", path, None, token, &mut |_| {})
    }

    pub fn post(&mut self, path: &str, body: &str, token: Option<&str>) -> Response {
        self.call("POST", path, Some(body), token, &mut |_| {})
    }

    /// Sends a request; `on_bytes` sees each piece of the body as it arrives (the whole body is
    /// also returned).
    pub fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
        on_bytes: &mut dyn FnMut(&[u8]),
    ) -> Response {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len()));
        } else {
            req.push_str("\r\n");
        }
        self.r.get_mut().write_all(req.as_bytes()).expect("send request");
        self.read_response(on_bytes)
    }

    pub fn read_response(&mut self, on_bytes: &mut dyn FnMut(&[u8])) -> Response {
        let mut line = String::new();
        self.r.read_line(&mut line).expect("status line");
        let code = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.r.read_line(&mut line).expect("header line");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').expect("header");
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let mut resp = Response { code, headers, body: Vec::new() };
        if resp.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                line.clear();
                self.r.read_line(&mut line).expect("chunk size");
                let n = usize::from_str_radix(line.trim(), 16).expect("hex chunk size");
                let at = resp.body.len();
                resp.body.resize(at + n, 0);
                self.r.read_exact(&mut resp.body[at..]).expect("chunk");
                let mut crlf = [0u8; 2];
                self.r.read_exact(&mut crlf).expect("chunk end");
                if n == 0 {
                    break;
                }
                on_bytes(&resp.body[at..]);
            }
        } else {
            let n: usize = resp.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            resp.body.resize(n, 0);
            self.r.read_exact(&mut resp.body).expect("body");
            on_bytes(&resp.body);
        }
        resp
    }
}
