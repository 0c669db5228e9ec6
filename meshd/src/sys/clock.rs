//! The wall clock (I/O shell): the one place the I/O threads read `now` from. The
//! sans-IO cores never read a clock (clippy.toml); they take this value as an argument.

use mesh_proto::time::UnixTime;

/// Wall-clock seconds. The I/O shell is where the clock is read.
#[allow(clippy::disallowed_methods)] // I/O shell: the one place `now` comes from
pub fn unix_now() -> UnixTime {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    UnixTime(secs)
}
