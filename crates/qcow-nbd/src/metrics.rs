//! `--metrics`: the export's Prometheus metrics over the smallest HTTP/1.0 that scrapers accept. One request per
//! connection, served one at a time with short timeouts, so a slow scraper delays only other scrapers.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::export::Export;

/// The longest request head read; scrapers send a few hundred bytes.
const MAX_HEAD: usize = 8 << 10;
const TIMEOUT: Duration = Duration::from_secs(5);

/// A bound metrics endpoint.
pub struct MetricsServer<E: Export> {
    listener: TcpListener,
    export: Arc<E>,
}

impl<E: Export> MetricsServer<E> {
    /// Binds `addr`.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub fn bind(addr: SocketAddr, export: Arc<E>) -> io::Result<Self> {
        Ok(MetricsServer { listener: TcpListener::bind(addr)?, export })
    }

    /// Where it listens.
    ///
    /// # Errors
    /// As [`TcpListener::local_addr`].
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Answers scrapes forever (run it on its own thread).
    pub fn run(self) {
        for stream in self.listener.incoming() {
            match stream {
                Ok(stream) => {
                    if let Err(e) = self.answer(stream) {
                        tracing::debug!(error = %e, "metrics request failed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "metrics accept failed"),
            }
        }
    }

    fn answer(&self, mut stream: TcpStream) -> io::Result<()> {
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(buf.get(..n).unwrap_or_default());
            if head.len() > MAX_HEAD {
                return respond(&mut stream, "431 Request Header Fields Too Large", "request head too large\n");
            }
        }
        let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
        let mut words = line.split(|&b| b == b' ');
        let (method, path) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
        if method != b"GET" {
            return respond(&mut stream, "405 Method Not Allowed", "only GET is served\n");
        }
        if path != b"/metrics" && path != b"/" {
            return respond(&mut stream, "404 Not Found", "metrics are at /metrics\n");
        }
        match self.export.prometheus_metrics() {
            Ok(Some(text)) => respond(&mut stream, "200 OK", &text),
            Ok(None) => respond(&mut stream, "404 Not Found", "this export keeps no metrics\n"),
            Err(e) => respond(&mut stream, "500 Internal Server Error", &format!("{e}\n")),
        }
    }
}

fn respond(stream: &mut TcpStream, status: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}
