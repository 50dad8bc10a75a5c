//! An OpenTelemetry collector of our own for the trace tests: an OTLP/gRPC
//! `opentelemetry.proto.collector.trace.v1.TraceService/Export` server on a free loopback
//! port (the `opentelemetry-proto` crate's generated server), keeping every export request
//! it receives. Tests point `telemetry.otlp_endpoint` at [`OtlpCollector::endpoint`] and read
//! the spans back ([`OtlpCollector::spans`]) or search the requests' protobuf encoding
//! ([`OtlpCollector::encoded`]).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value, AnyValue},
};
use prost::Message as _;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

/// One received span, flattened: ids in lowercase hex (`parent_span_id` empty for a root),
/// attributes as text.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    pub attributes: BTreeMap<String, String>,
    /// The `service.name` of the resource that sent it.
    pub service_name: String,
    /// The W3C `tracestate` the span carries.
    pub trace_state: String,
    /// `0` unset, `1` ok, `2` error.
    pub status_code: i32,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running collector; stops when dropped.
pub struct OtlpCollector {
    addr: SocketAddr,
    received: Received,
    _stop: oneshot::Sender<()>,
}

impl OtlpCollector {
    /// Starts the collector on the current tokio runtime.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the collector's port");
        let addr = listener.local_addr().unwrap();
        let received = Received::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received.clone()))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            });
        tokio::spawn(async move {
            if let Err(e) = server.await {
                panic!("the OTLP collector failed: {e}");
            }
        });
        Self {
            addr,
            received,
            _stop: stop,
        }
    }

    /// What `telemetry.otlp_endpoint` is set to.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, in the order received.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        let requests = self.received.0.lock().unwrap();
        let mut spans = Vec::new();
        for request in requests.iter() {
            for resource_spans in &request.resource_spans {
                let service_name = resource_spans
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                    .map(|kv| text(kv.value.as_ref()))
                    .unwrap_or_default();
                for scope in &resource_spans.scope_spans {
                    for span in &scope.spans {
                        spans.push(ReceivedSpan {
                            trace_id: hex::encode(&span.trace_id),
                            span_id: hex::encode(&span.span_id),
                            parent_span_id: hex::encode(&span.parent_span_id),
                            name: span.name.clone(),
                            attributes: span
                                .attributes
                                .iter()
                                .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                                .collect(),
                            service_name: service_name.clone(),
                            trace_state: span.trace_state.clone(),
                            status_code: span.status.as_ref().map_or(0, |s| s.code),
                        });
                    }
                }
            }
        }
        spans
    }

    /// The protobuf encoding of every export request received (what came over the wire,
    /// decoded and encoded again: the same fields, byte for byte in their values).
    pub fn encoded(&self) -> Vec<Vec<u8>> {
        let requests = self.received.0.lock().unwrap();
        requests.iter().map(|r| r.encode_to_vec()).collect()
    }

    /// The spans once `done` says they are complete, polling for up to `within`; panics with
    /// what was received otherwise.
    pub async fn wait_for(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + within;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what}: not received within {within:?}; received:\n{}",
                    outline(&spans)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// An attribute value as text (strings as they are, numbers and booleans printed).
fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// One line per span (trace, id, parent, name, attributes), for failure messages.
pub fn outline(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {} <- {:16} {} {:?}",
                s.trace_id, s.span_id, s.parent_span_id, s.name, s.attributes
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
