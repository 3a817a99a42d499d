//! File columns: single and chunked uploads, downloads (whole or by range),
//! deletes.

use super::*;

impl Ctx {
    pub(super) async fn upload(
        &self,
        s: &'static Schema,
        id: Uuid,
        col: &str,
        req: Request,
    ) -> Response {
        if !self.exists(s, id) {
            return not_found(s, id);
        }
        let q = Query::parse(&self.query);
        let name = req
            .headers()
            .get("x-ms-file-name")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| q.get("x-ms-file-name").map(str::to_owned))
            .unwrap_or_else(|| "file.bin".to_owned());
        let chunked = req
            .headers()
            .get("x-ms-transfer-mode")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked {
            return self.start_upload(s, id, col, name);
        }
        if let Some(token) = q.get("sessiontoken") {
            let token = token.to_owned();
            return self.upload_chunk(&token, req).await;
        }
        let body = match read_limited(
            &self.sim,
            req.into_body(),
            FILE_LIMIT,
            "0x80044a02",
            "Attachment file size is too big.",
        )
        .await
        {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        if lock(&self.sim.db).put_file(s.entity_set, id, col, &name, body) {
            StatusCode::NO_CONTENT.into_response()
        } else {
            not_found(s, id)
        }
    }

    /// First request of a chunked upload: a session and where to send chunks.
    pub(super) fn start_upload(
        &self,
        s: &'static Schema,
        id: Uuid,
        col: &str,
        name: String,
    ) -> Response {
        let token = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
        lock(&self.sim.uploads).insert(
            token.clone(),
            Upload {
                entity_set: s.entity_set,
                id,
                column: col.to_owned(),
                name,
                data: Vec::new(),
            },
        );
        let mut resp = StatusCode::OK.into_response();
        let h = resp.headers_mut();
        let location = format!("{}/{col}?sessiontoken={token}", self.entity_url(s, id));
        if let Ok(v) = HeaderValue::from_str(&location) {
            h.insert(header::LOCATION, v);
        }
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        h.insert("x-ms-chunk-size", HeaderValue::from(UPLOAD_CHUNK));
        h.insert(
            "access-control-expose-headers",
            HeaderValue::from_static("x-ms-chunk-size"),
        );
        resp
    }

    /// One chunk: 206 until the last byte arrives, then 204.
    pub(super) async fn upload_chunk(&self, token: &str, req: Request) -> Response {
        let range = req
            .headers()
            .get(header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_content_range);
        let Some((start, end, total)) = range else {
            return dv_error(
                StatusCode::BAD_REQUEST,
                "0x80090011",
                "A Content-Range header 'bytes start-end/total' is required for a chunk.",
            );
        };
        let body = match read_limited(
            &self.sim,
            req.into_body(),
            UPLOAD_CHUNK * 2,
            "0x80044a02",
            "The chunk is too big.",
        )
        .await
        {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let mut uploads = lock(&self.sim.uploads);
        let Some(upload) = uploads.get_mut(token) else {
            return dv_error(
                StatusCode::BAD_REQUEST,
                "0x80090012",
                "The upload session is invalid or has expired.",
            );
        };
        if start != upload.data.len() || end + 1 - start != body.len() || end >= total {
            return dv_error(
                StatusCode::BAD_REQUEST,
                "0x80090013",
                &format!(
                    "The chunk range {start}-{end}/{total} does not continue the upload at byte {}.",
                    upload.data.len()
                ),
            );
        }
        upload.data.extend_from_slice(&body);
        if upload.data.len() < total {
            return StatusCode::PARTIAL_CONTENT.into_response();
        }
        let Some(done) = uploads.remove(token) else {
            return dv_error(
                StatusCode::BAD_REQUEST,
                "0x80090012",
                "The upload session is invalid.",
            );
        };
        drop(uploads);
        let stored = lock(&self.sim.db).put_file(
            done.entity_set,
            done.id,
            &done.column,
            &done.name,
            Bytes::from(done.data),
        );
        if stored {
            StatusCode::NO_CONTENT.into_response()
        } else {
            dv_error(
                StatusCode::NOT_FOUND,
                "0x80040217",
                "The record was deleted during the upload.",
            )
        }
    }

    pub(super) fn delete_file(&self, s: &'static Schema, id: Uuid, col: &str) -> Response {
        let mut db = lock(&self.sim.db);
        match db.tables.get_mut(s.entity_set).and_then(|t| t.get_mut(&id)) {
            Some(row) => {
                row.files.remove(col);
                StatusCode::NO_CONTENT.into_response()
            }
            None => not_found(s, id),
        }
    }

    pub(super) fn exists(&self, s: &Schema, id: Uuid) -> bool {
        lock(&self.sim.db)
            .tables
            .get(s.entity_set)
            .is_some_and(|t| t.contains_key(&id))
    }

    pub(super) fn download(&self, s: &'static Schema, id: Uuid, col: &str) -> Response {
        let (name, data) = {
            let db = lock(&self.sim.db);
            let Some(row) = db.tables.get(s.entity_set).and_then(|t| t.get(&id)) else {
                return not_found(s, id);
            };
            match row.files.get(col) {
                Some(f) => (f.name.clone(), f.data.clone()),
                None => {
                    return dv_error(
                        StatusCode::NOT_FOUND,
                        "0x80060891",
                        &format!("No file attachment found for attribute: {col} EntityId: {id}."),
                    );
                }
            }
        };
        let abort_after = *lock(&self.sim.abort_downloads_after);
        let size = data.len();
        // Streamed in 64 KiB chunks, as a large file would be.
        let chunks = (0..size.div_ceil(CHUNK))
            .map(move |i| data.slice(i * CHUNK..((i + 1) * CHUNK).min(size)));
        let mut resp = match abort_after {
            None => {
                let stream = futures_util::stream::iter(chunks.map(Ok::<_, std::io::Error>));
                let mut resp = Response::new(Body::from_stream(stream));
                resp.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
                resp
            }
            Some(limit) => {
                // Send `limit` bytes, then fail: hyper drops the connection
                // without the final chunk, as a crashed server would.
                let mut sent = 0usize;
                let stream = futures_util::stream::iter(chunks)
                    .map(move |c| {
                        let take = c.len().min(limit.saturating_sub(sent));
                        sent += take;
                        c.slice(..take)
                    })
                    .take_while(|c| std::future::ready(!c.is_empty()))
                    .map(Ok::<_, std::io::Error>)
                    .chain(futures_util::stream::once(async {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        Err(std::io::Error::other("simulated crash mid-body"))
                    }));
                Response::new(Body::from_stream(stream))
            }
        };
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert("x-ms-file-size", HeaderValue::from(size));
        if let Ok(v) = HeaderValue::from_str(&name) {
            h.insert("x-ms-file-name", v);
        }
        h.insert(
            "mimetype",
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(
            "access-control-expose-headers",
            HeaderValue::from_static("x-ms-file-size; x-ms-file-name; mimetype"),
        );
        resp
    }
}

pub(super) const CHUNK: usize = 64 * 1024;

/// `bytes 0-4194303/25870370` → (0, 4194303, 25870370).
pub(super) fn parse_content_range(v: &str) -> Option<(usize, usize, usize)> {
    let v = v.trim().strip_prefix("bytes")?.trim();
    let (range, total) = v.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end, total) = (
        start.trim().parse().ok()?,
        end.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (start <= end).then_some((start, end, total))
}
