//! W3C Trace Context (`traceparent`): the gateway's trace goes on through kci-receiver into the
//! AMQP message, so that a CP's consumer continues the same trace.
//!
//! `POST /kcis` reads the gateway's `traceparent` (when it sends one that is valid; anything else
//! is ignored, never refused: it is optional metadata); intake is a span of that trace with an id
//! of its own, and the outbox event carries `traceparent: 00-<the gateway's trace id>-<intake's
//! span id>-<the gateway's flags>` as an AMQP header, so the consumer's span is intake's child.
//! Without one, intake starts a trace. The request's log lines carry the trace id.

use std::fmt;

/// A trace id, a span id and the trace flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceContext {
    /// Reads a `traceparent` header value (version 00, or a later one read as 00 allows);
    /// `None` for anything malformed, an all-zero id, or version `ff`.
    pub fn parse(header: &str) -> Option<TraceContext> {
        let header = header.trim();
        let mut parts = header.split('-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let span_id = parts.next()?;
        let flags = parts.next()?;
        let lower_hex = |text: &str, len: usize| {
            text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !lower_hex(version, 2)
            || version == "ff"
            || !lower_hex(trace_id, 32)
            || !lower_hex(span_id, 16)
            || !lower_hex(flags, 2)
            || (version == "00" && parts.next().is_some())
        {
            return None;
        }
        let mut context = TraceContext {
            trace_id: [0; 16],
            span_id: [0; 8],
            flags: u8::from_str_radix(flags, 16).ok()?,
        };
        decode(trace_id, &mut context.trace_id)?;
        decode(span_id, &mut context.span_id)?;
        if context.trace_id == [0; 16] || context.span_id == [0; 8] {
            return None;
        }
        Some(context)
    }

    /// A new span: in `parent`'s trace with its flags, or the first of a new sampled trace.
    pub fn child_of(parent: Option<&TraceContext>) -> TraceContext {
        let random = uuid::Uuid::new_v4().into_bytes();
        let mut span_id = [0; 8];
        span_id.copy_from_slice(&random[..8]);
        // A v4 uuid's first 8 bytes are random: never all zero in practice, and made sure of.
        span_id[7] |= 1;
        match parent {
            Some(parent) => TraceContext {
                trace_id: parent.trace_id,
                span_id,
                flags: parent.flags,
            },
            None => TraceContext {
                trace_id: uuid::Uuid::new_v4().into_bytes(),
                span_id,
                flags: 0x01,
            },
        }
    }

    /// The trace id, 32 lower-case hexadecimal digits.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

/// The `traceparent` header value.
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }
}

/// Lower-case hex, written into one string (it runs for every request: no allocation per byte).
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

fn decode(text: &str, into: &mut [u8]) -> Option<()> {
    for (index, byte) in into.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_read_and_continued() {
        let parent = TraceContext::parse(GATEWAY).unwrap();
        assert_eq!(parent.to_string(), GATEWAY);
        let child = TraceContext::child_of(Some(&parent));
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        assert_eq!(child.flags, 1);
        assert_eq!(TraceContext::parse(&child.to_string()), Some(child));
    }

    #[test]
    fn anything_malformed_is_ignored() {
        for header in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(header), None, "{header}");
        }
        // A later version may carry more fields.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
    }

    #[test]
    fn without_a_parent_a_new_sampled_trace_starts() {
        let first = TraceContext::child_of(None);
        assert_eq!(first.flags, 1);
        assert_ne!(first.trace_id, [0; 16]);
        assert_ne!(first.span_id, [0; 8]);
        assert_ne!(TraceContext::child_of(None).trace_id, first.trace_id);
    }
}
