//! `tessera certs`: the cluster's CA and member certificates for local use, and the flags with
//! which every cluster process finds its own ([`ClusterTlsArgs`]).
//!
//! `tessera certs --dir D --coordinators 3 --workers w0,w1` creates `D/ca.pem` and `D/ca.key`
//! when `D` has no CA yet, then a certificate per member (`coordinator-1.pem` …,
//! `worker-w0.pem` …) and one for the operator's tools (`admin-operator.pem`). Running it again
//! adds what is missing and keeps what is valid. A process started with `--certs D` picks its
//! own files from `D` by role and name; `--cluster-ca/--cluster-cert/--cluster-key` name them
//! one by one instead (what a Kubernetes Secret per member mounts).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_tls::{Authority, ClusterTls, Identity, MemberFiles, Role};

/// The name of the operator identity `tessera certs` issues and admin commands use by default.
pub const OPERATOR: &str = "operator";

/// Arguments of `tessera certs`.
#[derive(Args, Debug)]
pub struct CertsArgs {
    /// The certificate directory (created if missing).
    #[arg(long, env = "TESSERA_CERTS")]
    pub dir: PathBuf,
    /// Coordinators to certify: ids 1 to N.
    #[arg(long, default_value_t = 0)]
    pub coordinators: u64,
    /// Workers to certify, by name (comma-separated; each 1–63 of a-z, 0-9, '-'). A worker
    /// registers under its certificate's name.
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<String>,
    /// The operator identity for `tessera cluster …` (admin role).
    #[arg(long, default_value = OPERATOR)]
    pub admin: String,
    /// Also issue the public API's server certificate (`public.pem`, `public.key`, for
    /// `tessera coordinator --tls-cert/--tls-key`) for these host names or IP addresses
    /// (comma-separated); clients trust `ca.pem` (`$TESSERA_CA`). Replaced on every run.
    #[arg(long, value_delimiter = ',')]
    pub public: Vec<String>,
}

/// Runs `tessera certs`, printing each file written or kept.
///
/// # Errors
/// On a bad name, or when the directory cannot be read or written.
pub fn run(args: &CertsArgs) -> Result<()> {
    let mut members: Vec<Identity> = (1..=args.coordinators).map(Identity::coordinator).collect();
    for w in &args.workers {
        members.push(Identity::new(Role::Worker, w.trim()).context("--workers")?);
    }
    members.push(Identity::new(Role::Admin, &args.admin).context("--admin")?);
    let (ca, created, report) = issue(&args.dir, &members)?;
    println!(
        "{} CA {}",
        if created { "created" } else { "kept" },
        args.dir.join(tessera_tls::CA_CERT).display()
    );
    for (path, written) in report {
        println!(
            "{} {}",
            if written { "wrote" } else { "kept" },
            path.display()
        );
    }
    if !args.public.is_empty() {
        let names: Vec<String> = args.public.iter().map(|n| n.trim().to_owned()).collect();
        let path = ca
            .issue_public_into(&args.dir, &names)
            .context("--public")?;
        println!("wrote {} (for {})", path.display(), names.join(", "));
    }
    Ok(())
}

/// A CA, whether it was just created, and each certificate issued or kept (its path, and
/// whether it was written).
pub type IssueReport = (Authority, bool, Vec<(PathBuf, bool)>);

/// Makes sure `dir` holds a CA and a valid certificate for each of `members`.
///
/// # Errors
/// When the directory cannot be read or written.
pub fn issue(dir: &Path, members: &[Identity]) -> Result<IssueReport> {
    let (ca, created) = Authority::open_or_create(dir)
        .with_context(|| format!("the cluster CA in {}", dir.display()))?;
    let mut report = Vec::with_capacity(members.len());
    for m in members {
        report.push(
            ca.issue_into(dir, m)
                .with_context(|| format!("issuing a certificate for {m}"))?,
        );
    }
    Ok((ca, created, report))
}

/// How a cluster process proves who it is on the cluster protocol.
#[derive(Args, Debug, Clone, Default)]
pub struct ClusterTlsArgs {
    /// A directory made by `tessera certs`: this process uses ca.pem and its own
    /// <role>-<name>.pem / .key (coordinators by --id, workers by --name).
    #[arg(long, env = "TESSERA_CERTS")]
    pub certs: Option<PathBuf>,
    /// The cluster CA's certificate (instead of --certs).
    #[arg(long, env = "TESSERA_CLUSTER_CA", requires_all = ["cluster_cert", "cluster_key"])]
    pub cluster_ca: Option<PathBuf>,
    /// This process's certificate (instead of --certs).
    #[arg(long, env = "TESSERA_CLUSTER_CERT", requires_all = ["cluster_ca", "cluster_key"])]
    pub cluster_cert: Option<PathBuf>,
    /// This process's private key (instead of --certs).
    #[arg(long, env = "TESSERA_CLUSTER_KEY", requires_all = ["cluster_ca", "cluster_cert"])]
    pub cluster_key: Option<PathBuf>,
    /// Speak the cluster protocol in the clear and admit every caller: anyone who can reach the
    /// cluster port can then register workers, send Raft messages and read prompts. For
    /// debugging on a closed machine only; logs a warning.
    #[arg(long, conflicts_with_all = ["certs", "cluster_ca", "cluster_cert", "cluster_key"])]
    pub insecure_cluster: bool,
}

impl ClusterTlsArgs {
    /// The credentials of `identity` (whose files `--certs` names), checked.
    ///
    /// # Errors
    /// When no credentials and no `--insecure-cluster` are given, or the files are missing or
    /// do not check out (the message names the file).
    pub fn load(&self, identity: &Identity) -> Result<ClusterTls> {
        if self.insecure_cluster {
            return Ok(ClusterTls::insecure());
        }
        let files = match (&self.cluster_ca, &self.cluster_cert, &self.cluster_key) {
            (Some(ca), Some(cert), Some(key)) => MemberFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => match &self.certs {
                Some(dir) => MemberFiles::in_dir(dir, identity),
                None => bail!(
                    "the cluster protocol needs this process's certificate: pass --certs DIR \
                     (made by `tessera certs`) or --cluster-ca/--cluster-cert/--cluster-key; \
                     --insecure-cluster runs it in the clear, with no checks"
                ),
            },
        };
        let member = files.load().context("the cluster certificate")?;
        if self.certs.is_some() && member.identity() != identity {
            bail!(
                "{} names {}, not {identity}",
                files.cert.display(),
                member.identity()
            );
        }
        if member.identity().role() != identity.role() {
            bail!(
                "{} is a {} certificate; this process needs a {}'s",
                files.cert.display(),
                member.identity().role(),
                identity.role()
            );
        }
        Ok(ClusterTls::mutual(member))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that a process without credentials is refused unless it asks for the clear, and
    /// that `--certs` picks the file of the process's own identity and refuses another's.
    #[test]
    fn credentials_are_required_and_must_be_ones_own() {
        let none = ClusterTlsArgs::default();
        let err = none.load(&Identity::coordinator(1)).expect_err("refused");
        assert!(format!("{err:#}").contains("--insecure-cluster"), "{err:#}");
        let insecure = ClusterTlsArgs {
            insecure_cluster: true,
            ..Default::default()
        };
        assert!(
            !insecure
                .load(&Identity::coordinator(1))
                .expect("test setup")
                .is_mutual()
        );

        let dir = tempfile::tempdir().expect("test setup");
        let w0 = Identity::new(Role::Worker, "w0").expect("test setup");
        issue(dir.path(), &[Identity::coordinator(1), w0.clone()]).expect("test setup");
        let certs = ClusterTlsArgs {
            certs: Some(dir.path().to_owned()),
            ..Default::default()
        };
        let tls = certs.load(&Identity::coordinator(1)).expect("test setup");
        assert_eq!(tls.identity(), Some(&Identity::coordinator(1)));
        let err = certs.load(&Identity::coordinator(2)).expect_err("refused");
        assert!(format!("{err:#}").contains("coordinator-2.pem"), "{err:#}");

        let explicit = ClusterTlsArgs {
            cluster_ca: Some(dir.path().join("ca.pem")),
            cluster_cert: Some(dir.path().join("worker-w0.pem")),
            cluster_key: Some(dir.path().join("worker-w0.key")),
            ..Default::default()
        };
        let err = explicit
            .load(&Identity::coordinator(1))
            .expect_err("refused");
        assert!(
            format!("{err:#}").contains("is a worker certificate"),
            "{err:#}"
        );
        let tls = explicit
            .load(&Identity::new(Role::Worker, "anything").expect("test setup"))
            .expect("test setup");
        assert_eq!(tls.identity(), Some(&w0));
    }
}
