//! Property tests of the frame decoder and header parser: arbitrary and truncated input
//! never panics, valid frames always round-trip, and a stream is read frame by frame
//! however TCP splits it.

use netdisk::protocol::{decode_header, encode_header, parse_request, Connection, Request};
use proptest::prelude::*;

fn read_all_frames(bytes: Vec<u8>) -> (Vec<serde_json::Map<String, serde_json::Value>>, bool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let stream = tokio::io::join(std::io::Cursor::new(bytes), tokio::io::sink());
        let mut conn = Connection::new(stream);
        let mut frames = Vec::new();
        loop {
            match conn.read_header().await {
                Ok(Some(header)) => frames.push(header),
                Ok(None) => return (frames, true),
                Err(_) => return (frames, false),
            }
        }
    })
}

fn arb_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u32>(), ".*").prop_map(|(version, client)| Request::Hello { version, client }),
        (".*", any::<u64>(), any::<bool>()).prop_map(|(filename, size, restart)| Request::Put {
            filename,
            size,
            restart,
            digest: None,
        }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(offset, filesize)| Request::PutData { offset, filesize }),
        (".*", any::<u64>()).prop_map(|(filename, offset)| Request::Get {
            filename,
            offset,
            check_chunk: None
        }),
        ".*".prop_map(|message| Request::AuthStart { message }),
        Just(Request::Ls {
            path: "a/b".into(),
            partial: true,
            after: None,
            limit: Some(5)
        }),
        Just(Request::Quit),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let (frames, _) = read_all_frames(bytes.clone());
        for frame in frames {
            let _ = parse_request(frame);
        }
        let _ = decode_header(&bytes);
    }

    #[test]
    fn requests_round_trip(requests in proptest::collection::vec(arb_request(), 1..8)) {
        let mut stream = Vec::new();
        for request in &requests {
            stream.extend(encode_header(request).unwrap());
        }
        let (frames, clean_end) = read_all_frames(stream);
        prop_assert!(clean_end);
        let decoded: Vec<Request> = frames.into_iter().map(|f| parse_request(f).unwrap()).collect();
        prop_assert_eq!(decoded, requests);
    }

    #[test]
    fn a_truncated_frame_is_an_error_not_a_frame(request in arb_request(), cut in 1usize..64) {
        let frame = encode_header(&request).unwrap();
        let cut = cut.min(frame.len() - 1);
        let (frames, clean_end) = read_all_frames(frame[..frame.len() - cut].to_vec());
        prop_assert!(frames.is_empty());
        prop_assert!(!clean_end);
    }
}
