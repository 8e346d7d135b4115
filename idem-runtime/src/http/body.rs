//! The body types the layer hands to the inner service and to the client.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pub(super) fn to_bytes<D: Buf>(mut data: D) -> Bytes {
    data.copy_to_bytes(data.remaining())
}

pin_project! {
    /// The request body the inner service receives: the client's body untouched (requests the
    /// layer does not apply to), or the bytes the layer buffered to fingerprint the request.
    ///
    /// axum's router accepts it as is; a plain tower service takes `Request<RequestBody<B>>`
    /// (or is generic over the body).
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Streaming { #[pin] body: B },
        Buffered { data: Option<Bytes>, trailers: Option<HeaderMap> },
    }
}

impl<B> RequestBody<B> {
    /// The client's body, passed through.
    pub fn streaming(body: B) -> Self {
        RequestBody {
            kind: RequestKind::Streaming { body },
        }
    }

    /// A body already read: `data`, then `trailers` if any.
    pub fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        let data = (!data.is_empty()).then_some(data);
        RequestBody {
            kind: RequestKind::Buffered { data, trailers },
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            RequestKind::Streaming { .. } => "streaming",
            RequestKind::Buffered { .. } => "buffered",
        };
        f.debug_struct("RequestBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl<B: Body> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            RequestKindProj::Streaming { body } => body
                .poll_frame(cx)
                .map(|frame| frame.map(|r| r.map(|f| f.map_data(to_bytes)))),
            RequestKindProj::Buffered { data, trailers } => Poll::Ready(match data.take() {
                Some(d) => Some(Ok(Frame::data(d))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Streaming { body } => body.is_end_stream(),
            RequestKind::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Streaming { body } => body.size_hint(),
            RequestKind::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

pin_project! {
    /// The response body the client receives: the inner service's body untouched, a replayed
    /// or just-kept body, or an error document from the layer.
    pub struct ResponseBody<B: Body> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B: Body> {
        Full { data: Option<Bytes> },
        Streaming { #[pin] body: B },
        // A body the layer began to read before deciding not to keep it: the frames read so far,
        // the error that stopped the reading (if any), then the rest.
        Resumed { prefix: VecDeque<Frame<Bytes>>, error: Option<B::Error>, failed: bool, rest: Pin<Box<B>> },
    }
}

impl<B: Body> ResponseBody<B> {
    /// The inner service's body, passed through.
    pub fn streaming(body: B) -> Self {
        ResponseBody {
            kind: ResponseKind::Streaming { body },
        }
    }

    /// A complete body in one piece.
    pub fn full(data: Bytes) -> Self {
        let data = (!data.is_empty()).then_some(data);
        ResponseBody {
            kind: ResponseKind::Full { data },
        }
    }

    /// The frames already read from `rest`, then the error that stopped the reading, if any,
    /// then (without an error) whatever `rest` still gives.
    pub(crate) fn resumed(
        prefix: VecDeque<Frame<Bytes>>,
        error: Option<B::Error>,
        rest: Pin<Box<B>>,
    ) -> Self {
        ResponseBody {
            kind: ResponseKind::Resumed {
                prefix,
                error,
                failed: false,
                rest,
            },
        }
    }
}

impl<B: Body> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            ResponseKind::Full { .. } => "full",
            ResponseKind::Streaming { .. } => "streaming",
            ResponseKind::Resumed { .. } => "resumed",
        };
        f.debug_struct("ResponseBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            ResponseKindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseKindProj::Streaming { body } => body
                .poll_frame(cx)
                .map(|frame| frame.map(|r| r.map(|f| f.map_data(to_bytes)))),
            ResponseKindProj::Resumed {
                prefix,
                error,
                failed,
                rest,
            } => {
                if let Some(frame) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                if let Some(e) = error.take() {
                    *failed = true;
                    return Poll::Ready(Some(Err(e)));
                }
                if *failed {
                    return Poll::Ready(None);
                }
                rest.as_mut()
                    .poll_frame(cx)
                    .map(|frame| frame.map(|r| r.map(|f| f.map_data(to_bytes))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Full { data } => data.is_none(),
            ResponseKind::Streaming { body } => body.is_end_stream(),
            ResponseKind::Resumed {
                prefix,
                error,
                failed,
                rest,
            } => prefix.is_empty() && error.is_none() && (*failed || rest.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseKind::Streaming { body } => body.size_hint(),
            ResponseKind::Resumed {
                prefix,
                error,
                failed,
                rest,
            } => {
                let read: u64 = prefix
                    .iter()
                    .filter_map(|f| f.data_ref())
                    .map(|d| d.len() as u64)
                    .sum();
                if error.is_some() || *failed {
                    // The body ends in an error: claim no exact size, so that the server does
                    // not announce a `content-length` that makes the cut body look complete.
                    let mut hint = SizeHint::new();
                    hint.set_lower(read);
                    return hint;
                }
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + read);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + read);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn buffered_request_gives_data_then_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "3".parse().unwrap());
        let body = RequestBody::<Full<Bytes>>::buffered(
            Bytes::from_static(b"abc"),
            Some(trailers.clone()),
        );
        assert_eq!(body.size_hint().exact(), Some(3));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "abc");
        assert!(RequestBody::<Full<Bytes>>::buffered(Bytes::new(), None).is_end_stream());
    }

    #[tokio::test]
    async fn resumed_response_gives_prefix_then_rest() {
        let rest = Full::new(Bytes::from_static(b"world"));
        let prefix = VecDeque::from([Frame::data(Bytes::from_static(b"hello "))]);
        let body = ResponseBody::resumed(prefix, None, Box::pin(rest));
        assert_eq!(body.size_hint().exact(), Some(11));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello world");
    }

    /// A body that fails, then would give more data.
    struct FailsOnce(bool);
    impl Body for FailsOnce {
        type Data = Bytes;
        type Error = &'static str;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
            if std::mem::replace(&mut self.0, true) {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                    b"after the error",
                )))))
            } else {
                Poll::Ready(Some(Err("boom")))
            }
        }
    }

    #[tokio::test]
    async fn resumed_response_replays_the_error_and_stops() {
        let mut rest = Box::pin(FailsOnce(false));
        let err = rest.frame().await.unwrap().unwrap_err();
        let prefix = VecDeque::from([Frame::data(Bytes::from_static(b"part"))]);
        let mut body = ResponseBody::resumed(prefix, Some(err), rest);
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "part"
        );
        assert_eq!(body.frame().await.unwrap().unwrap_err(), "boom");
        assert!(body.frame().await.is_none(), "nothing after the error");
        assert!(body.is_end_stream());
    }
}
