//! The framework's ceiling for the load benchmark: a bare tonic server implementing the same
//! `fleetevents.v1.EventService` with no work behind it. `Classify` answers a `Classification`
//! of the same size as fleet-events' (identity echoed, fixed classification), `Stream` answers
//! each event the same way, with reflection so `ghz` drives both servers with identical
//! commands. Run by `benches/load.sh` and `benches/tls_cost.sh`; usage:
//! `echo_server ADDR READY_FILE [CERT_PEM KEY_PEM]`. With a certificate and key it serves TLS
//! (tonic's rustls with the ring provider, ALPN h2, as fleet-events' client port does), so
//! the ceiling pays for the same encryption; without them, plaintext. It checks no credential
//! (a bearer token sent to it is ignored).

use std::pin::Pin;

use fleet_events::api::proto::event_service_server::{EventService, EventServiceServer};
use fleet_events::api::proto::{
    self, Classification, QueryEventsRequest, QueryEventsResponse, SubscribeRequest,
};
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

struct Echo;

fn answer(e: proto::Event) -> Classification {
    Classification {
        event_id: e.event_id,
        device_id: e.device_id,
        event_type: e.event_type,
        event_type_id: 4139,
        severity: proto::Severity::Warning as i32,
        display_name: "HTTP error sending the FCM message to the FCM server".into(),
        stored: true,
        known: true,
        occurred_at: e.occurred_at.or(Some(prost_types::Timestamp {
            seconds: 1_795_564_800,
            nanos: 0,
        })),
        received_at: Some(prost_types::Timestamp {
            seconds: 1_795_564_800,
            nanos: 0,
        }),
        origin: proto::Origin::Client as i32,
        outcome: proto::Outcome::Stored as i32,
        ..Default::default()
    }
}

type Answers = Pin<Box<dyn Stream<Item = Result<Classification, Status>> + Send>>;

#[tonic::async_trait]
impl EventService for Echo {
    async fn classify(
        &self,
        request: Request<proto::Event>,
    ) -> Result<Response<Classification>, Status> {
        Ok(Response::new(answer(request.into_inner())))
    }

    type StreamStream = Answers;

    async fn stream(
        &self,
        request: Request<Streaming<proto::Event>>,
    ) -> Result<Response<Answers>, Status> {
        let out = request.into_inner().map(|r| r.map(answer));
        Ok(Response::new(Box::pin(out)))
    }

    type SubscribeStream = Answers;

    async fn subscribe(&self, _: Request<SubscribeRequest>) -> Result<Response<Answers>, Status> {
        Err(Status::unimplemented("echo server"))
    }

    async fn query_events(
        &self,
        _: Request<QueryEventsRequest>,
    ) -> Result<Response<QueryEventsResponse>, Status> {
        Err(Status::unimplemented("echo server"))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".into());
    let ready = args.next();
    let tls = match (args.next(), args.next()) {
        (Some(cert), Some(key)) => Some(tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?),
        )),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let bound = listener.local_addr()?;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // ghz asks for the older v1alpha reflection service.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    if let Some(path) = ready {
        std::fs::write(&path, bound.to_string())?;
    }
    eprintln!(
        "echo server on {bound} ({})",
        if tls.is_some() { "TLS" } else { "plaintext" }
    );
    let incoming = TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(EventServiceServer::new(Echo))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
