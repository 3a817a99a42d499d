//! Streaming decoders and encoders for HTTP bodies, from async-compression
//! (the codecs tower-http uses): a body becomes an `AsyncBufRead`, goes
//! through the codec and comes back a body of bounded chunks. Memory stays
//! at the codec's window plus one chunk, whatever the body's size.
//!
//! An error of the body underneath (Dataverse broke off) and a coding
//! error (a stream that is corrupt or ends early) both end the result with
//! an error, so the caller's connection is aborted rather than ended.

use std::io;

use async_compression::Level;
use async_compression::tokio::bufread::{
    BrotliDecoder, BrotliEncoder, GzipDecoder, GzipEncoder, ZlibDecoder, ZlibEncoder,
};
use axum::BoxError;
use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyDataStream, BodyExt, StreamBody};
use tokio::io::AsyncRead;
use tokio_util::io::{ReaderStream, StreamReader};

use super::Coding;

/// A body after a codec: its frames are the codec's output.
pub type CodedBody = UnsyncBoxBody<Bytes, BoxError>;

/// Size of the chunks a codec's output is cut into.
const CHUNK: usize = 16 * 1024;

/// `body` decoded from `coding`.
pub fn decode<B>(body: B, coding: Coding) -> CodedBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let input = reader(body);
    match coding {
        Coding::Gzip => {
            let mut decoder = GzipDecoder::new(input);
            // Several gzip members in a row are one valid body.
            decoder.multiple_members(true);
            into_body(decoder)
        }
        Coding::Brotli => into_body(BrotliDecoder::new(input)),
        Coding::Deflate => into_body(ZlibDecoder::new(input)),
    }
}

/// `body` encoded as `coding` at `level` (1 fastest … 9 smallest; brotli
/// takes it as its quality).
pub fn encode<B>(body: B, coding: Coding, level: u32) -> CodedBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let input = reader(body);
    let level = Level::Precise(level as i32);
    match coding {
        Coding::Gzip => into_body(GzipEncoder::with_quality(input, level)),
        Coding::Brotli => into_body(BrotliEncoder::with_quality(input, level)),
        Coding::Deflate => into_body(ZlibEncoder::with_quality(input, level)),
    }
}

/// The body's data as a reader; its errors become I/O errors that keep
/// the original as their source.
fn reader<B>(body: B) -> impl tokio::io::AsyncBufRead + Send + 'static
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let data = BodyDataStream::new(body).map_err(|e| io::Error::other(e.into()));
    StreamReader::new(data)
}

fn into_body<R>(codec: R) -> CodedBody
where
    R: AsyncRead + Send + 'static,
{
    let chunks = ReaderStream::with_capacity(codec, CHUNK)
        .map_ok(Frame::data)
        .map_err(BoxError::from);
    StreamBody::new(chunks).boxed_unsync()
}
