//! Issue 9, points 1–4 and 9: every path a Dockerfile, context or archive names is resolved
//! inside its root. Each test asserts a clear refusal or confinement, and that sentinel files
//! around the data dir, `/tmp` and `/root` are unchanged.
