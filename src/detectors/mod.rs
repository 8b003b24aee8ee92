//! Detectors: the parts of the server that raise catalog events from what they observe, each
//! owning one concern (design.md, "Where each warning comes from"). They raise through
//! [`crate::engine::Engine::raise_and_settle`], so their events are classified, stored and
//! delivered like any other. Time comes from the engine's clock.
//!
//! - [`push`]: outcomes of push batches: KLSRV_GCM_DEVICE_ERROR, _HTTP_ERROR, _GENERAL_ERROR.
//! - [`capacity`]: free space of the data volume and size of the event database:
//!   KLSRV_NO_SPACE_ON_VOLUMES, KLSRV_NO_SPACE_IN_DATABASE.
//! - [`certificates`]: MDM and APNs certificates: KLSRV_CERTIFICATE_REQUESTED, _REMOVED,
//!   KLSRV_APN_CERTIFICATE_EXPIRES_SOON, _EXPIRED.
//! - [`licences`]: units in use per licence: KLSRV_EV_LICENSE_CHECK_90 / _100_110 / _MORE_110.
//! - [`updates`]: module updates awaiting approval: KLSRV_SEAMLESS_UPDATE_REGISTERED.

pub mod capacity;
pub mod certificates;
pub mod licences;
pub mod push;
pub mod updates;
