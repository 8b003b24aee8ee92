//! `fleet-events token`, `enroll-token`, `device` (administration of credentials, with an
//! admin token) and `enroll` (an agent's enrolment: a new key, a CSR, the signed certificate).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use fleet_events::api::proto::{
    self, access_service_client::AccessServiceClient,
    enrollment_service_client::EnrollmentServiceClient,
};
use fleet_events::auth::Role;

use super::{ServerArg, show_time};

/// `fleet-events token ...`
#[derive(clap::Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a named token with one role; prints its secret once.
    Create {
        #[command(flatten)]
        server: ServerArg,
        /// Unique name (A-Z a-z 0-9 _ . - @, at most 128).
        #[arg(long)]
        name: String,
        /// viewer, operator, admin or ingest.
        #[arg(long)]
        role: String,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Revoke a token by name: refused from its next call on.
    Revoke {
        #[command(flatten)]
        server: ServerArg,
        /// The token's name.
        name: String,
    },
}

/// `fleet-events enroll-token ...`
#[derive(clap::Subcommand, Debug)]
pub enum EnrollTokenCommand {
    /// Create an enrolment token; prints its secret once.
    Create {
        #[command(flatten)]
        server: ServerArg,
        /// Enrolments it allows.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it is valid, e.g. 1h, 7d.
        #[arg(long, default_value = "1d")]
        valid_for: humantime::Duration,
        /// A group or label recorded on its enrolments.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List enrolment tokens.
    List {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Revoke an enrolment token by id.
    Revoke {
        #[command(flatten)]
        server: ServerArg,
        /// The token's id (see `list`).
        id: String,
    },
}

/// `fleet-events device ...`
#[derive(clap::Subcommand, Debug)]
pub enum DeviceCommand {
    /// Revoke every certificate issued to a device until now.
    Revoke {
        #[command(flatten)]
        server: ServerArg,
        /// The device id.
        device_id: String,
    },
}

/// Flags of `enroll`.
#[derive(clap::Args, Debug)]
pub struct EnrollArgs {
    #[command(flatten)]
    server: ServerArg,
    /// The enrolment token an administrator created (also FLEET_EVENTS_ENROLL_TOKEN).
    #[arg(
        long = "enroll-token",
        env = "FLEET_EVENTS_ENROLL_TOKEN",
        hide_env_values = true
    )]
    enroll_token: String,
    /// The device id the certificate will carry.
    #[arg(long)]
    device_id: String,
    /// Where to write `device.pem`, `device.key` (mode 0600) and `ca.pem`.
    #[arg(long)]
    out: PathBuf,
}

fn role_name(n: i32) -> &'static str {
    match proto::Role::try_from(n) {
        Ok(proto::Role::Viewer) => "viewer",
        Ok(proto::Role::Operator) => "operator",
        Ok(proto::Role::Admin) => "admin",
        Ok(proto::Role::Ingest) => "ingest",
        _ => "-",
    }
}

pub async fn token(c: TokenCommand) -> anyhow::Result<()> {
    match c {
        TokenCommand::Create { server, name, role } => {
            let role = Role::parse(&role).with_context(|| {
                format!("--role {role:?}: use viewer, operator, admin or ingest")
            })?;
            let pb = match role {
                Role::Viewer => proto::Role::Viewer,
                Role::Operator => proto::Role::Operator,
                Role::Admin => proto::Role::Admin,
                Role::Ingest => proto::Role::Ingest,
            };
            let r = AccessServiceClient::new(server.connect().await?)
                .create_token(proto::CreateTokenRequest {
                    name,
                    role: pb as i32,
                })
                .await?
                .into_inner();
            eprintln!("token created; this is the only time its secret is shown:");
            println!("{}", r.token);
        }
        TokenCommand::List { server } => {
            let r = AccessServiceClient::new(server.connect().await?)
                .list_tokens(proto::ListTokensRequest::default())
                .await?
                .into_inner();
            let mut t = Table::new();
            t.load_preset(UTF8_BORDERS_ONLY)
                .set_header(["name", "role", "created", "by", "revoked"]);
            for k in r.tokens {
                t.add_row([
                    k.name,
                    role_name(k.role).to_owned(),
                    show_time(k.created_at.as_ref()),
                    k.created_by,
                    show_time(k.revoked_at.as_ref()),
                ]);
            }
            println!("{t}");
        }
        TokenCommand::Revoke { server, name } => {
            AccessServiceClient::new(server.connect().await?)
                .revoke_token(proto::RevokeTokenRequest { name: name.clone() })
                .await?;
            println!("revoked token {name}");
        }
    }
    Ok(())
}

pub async fn enroll_token(c: EnrollTokenCommand) -> anyhow::Result<()> {
    match c {
        EnrollTokenCommand::Create {
            server,
            uses,
            valid_for,
            label,
        } => {
            let valid: Duration = valid_for.into();
            let r = AccessServiceClient::new(server.connect().await?)
                .create_enrollment_token(proto::CreateEnrollmentTokenRequest {
                    uses,
                    valid_for_secs: valid.as_secs(),
                    label,
                })
                .await?
                .into_inner();
            let info = r.info.unwrap_or_default();
            eprintln!(
                "enrolment token {} created: {} use(s) until {}; its secret is shown once:",
                info.id,
                info.uses,
                show_time(info.expires_at.as_ref())
            );
            println!("{}", r.token);
        }
        EnrollTokenCommand::List { server } => {
            let r = AccessServiceClient::new(server.connect().await?)
                .list_enrollment_tokens(proto::ListEnrollmentTokensRequest::default())
                .await?
                .into_inner();
            let mut t = Table::new();
            t.load_preset(UTF8_BORDERS_ONLY)
                .set_header(["id", "label", "used", "expires", "revoked", "by"]);
            for k in r.tokens {
                t.add_row([
                    k.id,
                    k.label,
                    format!("{}/{}", k.used, k.uses),
                    show_time(k.expires_at.as_ref()),
                    show_time(k.revoked_at.as_ref()),
                    k.created_by,
                ]);
            }
            println!("{t}");
        }
        EnrollTokenCommand::Revoke { server, id } => {
            AccessServiceClient::new(server.connect().await?)
                .revoke_enrollment_token(proto::RevokeEnrollmentTokenRequest { id: id.clone() })
                .await?;
            println!("revoked enrolment token {id}");
        }
    }
    Ok(())
}

pub async fn device(c: DeviceCommand) -> anyhow::Result<()> {
    match c {
        DeviceCommand::Revoke { server, device_id } => {
            let r = AccessServiceClient::new(server.connect().await?)
                .revoke_device(proto::RevokeDeviceRequest { device_id })
                .await?
                .into_inner();
            println!(
                "revoked the certificates of {} issued until {}",
                r.device_id,
                show_time(r.revoked_at.as_ref())
            );
        }
    }
    Ok(())
}

pub async fn enroll(a: EnrollArgs) -> anyhow::Result<()> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, a.device_id.as_str());
    let csr = params.serialize_request(&key)?.pem()?;
    let mut options = a.server.options()?;
    options.token = None;
    let channel = fleet_events::client::connect(&a.server.server, &options).await?;
    let r = EnrollmentServiceClient::new(channel)
        .enroll(proto::EnrollRequest {
            token: a.enroll_token,
            device_id: a.device_id,
            csr_pem: csr,
        })
        .await?
        .into_inner();
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let write = |name: &str, text: &str, mode: u32| -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let p = a.out.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&p)
            .with_context(|| format!("cannot write {}", p.display()))?;
        f.write_all(text.as_bytes())?;
        Ok(())
    };
    write("device.key", &key.serialize_pem(), 0o600)?;
    write("device.pem", &r.certificate_pem, 0o644)?;
    write("ca.pem", &r.ca_pem, 0o644)?;
    println!(
        "enrolled {}: {} (valid until {}), key {}, CA {}",
        r.device_id,
        a.out.join("device.pem").display(),
        show_time(r.not_after.as_ref()),
        a.out.join("device.key").display(),
        a.out.join("ca.pem").display()
    );
    Ok(())
}
