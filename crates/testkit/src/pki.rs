//! A private certificate authority for the tests that need TLS: a CA, a server certificate it
//! signed for 127.0.0.1 and a client certificate it signed, written as PEM files.

use std::path::{Path, PathBuf};

use ketchup_test_redis::TlsFiles;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The PEM files of a private CA: its certificate, a server certificate it signed for
/// 127.0.0.1, and a client certificate it signed, each with its key.
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    /// Makes the CA and its certificates, written into `dir`.
    pub fn create(dir: &Path) -> TestPki {
        let ca_key = KeyPair::generate().expect("a CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.distinguished_name
            .push(DnType::CommonName, "ketchup-gateway test CA");
        let ca_pem = ca.self_signed(&ca_key).expect("a CA certificate").pem();
        let issuer = Issuer::new(ca, ca_key);

        let signed = |name: &str, names: Vec<String>, purpose| {
            let key = KeyPair::generate().expect("a key");
            let mut params = CertificateParams::new(names).expect("certificate parameters");
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![purpose];
            let cert = params
                .signed_by(&key, &issuer)
                .expect("a signed certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = signed(
            "127.0.0.1",
            vec!["127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = signed(
            "ketchup-gateway",
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        );

        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("a PEM file");
            path
        };
        TestPki {
            ca: write("ca.pem", &ca_pem),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
        }
    }

    /// The files a Redis speaking only TLS serves with: the server certificate, and the CA its
    /// clients must present a certificate of.
    pub fn redis_tls(&self) -> TlsFiles {
        TlsFiles {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            ca: self.ca.clone(),
        }
    }
}
