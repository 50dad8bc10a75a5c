//! The API server's TLS, as a cluster's: a CA of the fake's own, a serving certificate for
//! `127.0.0.1` signed by it, and the CA in the kubeconfig as `certificate-authority-data`
//! (<https://kubernetes.io/docs/concepts/configuration/organize-cluster-access-kubeconfig/>;
//! <https://kubernetes.io/docs/reference/config-api/kubeconfig.v1/#Cluster>). A client must
//! verify the server against that CA, as against a real cluster: one that trusts only the
//! system roots, or speaks plain HTTP, gets nowhere.

use std::{io, net::SocketAddr, sync::Arc};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{net::TcpStream, sync::mpsc};
use tokio_rustls::{server::TlsStream, TlsAcceptor};

/// The fake's CA and serving certificate.
pub struct ServerTls {
    /// The CA certificate, PEM: what the kubeconfig carries.
    pub ca_pem: String,
    /// The same, DER.
    pub ca_der: Vec<u8>,
    config: Arc<rustls::ServerConfig>,
}

impl ServerTls {
    pub fn generate() -> Self {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "fake-kube-ca");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let (ca_pem, ca_der) = (ca_cert.pem(), ca_cert.der().to_vec());
        let issuer = Issuer::new(ca, ca_key);

        // The API server's serving certificate names the addresses clients dial.
        let mut serving =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        serving.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = serving.signed_by(&key, &issuer).unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        Self {
            ca_pem,
            ca_der,
            config: Arc::new(config),
        }
    }

    /// A listener for `axum::serve` that hands over connections once their TLS handshake is
    /// done; handshakes run apart, so a client that stalls in one delays no other.
    pub fn listen(&self, tcp: tokio::net::TcpListener) -> TlsListener {
        let local = tcp.local_addr().expect("fake kube address");
        let acceptor = TlsAcceptor::from(self.config.clone());
        let (ready, accepted) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = tcp.accept().await else {
                    continue;
                };
                let (acceptor, ready) = (acceptor.clone(), ready.clone());
                tokio::spawn(async move {
                    // A failed handshake (a plain-HTTP client, an untrusting one) is the
                    // client's problem, as on a real API server.
                    if let Ok(tls) = acceptor.accept(stream).await {
                        let _ = ready.send((tls, peer)).await;
                    }
                });
            }
        });
        TlsListener { local, accepted }
    }
}

pub struct TlsListener {
    local: SocketAddr,
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            // The accept loop never ends while the runtime runs.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// A client configuration that trusts only the cluster's CA (`ca_der`).
pub fn client_config(ca_der: &[u8]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec())).unwrap();
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}
