//! The checksum both sides compute while data streams.
//!
//! A file is cut into 4 MiB chunks; each chunk is hashed with BLAKE3 and the file's digest
//! is BLAKE3 over the concatenated chunk hashes (an empty file has no chunks). Chunk hashes
//! let an interrupted transfer resume at a chunk boundary without re-reading the prefix on
//! the server, and let the two halves of a resumed transfer be hashed independently.

/// Chunk size of the digest and the unit of resume offsets.
pub const CHUNK_SIZE: u64 = 4 * 1024 * 1024;

pub type ChunkHash = [u8; 32];

/// The digest of a file from its chunk hashes.
pub fn file_digest(chunks: &[ChunkHash]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    for chunk in chunks {
        hasher.update(chunk);
    }
    hasher.finalize()
}

/// Hashes a byte stream chunk by chunk, in whatever pieces the bytes arrive.
#[derive(Clone, Default)]
pub struct ChunkHasher {
    current: blake3::Hasher,
    current_len: u64,
    chunks: Vec<ChunkHash>,
}

impl ChunkHasher {
    pub fn new() -> ChunkHasher {
        ChunkHasher::default()
    }

    /// Continue after `chunks` already-hashed whole chunks (a resumed transfer).
    pub fn resume(chunks: Vec<ChunkHash>) -> ChunkHasher {
        ChunkHasher {
            chunks,
            ..ChunkHasher::default()
        }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = (CHUNK_SIZE - self.current_len) as usize;
            let take = room.min(bytes.len());
            self.current.update(&bytes[..take]);
            self.current_len += take as u64;
            bytes = &bytes[take..];
            if self.current_len == CHUNK_SIZE {
                self.chunks.push(*self.current.finalize().as_bytes());
                self.current.reset();
                self.current_len = 0;
            }
        }
    }

    /// Hashes of the whole chunks seen so far.
    pub fn complete_chunks(&self) -> &[ChunkHash] {
        &self.chunks
    }

    /// All chunk hashes, the last one possibly short.
    pub fn finish_chunks(mut self) -> Vec<ChunkHash> {
        if self.current_len > 0 {
            self.chunks.push(*self.current.finalize().as_bytes());
        }
        self.chunks
    }

    pub fn finish(self) -> blake3::Hash {
        file_digest(&self.finish_chunks())
    }
}

/// Chunk hashes of everything `reader` yields (used for files written without netdisk).
pub fn hash_reader(mut reader: impl std::io::Read) -> std::io::Result<Vec<ChunkHash>> {
    let mut hasher = ChunkHasher::new();
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(hasher.finish_chunks()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_does_not_depend_on_how_bytes_arrive() {
        let data: Vec<u8> = (0..(CHUNK_SIZE as usize * 2 + 12345))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let mut whole = ChunkHasher::new();
        whole.update(&data);
        let mut pieces = ChunkHasher::new();
        for piece in data.chunks(65_537) {
            pieces.update(piece);
        }
        assert_eq!(whole.clone().finish_chunks().len(), 3);
        assert_eq!(whole.finish(), pieces.finish());
        assert_eq!(hash_reader(&data[..]).unwrap().len(), 3);
    }

    #[test]
    fn resumed_hashing_matches_a_single_pass() {
        let data = vec![7u8; CHUNK_SIZE as usize + 10];
        let mut first = ChunkHasher::new();
        first.update(&data[..CHUNK_SIZE as usize]);
        let mut rest = ChunkHasher::resume(first.complete_chunks().to_vec());
        rest.update(&data[CHUNK_SIZE as usize..]);
        assert_eq!(rest.finish(), file_digest(&hash_reader(&data[..]).unwrap()));
    }

    #[test]
    fn empty_file_has_no_chunks() {
        assert_eq!(ChunkHasher::new().finish(), blake3::hash(b""));
    }

    #[test]
    fn one_changed_byte_changes_the_digest() {
        let mut data = vec![1u8; 1000];
        let before = file_digest(&hash_reader(&data[..]).unwrap());
        data[999] ^= 1;
        assert_ne!(before, file_digest(&hash_reader(&data[..]).unwrap()));
    }
}
