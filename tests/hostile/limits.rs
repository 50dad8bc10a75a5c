//! Issue 9, point 11: limits. Huge logs, sparse archive entries, ARG expansion bombs and queue
//! time are bounded, and the service stays healthy.
