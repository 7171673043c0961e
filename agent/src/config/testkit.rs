//! A registered data dir for unit tests: a vault CA made here, a host certificate for
//! `host/<id>` signed by it, and the files `agent register` would write.

use std::path::Path;
use std::time::Duration;

use siterecovery_certs::ca::ServerNames;
use siterecovery_certs::tls::PemIdentity;
use siterecovery_certs::{PeerIdentity, Role, VaultCa, VaultId};

use super::{AgentConfig, AgentFiles};

/// The CA of a test vault and a data dir registered with it.
pub struct Registered {
    pub ca: VaultCa,
    pub files: AgentFiles,
}

/// A host identity of `ca`'s vault.
pub fn host_id(ca: &VaultCa, id: &str) -> PeerIdentity {
    PeerIdentity::new(ca.vault_id().clone(), Role::Host, id).expect("identity")
}

/// A certificate and key for `id` from `ca`, valid for `validity`, names for 127.0.0.1.
pub fn issue(ca: &VaultCa, id: &PeerIdentity, validity: Duration) -> PemIdentity {
    let names = ServerNames::for_address("127.0.0.1:1").expect("names");
    let (cert_pem, key_pem) = ca.issue_local(id, &names, validity).expect("issue");
    PemIdentity { cert_pem, key_pem }
}

/// `dir` registered as host `id` (name `hv1`) of a new vault, provider at `provider`.
pub fn registered(dir: &Path, id: &str, provider: &str, validity: Duration) -> Registered {
    registered_with(dir, id, provider, |ca, who| issue(ca, who, validity))
}

/// [`registered`] with a certificate past two thirds of its life (100 s behind it, 20 s
/// left): its renewal is due.
pub fn registered_due(dir: &Path, id: &str, provider: &str) -> Registered {
    registered_with(dir, id, provider, |ca, who| {
        let now = time::OffsetDateTime::now_utc();
        let names = ServerNames::for_address("127.0.0.1:1").expect("names");
        let (cert_pem, key_pem) = ca
            .issue_local_between(who, &names, now - time::Duration::seconds(100), now + time::Duration::seconds(20))
            .expect("issue");
        PemIdentity { cert_pem, key_pem }
    })
}

fn registered_with(
    dir: &Path,
    id: &str,
    provider: &str,
    make: impl FnOnce(&VaultCa, &PeerIdentity) -> PemIdentity,
) -> Registered {
    let ca = VaultCa::create(VaultId::generate(), "test").expect("ca");
    let config = AgentConfig {
        host_id: id.into(),
        host_name: "hv1".into(),
        site: "primary".into(),
        cloud: "gold-a".into(),
        vault_id: ca.vault_id().to_string(),
        provider_address: provider.into(),
        listen_address: "127.0.0.1:1".into(),
        registered_unix: 0,
    };
    let identity = make(&ca, &host_id(&ca, id));
    AgentFiles::save(dir, &config, ca.cert_pem(), &identity).expect("save");
    let files = AgentFiles::load(dir).expect("load");
    Registered { ca, files }
}
