//! Mutual TLS end to end on 127.0.0.1: a tonic server configured by [`ClusterTls`] (health
//! service behind an interceptor that admits coordinators only) and clients holding different
//! credentials.

use std::path::Path;
use std::time::Duration;

use tessera_tls::{Authority, ClusterTls, Identity, MemberFiles, Role, TlsError};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::HealthServer;

fn member(dir: &Path, ca: &Authority, id: &Identity) -> ClusterTls {
    ca.issue_into(dir, id).expect("issue");
    ClusterTls::mutual(MemberFiles::in_dir(dir, id).load().expect("load"))
}

/// Serves health on 127.0.0.1 with `tls`; only coordinators pass the interceptor.
async fn serve(tls: ClusterTls) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("valid");
    let addr = listener.local_addr().expect("valid");
    let check = tls.clone();
    let service = HealthServer::with_interceptor(
        tonic_health::server::HealthService::from_health_reporter(
            tonic_health::server::HealthReporter::new(),
        ),
        move |req: tonic::Request<()>| {
            check.authorize(&req, &[Role::Coordinator])?;
            Ok(req)
        },
    );
    let mut builder = Server::builder();
    if let Some(cfg) = tls.server_tls() {
        builder = builder.tls_config(cfg).expect("valid");
    }
    tokio::spawn(
        builder
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

async fn check(tls: &ClusterTls, addr: std::net::SocketAddr) -> Result<(), tonic::Status> {
    let endpoint = tls
        .endpoint(&addr.to_string(), Role::Coordinator)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    let channel: Channel = endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(drop)
}

/// Ensures that a member certificate of the right role passes, one of another role is refused
/// with PERMISSION_DENIED naming it, and clients without a certificate of this cluster's CA
/// (none at all, or another CA's) never get past the handshake.
#[tokio::test]
async fn only_certified_members_of_the_allowed_role_get_in() {
    let dir = tempfile::tempdir().expect("valid");
    let (ca, created) = Authority::open_or_create(dir.path()).expect("valid");
    assert!(created);
    let server = member(dir.path(), &ca, &Identity::coordinator(1));
    let addr = serve(server).await;

    let coordinator = member(dir.path(), &ca, &Identity::coordinator(2));
    check(&coordinator, addr)
        .await
        .expect("a coordinator passes");

    let worker = member(
        dir.path(),
        &ca,
        &Identity::new(Role::Worker, "w0").expect("valid"),
    );
    let refused = check(&worker, addr).await.expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("worker w0"), "{refused:?}");

    let plain = check(&ClusterTls::insecure(), addr)
        .await
        .expect_err("refused");
    assert_ne!(plain.code(), tonic::Code::Ok);

    let other_dir = tempfile::tempdir().expect("valid");
    let (other_ca, _) = Authority::open_or_create(other_dir.path()).expect("valid");
    let stranger = member(other_dir.path(), &other_ca, &Identity::coordinator(2));
    let err = check(&stranger, addr).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}

/// Ensures that a client refuses a server whose certificate is for another role: a worker's
/// certificate cannot stand in for a coordinator.
#[tokio::test]
async fn a_server_of_the_wrong_role_is_refused() {
    let dir = tempfile::tempdir().expect("valid");
    let (ca, _) = Authority::open_or_create(dir.path()).expect("valid");
    let impostor = member(
        dir.path(),
        &ca,
        &Identity::new(Role::Worker, "w9").expect("valid"),
    );
    let addr = serve(impostor).await;
    let coordinator = member(dir.path(), &ca, &Identity::coordinator(1));
    let err = check(&coordinator, addr).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}

/// Ensures that start-up checks name the file at fault: a certificate from another CA, a key
/// that is not the certificate's, a missing file.
#[test]
fn bad_member_files_are_refused_at_start_up() {
    let dir = tempfile::tempdir().expect("valid");
    let (ca, _) = Authority::open_or_create(dir.path()).expect("valid");
    let w0 = Identity::new(Role::Worker, "w0").expect("valid");
    let w1 = Identity::new(Role::Worker, "w1").expect("valid");
    ca.issue_into(dir.path(), &w0).expect("valid");
    ca.issue_into(dir.path(), &w1).expect("valid");
    let good = MemberFiles::in_dir(dir.path(), &w0);
    assert_eq!(good.load().expect("valid").identity(), &w0);

    let swapped = MemberFiles {
        key: MemberFiles::in_dir(dir.path(), &w1).key,
        ..good.clone()
    };
    let err = swapped.load().expect_err("refused");
    assert!(matches!(err, TlsError::Mismatch { .. }), "{err}");
    assert!(err.to_string().contains("worker-w0.pem"), "{err}");

    let other = tempfile::tempdir().expect("valid");
    Authority::open_or_create(other.path()).expect("valid");
    let foreign_ca = MemberFiles {
        ca: other.path().join("ca.pem"),
        ..good.clone()
    };
    let err = foreign_ca.load().expect_err("refused");
    assert!(
        err.to_string().contains("was not issued by the CA"),
        "{err}"
    );

    let missing = MemberFiles::in_dir(dir.path(), &Identity::coordinator(7));
    let err = missing.load().expect_err("refused");
    assert!(matches!(err, TlsError::Io { .. }), "{err}");
    assert!(err.to_string().contains("coordinator-7.pem"), "{err}");
}

/// Ensures that issuing into a directory again keeps valid certificates, re-opens the same CA,
/// and writes keys readable by their owner only.
#[test]
fn issuing_again_keeps_what_is_valid() {
    let dir = tempfile::tempdir().expect("valid");
    let (ca, _) = Authority::open_or_create(dir.path()).expect("valid");
    let id = Identity::coordinator(1);
    let (path, written) = ca.issue_into(dir.path(), &id).expect("valid");
    assert!(written);
    let before = std::fs::read(&path).expect("valid");
    let (again, created) = Authority::open_or_create(dir.path()).expect("valid");
    assert!(!created);
    assert_eq!(again.cert_pem(), ca.cert_pem());
    let (_, written) = again.issue_into(dir.path(), &id).expect("valid");
    assert!(!written);
    assert_eq!(std::fs::read(&path).expect("valid"), before);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["ca.key", "coordinator-1.key"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .expect("valid")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{f} is readable by others: {mode:o}");
        }
    }
}
