//! S3 multipart uploads, made directly: OpenDAL hides the upload id, but a resumable
//! upload must keep it (and its part tags) in the staged upload's record so another call,
//! or another server, continues the same multipart upload. Requests are signed with
//! `rusty-s3` and sent through the shared [`crate::objstore::http_client`].

use std::time::Duration;

use rusty_s3::actions::{
    AbortMultipartUpload, CompleteMultipartUpload, CreateMultipartUpload, S3Action, UploadPart,
};
use rusty_s3::{Bucket, Credentials, UrlStyle};

use crate::error::{Error, ErrorCode, Result};
use crate::objstore::{http_client, ObjectStoreConfig};

/// How long a signed request stays valid (it is sent at once).
const SIGNED_FOR: Duration = Duration::from_secs(600);

/// The multipart calls of one bucket, for keys under one prefix.
pub struct S3Multipart {
    bucket: Bucket,
    credentials: Option<Credentials>,
    /// Prepended to every path (with a `/`), as the operator's root is.
    prefix: String,
    client: reqwest::Client,
}

impl S3Multipart {
    pub fn new(config: &ObjectStoreConfig) -> Result<S3Multipart> {
        let invalid = |e: String| Error::Invalid(format!("storage {}: {e}", config.url()));
        let region = config.region.clone().unwrap_or_else(|| "us-east-1".into());
        // A custom endpoint (MinIO, a test server) is addressed by path; AWS by host.
        let (endpoint, style) = match &config.endpoint {
            Some(endpoint) => (endpoint.clone(), UrlStyle::Path),
            None => (
                format!("https://s3.{region}.amazonaws.com"),
                UrlStyle::VirtualHost,
            ),
        };
        let endpoint = endpoint.parse().map_err(|e| invalid(format!("{e}")))?;
        let bucket = Bucket::new(endpoint, style, config.bucket.clone(), region)
            .map_err(|e| invalid(e.to_string()))?;
        let credentials = match (&config.access_key_id, &config.secret_access_key) {
            (Some(id), Some(key)) => Some(Credentials::new(id, key)),
            _ => Credentials::from_env(),
        };
        Ok(S3Multipart {
            bucket,
            credentials,
            prefix: config.prefix.clone(),
            client: http_client(),
        })
    }

    fn key(&self, path: &str) -> String {
        if self.prefix.is_empty() {
            path.to_string()
        } else {
            format!("{}/{path}", self.prefix)
        }
    }

    /// Start a multipart upload of `path`; returns its upload id.
    pub async fn create(&self, path: &str) -> Result<String> {
        let key = self.key(path);
        let url = CreateMultipartUpload::new(&self.bucket, self.credentials.as_ref(), &key)
            .sign(SIGNED_FOR);
        let body = self.send(self.client.post(url), "create").await?;
        let reply = CreateMultipartUpload::parse_response(&body)
            .map_err(|e| s3_error("create multipart upload", e))?;
        Ok(reply.upload_id().to_string())
    }

    /// Upload part `number` (from 1); returns its ETag.
    pub async fn upload_part(
        &self,
        path: &str,
        upload_id: &str,
        number: u16,
        body: Vec<u8>,
    ) -> Result<String> {
        let key = self.key(path);
        let url = UploadPart::new(
            &self.bucket,
            self.credentials.as_ref(),
            &key,
            number,
            upload_id,
        )
        .sign(SIGNED_FOR);
        let response = self
            .client
            .put(url)
            .body(body)
            .send()
            .await
            .map_err(|e| s3_error("upload part", e))?;
        let response = checked(response, "upload part").await?;
        response
            .headers()
            .get("etag")
            .and_then(|tag| tag.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| s3_error("upload part", "no ETag in the reply"))
    }

    /// Join the parts (tags in part order) into the object: no byte is copied again.
    pub async fn complete(&self, path: &str, upload_id: &str, etags: &[String]) -> Result<()> {
        let key = self.key(path);
        let action = CompleteMultipartUpload::new(
            &self.bucket,
            self.credentials.as_ref(),
            &key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = action.sign(SIGNED_FOR);
        let body = action.body();
        let reply = self
            .send(self.client.post(url).body(body), "complete")
            .await?;
        // S3 may answer 200 with an error document when completing fails late.
        if reply.contains("<Error>") {
            return Err(s3_error("complete multipart upload", reply));
        }
        Ok(())
    }

    /// Drop a multipart upload and its parts (best effort: it may be gone already).
    pub async fn abort(&self, path: &str, upload_id: &str) -> Result<()> {
        let key = self.key(path);
        let url =
            AbortMultipartUpload::new(&self.bucket, self.credentials.as_ref(), &key, upload_id)
                .sign(SIGNED_FOR);
        let response = self
            .client
            .delete(url)
            .send()
            .await
            .map_err(|e| s3_error("abort multipart upload", e))?;
        if response.status().is_success() || response.status().as_u16() == 404 {
            return Ok(());
        }
        checked(response, "abort multipart upload").await.map(drop)
    }

    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> Result<String> {
        let response = request.send().await.map_err(|e| s3_error(what, e))?;
        checked(response, what)
            .await?
            .text()
            .await
            .map_err(|e| s3_error(what, e))
    }
}

async fn checked(response: reqwest::Response, what: &str) -> Result<reqwest::Response> {
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    Err(s3_error(what, format!("{status}: {body}")))
}

fn s3_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::remote(
        ErrorCode::Internal,
        format!("object storage error ({what}): {e}"),
    )
}
