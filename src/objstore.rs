//! Where an S3-compatible bucket is and how to reach it: parsed from `s3://BUCKET/PREFIX`
//! plus explicit options, with the `AWS_*` environment variables as the ecosystem reads
//! them. Both the object file store and the state several servers share (users.xlsx,
//! sessions, the server secret) build their [`opendal::Operator`] here.

use crate::error::{Error, Result};

/// How to reach one bucket (and the prefix inside it that netdisk owns).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectStoreConfig {
    pub bucket: String,
    /// Key prefix without leading or trailing `/` (`""`: the whole bucket).
    pub prefix: String,
    /// e.g. `http://127.0.0.1:9000` for MinIO or a test server; `None`: AWS itself.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl ObjectStoreConfig {
    /// Parse `s3://BUCKET` or `s3://BUCKET/PREFIX`; endpoint, region and keys come from
    /// the `AWS_*` environment variables unless set afterwards.
    pub fn from_url(url: &str) -> Result<ObjectStoreConfig> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            Error::Invalid(format!("storage {url:?}: expected s3://BUCKET[/PREFIX]"))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if !valid_bucket_name(bucket) {
            return Err(Error::Invalid(format!(
                "storage {url:?}: {bucket:?} is not a valid bucket name (3-63 of a-z, 0-9, '.', '-')"
            )));
        }
        let prefix = prefix.trim_matches('/');
        if prefix
            .split('/')
            .any(|part| part.is_empty() && !prefix.is_empty())
            || prefix.split('/').any(|part| part == "." || part == "..")
        {
            return Err(Error::Invalid(format!(
                "storage {url:?}: bad prefix {prefix:?}"
            )));
        }
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Ok(ObjectStoreConfig {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL")),
            region: env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")),
            access_key_id: env("AWS_ACCESS_KEY_ID"),
            secret_access_key: env("AWS_SECRET_ACCESS_KEY"),
        })
    }

    /// The URL this configuration was made from (for logs; no credentials).
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    /// An operator rooted at the prefix: every path below is relative to it.
    pub fn operator(&self) -> Result<opendal::Operator> {
        install_http_transport();
        let mut builder = opendal::services::S3::default()
            .bucket(&self.bucket)
            .root(&format!("/{}", self.prefix))
            .region(self.region.as_deref().unwrap_or("us-east-1"));
        if let Some(endpoint) = &self.endpoint {
            builder = builder.endpoint(endpoint);
        }
        if let (Some(id), Some(key)) = (&self.access_key_id, &self.secret_access_key) {
            builder = builder.access_key_id(id).secret_access_key(key);
        }
        // Every request has an end: a bucket that stops answering (or a connection stuck in
        // ESTABLISHED) fails that request after S3_TIMEOUT instead of holding the client's
        // connection forever; each try is timed out, then retried (timeout inside retry).
        let operator = opendal::Operator::new(builder)
            .map_err(|e| Error::Invalid(format!("storage {}: {e}", self.url())))?
            .layer(
                opendal::layers::TimeoutLayer::new()
                    .with_timeout(S3_TIMEOUT)
                    .with_io_timeout(S3_TIMEOUT),
            )
            .layer(opendal::layers::RetryLayer::new());
        Ok(operator)
    }
}

/// The longest one S3 request may go without progress. Generous, because a server-side
/// copy or the completion of a multipart upload of a large file answers only at the end
/// (moto needs about 30 s per GiB).
pub const S3_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// The HTTP client of every S3 request: OpenDAL's and netdisk's own multipart calls.
pub fn http_client() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            // reqwest's rustls has no crypto provider of its own here; netdisk's TLS already
            // uses ring, so ring becomes the process default (no second crypto library).
            let _ = rustls::crypto::ring::default_provider().install_default();
            reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(10))
                .read_timeout(S3_TIMEOUT)
                .build()
                .expect("an HTTP client with default TLS settings")
        })
        .clone()
}

/// OpenDAL sends its requests through [`http_client`] (installed once per process).
fn install_http_transport() {
    opendal::HttpTransporter::install_default(
        opendal_http_transport_reqwest::ReqwestTransport::new(http_client()),
    );
}

/// S3's bucket naming rules (the subset every compatible server accepts).
fn valid_bucket_name(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_bucket_and_a_prefix() {
        let config = ObjectStoreConfig::from_url("s3://my-bucket/netdisk/prod/").unwrap();
        assert_eq!(config.bucket, "my-bucket");
        assert_eq!(config.prefix, "netdisk/prod");
        assert_eq!(config.url(), "s3://my-bucket/netdisk/prod");
        assert_eq!(ObjectStoreConfig::from_url("s3://b12").unwrap().prefix, "");
        for bad in [
            "b12",
            "s3://",
            "s3://A_B",
            "s3://ab",
            "s3://b12/x//y",
            "s3://b12/../x",
            "file:///tmp",
        ] {
            assert!(ObjectStoreConfig::from_url(bad).is_err(), "{bad}");
        }
    }
}
