//! Gitpod's server reading a build log through a supervisor's API: grpc-web over a
//! WebSocket, framed byte for byte as `components/server/src/util/grpc-web-ws-transport.ts`
//! (Gitpod's copy of improbable-eng's WebSocket transport) and parsed as improbable-eng's
//! `ChunkParser` and `client.ts` do. The URL is `log_info.url` with its path replaced by
//! `/_supervisor/v1` (`toSupervisorURL` in `headless-log-service.ts`), then
//! `/<package.Service>/<Method>`.

use std::collections::HashMap;

use futures::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest as _, http::HeaderValue, Message};

/// A call's answer as the grpc-web client sees it.
#[derive(Debug, Default)]
pub struct Reply {
    /// The first metadata frame.
    pub headers: Option<HashMap<String, String>>,
    /// The message frames, in order.
    pub messages: Vec<Vec<u8>>,
    /// `grpc-status` and decoded `grpc-message`: from the trailers, or from the headers of a
    /// trailers-only answer.
    pub status: Option<(i32, String)>,
    /// Whether the server sent the subprotocol back (the `ws` library refuses a socket
    /// without it).
    pub subprotocol: bool,
}

/// The supervisor URL of a `log_info.url` for `method` (`supervisor.StatusService/TasksStatus`).
pub fn supervisor_url(log_url: &str, method: &str) -> String {
    let (scheme, rest) = log_url.split_once("://").expect("an absolute URL");
    let host = rest.split('/').next().unwrap();
    let scheme = if scheme == "https" { "wss" } else { "ws" };
    format!("{scheme}://{host}/_supervisor/v1/{method}")
}

/// Calls `method` with `request` and `headers` (sent on the upgrade and as the call's
/// metadata, as Gitpod does) and reads the answer to the socket's close.
pub async fn call(
    log_url: &str,
    method: &str,
    headers: &HashMap<String, String>,
    request: &impl prost::Message,
) -> Reply {
    let mut frame = vec![0u8, 0];
    let body = request.encode_to_vec();
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    let metadata: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    call_raw(
        &supervisor_url(log_url, method),
        headers,
        vec![metadata.into_bytes(), frame, vec![1]],
    )
    .await
}

/// Opens the socket with `headers` on the upgrade, sends `sent` as binary messages, and
/// reads the answer to the close.
pub async fn call_raw(url: &str, headers: &HashMap<String, String>, sent: Vec<Vec<u8>>) -> Reply {
    let mut upgrade = url.into_client_request().unwrap();
    upgrade.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("grpc-websockets"),
    );
    for (name, value) in headers {
        upgrade.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    let (mut socket, response) = tokio_tungstenite::connect_async(upgrade)
        .await
        .unwrap_or_else(|e| panic!("WebSocket to {url}: {e}"));
    let mut reply = Reply {
        subprotocol: response
            .headers()
            .get("sec-websocket-protocol")
            .is_some_and(|p| p == "grpc-websockets"),
        ..Default::default()
    };
    for message in sent {
        if socket.send(Message::binary(message)).await.is_err() {
            break;
        }
    }
    let mut buffer = Vec::new();
    while let Some(Ok(message)) = socket.next().await {
        let Message::Binary(bytes) = message else { continue };
        buffer.extend_from_slice(&bytes);
        while buffer.len() >= 5 {
            let length = u32::from_be_bytes(buffer[1..5].try_into().unwrap()) as usize;
            if buffer.len() < 5 + length {
                break;
            }
            let frame: Vec<u8> = buffer.drain(..5 + length).collect();
            let payload = frame[5..].to_vec();
            if frame[0] & 0x80 == 0 {
                reply.messages.push(payload);
            } else {
                let fields = parse_metadata(&payload);
                if reply.headers.is_none() {
                    reply.status = status_of(&fields);
                    reply.headers = Some(fields);
                } else {
                    reply.status = status_of(&fields);
                }
            }
        }
    }
    reply
}

fn parse_metadata(payload: &[u8]) -> HashMap<String, String> {
    let text = std::str::from_utf8(payload).expect("metadata is ASCII");
    text.split("\r\n")
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once(':').expect("name: value");
            (k.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect()
}

fn status_of(fields: &HashMap<String, String>) -> Option<(i32, String)> {
    let code = fields.get("grpc-status")?.parse().expect("a numeric grpc-status");
    let message = fields
        .get("grpc-message")
        .map(|m| percent_decode(m))
        .unwrap_or_default();
    Some((code, message))
}

fn percent_decode(text: &str) -> String {
    let mut bytes = Vec::new();
    let mut rest = text.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' && tail.len() >= 2 {
            bytes.push(u8::from_str_radix(std::str::from_utf8(&tail[..2]).unwrap(), 16).unwrap());
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).unwrap()
}
