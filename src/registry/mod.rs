//! Talking OCI distribution: a client (resolve, exists, copy) and an embedded server.
