//! The request a line is logged for, without a `tracing` span per request.
//!
//! In the JSON format, a line logged while a request is served carries that request under
//! `span` (`{"name": "request", "request_id": …, "method": …, "route": …}`). The request is known
//! from [`InRequest`], which sets it as the thread's current request while it polls the
//! request's future: a pointer swap per poll, where a span costs the registry an entry, its
//! fields formatted up front, and a push and pop on each poll (about a tenth of a cached status
//! read's instructions, by `bench/instructions`). The human format keeps its span prefix, made by
//! the outer layer only when that format is on.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::ser::{Serialize, SerializeMap, Serializer};

/// What a line says of the request it was logged for.
pub trait RequestContext: Send + Sync {
    fn request_id(&self) -> &str;
    fn method(&self) -> &str;
    fn route(&self) -> &str;
}

/// A request as lines name it.
pub type LoggedRequest = Arc<dyn RequestContext>;

thread_local! {
    static CURRENT: RefCell<Option<LoggedRequest>> = const { RefCell::new(None) };
}

/// The request this thread is serving now, if any.
pub fn current() -> Option<LoggedRequest> {
    CURRENT.with_borrow(Clone::clone)
}

/// The current request as the `span` member of a JSON line.
pub(super) fn span_member() -> Option<SpanMember> {
    current().map(SpanMember)
}

pub(super) struct SpanMember(LoggedRequest);

impl Serialize for SpanMember {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let request = &*self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("name", "request")?;
        map.serialize_entry("request_id", request.request_id())?;
        map.serialize_entry("method", request.method())?;
        map.serialize_entry("route", request.route())?;
        map.end()
    }
}

pin_project_lite::pin_project! {
    /// `future`, polled with `request` as the thread's current request.
    pub struct InRequest<F> {
        request: Option<LoggedRequest>,
        #[pin]
        future: F,
    }
}

impl<F> InRequest<F> {
    pub fn new(request: LoggedRequest, future: F) -> Self {
        InRequest {
            request: Some(request),
            future,
        }
    }

    /// `future` in the request being served now (none if there is none): for work a handler
    /// spawns, whose lines belong to the request that started it.
    pub fn current(future: F) -> Self {
        InRequest {
            request: current(),
            future,
        }
    }
}

impl<F: Future> Future for InRequest<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _current = Current::set(this.request.clone());
        this.future.poll(cx)
    }
}

/// The thread's current request while it lives; the one before it again after, even if the
/// poll unwinds.
struct Current(Option<LoggedRequest>);

impl Current {
    fn set(request: Option<LoggedRequest>) -> Self {
        Current(CURRENT.replace(request))
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        CURRENT.set(self.0.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(&'static str);

    impl RequestContext for Fixed {
        fn request_id(&self) -> &str {
            self.0
        }
        fn method(&self) -> &str {
            "GET"
        }
        fn route(&self) -> &str {
            "/api/user"
        }
    }

    fn id_now() -> Option<String> {
        current().map(|r| r.request_id().to_owned())
    }

    #[tokio::test]
    async fn a_future_sees_its_request_and_the_thread_gets_the_one_before_back() {
        assert_eq!(id_now(), None);
        let outer = InRequest::new(Arc::new(Fixed("r-1")), async {
            assert_eq!(id_now().as_deref(), Some("r-1"));
            let inner = InRequest::new(Arc::new(Fixed("r-2")), async { id_now() }).await;
            assert_eq!(inner.as_deref(), Some("r-2"));
            // Spawned work carries the request that was current where it was made.
            let carried = InRequest::current(async { id_now() });
            tokio::task::yield_now().await;
            (id_now(), carried)
        });
        let (after_inner, carried) = outer.await;
        assert_eq!(after_inner.as_deref(), Some("r-1"));
        assert_eq!(id_now(), None);
        assert_eq!(carried.await.as_deref(), Some("r-1"));
    }
}
