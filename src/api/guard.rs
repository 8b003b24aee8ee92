//! The last line of defence against a panic in a handler: [`CatchPanicLayer`] turns a panic
//! while a call is being answered into an `INTERNAL` status for that call alone, so the
//! connection (and every other call on it) goes on. No remote input is meant to reach a panic
//! (the fuzz tests check that); this keeps one bug from becoming a disconnect.

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::FutureExt;
use tonic::body::Body;

/// The tower layer of [`CatchPanic`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CatchPanicLayer;

impl<S> tower::Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;
    fn layer(&self, inner: S) -> CatchPanic<S> {
        CatchPanic { inner }
    }
}

/// Answers a call whose handler panicked (before its response was returned) with
/// `INTERNAL`; see the module documentation.
#[derive(Clone, Debug)]
pub struct CatchPanic<S> {
    inner: S,
}

type Answer<E> = Pin<Box<dyn Future<Output = Result<http::Response<Body>, E>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for CatchPanic<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Answer<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let answer = std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(req)));
        Box::pin(async move {
            let outcome = match answer {
                Ok(future) => AssertUnwindSafe(future).catch_unwind().await,
                Err(panic) => Err(panic),
            };
            match outcome {
                Ok(answer) => answer,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(path, panic = what, "a handler panicked");
                    Ok(super::status::refuse(
                        super::status::Reason::ServerFailed,
                        format!("{path}: the server failed while answering this call"),
                    )
                    .into_http())
                }
            }
        })
    }
}
