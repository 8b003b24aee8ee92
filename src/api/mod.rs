//! The gRPC layer, and the only place that knows tonic: each service converts the request
//! ([`convert`]), calls the [`crate::engine::Engine`], and converts the answer; every error
//! becomes a `Status` in [`status`].

pub mod access;
pub mod auth;
pub mod capacity;
pub mod catalog;
pub mod certificates;
pub mod convert;
pub mod devices;
pub mod events;
pub mod guard;
pub mod hierarchy;
pub mod licences;
pub mod notify;
pub mod paging;
pub mod push;
pub mod relay_client;
pub mod siem;
pub mod status;
pub mod updates;
pub mod validate;

/// The generated protobuf and tonic code of `proto/fleetevents/v1/fleetevents.proto`.
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("fleetevents.v1");

    /// The encoded descriptors of the contract (with its imports), served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/fleetevents_descriptor.bin"));
}
