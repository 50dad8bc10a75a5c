//! Issue 9, points 5–8 and 11 (RUN's side): what a RUN step can reach. Each test runs a
//! Dockerfile on a real `kiln serve` and asserts confinement from inside and outside.
