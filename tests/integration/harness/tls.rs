//! A second PostgreSQL cluster that only accepts TLS connections, with a certificate
//! made for this test run: tenant databases for the `sslmode` tests.

use std::sync::OnceLock;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use super::postgres::{start_cluster, ClusterSetup, Server};

pub struct TlsServer {
    pub server: Server,
    /// PEM of the CA that signed the server's certificate.
    pub ca_pem: String,
    /// PEM of a CA that has nothing to do with the server.
    pub other_ca_pem: String,
}

static TLS_SERVER: OnceLock<TlsServer> = OnceLock::new();

/// The TLS-only cluster, started on first use. Its certificate names `localhost` and
/// `127.0.0.1`.
pub fn tls_server() -> &'static TlsServer {
    TLS_SERVER.get_or_init(|| {
        let (ca_pem, issuer) = certificate_authority("external-db-sync test CA");
        let (other_ca_pem, _) = certificate_authority("an unrelated CA");
        let server_key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server_cert = params.signed_by(&server_key, &issuer).unwrap();

        let setup = ClusterSetup {
            files: vec![
                ("server.crt", server_cert.pem()),
                ("server.key", server_key.serialize_pem()),
                // TLS or nothing: a plain connection is rejected, so a successful sync
                // proves the connection was encrypted.
                (
                    "pg_hba.conf",
                    "hostssl all all 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 reject\n"
                        .to_owned(),
                ),
            ],
            settings: vec![
                ("ssl", "on".to_owned()),
                ("ssl_cert_file", "{dir}/server.crt".to_owned()),
                ("ssl_key_file", "{dir}/server.key".to_owned()),
                ("hba_file", "{dir}/pg_hba.conf".to_owned()),
            ],
        };
        let (base_url, _socket_directory) = std::thread::spawn(move || start_cluster(&setup))
            .join()
            .expect("the TLS test cluster started");
        TlsServer {
            server: Server::without_template(base_url),
            ca_pem,
            other_ca_pem,
        }
    })
}

fn certificate_authority(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let certificate = params.self_signed(&key).unwrap();
    (certificate.pem(), Issuer::new(params, key))
}
