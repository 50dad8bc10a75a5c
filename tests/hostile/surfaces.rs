//! Issue 9, points 10 and 12: Kiln's own surfaces (the embedded registry, the data dir, git
//! configuration from requests, upload sessions, cache mounts) are closed to builds.
