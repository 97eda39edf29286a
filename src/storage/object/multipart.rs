//! S3 calls made directly, where OpenDAL hides what netdisk needs: multipart uploads (a
//! resumable upload must keep the upload id and part tags in the staged upload's record so
//! another call, or another server, continues the same multipart upload), and one response
//! of a folder listing at a time (a page of `ls` stops as soon as it is complete, which
//! needs the boundaries of S3's responses). Requests are signed with `rusty-s3` and sent
//! through the shared [`crate::objstore::http_client`].

use std::time::{Duration, SystemTime};

use rusty_s3::actions::{
    AbortMultipartUpload, CompleteMultipartUpload, CompleteMultipartUploadResponse,
    CreateMultipartUpload, ListObjectsV2, S3Action, UploadPart,
};
use rusty_s3::{Bucket, Credentials, UrlStyle};

use time::format_description::well_known::Rfc3339;

use crate::error::{Error, ErrorCode, Result};
use crate::objstore::{http_client, ObjectStoreConfig};

/// How long a signed request stays valid (it is sent at once).
const SIGNED_FOR: Duration = Duration::from_secs(600);

/// One response of a folder listing: every key between the request's start and the last
/// key or folder it names (S3 sorts them together, by bytes).
pub struct ListedKeys {
    /// Objects directly in the folder: key (relative to the prefix, as the operator's
    /// paths are), size, time and ETag.
    pub objects: Vec<(String, u64, SystemTime, Option<String>)>,
    /// Sub-folders: keys ending in `/`, each standing for everything under it.
    pub folders: Vec<String>,
    /// Where the next response continues, if the listing was cut here.
    pub next: Option<String>,
}

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

    /// Join the parts (tags in part order) into the object: no byte is copied again. Only
    /// if the object is still the one `replacing` names: `Some(None)` none (If-None-Match),
    /// `Some(Some(etag))` that version (If-Match), `None` whatever is there. Returns the new
    /// object's ETag, or `None` when the condition failed (the upload stays, to complete
    /// again once the caller has looked anew).
    pub async fn complete(
        &self,
        path: &str,
        upload_id: &str,
        etags: &[String],
        replacing: Option<Option<&str>>,
    ) -> Result<Option<String>> {
        let key = self.key(path);
        let action = CompleteMultipartUpload::new(
            &self.bucket,
            self.credentials.as_ref(),
            &key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = action.sign(SIGNED_FOR);
        let mut request = self.client.post(url).body(action.body());
        match replacing {
            Some(None) => request = request.header("if-none-match", "*"),
            Some(Some(etag)) => request = request.header("if-match", etag),
            None => {}
        }
        let response = request
            .send()
            .await
            .map_err(|e| s3_error("complete multipart upload", e))?;
        let status = response.status().as_u16();
        let reply = response
            .text()
            .await
            .map_err(|e| s3_error("complete multipart upload", e))?;
        // 412, or 404 NoSuchKey for If-Match on an object removed meanwhile; S3 may also
        // answer 200 with an error document when completing fails late.
        let lost = status == 412
            || (status == 404 && reply.contains("NoSuchKey"))
            || reply.contains("<Code>PreconditionFailed</Code>");
        if lost {
            return Ok(None);
        }
        if !(200..300).contains(&status) || reply.contains("<Error>") {
            return Err(s3_error(
                "complete multipart upload",
                format!("{status}: {reply}"),
            ));
        }
        let etag = CompleteMultipartUploadResponse::parse(&reply)
            .map(|done| done.etag().to_string())
            .map_err(|e| s3_error("complete multipart upload", e))?;
        Ok(Some(etag))
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

    /// One ListObjectsV2 response of the keys starting with `prefix`, with `/` as
    /// delimiter: at most `max_keys` keys and folders after `start_after`, or continuing
    /// from `token`.
    pub async fn list_keys(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        token: Option<&str>,
        max_keys: usize,
    ) -> Result<ListedKeys> {
        let prefix = self.key(prefix);
        let start = start_after.map(|start| self.key(start));
        let mut action = ListObjectsV2::new(&self.bucket, self.credentials.as_ref());
        action.with_prefix(prefix.as_str());
        action.with_delimiter("/");
        action.with_max_keys(max_keys);
        match (token, &start) {
            (Some(token), _) => action.with_continuation_token(token),
            (None, Some(start)) => action.with_start_after(start.as_str()),
            (None, None) => {}
        }
        let url = action.sign(SIGNED_FOR);
        let body = self.send(self.client.get(url), "list").await?;
        let reply =
            ListObjectsV2::parse_response(&body).map_err(|e| s3_error("list objects", e))?;
        let root = self.key("");
        let relative = |key: String| key.strip_prefix(root.as_str()).map(str::to_string);
        let objects = reply
            .contents
            .into_iter()
            .filter_map(|object| {
                let modified = object
                    .last_modified
                    .as_deref()
                    .and_then(|t| time::OffsetDateTime::parse(t, &Rfc3339).ok())
                    .map(SystemTime::from)
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                let size = object.size.unwrap_or(0);
                Some((relative(object.key)?, size, modified, object.etag))
            })
            .collect();
        let folders = reply
            .common_prefixes
            .into_iter()
            .filter_map(|folder| relative(folder.prefix))
            .collect();
        Ok(ListedKeys {
            objects,
            folders,
            next: reply.next_continuation_token,
        })
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
