//! The object-store settings reach a real S3-compatible server (moto on loopback), and
//! that server keeps the promises netdisk builds on: conditional writes and range reads.
#![cfg(feature = "s3")]

mod common;

use netdisk::objstore::ObjectStoreConfig;

#[tokio::test]
async fn an_operator_reaches_the_bucket_with_conditional_writes_and_ranges() {
    let Some(bucket) = common::s3_bucket() else {
        return;
    };
    let mut config = ObjectStoreConfig::from_url(&bucket.url("prefix/one")).unwrap();
    config.endpoint = Some(bucket.endpoint.clone());
    config.access_key_id = Some("id".into());
    config.secret_access_key = Some("key".into());
    let op = config.operator().unwrap();

    op.write_with("users.xlsx", b"first".to_vec())
        .if_not_exists(true)
        .await
        .unwrap();
    // A second create loses: two servers cannot both make the table.
    let err = op
        .write_with("users.xlsx", b"second".to_vec())
        .if_not_exists(true)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), opendal::ErrorKind::ConditionNotMatch, "{err}");

    let etag = op
        .stat("users.xlsx")
        .await
        .unwrap()
        .etag()
        .unwrap()
        .to_string();
    op.write_with("users.xlsx", b"third".to_vec())
        .if_match(&etag)
        .await
        .unwrap();
    // The old tag is stale now: a writer that read before must retry.
    let err = op
        .write_with("users.xlsx", b"lost".to_vec())
        .if_match(&etag)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), opendal::ErrorKind::ConditionNotMatch, "{err}");

    let range = op.read_with("users.xlsx").range(1..4).await.unwrap();
    assert_eq!(range.to_vec(), b"hir");
    // The prefix is honoured: the object lives under it.
    let entries = op.list("").await.unwrap();
    assert!(
        entries.iter().any(|e| e.path() == "users.xlsx"),
        "{entries:?}"
    );
}
