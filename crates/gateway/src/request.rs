//! The client's request: read under a size and time limit, two fields
//! parsed, the rest forwarded byte for byte.
//!
//! The gateway reads only `model` (to route) and `stream` (to choose how
//! the answer is relayed). Re-serialising the body would reorder keys,
//! change number formatting and cost a full allocation tree per request;
//! instead the body is parsed once with borrowed strings (which also
//! validates it: a bad body is refused here, not by every upstream in
//! turn) and forwarded as the same bytes. A provider that knows the model
//! by another name gets the same bytes with only the `model` value
//! spliced.

use std::borrow::Cow;
use std::ops::Range;
use std::pin::pin;
use std::task::Poll;

use axum::body::Bytes;
use http_body_util::BodyExt as _;
use serde::Deserialize;
use tokio::time::Instant;

/// The two fields the gateway reads.
#[derive(Debug, Deserialize)]
pub(crate) struct RequestHead<'a> {
    #[serde(borrow, default)]
    pub(crate) model: Option<ModelName<'a>>,
    #[serde(default)]
    pub(crate) stream: Option<bool>,
}

/// The `model` value, borrowed from the body unless it has escapes.
///
/// A newtype because serde borrows a `Cow<str>` only as a field of its own:
/// inside an `Option` it deserializes an owned `String`, an allocation and
/// a copy per request.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub(crate) struct ModelName<'a>(#[serde(borrow)] pub(crate) Cow<'a, str>);

impl<'a> RequestHead<'a> {
    /// Parses (and so validates) a request body, which must be a JSON
    /// object (serde would also accept an array as a struct).
    ///
    /// The body is checked to be UTF-8 once, as a whole, then parsed as a
    /// `str`: parsed as bytes, every string in it would be validated on
    /// its own, a call per string that cost more than the rest of the
    /// parse (a chat request is mostly short strings).
    pub(crate) fn parse(body: &'a [u8]) -> Result<Self, serde_json::Error> {
        if body.get(skip_ws(body, 0)) != Some(&b'{') {
            return Err(serde::de::Error::custom("expected a JSON object"));
        }
        let text = std::str::from_utf8(body).map_err(|e| {
            serde::de::Error::custom(format_args!(
                "not UTF-8: invalid byte at offset {}",
                e.valid_up_to()
            ))
        })?;
        serde_json::from_str(text)
    }
}

/// Why a body could not be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// Longer than the limit (declared or actual).
    TooLarge { limit: usize },
    /// The client did not send it in time.
    TimedOut,
    /// The connection failed while reading.
    Read,
}

/// Reads the whole body, refusing a declared or actual length above
/// `limit` and a body not complete by `deadline`.
///
/// Generic over the body: `serve` reads hyper's own, unboxed; an `axum`
/// application mounting the gateway's router passes its `Body`.
pub(crate) async fn read_body<B>(
    mut body: B,
    declared: Option<u64>,
    limit: usize,
    deadline: Instant,
) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let read = async {
        // The first chunk is kept as it is: a body that arrives in one
        // (nearly every request's) is neither copied nor collected in a
        // `Vec` first.
        let mut first: Option<Bytes> = None;
        let mut more: Vec<Bytes> = Vec::new();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(chunk) = frame.map_err(|_| BodyError::Read)?.into_data() else {
                continue; // trailers
            };
            total += chunk.len();
            if total > limit {
                return Err(BodyError::TooLarge { limit });
            }
            match first {
                None => first = Some(chunk),
                Some(_) => more.push(chunk),
            }
        }
        Ok(match first {
            None => Bytes::new(),
            Some(only) if more.is_empty() => only,
            Some(head) => {
                let mut all = Vec::with_capacity(total);
                all.extend_from_slice(&head);
                for chunk in &more {
                    all.extend_from_slice(chunk);
                }
                Bytes::from(all)
            }
        })
    };
    // A body that is already here is read without arming a timer (a
    // runtime-handle clone and a timer-wheel entry): only a body still on
    // its way is raced against the deadline.
    let mut read = pin!(read);
    match std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await {
        Poll::Ready(read) => read,
        Poll::Pending => tokio::time::timeout_at(deadline, read)
            .await
            .unwrap_or(Err(BodyError::TimedOut)),
    }
}

/// The byte range of the top-level `model` member's value in a JSON
/// object that already parsed (so the scan can trust its syntax).
pub(crate) fn model_span(body: &[u8]) -> Option<Range<usize>> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(body, i);
        if body.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = skip_string(body, i)?;
        let key = &body[i..key_end];
        i = skip_ws(body, key_end);
        if body.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_ws(body, i + 1);
        let end = skip_value(body, start)?;
        if is_model_key(key) {
            return Some(start..end);
        }
        i = skip_ws(body, end);
        match body.get(i) {
            Some(b',') => i += 1,
            _ => return None,
        }
    }
}

/// Whether a raw JSON string token (quotes included) is `"model"`,
/// escapes decoded.
fn is_model_key(token: &[u8]) -> bool {
    if token == b"\"model\"" {
        return true;
    }
    token.contains(&b'\\') && serde_json::from_slice::<String>(token).is_ok_and(|k| k == "model")
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b
        .get(i)
        .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// The end (exclusive) of the string starting at `i` (a `"`).
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while let Some(&c) = b.get(j) {
        match c {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// The end (exclusive) of the value starting at `i`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while let Some(&c) = b.get(j) {
                match c {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while b
                .get(j)
                .is_some_and(|c| !matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
            {
                j += 1;
            }
            Some(j)
        }
    }
}

/// `body` with the bytes at `span` replaced by `model` as a JSON string.
pub(crate) fn rewrite_model(body: &Bytes, span: Range<usize>, model: &str) -> Bytes {
    let quoted = serde_json::to_string(model).unwrap_or_else(|_| format!("\"{model}\""));
    let mut out = Vec::with_capacity(body.len() + quoted.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(&body[span.end..]);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn span_text(body: &str) -> Option<&str> {
        model_span(body.as_bytes()).map(|r| &body[r])
    }

    #[test]
    fn finds_the_top_level_model_only() {
        assert_eq!(span_text(r#"{"model":"a","x":1}"#), Some(r#""a""#));
        let nested = r#" { "messages": [{"model": "inner", "c": "}\"]"}], "n": -1.5e3,
            "ok": true, "model" : "outer" } "#;
        assert_eq!(span_text(nested), Some(r#""outer""#));
        assert_eq!(span_text(r#"{"mod\u0065l":"esc"}"#), Some(r#""esc""#));
        assert_eq!(span_text(r#"{"x":{"model":"no"}}"#), None);
        assert_eq!(span_text(r#"{"model":null}"#), Some("null"));
        assert_eq!(span_text("[1]"), None);
        assert_eq!(span_text("{}"), None);
    }

    #[test]
    fn rewrite_keeps_every_other_byte() {
        let body = Bytes::from_static(br#"{"stream":true, "model":"public","z":[1, 2]}"#);
        let span = model_span(&body).unwrap();
        let out = rewrite_model(&body, span, "real/\"name\"");
        assert_eq!(
            &out[..],
            br#"{"stream":true, "model":"real/\"name\"","z":[1, 2]}"#
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "real/\"name\"");
    }

    #[test]
    fn head_parses_borrowed_and_validates() {
        let h = RequestHead::parse(br#" {"model":"m","stream":true,"other":[1]}"#).unwrap();
        let model = h.model.map(|m| m.0);
        assert!(matches!(model, Some(Cow::Borrowed("m"))), "{model:?}");
        assert_eq!(h.stream, Some(true));
        // An escape cannot be borrowed: the unescaped name is owned.
        let h = RequestHead::parse(br#"{"model":"a\u0062"}"#).unwrap();
        let model = h.model.map(|m| m.0);
        assert!(
            matches!(&model, Some(Cow::Owned(m)) if m == "ab"),
            "{model:?}"
        );
        assert!(RequestHead::parse(br#"{"model":"m""#).is_err());
        assert!(RequestHead::parse(br#"{"model":5}"#).is_err());
        assert!(RequestHead::parse(br#"{"model":"a","model":"b"}"#).is_err());
        assert!(RequestHead::parse(br#"["model"]"#).is_err());
        assert!(RequestHead::parse(b"").is_err());
        let e = RequestHead::parse(b"{\"model\":\"m\xff\"}").unwrap_err();
        assert_eq!(e.to_string(), "not UTF-8: invalid byte at offset 11");
        let h = RequestHead::parse(br#"{"stream":null}"#).unwrap();
        assert_eq!((h.model.is_none(), h.stream), (true, None));
    }

    #[tokio::test]
    async fn body_limits() {
        let far = Instant::now() + std::time::Duration::from_secs(5);
        let ok = read_body(Body::from("12345"), Some(5), 5, far).await;
        assert_eq!(ok.unwrap(), Bytes::from_static(b"12345"));
        let declared = read_body(Body::from("x"), Some(6), 5, far).await;
        assert_eq!(declared.unwrap_err(), BodyError::TooLarge { limit: 5 });
        let chunks = futures_util::stream::iter(["abc", "def"].map(Ok::<_, std::io::Error>));
        let actual = read_body(Body::from_stream(chunks), None, 5, far).await;
        assert_eq!(actual.unwrap_err(), BodyError::TooLarge { limit: 5 });
        let chunks = futures_util::stream::iter(["ab", "c", "de"].map(Ok::<_, std::io::Error>));
        let multi = read_body(Body::from_stream(chunks), None, 5, far).await;
        assert_eq!(multi.unwrap(), Bytes::from_static(b"abcde"));
    }
}
