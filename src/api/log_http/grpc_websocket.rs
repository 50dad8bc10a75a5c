//! The server half of improbable-eng's grpc-web WebSocket transport: the protocol Gitpod's
//! server speaks to a workspace's supervisor (`components/server/src/util/grpc-web-ws-transport.ts`,
//! its copy of improbable-eng `client/grpc-web/src/transports/websocket/websocket.ts`; the
//! reference server is improbable-eng `go/grpcweb/websocket_wrapper.go`).
//!
//! One call per socket, subprotocol `grpc-websockets`:
//! - client → server: first the call's metadata as `key: value\r\n` lines; then each request
//!   message as `0x00` followed by a gRPC frame (flag byte, 4-byte big-endian length,
//!   protobuf); then `0x01`, the end of the requests.
//! - server → client: grpc-web frames: a metadata frame (flag `0x80`, header lines) with the
//!   response headers, message frames (flag `0x00`), a metadata frame with the trailers
//!   (`grpc-status`, `grpc-message` percent-encoded); then the socket closes. A call refused
//!   before any answer sends only the trailers: the client takes its first metadata frame as
//!   the headers, and a close after headers alone as a trailers-only response (improbable-eng
//!   `client/grpc-web/src/client.ts`, `onTransportChunk` and `onTransportEnd`).
//!
//! Each frame goes in a WebSocket message of its own: the client's `ChunkParser` stops after a
//! metadata frame and parses what follows it only when the next message arrives.

use std::collections::HashMap;

use axum::extract::ws::{Message, WebSocket};
use bytes::{BufMut as _, Bytes, BytesMut};
use tonic::{Code, Status};

/// The WebSocket subprotocol of the transport.
pub const SUBPROTOCOL: &str = "grpc-websockets";

/// The most a client may send for one call (its metadata and its request): the calls
/// answered here take a few bytes.
pub const MAX_CALL_BYTES: usize = 16 * 1024;

/// The gRPC frame header: a flag byte and a 4-byte big-endian length.
const FRAME_HEADER: usize = 5;
const FLAG_METADATA: u8 = 0x80;
const FLAG_COMPRESSED: u8 = 0x01;
/// The client's prefix of a request chunk, and its end-of-requests signal.
const CLIENT_DATA: u8 = 0x00;
const CLIENT_FINISH_SEND: u8 = 0x01;

/// A call's metadata: header names in lower case.
#[derive(Debug, Default)]
pub struct Metadata(HashMap<String, String>);

impl Metadata {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn parse(text: &[u8]) -> Result<Self, Status> {
        let text = std::str::from_utf8(text)
            .ok()
            .filter(|t| {
                t.bytes()
                    .all(|b| b == b'\t' || b == b'\r' || b == b'\n' || (0x20..0x7f).contains(&b))
            })
            .ok_or_else(|| Status::invalid_argument("call metadata must be printable ASCII header lines"))?;
        let mut fields = HashMap::new();
        for line in text.split("\r\n").filter(|l| !l.is_empty()) {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| Status::invalid_argument("call metadata lines are `name: value`"))?;
            fields.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
        Ok(Self(fields))
    }
}

/// What a client sent for a call: its metadata and its one request message.
#[derive(Debug)]
pub struct Call {
    pub metadata: Metadata,
    pub request: Bytes,
}

/// One grpc-web call on an upgraded WebSocket.
pub struct GrpcWebSocket {
    socket: WebSocket,
    headers_sent: bool,
}

impl GrpcWebSocket {
    pub fn new(socket: WebSocket) -> Self {
        Self {
            socket,
            headers_sent: false,
        }
    }

    /// The call's metadata and its request (server-streaming and unary calls have one).
    pub async fn read_call(&mut self) -> Result<Call, Status> {
        let metadata = Metadata::parse(&self.next_payload().await?)?;
        let mut request = BytesMut::new();
        loop {
            let payload = self.next_payload().await?;
            match payload.split_first() {
                Some((&CLIENT_DATA, chunk)) => {
                    if request.len() + chunk.len() > MAX_CALL_BYTES {
                        return Err(too_big());
                    }
                    request.extend_from_slice(chunk);
                    if let Some(message) = complete_message(&request)? {
                        return Ok(Call {
                            metadata,
                            request: message,
                        });
                    }
                }
                Some((&CLIENT_FINISH_SEND, [])) => {
                    return Err(Status::invalid_argument(
                        "the requests ended before one complete request message",
                    ));
                }
                _ => {
                    return Err(Status::invalid_argument(
                        "not a grpc-web WebSocket frame: expected 0x00 and a gRPC frame, or 0x01",
                    ))
                }
            }
        }
    }

    /// Sends `message`, after the response headers if they have not gone yet.
    pub async fn send_message(&mut self, message: &impl prost::Message) -> Result<(), axum::Error> {
        if !self.headers_sent {
            self.headers_sent = true;
            let headers = metadata_frame(&[("content-type", "application/grpc-web+proto")]);
            self.socket.send(Message::Binary(headers)).await?;
        }
        let body = message.encode_to_vec();
        let mut frame = BytesMut::with_capacity(FRAME_HEADER + body.len());
        frame.put_u8(0);
        frame.put_u32(u32::try_from(body.len()).expect("a message under 4 GiB"));
        frame.extend_from_slice(&body);
        self.socket.send(Message::Binary(frame.freeze())).await
    }

    /// Resolves when the client closes the socket or it breaks (a cancelled call).
    /// Cancel-safe: anything else the client sends is ignored.
    pub async fn closed_by_client(&mut self) {
        while let Some(Ok(message)) = self.socket.recv().await {
            if matches!(message, Message::Close(_)) {
                return;
            }
        }
    }

    /// Ends the call with `status` (as trailers, or as a trailers-only answer) and closes.
    pub async fn finish(mut self, status: Status) {
        let code = (status.code() as i32).to_string();
        let message = percent_encode(status.message());
        let trailers = metadata_frame(&[("grpc-status", &code), ("grpc-message", &message)]);
        // The client may be gone already; there is no one left to tell.
        if self.socket.send(Message::Binary(trailers)).await.is_ok() {
            let _ = self.socket.send(Message::Close(None)).await;
        }
    }

    /// The payload of the client's next data message.
    async fn next_payload(&mut self) -> Result<Bytes, Status> {
        loop {
            match self.socket.recv().await {
                Some(Ok(Message::Binary(payload))) => return Ok(payload),
                Some(Ok(Message::Text(text))) => return Ok(Bytes::from(text.as_str().to_owned())),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(_))) | None => {
                    return Err(Status::cancelled("the client closed the call"))
                }
                Some(Err(e)) => {
                    return Err(Status::new(
                        Code::Cancelled,
                        format!("the call's socket broke: {e}"),
                    ))
                }
            }
        }
    }
}

/// The message in `buffer` once it holds one whole gRPC frame.
fn complete_message(buffer: &[u8]) -> Result<Option<Bytes>, Status> {
    let Some((header, body)) = buffer.split_first_chunk::<FRAME_HEADER>() else {
        return Ok(None);
    };
    if header[0] & FLAG_COMPRESSED != 0 {
        return Err(Status::unimplemented(
            "compressed request messages are not accepted; send them uncompressed",
        ));
    }
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if length > MAX_CALL_BYTES {
        return Err(too_big());
    }
    Ok((body.len() >= length).then(|| Bytes::copy_from_slice(&body[..length])))
}

fn too_big() -> Status {
    Status::resource_exhausted(format!(
        "a request of this call is at most {MAX_CALL_BYTES} bytes"
    ))
}

/// A grpc-web metadata frame of `fields`.
fn metadata_frame(fields: &[(&str, &str)]) -> Bytes {
    let lines: String = fields
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let mut frame = BytesMut::with_capacity(FRAME_HEADER + lines.len());
    frame.put_u8(FLAG_METADATA);
    frame.put_u32(u32::try_from(lines.len()).expect("metadata under 4 GiB"));
    frame.extend_from_slice(lines.as_bytes());
    frame.freeze()
}

/// `grpc-message`'s encoding (gRPC over HTTP/2 spec): bytes outside printable ASCII, and
/// `%`, as `%XX`.
fn percent_encode(message: &str) -> String {
    let mut encoded = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_is_header_lines_with_names_in_lower_case() {
        let metadata = Metadata::parse(b"X-Kiln-Build-Id: abc\r\nx-kiln-log-token:  f00 \r\n").unwrap();
        assert_eq!(metadata.get("x-kiln-build-id"), Some("abc"));
        assert_eq!(metadata.get("x-kiln-log-token"), Some("f00"));
        assert_eq!(metadata.get("other"), None);
        for bad in [&b"no colon\r\n"[..], b"name: \xff\r\n", b"name: a\x00b\r\n"] {
            assert_eq!(Metadata::parse(bad).unwrap_err().code(), Code::InvalidArgument);
        }
    }

    #[test]
    fn a_request_is_complete_when_its_frame_is() {
        let mut frame = vec![0, 0, 0, 0, 3, b'a', b'b'];
        assert_eq!(complete_message(&frame[..3]).unwrap(), None);
        assert_eq!(complete_message(&frame).unwrap(), None);
        frame.push(b'c');
        assert_eq!(complete_message(&frame).unwrap().unwrap(), &b"abc"[..]);
        frame[0] = FLAG_COMPRESSED;
        assert_eq!(complete_message(&frame).unwrap_err().code(), Code::Unimplemented);
        let huge = [0, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            complete_message(&huge).unwrap_err().code(),
            Code::ResourceExhausted
        );
    }

    #[test]
    fn frames_are_grpc_web_and_messages_percent_encoded() {
        let frame = metadata_frame(&[
            ("grpc-status", "5"),
            ("grpc-message", &percent_encode("no build 50% é\n")),
        ]);
        assert_eq!(frame[0], FLAG_METADATA);
        let text = std::str::from_utf8(&frame[FRAME_HEADER..]).unwrap();
        assert_eq!(
            u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize,
            text.len()
        );
        assert_eq!(
            text,
            "grpc-status: 5\r\ngrpc-message: no build 50%25 %C3%A9%0A\r\n"
        );
    }
}
