//! What the steps of one request share.

use tokio::time::Instant;

use crate::app::AppState;
use crate::compression::AcceptEncoding;
use crate::http::access_log::RequestInfo;

/// One request on its way through the steps: the application serving it,
/// when it arrived, what its caller accepts, and what the access log
/// learns on the way.
pub struct Call<'a> {
    pub state: &'a AppState,
    pub arrived: Instant,
    pub accept: &'a AcceptEncoding,
    pub info: &'a mut RequestInfo,
}
