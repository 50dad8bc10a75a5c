//! Kiln as image-builder-mk3's successor, driven the way Gitpod's server drives mk3 (issue
//! 10): the real `kiln serve` binary, a client generated from Kiln's copy of Gitpod's protos
//! (`proto/`, equal on the wire), and the call sequences of `components/server`'s
//! `workspace-starter.ts`. Each test names the sequence it replays and how it ends on mk3.

#[path = "../support/mod.rs"]
mod support;

// Shared with the service suite, of which this one uses a part.
#[allow(dead_code)]
#[path = "../service/common.rs"]
mod common;

mod auth;
mod base_ref;
mod calls;
mod config;
mod logs;
mod mistakes;
mod shutdown;
mod starts;
mod warm;
