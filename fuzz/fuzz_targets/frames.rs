//! Feeds arbitrary bytes to the frame decoder and the request parser, as a server would
//! read them from a socket: nothing may panic, hang or allocate beyond the header cap.
#![no_main]

use std::io::Cursor;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use netdisk::protocol::{parse_request, Connection};
use tokio::runtime::Runtime;

/// One runtime for the whole run: building one per input would dominate the time spent.
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("build the tokio runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    // An owned copy, freed with the connection (a leaked one trips LeakSanitizer).
    let stream = tokio::io::join(Cursor::new(data.to_vec()), tokio::io::sink());
    runtime().block_on(async {
        let mut conn = Connection::new(stream);
        while let Ok(Some(header)) = conn.read_header().await {
            let _ = parse_request(header);
        }
    });
});
