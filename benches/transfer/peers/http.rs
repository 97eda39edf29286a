//! A minimal HTTP/1.1 client (for dufs): PUT a file, GET into a file, keep-alive.

#[allow(unused_imports)]
use crate::prelude::*;

pub struct Http {
    pub stream: BufStream<TcpStream>,
    pub host: String,
}

impl Http {
    pub async fn connect(addr: &str) -> Result<Http> {
        let socket = TcpStream::connect(addr).await?;
        socket.set_nodelay(true)?;
        Ok(Http {
            stream: BufStream::with_capacity(BLOCK, BLOCK, socket),
            host: addr.to_string(),
        })
    }

    pub async fn put(&mut self, url_path: &str, src: &Path) -> Result<()> {
        let mut file = File::open(src)?;
        let len = file.metadata()?.len();
        let head = format!(
            "PUT {url_path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {len}\r\n\
             Content-Type: application/octet-stream\r\n\r\n",
            self.host
        );
        self.stream.write_all(head.as_bytes()).await?;
        let mut buf = vec![0u8; BLOCK.min(len.max(1) as usize)];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            self.stream.write_all(&buf[..n]).await?;
        }
        self.stream.flush().await?;
        let status = self.response(None).await?;
        if !(200..300).contains(&status) {
            bail!("PUT {url_path}: HTTP {status}");
        }
        Ok(())
    }

    pub async fn get(&mut self, url_path: &str, dst: &Path) -> Result<()> {
        let head = format!("GET {url_path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        self.stream.write_all(head.as_bytes()).await?;
        self.stream.flush().await?;
        let mut file = File::create(dst)?;
        let status = self.response(Some(&mut file)).await?;
        if status != 200 {
            bail!("GET {url_path}: HTTP {status}");
        }
        Ok(())
    }

    /// Read one response; its body goes to `sink` (or nowhere). Returns the status.
    pub async fn response(&mut self, mut sink: Option<&mut File>) -> Result<u16> {
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad HTTP status line {line:?}"))?;
        let mut length: Option<u64> = None;
        let mut chunked = false;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                bail!("connection closed in HTTP headers");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
                if name == "content-length" {
                    length = value.parse().ok();
                } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        if chunked {
            loop {
                line.clear();
                self.stream.read_line(&mut line).await?;
                let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)?;
                if size == 0 {
                    // Trailers end with an empty line.
                    loop {
                        line.clear();
                        if self.stream.read_line(&mut line).await? == 0 || line.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                self.body(size, sink.as_deref_mut()).await?;
                line.clear();
                self.stream.read_line(&mut line).await?;
            }
        } else if let Some(len) = length {
            self.body(len, sink).await?;
        } else if status != 204 && status != 304 && !(100..200).contains(&status) {
            bail!("HTTP response without a length is not supported here");
        }
        Ok(status)
    }

    pub async fn body(&mut self, mut len: u64, mut sink: Option<&mut File>) -> Result<()> {
        let mut buf = vec![0u8; BLOCK.min(len.max(1) as usize)];
        while len > 0 {
            let want = buf.len().min(len as usize);
            let n = self.stream.read(&mut buf[..want]).await?;
            if n == 0 {
                bail!("connection closed in an HTTP body");
            }
            if let Some(file) = sink.as_deref_mut() {
                file.write_all(&buf[..n])?;
            }
            len -= n as u64;
        }
        Ok(())
    }
}
