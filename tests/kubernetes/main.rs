//! Kiln on Kubernetes: the deployment in `deploy/` and the Kubernetes executor against a fake
//! API server.

#[path = "../support/mod.rs"]
mod support;

mod deploy;
mod executor;
mod fake_cluster;
mod fake_node;
