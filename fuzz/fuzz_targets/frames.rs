//! Feeds arbitrary bytes to the frame decoder and the request parser, as a server would
//! read them from a socket: nothing may panic, hang or allocate beyond the header cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netdisk::protocol::{parse_request, Connection};

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let stream = tokio::io::join(data.to_vec().leak() as &[u8], tokio::io::sink());
    runtime.block_on(async {
        let mut conn = Connection::new(stream);
        while let Ok(Some(header)) = conn.read_header().await {
            let _ = parse_request(header);
        }
    });
});
