//! The one table of who may call what. Every RPC of the client port is here; the API layer
//! looks the method up before any handler runs (see `api::auth`), and a test walks the whole
//! table. The README's authorisation table is this table.

use super::Role;
use Role::*;

/// Who may call one RPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Callers {
    /// Anyone, without a credential (health, reflection, enrolment: its token is in the request).
    Open,
    /// No caller on this port, for the reason given.
    Nobody(&'static str),
    /// Tokens of these roles, and device certificates when `device` is true.
    Allowed {
        /// The bearer-token roles allowed.
        roles: &'static [Role],
        /// Whether a device certificate may call it (for its own device only, where the
        /// request names a device).
        device: bool,
    },
}

const VIEW: Callers = Callers::Allowed {
    roles: &[Viewer, Operator, Admin],
    device: false,
};
const OPERATE: Callers = Callers::Allowed {
    roles: &[Operator, Admin],
    device: false,
};
const ADMIN: Callers = Callers::Allowed {
    roles: &[Admin],
    device: false,
};
const REPORT: Callers = Callers::Allowed {
    roles: &[Ingest, Admin],
    device: false,
};
const DEVICE_REPORT: Callers = Callers::Allowed {
    roles: &[Ingest, Admin],
    device: true,
};
const DEVICE_ONLY: Callers = Callers::Allowed {
    roles: &[],
    device: true,
};
const ANY_CREDENTIAL: Callers = Callers::Allowed {
    roles: &[Viewer, Operator, Admin, Ingest],
    device: true,
};

/// Every RPC of the client port: (service, method, callers).
pub const TABLE: &[(&str, &str, Callers)] = &[
    ("fleetevents.v1.EventService", "Classify", DEVICE_REPORT),
    ("fleetevents.v1.EventService", "Stream", DEVICE_REPORT),
    ("fleetevents.v1.EventService", "Subscribe", VIEW),
    ("fleetevents.v1.EventService", "QueryEvents", VIEW),
    ("fleetevents.v1.CatalogService", "ListEventTypes", VIEW),
    ("fleetevents.v1.CatalogService", "GetEventType", VIEW),
    ("fleetevents.v1.CatalogService", "RegisterEventType", ADMIN),
    (
        "fleetevents.v1.CatalogService",
        "UpdateEventTypeSettings",
        ADMIN,
    ),
    (
        "fleetevents.v1.DeviceService",
        "ReportHeartbeat",
        DEVICE_REPORT,
    ),
    ("fleetevents.v1.DeviceService", "GetDevice", VIEW),
    ("fleetevents.v1.DeviceService", "ListDevices", VIEW),
    ("fleetevents.v1.DeviceService", "CheckDevices", OPERATE),
    (
        "fleetevents.v1.DeviceService",
        "ListFrequentEventBlocks",
        VIEW,
    ),
    (
        "fleetevents.v1.DeviceService",
        "UnblockFrequentEvent",
        OPERATE,
    ),
    (
        "fleetevents.v1.DeviceService",
        "BlockFrequentEventAgain",
        OPERATE,
    ),
    (
        "fleetevents.v1.DeviceService",
        "RemoveFrequentEventBlock",
        OPERATE,
    ),
    ("fleetevents.v1.PushService", "ReportPushBatch", REPORT),
    ("fleetevents.v1.CapacityService", "CheckCapacity", OPERATE),
    (
        "fleetevents.v1.CapacityService",
        "UpdateCapacitySettings",
        ADMIN,
    ),
    ("fleetevents.v1.UpdateService", "RegisterUpdate", REPORT),
    ("fleetevents.v1.UpdateService", "ApproveUpdate", ADMIN),
    ("fleetevents.v1.UpdateService", "RejectUpdate", ADMIN),
    ("fleetevents.v1.UpdateService", "ListUpdates", VIEW),
    (
        "fleetevents.v1.CertificateService",
        "PutMdmCertificate",
        ADMIN,
    ),
    (
        "fleetevents.v1.CertificateService",
        "RemoveMdmCertificate",
        ADMIN,
    ),
    (
        "fleetevents.v1.CertificateService",
        "ReportReissueFailure",
        REPORT,
    ),
    (
        "fleetevents.v1.CertificateService",
        "ListMdmCertificates",
        VIEW,
    ),
    (
        "fleetevents.v1.CertificateService",
        "UploadApnsCertificate",
        ADMIN,
    ),
    (
        "fleetevents.v1.CertificateService",
        "CheckCertificates",
        OPERATE,
    ),
    ("fleetevents.v1.LicenceService", "PutLicence", ADMIN),
    ("fleetevents.v1.LicenceService", "ListLicences", VIEW),
    ("fleetevents.v1.LicenceService", "CheckLicences", OPERATE),
    ("fleetevents.v1.NotificationService", "PutChannel", ADMIN),
    ("fleetevents.v1.NotificationService", "ListChannels", ADMIN),
    ("fleetevents.v1.NotificationService", "RemoveChannel", ADMIN),
    (
        "fleetevents.v1.NotificationService",
        "TestNotification",
        ADMIN,
    ),
    ("fleetevents.v1.SiemService", "PutDestination", ADMIN),
    ("fleetevents.v1.SiemService", "ListDestinations", ADMIN),
    ("fleetevents.v1.SiemService", "RemoveDestination", ADMIN),
    ("fleetevents.v1.SiemService", "TestDestination", ADMIN),
    (
        "fleetevents.v1.HierarchyService",
        "Relay",
        Callers::Nobody(
            "secondaries relay on the hierarchy listener (mutual TLS with a server certificate), not on the client port",
        ),
    ),
    ("fleetevents.v1.HierarchyService", "ListSecondaries", VIEW),
    ("fleetevents.v1.HierarchyService", "GetUplinkStatus", VIEW),
    ("fleetevents.v1.AccessService", "CreateToken", ADMIN),
    ("fleetevents.v1.AccessService", "ListTokens", ADMIN),
    ("fleetevents.v1.AccessService", "RevokeToken", ADMIN),
    (
        "fleetevents.v1.AccessService",
        "CreateEnrollmentToken",
        ADMIN,
    ),
    (
        "fleetevents.v1.AccessService",
        "ListEnrollmentTokens",
        ADMIN,
    ),
    (
        "fleetevents.v1.AccessService",
        "RevokeEnrollmentToken",
        ADMIN,
    ),
    ("fleetevents.v1.AccessService", "RevokeDevice", ADMIN),
    ("fleetevents.v1.AccessService", "WhoAmI", ANY_CREDENTIAL),
    ("fleetevents.v1.EnrollmentService", "Enroll", Callers::Open),
    ("fleetevents.v1.EnrollmentService", "Renew", DEVICE_ONLY),
];

/// Services open to everyone: standard health checks and server reflection.
pub const OPEN_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Who may call the gRPC method at `path` (`/package.Service/Method`). A path not in the
/// table needs any valid credential (the router then answers UNIMPLEMENTED).
pub fn callers(path: &str) -> Callers {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return ANY_CREDENTIAL;
    };
    if OPEN_SERVICES.contains(&service) {
        return Callers::Open;
    }
    TABLE
        .iter()
        .find(|(s, m, _)| *s == service && *m == method)
        .map(|(_, _, c)| *c)
        .unwrap_or(ANY_CREDENTIAL)
}

/// Whether the table has an entry for `service`/`method`.
pub fn listed(service: &str, method: &str) -> bool {
    TABLE.iter().any(|(s, m, _)| *s == service && *m == method)
}

/// The callers in words, for error messages and the README.
pub fn describe(c: &Callers) -> String {
    match c {
        Callers::Open => "anyone".into(),
        Callers::Nobody(_) => "nobody on this port".into(),
        Callers::Allowed { roles, device } => {
            let mut parts: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            if *device {
                parts.push("device certificate (own device)");
            }
            parts.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        assert_eq!(callers("/grpc.health.v1.Health/Check"), Callers::Open);
        assert_eq!(
            callers("/fleetevents.v1.CatalogService/RegisterEventType"),
            ADMIN
        );
        assert_eq!(callers("/fleetevents.v1.EventService/Nope"), ANY_CREDENTIAL);
        assert_eq!(callers("garbage"), ANY_CREDENTIAL);
        assert!(matches!(
            callers("/fleetevents.v1.HierarchyService/Relay"),
            Callers::Nobody(_)
        ));
    }
}
